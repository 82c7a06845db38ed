"""model/checkpoint.py against transformers: load its checkpoints, write ones it loads, same numbers.

Reference: transformers' Qwen2ForCausalLM / Qwen3ForCausalLM (eager attention, fp32) with every
parameter randomised (norm weights and biases too, so a swapped name cannot hide behind ones/zeros).
"""
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from model.checkpoint import INDEX_FILE, WEIGHTS_FILE, load_pretrained, local_to_hf, save_pretrained
from model.config import ModelConfig
from model.transformer import Transformer

transformers = pytest.importorskip("transformers", reason="transformers is the parity reference (requirements-dev.txt)")

VOCAB = 97
# (model_type, tied, num_key_value_heads): GQA, MHA and MQA; qkv bias (qwen2) and QK-norm (qwen3);
# head_dim 24 with hidden 64 and 4 heads, so head_dim != hidden / heads everywhere.
CASES = [("qwen2", False, 2), ("qwen2", True, 4), ("qwen3", True, 2), ("qwen3", False, 1)]
CASE_IDS = [f"{t}-{'tied' if tied else 'untied'}-kv{kv}" for t, tied, kv in CASES]


def hf_model(model_type: str, tied: bool, kv_heads: int, seed: int = 0):
    """A random transformers model (every parameter perturbed) in fp32 eager attention."""
    cls = {"qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}[model_type]
    config = cls(vocab_size=VOCAB, hidden_size=64, intermediate_size=80, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=24, rms_norm_eps=1e-6,
                 tie_word_embeddings=tied, max_position_embeddings=128)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float()
    randomize_(model)
    return model.eval()


def randomize_(model: torch.nn.Module):
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))


def tokens(batch: int = 3, length: int = 11, seed: int = 1):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_load_transformers_checkpoint_matches_logits(tmp_path, case):
    ref = hf_model(*case)
    ref.save_pretrained(tmp_path)
    model = load_pretrained(tmp_path)
    x = tokens()
    with torch.no_grad():
        assert (model(x) - ref(x).logits).abs().max() <= 1e-4


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_saved_checkpoint_loads_in_transformers(tmp_path, case):
    model_type, tied, kv = case
    config = ModelConfig.from_hf_config(hf_model(*case).config.to_dict())
    torch.manual_seed(2)
    model = Transformer(config)
    randomize_(model)
    save_pretrained(model, tmp_path)
    ref, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert type(ref).__name__ == {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[model_type]
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    x = tokens()
    with torch.no_grad():
        assert (model(x) - ref(x).logits).abs().max() <= 1e-4


@pytest.mark.parametrize("case", CASES[:3:2], ids=CASE_IDS[:3:2])
def test_left_padded_batch_matches_transformers(tmp_path, case):
    ref = hf_model(*case)
    ref.save_pretrained(tmp_path)
    model = load_pretrained(tmp_path)
    x = tokens(batch=3, length=9)
    mask = torch.ones_like(x)
    mask[0, :4] = 0  # left padding of different lengths; row 2 unpadded
    mask[1, :1] = 0
    positions = (mask.cumsum(1) - 1).clamp(min=0)  # transformers takes RoPE positions from the caller
    with torch.no_grad():
        ours = model(x, attention_mask=mask)
        theirs = ref(x, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()
    assert (ours[real] - theirs[real]).abs().max() <= 1e-4


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_gradients_match_transformers(tmp_path, case):
    ref = hf_model(*case)
    ref.save_pretrained(tmp_path)
    model = load_pretrained(tmp_path)
    x, y = tokens(length=10), tokens(length=10, seed=3)
    F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
    F.cross_entropy(ref(x).logits.flatten(0, 1), y.flatten()).backward()
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        g_ref = ref_params[local_to_hf(name)].grad
        assert (p.grad - g_ref).norm() <= 1e-4 * g_ref.norm(), name


def test_sharded_checkpoint_loads(tmp_path):
    ref = hf_model("qwen2", False, 2)
    ref.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_FILE)
    (tmp_path / WEIGHTS_FILE).unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, shard in shards.items():
        save_file({n: tensors[n] for n in shard}, tmp_path / file)
    index = {"metadata": {}, "weight_map": {n: file for file, shard in shards.items() for n in shard}}
    (tmp_path / INDEX_FILE).write_text(json.dumps(index))
    x = tokens()
    with torch.no_grad():
        assert (load_pretrained(tmp_path)(x) - ref(x).logits).abs().max() <= 1e-4


def test_save_shards_above_threshold_and_both_libraries_load(tmp_path):
    ref = hf_model("qwen3", True, 2)
    model = Transformer(ModelConfig.from_hf_config(ref.config.to_dict()))
    model.load_state_dict({n: dict(ref.named_parameters())[local_to_hf(n)] for n, _ in model.named_parameters()})
    save_pretrained(model, tmp_path, max_shard_bytes=40_000)
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / INDEX_FILE).exists() and not (tmp_path / WEIGHTS_FILE).exists()
    x = tokens()
    with torch.no_grad():
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
        assert (reloaded(x).logits - ref(x).logits).abs().max() <= 1e-4
        assert (load_pretrained(tmp_path)(x) - ref(x).logits).abs().max() <= 1e-4


