"""Training-state checkpoints (for resuming), written atomically; distinct from the HF export.

One file per checkpoint, `<out>/checkpoints/step_00000042.pt`, holding the full (unsharded) model
and optimizer state, the step, the data position, the config and the RNG states of every rank
(torch, CUDA, numpy, python). Rank 0 writes it: torch.save into a hidden temp file, fsync,
os.replace onto the final name, fsync the directory. A crash at any moment leaves either the old
set of complete checkpoints or the old set plus the new one, never a truncated `step_*.pt`. A failed
write (a full disk: `DiskFullError` naming the file, on every rank) removes its temp file and leaves
the complete checkpoints as they were. Resuming reads the file on every rank (multi-node runs need
`out` on a shared filesystem).

A run directory belongs to one run at a time (`lock_run_dir`); temp files and directories that a killed
writer left behind are removed at start (`remove_stale_temps`).

With LoRA (model/lora.py) the model state holds only the adapters: the frozen base is rebuilt from
the config's `model` on resume, and a fingerprint of its weights, stored beside the adapters, makes
resuming on a different base an error.

Under FSDP (`sharded`) each rank holds a shard; torch.distributed.checkpoint's state_dict helpers
gather full tensors to rank 0 and scatter them back on load. They are imported only then: the
import alone takes seconds, which every plain run would pay.
"""
from __future__ import annotations

import fcntl
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from model.checkpoint import disk_full_reported, export_temp_prefix
from model.lora import adapter_state, base_fingerprint, load_adapter_state, lora_layers
from model.parallel import all_gather_objects, unwrap


def rng_state() -> dict:
    """This rank's random-number-generator states as plain Python values (bytes, ints, lists):
    they travel through all_gather_object and torch.load(weights_only=True) unchanged."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state().numpy().tobytes(), "python": random.getstate(),
             "numpy": (kind, keys.tolist(), pos, has_gauss, gauss)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().numpy().tobytes()
    return state


def set_rng_state(state: dict):
    as_tensor = lambda b: torch.frombuffer(bytearray(b), dtype=torch.uint8)  # noqa: E731
    torch.set_rng_state(as_tensor(state["torch"]))
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    if "cuda" in state:
        torch.cuda.set_rng_state(as_tensor(state["cuda"]))


def checkpoint_paths(out: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temp files of an interrupted write are ignored)."""
    return sorted((Path(out) / "checkpoints").glob("step_*.pt"))


def full_model_state(model, sharded: bool) -> dict:
    """The unsharded model state dict (collective under FSDP: complete on rank 0 only, on CPU)."""
    if not sharded:
        return unwrap(model).state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(model, optimizer, sharded: bool) -> dict:
    if not sharded:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def set_full_state(model, optimizer, model_state: dict, optimizer_state: dict, sharded: bool, source: str):
    """Load full (unsharded) states (with LoRA: the adapters); under FSDP each rank keeps its shard of them."""
    if not sharded:
        if lora_layers(unwrap(model)):
            load_adapter_state(unwrap(model), model_state, source)
        else:
            unwrap(model).load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state)
        return
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=options)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)


def save_checkpoint(out: str | Path, model, optimizer, step: int, extra: dict, keep_last: int, is_main: bool,
                    sharded: bool):
    """Collective: every rank calls it (state gathering); rank 0 writes and prunes to `keep_last`, and
    every rank returns once the file is on disk (none leaves, or tears down the process group, early).
    If rank 0's write fails with an OSError (DiskFullError for a full disk), every rank raises it."""
    state = {"model": full_model_state(model, sharded),
             "optimizer": full_optimizer_state(model, optimizer, sharded),
             "rng": all_gather_objects(rng_state()), "step": step, **extra}
    failure = None
    if is_main:
        if lora_layers(unwrap(model)):  # the frozen base is not saved, only checked on resume
            state.update(model=adapter_state(state["model"]), base_fingerprint=base_fingerprint(unwrap(model)))
        try:
            write_checkpoint(Path(out), state, step, keep_last)
        except OSError as e:
            failure = e
    shared = all_gather_objects(failure)[0]  # also the barrier: no rank returns before the file is on disk
    if shared is not None:
        raise failure or shared


