"""Stage rl's pieces around rl/ (GRPO): prompts, the step's rollouts, the reference model, records.

Data: the rows of eval.py's task `data.task` (gsm8k, synthetic, math, humaneval, synthetic-code), read,
rendered and graded exactly as eval.py does: a prompt is eval's prompt for the row, its reference the
row's reference (final answer, or the HumanEval row for the code grader), the stop strings eval's for
the task and style. Step s reads the prompts_per_step
prompts that trainer/batches.py's sharding gives to global batch s (a seeded permutation per
epoch), so the prompts of a step are a function of (seed, step) and resuming needs no iterator.

Records (metrics.jsonl) combine the ranks' figures exactly: every rank samples as many completions,
so per-completion means are means of the ranks' means, and per-token figures (clip_frac, kl,
entropy) are weighted by each rank's loss tokens.
"""
from __future__ import annotations

import copy
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

from eval import TASKS, evaluate, render_prompts, stop_strings
from model.generate import SamplingParams
from model.lora import WithoutAdapters, lora_layers
from model.tokenizer import Tokenizer
from rl.rollout import RolloutBatch, rollout_batches
from trainer.batches import rank_micro_batches
from trainer.config import DataConfig, TrainConfig
from trainer.distributed import Dist, all_gather_objects, unwrap

Prompt = tuple[list[int], Any]  # (prompt token ids, reference answer)
PER_COMPLETION = ("reward", "zero_std_frac", "completion_len", "truncated_frac")  # equal counts on every rank
PER_TOKEN = ("clip_frac", "kl", "entropy")


def load_rows(path: str, cfg: DataConfig) -> list[dict]:
    """The rows of task cfg.task in `path` (errors name the file and line)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"data file {path} not found")
    rows = TASKS[cfg.task].load(path)
    if not rows:
        raise ValueError(f"{path}: no examples")
    return rows


def load_prompts(path: str, cfg: DataConfig, tokenizer: Tokenizer) -> list[Prompt]:
    """eval.py's rendered prompts for the rows of `path`, tokenized, with their references."""
    rows = load_rows(path, cfg)
    prompts = render_prompts(tokenizer, rows, cfg.task, cfg.style)
    return [(tokenizer.encode(prompt), row["reference"]) for prompt, row in zip(prompts, rows)]


def reference_model(model):
    """The KL reference, GRPO's pi_ref: the initial policy. With LoRA that is the frozen base (the adapters
    start at B = 0), so the same model with its adapters off; else a frozen copy."""
    if lora_layers(model):
        return WithoutAdapters(model)
    return copy.deepcopy(model).eval().requires_grad_(False)


def step_rollouts(model, prompts: list[Prompt], step: int, cfg: TrainConfig, tokenizer: Tokenizer,
                  d: Dist) -> RolloutBatch:
    """This rank's group_size samples of each of its prompts of global step `step`."""
    chosen = rank_micro_batches(prompts, step, cfg.seed, cfg.grpo.prompts_per_step, 1, 0, 1)[0]
    ids, references = [p for p, _ in chosen], [r for _, r in chosen]
    params = cfg.grpo.sampling_params(stop_strings(cfg.data.task, cfg.data.style))
    params = replace(params, seed=params.seed + step * d.world_size)  # rollout_batches adds the rank
    return next(rollout_batches(model, ids, references, params, tokenizer.stop_ids, cfg.grpo.prompts_per_step,
                                tokenizer, d.rank, d.world_size))


def rl_record(step_metrics: dict, batch: RolloutBatch, rollout_s: float, update_s: float) -> dict:
    """The step's figures over all ranks (collective). tokens_per_s: sampled completion tokens of all
    ranks per second of the step (rollout + update); accuracy: the mean correctness reward."""
    local = {**step_metrics, "completion_len_max": int(batch.completion_mask.sum(1).max()),
             "completion_tokens": int(batch.completion_mask.sum())}
    ranks = all_gather_objects(local)
    mean = lambda key: sum(r[key] for r in ranks) / len(ranks)  # noqa: E731
    record = {k: mean(k) for k in local if k in PER_COMPLETION or k.startswith("reward/")}
    for name in [k for k in local if k.startswith("reward_std")]:  # var = E[std_r^2 + mean_r^2] - mean^2
        mean_key = name.replace("reward_std", "reward")
        second_moment = sum(r[name] ** 2 + r[mean_key] ** 2 for r in ranks) / len(ranks)
        record[name] = math.sqrt(max(0.0, second_moment - record[mean_key] ** 2))
    record["accuracy"] = record["reward/correct"]
    record["completion_len_max"] = max(r["completion_len_max"] for r in ranks)
    record.update(rollout_s=rollout_s, update_s=update_s,
                  tokens_per_s=sum(r["completion_tokens"] for r in ranks) / (rollout_s + update_s))
    if "skipped" in local:  # every group filtered out on every rank: no update was made
        return {**record, "skipped": 1.0}
    tokens = sum(r["loss_tokens"] for r in ranks)
    record.update({k: sum(r[k] * r["loss_tokens"] for r in ranks) / tokens for k in PER_TOKEN})
    record.update(loss=sum(r["loss"] for r in ranks), loss_tokens=tokens, grad_norm=local["grad_norm"])
    return record


def greedy_accuracy(model, tokenizer: Tokenizer, rows: list[dict], cfg: TrainConfig, d: Dist) -> float:
    """Greedy pass@1 on `rows` with eval.py's prompts and grader (every rank runs all rows: same result).
    Prompts go `rollout rows` at a time, so evaluation fits in memory wherever the rollouts do."""
    params = SamplingParams(max_new_tokens=cfg.grpo.max_new_tokens, temperature=0.0)
    batch_size = max(1, cfg.grpo.prompts_per_step * cfg.grpo.group_size // d.world_size)
    summary = evaluate(unwrap(model), tokenizer, rows, cfg.data.task, params, cfg.data.style, batch_size,
                       progress=False)
    return summary["pass@1"]