def test_dtype_on_load_and_save(tmp_path):
    ref = hf_model("qwen2", True, 2)
    ref.save_pretrained(tmp_path / "fp32")
    model = load_pretrained(tmp_path / "fp32", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    save_pretrained(model, tmp_path / "bf16")
    assert {t.dtype for t in load_file(tmp_path / "bf16" / WEIGHTS_FILE).values()} == {torch.bfloat16}
    save_pretrained(model, tmp_path / "back", dtype=torch.float32)
    expected = {local_to_hf(n): p.float() for n, p in model.state_dict().items()}
    assert load_file(tmp_path / "back" / WEIGHTS_FILE).keys() == expected.keys()
    assert all(torch.equal(t, expected[n]) for n, t in load_file(tmp_path / "back" / WEIGHTS_FILE).items())


def test_tied_checkpoint_with_or_without_lm_head(tmp_path):
    ref = hf_model("qwen3", True, 2)
    ref.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_FILE)
    assert "lm_head.weight" not in tensors  # transformers drops the tied copy
    save_file({**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"].clone()}, tmp_path / WEIGHTS_FILE)
    x = tokens()
    with torch.no_grad():
        assert (load_pretrained(tmp_path)(x) - ref(x).logits).abs().max() <= 1e-4


# --- broken checkpoints: each error names the tensor / file / field -----------------------------

@pytest.fixture
def checkpoint(tmp_path):
    """A valid (untied qwen2) checkpoint directory written by transformers."""
    hf_model("qwen2", False, 2).save_pretrained(tmp_path)
    return tmp_path


def rewrite_weights(path, edit):
    tensors = load_file(path / WEIGHTS_FILE)
    edit(tensors)
    save_file(tensors, path / WEIGHTS_FILE)


def test_error_missing_tensor(checkpoint):
    rewrite_weights(checkpoint, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensor.*model\.layers\.1\.mlp\.up_proj\.weight"):
        load_pretrained(checkpoint)


def test_error_missing_lm_head_when_untied(checkpoint):
    rewrite_weights(checkpoint, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(ValueError, match=r"missing tensor.*lm_head\.weight"):
        load_pretrained(checkpoint)


def test_error_unexpected_tensor(checkpoint):
    rewrite_weights(checkpoint, lambda t: t.update({"model.layers.0.self_attn.rotary.weight": torch.ones(3)}))
    with pytest.raises(ValueError, match=r"model\.safetensors.*unexpected tensor 'model\.layers\.0\.self_attn\.rotary"):
        load_pretrained(checkpoint)


def test_error_wrong_shape(checkpoint):
    rewrite_weights(checkpoint, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": torch.ones(24, 64)}))
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.self_attn\.k_proj\.weight' has shape \(24, 64\), "
                                         r"expected \(48, 64\)"):
        load_pretrained(checkpoint)


def test_error_unsupported_model_type(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(ValueError, match=r"config\.json: field 'model_type' is 'llama'"):
        load_pretrained(checkpoint)


def test_error_corrupt_safetensors(checkpoint):
    data = (checkpoint / WEIGHTS_FILE).read_bytes()
    (checkpoint / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])  # truncated download
    with pytest.raises(ValueError, match=r"model\.safetensors: unreadable safetensors file"):
        load_pretrained(checkpoint)
    (checkpoint / WEIGHTS_FILE).write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match=r"model\.safetensors: unreadable safetensors file"):
        load_pretrained(checkpoint)


def test_error_unreadable_config_and_index(checkpoint):
    (checkpoint / "config.json").write_text('{"model_type": "qwen2",\n  "hidden_size": }')  # cut short
    with pytest.raises(ValueError, match=r"config\.json: not valid JSON \(.*line 2"):
        load_pretrained(checkpoint)
    hf_model("qwen2", False, 2).save_pretrained(checkpoint)
    (checkpoint / INDEX_FILE).write_text(json.dumps({"metadata": {}}))  # no weight_map
    with pytest.raises(ValueError, match=r"index\.json: expected JSON with a 'weight_map' object"):
        load_pretrained(checkpoint)


def test_error_missing_config(checkpoint):
    (checkpoint / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"config\.json: missing config\.json"):
        load_pretrained(checkpoint)


def test_error_missing_directory_is_reported_as_such(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"^model directory {tmp_path / 'nope'} not found$"):
        load_pretrained(tmp_path / "nope")
    (tmp_path / "file").write_text("{}")
    with pytest.raises(ValueError, match=f"^model directory {tmp_path / 'file'} is a file, not a directory$"):
        load_pretrained(tmp_path / "file")


def test_error_missing_weights_and_missing_shard(checkpoint):
    (checkpoint / WEIGHTS_FILE).rename(checkpoint / "part-1.safetensors")
    with pytest.raises(FileNotFoundError, match=r"neither model\.safetensors nor model\.safetensors\.index\.json"):
        load_pretrained(checkpoint)
    (checkpoint / INDEX_FILE).write_text(json.dumps({"weight_map": {"lm_head.weight": "part-2.safetensors"}}))
    with pytest.raises(FileNotFoundError, match=r"index\.json: shard 'part-2\.safetensors' does not exist"):
        load_pretrained(checkpoint)


# --- atomic save ---------------------------------------------------------------------------------

def test_crash_while_writing_keeps_previous_checkpoint(tmp_path, monkeypatch):
    old = Transformer(ModelConfig.from_hf_config(hf_model("qwen2", True, 2).config.to_dict()))
    save_pretrained(old, tmp_path / "ckpt")
    new = Transformer(old.config)
    randomize_(new)

    def crash(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr("model.checkpoint.save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(new, tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary directory left behind
    reloaded = load_pretrained(tmp_path / "ckpt")
    assert all(torch.equal(a, b) for a, b in zip(reloaded.parameters(), old.parameters()))


def test_crash_while_moving_files_leaves_no_config(tmp_path, monkeypatch):
    model = Transformer(ModelConfig.from_hf_config(hf_model("qwen3", True, 2).config.to_dict()))
    save_pretrained(model, tmp_path)
    real_replace = __import__("os").replace

    def crash_on_config(src, dst):
        if str(dst).endswith("config.json"):
            raise OSError("killed")
        real_replace(src, dst)
    monkeypatch.setattr("model.checkpoint.os.replace", crash_on_config)
    with pytest.raises(OSError, match="killed"):
        save_pretrained(model, tmp_path)
    with pytest.raises(FileNotFoundError, match="missing config.json"):
        load_pretrained(tmp_path)  # incomplete checkpoints do not look complete
