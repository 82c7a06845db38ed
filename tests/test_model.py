"""model/config.py and model/transformer.py: config parsing, parameter counts, padding, cache, recompute.

Parity of logits and gradients with transformers lives in tests/test_checkpoint.py (it needs the
checkpoint I/O); here the references are published parameter counts, transformers' own parameter
count, and the model run on each row alone / without cache / without recompute.
"""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from model.config import PRESETS, ModelConfig
from model.transformer import KVCache, RMSNormFunction, Transformer

# The config.json files published with the checkpoints (Qwen/Qwen2.5-0.5B, Qwen/Qwen3-0.6B).
QWEN25_05B_JSON = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02,
    "intermediate_size": 4864, "max_position_embeddings": 32768, "max_window_layers": 24,
    "model_type": "qwen2", "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16", "transformers_version": "4.40.1", "use_cache": True,
    "use_sliding_window": False, "vocab_size": 151936,
}
QWEN3_06B_JSON = {  # as transformers >= 5 re-saves it: rope_theta inside rope_parameters
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
    "hidden_size": 1024, "initializer_range": 0.02, "intermediate_size": 3072,
    "max_position_embeddings": 40960, "max_window_layers": 28, "model_type": "qwen3",
    "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
    "rope_parameters": {"rope_theta": 1000000, "rope_type": "default"}, "sliding_window": None,
    "tie_word_embeddings": True, "dtype": "bfloat16", "use_cache": True, "use_sliding_window": False,
    "vocab_size": 151936,
}

SMALL = ModelConfig(model_type="qwen3", vocab_size=101, hidden_size=48, intermediate_size=72,
                    num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2, head_dim=10,
                    rms_norm_eps=1e-6, rope_theta=10_000.0, max_position_embeddings=64,
                    tie_word_embeddings=False, attention_bias=False, qk_norm=True)
SMALL_QWEN2 = dataclasses.replace(SMALL, model_type="qwen2", attention_bias=True, qk_norm=False,
                                  tie_word_embeddings=True)


