"""model/lora.py and LoRA through train.py (CPU): the layer's formula, an exact start, merge == adapters,
a frozen base, GRPO's reference without a copy, PEFT loading our export, exact resume, DDP, config errors.
Runs use one thread: two cores are shared."""
from __future__ import annotations

import copy
import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import train
from conftest import synthetic_workspace
from model.checkpoint import load_pretrained, save_pretrained
from model.config import PRESETS
from model.lora import (LoRAConfig, LoRALinear, adapters_disabled, apply_lora, is_adapter, merged_state,
                        peft_name)
from model.transformer import Transformer
from rl.grpo import completion_logprobs
from rl.rollout import RolloutBatch
from trainer.checkpoint import checkpoint_paths
from trainer.config import OptimConfig
from trainer.rl_stage import reference_model
from trainer.run import build_optimizer

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
VOCAB = 400

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(seed: int) -> Transformer:
    """tiny-student: Qwen2 layout (q/k/v bias), tied embedding, 4 layers."""
    torch.manual_seed(seed)
    return Transformer(replace(PRESETS["tiny-student"], vocab_size=VOCAB)).eval()


def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows of odd lengths 7 and 11, the shorter left-padded."""
    torch.manual_seed(5)
    ids = torch.randint(0, VOCAB, (2, 11))
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[0, :4] = 0
    return ids, mask


def test_lora_linear_is_the_formula_with_dropout_on_the_adapter_input_only():
    torch.manual_seed(0)
    base = torch.nn.Linear(37, 23)
    layer = LoRALinear(base, rank=3, alpha=6.0, dropout=0.3)
    assert layer.weight is base.weight and layer.bias is base.bias  # the base tensors, not copies
    assert torch.equal(layer.lora_B, torch.zeros(23, 3))  # Hu et al.: B = 0, the start is the base
    bound = 1 / math.sqrt(37)  # kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)), as nn.Linear and PEFT
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > bound / 2
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 5, 37)
    torch.manual_seed(1)
    y = layer(x)
    torch.manual_seed(1)
    dropped = F.dropout(x, 0.3, training=True)  # the same mask nn.Dropout draws
    expected = x @ base.weight.T + base.bias + (6.0 / 3) * dropped @ layer.lora_A.T @ layer.lora_B.T
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-5)
    layer.eval()
    torch.testing.assert_close(layer(x), x @ (base.weight + 2.0 * layer.lora_B @ layer.lora_A).T + base.bias,
                               rtol=0, atol=1e-5)


def test_start_is_the_base_only_adapters_train_and_merging_is_exact():
    base = tiny_model(0)
    model = apply_lora(copy.deepcopy(base), LoRAConfig(rank=4, alpha=8.0))
    ids, mask = padded_batch()
    assert torch.equal(model(ids, mask), base(ids, mask))  # B = 0: bit-identical logits at step 0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(is_adapter(n) for n in trainable)
    assert len(trainable) == 2 * 7 * 4  # A and B of the 7 projections of 4 layers
    cfg = model.config
    d, kv, ff = cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim, cfg.intermediate_size
    per_layer = sum(4 * (i + o) for i, o in [(d, d), (d, kv), (d, kv), (d, d), (d, ff), (d, ff), (ff, d)])
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 4 * per_layer

    model.train()
    optimizer = build_optimizer(model, OptimConfig(lr=1e-2, warmup_steps=0))
    for step in range(3):
        logits = model(ids, mask)  # (B, T, V)
        F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        assert all(grads[n] is None for n in grads if not is_adapter(n))
        if step == 0:  # dL/dA = scale * B^T (dL/dy)^T x = 0 while B = 0; B alone moves first
            assert all(grads[n].abs().sum() == 0 for n in grads if n.endswith("lora_A"))
            assert all(grads[n].abs().sum() > 0 for n in grads if n.endswith("lora_B"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    base_state = base.state_dict()
    assert all(torch.equal(t, base_state[n]) for n, t in model.state_dict().items() if not is_adapter(n))

    adapted = model(ids, mask)
    assert (adapted - base(ids, mask)).abs().max() > 1e-2  # training moved the model
    merged = Transformer(model.config)
    merged.load_state_dict(merged_state(model.state_dict(), LoRAConfig(rank=4, alpha=8.0).scale))
    torch.testing.assert_close(merged(ids, mask), adapted, rtol=0, atol=1e-5)
    with adapters_disabled(model):
        assert torch.equal(model(ids, mask), base(ids, mask))
    assert torch.equal(model(ids, mask), adapted)  # switched on again after the block


def test_activation_checkpointing_replays_the_adapter_dropout():
    """Recomputing each block in backward gives the same adapter gradients (same dropout masks)."""
    model = apply_lora(tiny_model(2), LoRAConfig(rank=4, alpha=8.0, dropout=0.2)).train()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(std=0.05)
    ids, mask = padded_batch()
    grads = []
    for recompute in (False, True):
        model.activation_checkpointing = recompute
        torch.manual_seed(3)
        model(ids, mask).logsumexp(-1).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
        model.zero_grad(set_to_none=True)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * 7 * 4
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=0, atol=1e-6, msg=name)


def test_grpo_reference_is_the_base_with_adapters_off():
    """The same model with adapters disabled == a separate frozen copy of the base (no copy is made)."""
    base = tiny_model(1)
    frozen_base = copy.deepcopy(base).requires_grad_(False)
    model = apply_lora(base, LoRAConfig(rank=4, alpha=8.0, dropout=0.1)).train()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(std=0.05)  # adapters as after some training
    ids, mask = padded_batch()
    P = 6  # prompt columns; completion slots are the 5 after them
    batch = RolloutBatch(input_ids=ids, attention_mask=mask, completion_mask=mask[:, P:].bool(),
                         sampler_logprobs=torch.zeros(2, 5), truncated=torch.zeros(2, dtype=torch.bool),
                         completions=[], references=[], prompt_length=P, group_size=2)
    reference = reference_model(model)
    assert reference.model is model  # a view, not a copy
    with torch.no_grad():
        ours = completion_logprobs(reference, batch, chunk_size=3)  # (B, C)
        theirs = completion_logprobs(frozen_base, batch, chunk_size=3)
        policy = completion_logprobs(model.eval(), batch, chunk_size=3)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert (policy - theirs).abs().max() > 1e-3


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Tokenizer, synthetic train JSONL, and a pretrained-layout base (tiny-student, seed 1)."""
    root = tmp_path_factory.mktemp("lora_ws")
    synthetic_workspace(root, n_train=16, n_test=4, vocab_size=VOCAB)
    save_pretrained(tiny_model(1), root / "base")
    return root


