"""Stage rl: GRPO (rl/grpo.py). Each step samples group_size completions for prompts_per_step prompts,
rewards them with the task's grader, and takes grpo.mu optimizer steps on them.

Data: the rows of data/tasks.py's task `data.task` (gsm8k, synthetic, math, humaneval, synthetic-code),
read, rendered and graded exactly as eval.py does: a prompt is eval's prompt for the row, its reference
the row's reference (final answer, or the HumanEval row for the code grader), the stop strings eval's
for the task and style. Step s reads the prompts_per_step prompts that trainer/batches.py's sharding
gives to global batch s (a seeded permutation per epoch) and samples with model/generate.py's
stream_seed(grpo.seed, s, rank, world_size), so the prompts and samples of a step are a function of
(seed, step) and resuming needs no iterator.

Records (metrics.jsonl) combine the ranks' figures exactly: every rank samples as many completions,
so per-completion means are means of the ranks' means, and per-token figures (clip_frac, kl,
entropy) are weighted by each rank's loss tokens.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import replace
from typing import Any

from data.tasks import TASKS, load_rows, render_prompts, stop_strings
from model.generate import stream_seed
from model.lora import WithoutAdapters, lora_layers
from model.parallel import all_gather_objects, unwrap
from model.tokenizer import Tokenizer
from rl.grpo import grpo_step
from rl.rollout import RolloutBatch, rollout
from trainer.batches import data_position, rank_micro_batches, steps_per_epoch
from trainer.config import TrainConfig
from trainer.distributed import Dist
from trainer.evaluation import evaluate
from trainer.models import autocast
from trainer.run import digest

Prompt = tuple[list[int], Any]  # (prompt token ids, reference answer)
PER_COMPLETION = ("reward", "zero_std_frac", "completion_len", "truncated_frac")  # equal counts on every rank
PER_TOKEN = ("clip_frac", "kl", "entropy")


def load_prompts(rows: list[dict], cfg: TrainConfig, tokenizer: Tokenizer) -> list[Prompt]:
    """eval.py's rendered prompts for `rows` of task data.task, tokenized, with their references."""
    prompts = render_prompts(tokenizer, rows, cfg.data.task, cfg.data.style)
    return [(tokenizer.encode(prompt), row["reference"]) for prompt, row in zip(prompts, rows)]


def reference_model(model):
    """The KL reference, GRPO's pi_ref: the initial policy. With LoRA that is the frozen base (the adapters
    start at B = 0), so the same model with its adapters off; else a frozen copy."""
    if lora_layers(model):
        return WithoutAdapters(model)
    return copy.deepcopy(model).eval().requires_grad_(False)


def step_rollouts(model, prompts: list[Prompt], step: int, cfg: TrainConfig, tokenizer: Tokenizer,
                  d: Dist) -> RolloutBatch:
    """This rank's group_size samples of each of its prompts of global step `step` (a contiguous block of
    the step's prompts_per_step prompts: groups are never split across ranks)."""
    chosen = rank_micro_batches(prompts, step, cfg.seed, cfg.grpo.prompts_per_step, 1, 0, 1)[0]
    per_rank = cfg.grpo.prompts_per_step // d.world_size
    mine = chosen[d.rank * per_rank:(d.rank + 1) * per_rank]
    params = replace(cfg.grpo.sampling_params(stop_strings(cfg.data.task, cfg.data.style)),
                     seed=stream_seed(cfg.grpo.seed, step, d.rank, d.world_size))
    return rollout(model, [p for p, _ in mine], [r for _, r in mine], params, tokenizer.stop_ids, tokenizer)


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
    params = replace(cfg.grpo.sampling_params(), temperature=0.0, n=1)
    batch_size = max(1, cfg.grpo.prompts_per_step * cfg.grpo.group_size // d.world_size)
    summary = evaluate(unwrap(model), tokenizer, rows, cfg.data.task, params, cfg.data.style, batch_size,
                       progress=False)
    return summary["pass@1"]


class GRPOStage:
    """GRPO on the prompts of `rows`; `eval_rows` give the greedy eval accuracy."""

    def __init__(self, cfg: TrainConfig, d: Dist, tokenizer: Tokenizer, ref_model, rows: list[dict],
                 eval_rows: list[dict]):
        if cfg.grpo.prompts_per_step % d.world_size:  # each rank samples whole groups of its own prompts
            raise ValueError(f"config key 'grpo.prompts_per_step' ({cfg.grpo.prompts_per_step}) must be a multiple "
                             f"of the number of ranks ({d.world_size})")
        self.cfg, self.d, self.tokenizer, self.ref_model, self.eval_rows = cfg, d, tokenizer, ref_model, eval_rows
        self.evaluates = bool(eval_rows)
        self.prompts = load_prompts(rows, cfg, tokenizer)
        self.num_examples, self.examples_per_step = len(self.prompts), cfg.grpo.prompts_per_step
        steps_per_epoch(self.num_examples, self.examples_per_step, cfg.data.path)
        self.reward_fns = cfg.grpo.reward_fns(TASKS[cfg.data.task].grader)

    @classmethod
    def load(cls, cfg: TrainConfig, d: Dist, tokenizer: Tokenizer, model) -> "GRPOStage":
        """Read the task's rows; the KL reference (the initial policy, also when resuming) when grpo.beta > 0."""
        ref_model = reference_model(model) if cfg.grpo.beta > 0 else None
        rows = load_rows(cfg.data.task, cfg.data.path)
        eval_rows = load_rows(cfg.data.task, cfg.data.eval_path) if cfg.data.eval_path else []
        return cls(cfg, d, tokenizer, ref_model, rows, eval_rows)

    def input_digests(self) -> dict[str, str]:
        return {"training prompts": digest(self.prompts), "eval rows": digest(self.eval_rows)}

    def step(self, model, optimizer, step: int, record: bool) -> dict:
        """One rollout batch and grpo.mu optimizer steps on it; its record (collective) when `record`."""
        cfg, d = self.cfg, self.d
        t0 = time.perf_counter()
        with autocast(cfg, d.device):
            batch = step_rollouts(model, self.prompts, step, cfg, self.tokenizer, d)
        t1 = time.perf_counter()
        out = grpo_step(model, self.ref_model, optimizer, batch, self.reward_fns, cfg.grpo,
                        forward_context=lambda: autocast(cfg, d.device))
        if not record:
            return {}
        return {**rl_record(out, batch, t1 - t0, time.perf_counter() - t1),
                "epoch": data_position(step, self.num_examples, self.examples_per_step)[0]}

    def evaluate(self, model) -> dict:
        with autocast(self.cfg, self.d.device):
            return {"eval_accuracy": greedy_accuracy(model, self.tokenizer, self.eval_rows, self.cfg, self.d)}