def random_model(config: ModelConfig, seed: int = 0) -> Transformer:
    """fp32 model with every parameter random (norms and biases included)."""
    torch.manual_seed(seed)
    model = Transformer(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
    return model


# --- ModelConfig ---------------------------------------------------------------------------------

def test_from_hf_config_reads_published_configs():
    assert ModelConfig.from_hf_config(QWEN25_05B_JSON) == PRESETS["qwen2.5-0.5b"]  # rope_theta top-level
    assert ModelConfig.from_hf_config(QWEN3_06B_JSON) == PRESETS["qwen3-0.6b"]  # rope_parameters


def test_to_hf_config_round_trips():
    for config in (*PRESETS.values(), SMALL, SMALL_QWEN2):
        assert ModelConfig.from_hf_config(config.to_hf_config()) == config


def test_head_dim_defaults_to_hidden_over_heads_when_absent():
    assert "head_dim" not in QWEN25_05B_JSON  # Qwen2 files omit it; transformers then uses hidden / heads
    assert ModelConfig.from_hf_config(QWEN25_05B_JSON).head_dim == 896 // 14


@pytest.mark.parametrize("edit, message", [
    ({"model_type": "llama"}, r"my\.json: field 'model_type' is 'llama'"),
    ({"hidden_size": None}, r"my\.json: missing field 'hidden_size'"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, r"my\.json: field 'rope_scaling' type 'yarn'"),
    ({"use_sliding_window": True}, r"my\.json: field 'use_sliding_window'"),
    ({"rope_theta": None}, r"my\.json: missing field 'rope_theta'"),
])
def test_from_hf_config_errors_name_file_and_field(edit, message):
    hf = {**QWEN25_05B_JSON, **edit}
    hf = {k: v for k, v in hf.items() if v is not None}
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf_config(hf, source="my.json")


def test_qwen3_attention_bias_is_rejected():
    with pytest.raises(ValueError, match=r"field 'attention_bias'"):
        ModelConfig.from_hf_config({**QWEN3_06B_JSON, "attention_bias": True})


def test_invalid_config_values_are_rejected():
    with pytest.raises(ValueError, match="num_attention_heads .* multiple of num_key_value_heads"):
        dataclasses.replace(SMALL, num_key_value_heads=4)
    with pytest.raises(ValueError, match="head_dim must be even"):
        dataclasses.replace(SMALL, head_dim=9)
    with pytest.raises(ValueError, match="hidden_size must be positive"):
        dataclasses.replace(SMALL, hidden_size=0)


# --- parameter counts ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["qwen2.5-0.5b", "qwen3-0.6b", "tiny-teacher", "tiny-student", "bench-tiny"])
def test_num_parameters_equals_real_count(name):
    config = PRESETS[name]
    with torch.device("meta"):  # no memory: only shapes are counted
        model = Transformer(config)
    assert config.num_parameters == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("config", [SMALL, SMALL_QWEN2], ids=["qwen3-untied", "qwen2-tied"])
def test_num_parameters_small_configs(config):
    assert config.num_parameters == sum(p.numel() for p in Transformer(config).parameters())


def test_presets_match_published_parameter_counts():
    # Embedding included, lm_head tied. By hand, Qwen2.5-0.5B: 151936*896 embedding + 24 layers of
    # (896*896+896 q, 2*(896*128+128) k/v, 896*896 o, 3*896*4864 MLP, 2*896 norms) + 896 final norm.
    # Qwen3-0.6B: 151936*1024 + 28 * (1024*2048 q, 2*1024*1024 k/v, 2048*1024 o, 2*128 qk-norm,
    # 3*1024*3072 MLP, 2*1024 norms) + 1024.
    assert PRESETS["qwen2.5-0.5b"].num_parameters == 494_032_768
    assert PRESETS["qwen3-0.6b"].num_parameters == 596_049_920


def test_presets_match_transformers_parameter_count():
    transformers = pytest.importorskip("transformers", reason="transformers gives the reference count")
    for name in ("qwen2.5-0.5b", "qwen3-0.6b"):
        hf_config = transformers.AutoConfig.for_model(**PRESETS[name].to_hf_config())
        with torch.device("meta"):
            ref = transformers.AutoModelForCausalLM.from_config(hf_config)
        assert PRESETS[name].num_parameters == ref.num_parameters(), name


# --- forward: padding, cache, activation checkpointing --------------------------------------------

@pytest.mark.parametrize("config", [SMALL, SMALL_QWEN2], ids=["qwen3", "qwen2"])
def test_padded_rows_equal_rows_alone(config):
    model = random_model(config)
    lengths, T = [7, 3, 5], 7
    rows = [torch.randint(0, config.vocab_size, (n,), generator=torch.Generator().manual_seed(n)) for n in lengths]
    for side in ("left", "right"):
        ids = torch.zeros(len(rows), T, dtype=torch.long)
        mask = torch.zeros(len(rows), T, dtype=torch.long)
        for i, row in enumerate(rows):
            where = slice(T - len(row), T) if side == "left" else slice(0, len(row))
            ids[i, where], mask[i, where] = row, 1
        with torch.no_grad():
            batched = model(ids, attention_mask=mask)  # (B, T, V)
            for i, row in enumerate(rows):
                alone = model(row[None])[0]  # (n, V)
                assert (batched[i][mask[i].bool()] - alone).abs().max() <= 1e-5, (side, i)
                assert torch.isfinite(batched[i]).all()  # padding positions: finite, not NaN


def test_kv_cache_prefill_then_decode_equals_full_forward():
    model = random_model(SMALL)
    B, T, new = 3, 6, 4
    ids = torch.randint(0, SMALL.vocab_size, (B, T + new), generator=torch.Generator().manual_seed(5))
    mask = torch.ones(B, T + new, dtype=torch.long)
    mask[0, :2] = 0  # left-padded prompt
    with torch.no_grad():
        full = model(ids, attention_mask=mask)  # (B, T+new, V)
        cache = KVCache(SMALL, B, T + new, torch.float32, "cpu")
        steps = [model(ids[:, :T], attention_mask=mask[:, :T], cache=cache)]
        steps += [model(ids[:, t:t + 1], cache=cache) for t in range(T, T + new)]
    cached = torch.cat(steps, dim=1)
    real = mask.bool()
    assert (cached[real] - full[real]).abs().max() <= 1e-5


def test_kv_cache_select_rows_reorders_repeats_and_drops_rows():
    """select_rows serves both one prefill for n samples (repeats) and dropping finished rows (subsets)."""
    model = random_model(SMALL_QWEN2)
    prompts = torch.randint(0, SMALL_QWEN2.vocab_size, (3, 5), generator=torch.Generator().manual_seed(6))
    rows = torch.tensor([2, 0, 0, 2, 2])  # row 1 dropped, the others repeated and reordered
    nxt = torch.randint(0, SMALL_QWEN2.vocab_size, (5, 1), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        cache = KVCache(SMALL_QWEN2, 3, 8, torch.float32, "cpu")
        model(prompts, cache=cache)
        shared = model(nxt, cache=cache.select_rows(rows))[:, -1]  # (5, V)
        full = model(torch.cat([prompts[rows], nxt], dim=1))[:, -1]
    assert (shared - full).abs().max() <= 1e-5


def test_return_hidden_times_output_weight_is_logits():
    model = random_model(SMALL)
    ids = torch.randint(0, SMALL.vocab_size, (2, 5))
    with torch.no_grad():
        assert torch.allclose(model(ids, return_hidden=True) @ model.output_weight.T, model(ids), atol=1e-5)


@pytest.mark.parametrize("config", [SMALL, SMALL_QWEN2], ids=["qwen3", "qwen2"])
def test_activation_checkpointing_gives_identical_gradients(config):
    ids = torch.randint(0, config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(8))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    grads = []
    for recompute in (False, True):
        model = random_model(config)
        model.activation_checkpointing = recompute
        logits = model(ids, attention_mask=mask)
        F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
        grads.append([p.grad for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def rms_norm_plain(x, weight, eps):
    """The formula written out for autograd to differentiate (HF's Qwen2RMSNorm)."""
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def test_rms_norm_function_passes_fp64_gradcheck():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 5, 7, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.randn(7, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: RMSNormFunction.apply(x, w, 1e-6), (x, weight))


@pytest.mark.parametrize("shape", [(3, 17, 33), (2, 5, 3, 64), (1, 1)], ids=str)
def test_rms_norm_function_matches_autograd_of_the_formula(shape):
    gen = torch.Generator().manual_seed(5)
    x = (3 * torch.randn(shape, generator=gen)).requires_grad_()
    weight = torch.randn(shape[-1], generator=gen).requires_grad_()
    grad = torch.randn(shape, generator=gen)
    results = []
    for norm in (RMSNormFunction.apply, rms_norm_plain):
        y = norm(x, weight, 1e-6)
        y.backward(grad)
        results.append((y.detach(), x.grad, weight.grad))
        x.grad = weight.grad = None
    for ours, reference in zip(*results):
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def test_rms_norm_function_bf16_input_keeps_dtypes_and_tracks_fp32():
    gen = torch.Generator().manual_seed(6)
    x32 = torch.randn(4, 9, 24, generator=gen)
    weight = torch.randn(24, generator=gen).requires_grad_()
    grad = torch.randn(4, 9, 24, generator=gen)
    x16 = x32.bfloat16().requires_grad_()
    y = RMSNormFunction.apply(x16, weight, 1e-6)
    y.backward(grad)
    assert y.dtype == torch.float32 and x16.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.float32
    x = x16.detach().float().requires_grad_()
    weight_grad16, weight.grad = weight.grad, None
    rms_norm_plain(x, weight, 1e-6).backward(grad)
    torch.testing.assert_close(x16.grad.float(), x.grad, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(weight_grad16, weight.grad, rtol=2e-2, atol=2e-2)


def test_init_weights_is_seeded_and_standard():
    torch.manual_seed(3)
    a = Transformer(SMALL_QWEN2)
    torch.manual_seed(3)
    b = Transformer(SMALL_QWEN2)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert torch.equal(a.norm.weight, torch.ones(SMALL.hidden_size))
    assert torch.equal(a.layers[0].attn.q_proj.bias, torch.zeros(SMALL.num_attention_heads * SMALL.head_dim))
    assert abs(a.embed_tokens.weight.std().item() - 0.02) < 0.002


def test_bf16_autocast_forward_and_backward_track_fp32():
    """Mixed precision as on GPU (autocast bf16 matmuls, fp32 norms/residual), here on CPU autocast."""
    model = random_model(SMALL_QWEN2)
    ids = torch.randint(0, SMALL_QWEN2.vocab_size, (2, 8), generator=torch.Generator().manual_seed(9))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    reference = model(ids, attention_mask=mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(ids, attention_mask=mask)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    real = mask.bool()
    error = (logits.float() - reference)[real].norm() / reference[real].norm()
    assert error < 3e-2  # bf16 has an 8-bit mantissa (~4e-3 relative per op)
    logits.float().sum().backward()
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in model.parameters())
