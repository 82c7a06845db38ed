"""HuggingFace checkpoint I/O: load a Qwen2/Qwen3 directory into `Transformer`, save one back.

A checkpoint directory holds `config.json` and either `model.safetensors` or shards listed by
`model.safetensors.index.json` (`{"weight_map": {tensor name: shard file}}`). Names differ from ours
only by a fixed rename, written out once in `WEIGHT_MAP` (`{}` stands for the layer index).

Loading builds the model on the `meta` device (no memory, no random init) and assigns the file's
tensors as parameters, so the weights are materialised once (on CPU, tensors already in `dtype` stay
private copy-on-write mappings of the file: pages load when first touched). Saving writes to a
temporary directory and moves `config.json` into place last: a crash never leaves a checkpoint that
looks complete. A write that fails because the disk is full raises `DiskFullError` naming the path,
after removing its temporary directory: the previous checkpoint stays as it was.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from model.config import ModelConfig
from model.transformer import Transformer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# HF name -> our name; `{}` is the layer index.
WEIGHT_MAP = {
    "model.embed_tokens.weight": "embed_tokens.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.attn_norm.weight",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attn.q_proj.weight",
    "model.layers.{}.self_attn.q_proj.bias": "layers.{}.attn.q_proj.bias",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.attn.k_proj.weight",
    "model.layers.{}.self_attn.k_proj.bias": "layers.{}.attn.k_proj.bias",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.attn.v_proj.weight",
    "model.layers.{}.self_attn.v_proj.bias": "layers.{}.attn.v_proj.bias",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attn.o_proj.weight",
    "model.layers.{}.self_attn.q_norm.weight": "layers.{}.attn.q_norm.weight",
    "model.layers.{}.self_attn.k_norm.weight": "layers.{}.attn.k_norm.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.mlp_norm.weight",
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.mlp.gate_proj.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.mlp.up_proj.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.mlp.down_proj.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
}
LOCAL_TO_HF = {local: hf for hf, local in WEIGHT_MAP.items()}
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
EXPORT_TEMP_INFIX = ".tmp-"  # save_pretrained writes <parent>/.<name>.tmp-XXXXXXXX, then moves files into <name>
_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def _rename(name: str, table: dict[str, str]) -> str | None:
    """Map a name through `table`, carrying the layer index; None if the name is not in the table."""
    match = _LAYER_INDEX.search(name)
    key = _LAYER_INDEX.sub(".{}.", name, count=1) if match else name
    if key not in table:
        return None
    return table[key].format(match.group(1)) if match else table[key]


def hf_to_local(name: str) -> str | None:
    return _rename(name, WEIGHT_MAP)


def local_to_hf(name: str) -> str:
    return _rename(name, LOCAL_TO_HF)


class DiskFullError(OSError, ValueError):
    """A write failed because the disk (or the user's quota) is full: errno ENOSPC or EDQUOT, and a
    one-line str() naming the path. Also a ValueError, so the one-line error path of the entry points
    reports it without a traceback."""

    def __str__(self) -> str:
        return self.strerror


def disk_full_errno(error: BaseException) -> int | None:
    """ENOSPC / EDQUOT when `error`, or an error it was raised from or during, is a full disk.

    torch.save raises RuntimeError("... unexpected pos N vs M") while the OSError of the failed write
    is its __context__; safetensors' Rust error says "(os error 28)" in its message.
    """
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
            return error.errno
        code = next((c for c in DISK_FULL_ERRNOS if f"(os error {c})" in str(error)), None)
        if code is not None:
            return code
        error = error.__cause__ or error.__context__
    return None


@contextmanager
def disk_full_reported(path: Path, kept: str) -> Iterator[None]:
    """Turn a full-disk failure inside the block into DiskFullError("{path}: disk full ...; {kept}")."""
    try:
        yield
    except Exception as e:
        code = disk_full_errno(e)
        if code is None:
            raise
        raise DiskFullError(code, f"{path}: disk full ({os.strerror(code)}) while writing it; {kept}") from e


def require_directory(path: str | Path, role: str) -> Path:
    """`path` as a Path if it is a directory; else FileNotFoundError "{role} directory X not found"
    (ValueError when X is a file), before anything looks for files inside it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{role} directory {path} not found")
    if not path.is_dir():
        raise ValueError(f"{role} directory {path} is a file, not a directory")
    return path


def read_config(path: Path) -> ModelConfig:
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: missing config.json (not a HuggingFace checkpoint directory?)")
    try:
        hf = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_path}: not valid JSON ({e})") from e
    return ModelConfig.from_hf_config(hf, source=str(config_path))


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the shards named by the index, or the single file."""
    index_path = path / INDEX_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index_path}: expected JSON with a 'weight_map' object ({e!r})") from e
        files = [path / shard for shard in dict.fromkeys(weight_map.values())]  # unique, in order
        for file in files:
            if not file.is_file():
                raise FileNotFoundError(f"{index_path}: shard {file.name!r} does not exist in {path}")
        return files
    if (path / WEIGHTS_FILE).is_file():
        return [path / WEIGHTS_FILE]
    raise FileNotFoundError(f"{path}: neither {WEIGHTS_FILE} nor {INDEX_FILE} found")


def read_tensors(file: Path, expected: dict[str, torch.Size], tied: bool, dtype, device):
    """Yield (our name, tensor) for each tensor in one safetensors file, checking name and shape."""
    try:
        with safe_open(file, framework="pt", device=str(device)) as f:
            for hf_name in f.keys():
                name = hf_to_local(hf_name)
                if name == "lm_head.weight" and tied:
                    continue  # tied: transformers also ignores a stored lm_head and uses the embedding
                if name not in expected:
                    raise ValueError(f"{file}: unexpected tensor {hf_name!r} for this config.json")
                tensor = f.get_tensor(hf_name)
                if tensor.shape != expected[name]:
                    raise ValueError(f"{file}: tensor {hf_name!r} has shape {tuple(tensor.shape)}, "
                                     f"expected {tuple(expected[name])} from config.json")
                yield name, tensor.to(dtype)
    except SafetensorError as e:
        raise ValueError(f"{file}: unreadable safetensors file ({e})") from e


def load_pretrained(path, dtype: torch.dtype = torch.float32, device="cpu") -> Transformer:
    """Load an HF-layout Qwen2/Qwen3 checkpoint directory as a `Transformer` in `dtype` on `device`."""
    path = require_directory(path, "model")
    config = read_config(path)
    with torch.device("meta"):
        model = Transformer(config)
    expected = {name: p.shape for name, p in model.state_dict().items()}
    state = {}
    for file in weight_files(path):
        state.update(read_tensors(file, expected, config.tie_word_embeddings, dtype, device))
    missing = [local_to_hf(name) for name in expected if name not in state]
    if missing:
        raise ValueError(f"{path}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                         f"required by config.json")
    model.load_state_dict(state, assign=True)
    return model


def save_pretrained(model: Transformer, path, dtype: torch.dtype | None = None,
                    max_shard_bytes: int = 4 * 2**30) -> None:
    """Write config.json + model.safetensors (or shards + index above `max_shard_bytes`) to `path`.

    transformers loads the result as Qwen2ForCausalLM / Qwen3ForCausalLM. Files are written to a
    temporary directory beside `path` (`export_temp_prefix`), removed on any failure; the old
    config.json is removed first and the new one moved in last, so a directory with a config.json
    always holds a complete checkpoint. A full disk raises DiskFullError; `path` is then unchanged.
    """
    path = Path(path)
    state = {local_to_hf(name): t.detach().to(dtype or t.dtype).contiguous()
             for name, t in model.state_dict().items()}
    torch_dtype = str(next(iter(state.values())).dtype).removeprefix("torch.")
    with disk_full_reported(path, "its temporary files were removed and the directory was left as it was"):
        path.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=export_temp_prefix(path), dir=path.parent))
        try:
            names = write_weights(state, tmp, max_shard_bytes)
            (tmp / CONFIG_FILE).write_text(json.dumps(model.config.to_hf_config(torch_dtype), indent=2))
            replace_checkpoint_files(tmp, path, names)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def export_temp_prefix(path: Path) -> str:
    """Name prefix of save_pretrained's temporary directory for `path` (beside it, hidden)."""
    return f".{path.name}{EXPORT_TEMP_INFIX}"


def replace_checkpoint_files(tmp: Path, path: Path, names: list[str]):
    """Move the files written in `tmp` into `path`: config.json out first and in last."""
    (path / CONFIG_FILE).unlink(missing_ok=True)
    for stale in [*path.glob("model*.safetensors"), path / INDEX_FILE]:
        stale.unlink(missing_ok=True)
    for name in [*names, CONFIG_FILE]:
        os.replace(tmp / name, path / name)


def write_weights(state: dict[str, torch.Tensor], out: Path, max_shard_bytes: int) -> list[str]:
    """Save tensors as one file, or greedily packed shards plus an index; return the file names."""
    shards, size = [{}], 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards, size = [*shards, {}], 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        save_file(state, out / WEIGHTS_FILE, metadata={"format": "pt"})
        return [WEIGHTS_FILE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        save_file(shard, out / name, metadata={"format": "pt"})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total},
             "weight_map": {tensor: name for name, shard in zip(names, shards) for tensor in shard}}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2))
    return [*names, INDEX_FILE]