def write_checkpoint(out: Path, state: dict, step: int, keep_last: int):
    """torch.save into a hidden temp file, fsync, rename onto step_<step>.pt, fsync the directory; prune.

    A failed write removes the temp file and raises (DiskFullError when the disk is full); the
    complete checkpoints are then untouched.
    """
    directory = out / "checkpoints"
    path = directory / f"step_{step:08d}.pt"
    tmp = checkpoint_temp(path)
    with disk_full_reported(path, "the partial file was removed, the earlier checkpoints are intact"):
        directory.mkdir(parents=True, exist_ok=True)
        try:
            with open(tmp, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    os.replace(tmp, path)
    fsync_directory(directory)
    stale = [*checkpoint_paths(out)[:-keep_last], *directory.glob(".step_*.pt.tmp")]  # tmp: torn by a crash
    for old in stale:
        old.unlink()


def checkpoint_temp(path: Path) -> Path:
    """The hidden temp file write_checkpoint fills before renaming it onto `path`."""
    return path.with_name(f".{path.name}.tmp")


# A dead writer's leftovers: write_checkpoint's temp file, save_pretrained's temp directory (tempfile.mkdtemp
# adds 8 characters of [a-z0-9_] to the prefix).
CHECKPOINT_TEMP = re.compile(r"\.step_\d{8}\.pt\.tmp")
MKDTEMP_SUFFIX = r"[a-z0-9_]{8}"


def remove_stale_temps(out: Path, exports: tuple[str, ...] = ("final",)) -> list[Path]:
    """Remove the temp files and directories that a killed writer left in run directory `out`; return them.

    Matched exactly: `checkpoints/.step_<8 digits>.pt.tmp` (write_checkpoint) and `.<name>.tmp-<8 chars>`
    (save_pretrained into `<out>/<name>`, for each name in `exports`). Nothing else is touched.
    Call it only while holding the run directory's lock (`lock_run_dir`): a live writer's temps match too.
    """
    out = Path(out)
    export_temp = re.compile("|".join(re.escape(export_temp_prefix(out / name)) + MKDTEMP_SUFFIX for name in exports))
    candidates = [*_entries(out / "checkpoints", CHECKPOINT_TEMP, directories=False),
                  *_entries(out, export_temp, directories=True)]
    for path in candidates:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    return candidates


def _entries(directory: Path, name: re.Pattern, directories: bool) -> list[Path]:
    """Entries of `directory` whose whole name matches, directories or plain files (never symlinks)."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if name.fullmatch(p.name) and not p.is_symlink()
                  and (p.is_dir() if directories else p.is_file()))


LOCK_FILE = ".lock"


def lock_run_dir(out: Path):
    """Take the run directory `out` (created if missing) for this process: an exclusive flock on
    `<out>/.lock`, which then holds this process's pid. Returns the open lock file: keep it referenced for
    the whole run. Closing it, or this process ending in any way (SIGKILL included), releases the lock.

    While another process holds it, fails at once with a one-line ValueError naming that process's pid
    and the directory.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lock = os.fdopen(os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644), "r+")  # not truncated: the pid
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = lock.read().strip() or "(pid not written yet)"
        lock.close()
        raise ValueError(f"run directory {out} is in use by process {holder} (it holds {out / LOCK_FILE}); "
                         f"wait for that run to end, or choose another --out") from None
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


def fsync_directory(directory: Path):
    """Make the rename durable: the directory entry itself must reach the disk."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(path: str | Path, model, optimizer, rank: int, world_size: int, sharded: bool) -> dict:
    """Restore model, optimizer and this rank's RNG states in place; return the whole state dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a torn or foreign file: say which one
        raise ValueError(f"checkpoint {path} is unreadable ({type(e).__name__}: {e})") from None
    if len(state["rng"]) != world_size:
        raise ValueError(f"checkpoint {path} was written by {len(state['rng'])} ranks; resuming needs the same "
                         f"world size (now {world_size}) for exact per-rank RNG and data positions")
    check_base(state, unwrap(model), path)
    set_full_state(model, optimizer, state["model"], state["optimizer"], sharded, str(path))
    set_rng_state(state["rng"][rank])
    return state


def check_base(state: dict, model, path: Path):
    """Adapters resume only a LoRA run, on the very base weights they were trained on."""
    saved, lora = "base_fingerprint" in state, bool(lora_layers(model))
    if saved != lora:
        raise ValueError(f"--resume: {path} holds {'LoRA adapters' if saved else 'full weights'}, but this run "
                         f"{'trains adapters' if lora else 'fine-tunes all weights'} (config key 'lora.rank')")
    if lora and state["base_fingerprint"] != base_fingerprint(model):
        raise ValueError(f"--resume: {path} holds adapters trained on other base weights (fingerprint "
                         f"{state['base_fingerprint']}) than the base loaded now ({base_fingerprint(model)})")
