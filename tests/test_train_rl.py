"""train.py --stage rl (GRPO) end to end on a tiny model (CPU): records, export, exact resume, bad configs.

A random tiny model never answers the synthetic task, so the correctness reward is always 0 and
gives no gradient; the runs add a format reward for "a digit anywhere", which random text meets
sometimes, so groups have reward variance and the policy does move. Runs use one thread.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train
from conftest import shared_data, synthetic_workspace
from data.synthetic import make_code_tasks, write_jsonl
import trainer.rl_stage as rl_stage
from model.config import PRESETS
from model.transformer import Transformer
from rl.rollout import RolloutBatch

ROOT = Path(__file__).resolve().parents[1]
RL_KEYS = ("reward", "reward/correct", "reward_std/correct", "reward/format", "reward_std/format", "accuracy",
           "completion_len", "completion_len_max", "truncated_frac", "clip_frac", "kl", "entropy", "rollout_s",
           "update_s", "tokens_per_s", "loss", "grad_norm", "lr")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("rl_ws")
    synthetic_workspace(root, n_train=16, n_test=4)
    return root


pytestmark = pytest.mark.usefixtures("one_thread")


def rl_args(ws: Path, out: Path, *extra: str) -> list[str]:
    return ["--recipe", "recipes/rl_tiny.toml", "--model", "tiny-student", "--tokenizer", str(ws / "tok"),
            "--data", str(ws / "train.jsonl"), "--out", str(out), "--max-steps", "3", "--set", "save_every=1",
            "--set", "optim.lr=3e-3", "--set", "optim.warmup_steps=1", "--set", "grpo.prompts_per_step=2",
            "--set", "grpo.group_size=4", "--set", "grpo.max_new_tokens=12", "--set", "grpo.micro_batch_size=3",
            "--set", 'grpo.format_pattern="[0-9]"', "--set", "grpo.format_weight=1.0", *extra]


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_rl_stage_end_to_end(workspace, tmp_path):
    out = tmp_path / "run"
    assert train.main(rl_args(workspace, out, "--set", f"data.eval_path={workspace / 'eval.jsonl'}",
                              "--set", "eval_every=2")) == 0
    assert (out / "DONE").exists() and (out / "plots.png").exists() and (out / "config.toml").exists()
    rows = records(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert all(k in r for k in RL_KEYS), sorted(set(RL_KEYS) - set(r))
        assert r["accuracy"] == r["reward/correct"]
        for name in ("correct", "format"):  # 0/1 rewards: population std^2 = m (1 - m)
            m = r[f"reward/{name}"]
            assert r[f"reward_std/{name}"] == pytest.approx(math.sqrt(m * (1 - m)), abs=1e-6)
        assert r["completion_len"] <= r["completion_len_max"] <= 12
        assert 0 <= r["truncated_frac"] <= 1 and 0 <= r["clip_frac"] <= 1
        assert r["kl"] == 0 and r["entropy"] > 0  # beta = 0: no reference; entropy of a random policy
    assert [("eval_accuracy" in r) for r in rows] == [False, True, True]  # every 2 steps and at the end
    # The exported policy moved away from the seeded initial weights (the format reward had variance).
    assert any(0 < r["reward/format"] < 1 for r in rows)
    final = load_file(out / "final" / "model.safetensors")
    torch.manual_seed(0)
    initial = Transformer(replace(PRESETS["tiny-student"], vocab_size=final["model.embed_tokens.weight"].shape[0]))
    assert not torch.equal(final["model.norm.weight"], initial.norm.weight.detach())


def test_rl_resume_is_bit_exact(workspace, tmp_path):
    """beta > 0 (the reference is the initial policy, also after resuming) and mu = 2 (sampler log-probs)."""
    knobs = ("--set", "grpo.beta=0.04", "--set", "grpo.mu=2")
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert train.main(rl_args(workspace, whole, *knobs)) == 0
    assert train.main(rl_args(workspace, parts, *knobs, "--set", "stop_at=1")) == 0
    assert not (parts / "DONE").exists()
    assert train.main(rl_args(workspace, parts, *knobs, "--resume")) == 0
    a, b = load_file(whole / "final" / "model.safetensors"), load_file(parts / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    same = ("reward", "reward/format", "completion_len", "kl", "loss", "grad_norm")
    assert [[r[k] for k in same] for r in records(whole)] == [[r[k] for k in same] for r in records(parts)]
    assert any(r["kl"] > 0 for r in records(whole))  # the second update of a step moves away from pi_ref


def test_rl_stage_under_torchrun(workspace, tmp_path):
    """2 ranks (gloo), each sampling whole groups of its own prompts: the run completes, and the records
    combine the ranks (every completion token is a loss token: sum over ranks == mean length x 2 x 4)."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train.py"), *rl_args(workspace, out, "--max-steps", "2")]
    result = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}, cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "DONE").exists()
    rows = records(out)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["loss_tokens"] == pytest.approx(r["completion_len"] * 2 * 4)
        assert r["completion_len"] <= r["completion_len_max"] <= 12