# optim.eps = 1e-3: see tests/test_train.py's RANKS_COMMON (the update stays Lipschitz in the gradient).
def lora_args(ws: Path, out: Path, *extra: str, base: Path | None = None) -> list[str]:
    return ["--model", str(base or ws / "base"), "--tokenizer", str(ws / "tok"), "--data", str(ws / "train.jsonl"),
            "--out", str(out), "--max-steps", "3", "--set", "data.max_len=256", "--set", "optim.lr=1e-2",
            "--set", "optim.warmup_steps=1", "--set", "optim.eps=1e-3", "--set", "save_every=1",
            "--set", "data.grad_accum_steps=2", "--set", "lora.rank=4", "--set", "lora.alpha=8.0", *extra]


@pytest.fixture(scope="module")
def lora_run(workspace, tmp_path_factory):
    """One process, 3 SFT steps of 2 x 2 examples; returns (run directory, the trained model in memory)."""
    out = tmp_path_factory.mktemp("lora_run")
    captured = {}

    def spy_finish(cfg, model, *args):
        captured["model"] = model
        return real_finish(cfg, model, *args)

    real_finish = train.finish
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "finish", spy_finish)
        assert train.main(lora_args(workspace, out, "--set", "data.micro_batch_size=2")) == 0
    return out, captured["model"]


def test_train_py_keeps_the_base_and_exports_merged_plus_peft(workspace, lora_run):
    out, model = lora_run
    base = load_pretrained(workspace / "base").state_dict()
    state = model.state_dict()
    assert all(torch.equal(state[n], base[n]) for n in base)  # every base tensor bit-identical after training
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {n for n in state if is_adapter(n)}
    checkpoint = torch.load(checkpoint_paths(out)[-1], weights_only=True)
    assert set(checkpoint["model"]) == {n for n in state if is_adapter(n)}  # adapters only, no base
    assert len(checkpoint["optimizer"]["state"]) == len(checkpoint["model"])  # AdamW moments of adapters only

    final = load_file(out / "final" / "model.safetensors")
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["base_model_name_or_path"]) == (4, 8.0, str(workspace / "base"))
    assert len(adapter) == 2 * 7 * 4
    hf_base = load_file(workspace / "base" / "model.safetensors")
    for name, W in hf_base.items():  # merged = W + (alpha / r) B A for the 7 projections, W elsewhere
        module = name.removesuffix(".weight")
        A = adapter.get(f"base_model.model.{module}.lora_A.weight")
        if A is None:
            assert torch.equal(final[name], W), name
        else:
            B = adapter[f"base_model.model.{module}.lora_B.weight"]
            assert B.abs().max() > 0, name
            torch.testing.assert_close(final[name], W + 2.0 * B @ A, rtol=0, atol=1e-6, msg=name)


