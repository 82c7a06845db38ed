"""Dataset -> tokenized examples -> padded micro-batches, sharded across ranks.

Sharding is a pure function of (seed, step): epoch e uses the permutation randperm(n, seed + e);
optimizer step s takes the next `global_batch` = micro_batch_size * grad_accum_steps * world_size
indices of it and splits them into world_size * grad_accum_steps micro-batches, micro-batch
`rank * grad_accum_steps + a` going to rank `rank`, accumulation step `a`. So every rank sees a
disjoint shard, the data position is (epoch, index) = divmod(step, steps_per_epoch) — resuming
needs no iterator state — and the set of examples in an optimizer step does not depend on how it
is split between ranks and accumulation steps. The incomplete last global batch of an epoch is
dropped (it would change the batch size of one step).
"""
from __future__ import annotations

from pathlib import Path

import torch

from data.readers import TRAINING_FORMATS
from data.templates import IGNORE_INDEX, chat_example, format_completion, render_prompt, tokenize_example
from model.tokenizer import Tokenizer
from trainer.config import DataConfig

Example = tuple[list[int], list[int]]  # (input_ids, labels) with -100 on tokens not learned


def tokenize_row(row: dict, cfg: DataConfig, tokenizer: Tokenizer) -> Example:
    """Chat rows learn every assistant turn; gsm8k and prompt/completion rows learn the completion."""
    if cfg.format == "chat":
        return chat_example(tokenizer, row["messages"], cfg.max_len)
    if cfg.format == "gsm8k":
        prompt = render_prompt(tokenizer, row["question"], cfg.style, task=cfg.task)
        completion = format_completion(row["answer"], cfg.style)
    else:
        prompt, completion = row["prompt"], row["completion"]
    return tokenize_example(tokenizer, prompt, completion, cfg.max_len, cfg.style)


def load_examples(path: str, cfg: DataConfig, tokenizer: Tokenizer) -> list[Example]:
    """Read a JSONL file of `cfg.format` and tokenize every row (errors name the file and the row)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"data file {path} not found")
    examples = []
    for i, row in enumerate(TRAINING_FORMATS[cfg.format](path)):
        try:
            examples.append(tokenize_row(row, cfg, tokenizer))
        except ValueError as e:
            raise ValueError(f"{path}: row {i + 1} (blank lines not counted): {e}") from None
    if not examples:
        raise ValueError(f"{path}: no examples")
    return examples


def steps_per_epoch(num_examples: int, global_batch: int, source: str) -> int:
    if num_examples < global_batch:
        raise ValueError(f"{source}: {num_examples} examples, fewer than one global batch "
                         f"(micro_batch_size * grad_accum_steps * world_size = {global_batch})")
    return num_examples // global_batch


def data_position(step: int, num_examples: int, global_batch: int) -> tuple[int, int]:
    """(epoch, index of the global batch within the epoch) that optimizer step `step` (0-based) reads."""
    return divmod(step, steps_per_epoch(num_examples, global_batch, "data"))


def rank_micro_batches(examples: list[Example], step: int, seed: int, micro_batch_size: int,
                       grad_accum_steps: int, rank: int, world_size: int) -> list[list[Example]]:
    """The grad_accum_steps micro-batches (lists of examples) this rank trains on at `step`."""
    global_batch = micro_batch_size * grad_accum_steps * world_size
    epoch, index = data_position(step, len(examples), global_batch)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed + epoch))
    chosen = order[index * global_batch:(index + 1) * global_batch].tolist()
    first = rank * grad_accum_steps
    return [[examples[i] for i in chosen[m * micro_batch_size:(m + 1) * micro_batch_size]]
            for m in range(first, first + grad_accum_steps)]


def collate(examples: list[Example], pad_id: int, device) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: input_ids, attention_mask (1 = token), labels (-100 on padding)."""
    T = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), T), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(examples), T), dtype=torch.long)  # (B, T)
    for row, (ids, lab) in enumerate(examples):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        labels[row, :len(lab)] = torch.tensor(lab)
        attention_mask[row, :len(ids)] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    return {k: v.to(device) for k, v in batch.items()}


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """Next-token targets: position t predicts labels[t + 1]; the last position predicts nothing."""
    return torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1)  # (B, T)