@pytest.mark.parametrize("recipe_text, message", [
    ('stage = "rl"\n[grpo]\ngroup_sise = 8\n', "unknown config key 'grpo.group_sise'"),
    ('stage = "rl"\n[grpo]\ngroup_size = 1\n', "[grpo]: GRPOConfig.group_size must be >= 2"),
    ('stage = "rl"\nparallel = "fsdp"\n', "stage 'rl' needs config key 'parallel' = 'ddp'"),
    ('stage = "rl"\n[data]\ntask = "chat"\n', "config key 'data.task' must be one of ('gsm8k', 'synthetic', 'math'"),
    ('stage = "rl"\n[grpo]\nadvantage = "ppo"\n', "[grpo]: GRPOConfig.advantage must be one of ('grpo'"),
])
def test_bad_rl_config_is_one_line_error(workspace, tmp_path, capsys, recipe_text, message):
    recipe = tmp_path / "bad.toml"
    recipe.write_text(recipe_text)
    out = tmp_path / "run"
    assert train.main(["--recipe", str(recipe), "--model", "tiny-student", "--tokenizer", str(workspace / "tok"),
                       "--data", str(workspace / "train.jsonl"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not out.exists()


def fake_batch(lengths: list[int]) -> RolloutBatch:
    mask = torch.tensor([[j < n for j in range(max(lengths))] for n in lengths])  # (B, C)
    return RolloutBatch(input_ids=torch.zeros(len(lengths), 1 + mask.shape[1], dtype=torch.long),
                        attention_mask=torch.ones(len(lengths), 1 + mask.shape[1], dtype=torch.long),
                        completion_mask=mask, sampler_logprobs=torch.zeros(mask.shape),
                        truncated=torch.zeros(len(lengths), dtype=torch.bool), completions=[], references=[],
                        prompt_length=1, group_size=2)


def test_rl_record_combines_ranks_like_one_batch(monkeypatch):
    """Two ranks' per-rank figures (as rl/grpo.py reports them) combine into those of the joined batch."""
    rewards = [torch.tensor([1.0, 0.0, 1.0, 1.0]), torch.tensor([0.0, 0.0, 0.5, 1.0])]
    clipped, tokens = [torch.tensor(3.0), torch.tensor(1.0)], [torch.tensor(10.0), torch.tensor(30.0)]
    lengths = [[2, 5, 3, 1], [7, 2, 2, 4]]
    ranks = [{"reward/correct": r.mean().item(), "reward_std/correct": r.std(correction=0).item(),
              "reward": r.mean().item(), "reward_std": r.std(correction=0).item(), "zero_std_frac": 0.0,
              "completion_len": sum(n) / len(n), "truncated_frac": 0.0, "loss": 0.25, "grad_norm": 2.0,
              "clip_frac": (c / t).item(), "kl": 0.0, "entropy": 1.0, "loss_tokens": t.item(),
              "completion_len_max": max(n), "completion_tokens": sum(n)}
             for r, c, t, n in zip(rewards, clipped, tokens, lengths)]
    monkeypatch.setattr(rl_stage, "all_gather_objects", lambda obj: ranks)
    record = rl_stage.rl_record(ranks[0], fake_batch(lengths[0]), rollout_s=1.5, update_s=0.5)
    joined = torch.cat(rewards)
    assert record["reward"] == pytest.approx(joined.mean().item())
    assert record["reward_std/correct"] == pytest.approx(joined.std(correction=0).item())
    assert record["clip_frac"] == pytest.approx((sum(clipped) / sum(tokens)).item())
    assert record["completion_len"] == pytest.approx(sum(map(sum, lengths)) / 8)
    assert record["completion_len_max"] == 7 and record["loss"] == 0.5 and record["grad_norm"] == 2.0
    assert record["tokens_per_s"] == pytest.approx(sum(map(sum, lengths)) / 2.0)


def test_rl_raises_a_reward_the_policy_can_learn(workspace, tmp_path):
    """The wiring end to end (prompts, references, rewards, update sign): a random policy rewarded for
    emitting a digit emits more of them within 20 steps."""
    out = tmp_path / "run"
    assert train.main(rl_args(workspace, out, "--max-steps", "20", "--set", "optim.lr=1e-3",
                              "--set", "grpo.prompts_per_step=4", "--set", "grpo.group_size=8",
                              "--set", "grpo.max_new_tokens=8", "--set", "grpo.micro_batch_size=32",
                              "--set", "save_every=20")) == 0
    format_reward = [r["reward/format"] for r in records(out)]
    first, last = sum(format_reward[:5]) / 5, sum(format_reward[-5:]) / 5
    assert last > first + 0.2, format_reward


def test_rl_prompts_and_references_are_evals(tmp_path):
    """Stage rl trains on the prompts eval.py scores: MATH-500 rows and HumanEval-format code tasks."""
    from data.tasks import load_rows, render_prompts
    from trainer.config import DataConfig, TrainConfig
    tokenizer = synthetic_workspace(tmp_path, n_train=16, n_test=1)
    code = tmp_path / "code.jsonl"
    write_jsonl(code, make_code_tasks(seed=0, n=3))
    for task, path in (("math", shared_data("math500/test.jsonl")), ("synthetic-code", code)):
        rows = load_rows(task, path)
        prompts = rl_stage.load_prompts(rows, TrainConfig(data=DataConfig(task=task, style="chat")), tokenizer)
        assert len(prompts) == len(rows)
        expected = render_prompts(tokenizer, rows, task, "chat")
        assert [ids for ids, _ in prompts] == [tokenizer.encode(p) for p in expected]
        assert [ref for _, ref in prompts] == [row["reference"] for row in rows]
    assert "Complete the following Python function" in expected[0] and rows[0]["prompt"] in expected[0]
    with pytest.raises(FileNotFoundError, match="nope.jsonl not found"):
        load_rows("math", tmp_path / "nope.jsonl")


def test_rl_stage_on_a_code_task_rewards_through_the_sandbox(workspace, tmp_path):
    """The code grader end to end: rollouts of the synthetic code task are run in the sandbox (a random
    policy passes none) and the record holds the correctness reward."""
    code = tmp_path / "code.jsonl"
    write_jsonl(code, make_code_tasks(seed=0, n=4))
    out = tmp_path / "run"
    assert train.main(rl_args(workspace, out, "--data", str(code), "--max-steps", "1", "--set",
                              'data.task="synthetic-code"')) == 0
    (record,) = records(out)
    assert record["reward/correct"] == 0 and "reward/format" in record and (out / "DONE").exists()