def test_peft_loads_our_adapter_with_the_same_logits(workspace, lora_run):
    peft = pytest.importorskip("peft", reason="peft (requirements-dev.txt) checks the PEFT export")
    transformers = pytest.importorskip("transformers")
    out, model = lora_run
    hf = transformers.AutoModelForCausalLM.from_pretrained(workspace / "base", dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(hf, out / "adapter").eval()
    names = {n for n, _ in peft_model.named_parameters() if "lora_" in n}
    assert names == {peft_name(n).replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")
                     for n in model.state_dict() if is_adapter(n)}  # every adapter found, under PEFT's names
    ids, mask = padded_batch()
    with torch.no_grad():
        theirs = peft_model(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
        ours = model.eval()(ids, mask)
        merged = load_pretrained(out / "final")(ids, mask)
    valid = mask.bool()  # HF's padded query rows differ by convention; compare real tokens
    torch.testing.assert_close(theirs[valid], ours[valid], rtol=0, atol=1e-5)
    torch.testing.assert_close(merged, ours, rtol=0, atol=1e-5)


def test_two_ranks_with_lora_equal_one_process(workspace, tmp_path, lora_run):
    """torchrun DDP 2 ranks x 2 micro-batches of 1 == 1 process x 2 micro-batches of 2."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train.py"), *lora_args(workspace, out, "--set", "data.micro_batch_size=1")]
    result = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = load_file(lora_run[0] / "adapter" / "adapter_model.safetensors"), load_file(
        out / "adapter" / "adapter_model.safetensors")
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-5, msg=name)


def test_kd_lora_resume_is_bit_exact(workspace, tmp_path):
    """Stage kd, adapter dropout on: stopped after step 1 and resumed == uninterrupted (torch.equal)."""
    extra = ("--stage", "kd", "--teacher", str(workspace / "base"), "--set", "lora.dropout=0.2",
             "--set", "data.micro_batch_size=2")
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert train.main(lora_args(workspace, whole, *extra)) == 0
    assert train.main(lora_args(workspace, parts, *extra, "--set", "stop_at=1")) == 0
    torch.manual_seed(123)  # the resumed run must restore RNG states (dropout masks), not inherit these
    assert train.main(lora_args(workspace, parts, *extra, "--resume")) == 0
    for path in ("final/model.safetensors", "adapter/adapter_model.safetensors"):
        a, b = load_file(whole / path), load_file(parts / path)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), path


def test_resume_on_another_base_or_without_lora_is_an_error(workspace, tmp_path, capsys):
    base = tmp_path / "base"
    shutil.copytree(workspace / "base", base)
    out = tmp_path / "run"
    assert train.main(lora_args(workspace, out, "--set", "stop_at=1", "--set", "data.micro_batch_size=2",
                                base=base)) == 0
    assert train.main(lora_args(workspace, out, "--resume", "--set", "lora.rank=0", base=base)) == 2
    assert "holds LoRA adapters, but this run fine-tunes all weights" in capsys.readouterr().err
    save_pretrained(tiny_model(2), base)  # same path, same shapes, other weights
    assert train.main(lora_args(workspace, out, "--resume", "--set", "data.micro_batch_size=2", base=base)) == 2
    assert "adapters trained on other base weights" in capsys.readouterr().err


def test_grpo_with_lora_and_kl_reference(workspace, tmp_path):
    """Stage rl with beta > 0: the reference is the base (adapters off); KL grows once the adapters move."""
    out = tmp_path / "rl"
    assert train.main(["--recipe", "recipes/rl_tiny.toml", "--model", str(workspace / "base"),
                       "--tokenizer", str(workspace / "tok"), "--data", str(workspace / "train.jsonl"),
                       "--out", str(out), "--max-steps", "2", "--set", "optim.lr=1e-2", "--set", "optim.warmup_steps=1",
                       "--set", "grpo.prompts_per_step=2", "--set", "grpo.group_size=4",
                       "--set", "grpo.max_new_tokens=12", "--set", 'grpo.format_pattern="[0-9]"',
                       "--set", "grpo.format_weight=1.0", "--set", "grpo.beta=0.04", "--set", "grpo.mu=2",
                       "--set", "lora.rank=4"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(r["kl"] > 0 for r in records) and (out / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("setting, message", [
    ("lora.rank=-1", "[lora]: LoRAConfig.rank must be >= 0"),
    ('lora.targets="q_proj,lm_head"', "[lora]: LoRAConfig.targets must be a comma-separated subset"),
    ("lora.dropout=1.0", "[lora]: LoRAConfig.dropout must be in [0, 1)"),
    ('parallel="fsdp"', "'lora.rank' > 0 needs a training stage (sft, kd, rl) and parallel = 'ddp'"),
    ('stage="gen"', "'lora.rank' > 0 needs a training stage"),
])
def test_bad_lora_config_is_one_line_error(workspace, tmp_path, capsys, setting, message):
    out = tmp_path / "run"
    assert train.main(lora_args(workspace, out, "--set", setting)) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not out.exists()
