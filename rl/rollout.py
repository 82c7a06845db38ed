"""Rollouts: G sampled completions per prompt, packed as the token tensors the GRPO update needs.

`rollout` samples one batch with model/generate.py (one shared prefill per prompt, its G samples
decoded from copies of that prompt's KV cache) and packs, row p * G + g for sample g of prompt p:

    input_ids       [B, P + C]  left-padded prompt | right-padded completion (B = prompts x G)
    attention_mask  [B, P + C]  1 = real token
    completion_mask [B, C]      1 = completion token (the stop token included when one ended it)
    sampler_logprobs[B, C]      log pi(o_t) at temperature 1 as the sampler computed it: the
                                "old" log-probs of the importance ratio when mu > 1

`rollout_batches` walks a prompt list in steps of `prompts_per_step` prompts and gives each rank a
contiguous shard of whole prompts. All G samples of a prompt are generated on the rank that owns
the prompt, so groups are never split across ranks and the group mean/std of rl/advantages.py are
exact without communication.

Sampling may use temperature / top-p != 1 while the policy being optimised is the plain model at
temperature 1 (what the trainer computes); the difference between the two is not corrected for.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Iterator, Sequence

import torch

from model.generate import Completion, SamplingParams, generate, stream_seed
from model.parallel import unwrap


@dataclass
class RolloutBatch:
    input_ids: torch.Tensor  # (B, P + C) long
    attention_mask: torch.Tensor  # (B, P + C) long
    completion_mask: torch.Tensor  # (B, C) bool
    sampler_logprobs: torch.Tensor  # (B, C) float32, 0 at padding
    truncated: torch.Tensor  # (B,) bool: finish_reason == "length"
    completions: list[Completion]  # B, in row order (texts for the reward functions)
    references: list[Any]  # B: each row's reference answer (its prompt's, repeated G times)
    prompt_length: int  # P: completion slot j of row b is input_ids[b, P + j]
    group_size: int  # G

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device) -> "RolloutBatch":
        return replace(self, input_ids=self.input_ids.to(device), attention_mask=self.attention_mask.to(device),
                       completion_mask=self.completion_mask.to(device),
                       sampler_logprobs=self.sampler_logprobs.to(device), truncated=self.truncated.to(device))

    def select(self, rows: slice) -> "RolloutBatch":
        """Rows `rows` with the columns that are padding in all of them cut off (prompt left, completion right)."""
        P, mask = self.prompt_length, self.attention_mask[rows]
        lo = P - int(mask[:, :P].sum(1).max())  # first column holding a prompt token
        C = max(1, int(mask[:, P:].sum(1).max()))  # longest completion
        return RolloutBatch(
            input_ids=self.input_ids[rows, lo:P + C], attention_mask=mask[:, lo:P + C],
            completion_mask=self.completion_mask[rows, :C], sampler_logprobs=self.sampler_logprobs[rows, :C],
            truncated=self.truncated[rows], completions=self.completions[rows], references=self.references[rows],
            prompt_length=P - lo, group_size=self.group_size)


def pack(prompts: Sequence[list[int]], completions: list[Completion], references: Sequence[Any],
         group_size: int) -> RolloutBatch:
    """Pack `completions` (ordered by prompt, then sample) into a RolloutBatch of padded tensors.
    Padding holds token id 0: it is masked everywhere, so any id would do."""
    B = len(completions)
    P = max(len(p) for p in prompts)
    C = max(1, max(len(c.tokens) for c in completions))
    input_ids = torch.zeros(B, P + C, dtype=torch.long)
    attention_mask = torch.zeros(B, P + C, dtype=torch.long)
    sampler_logprobs = torch.zeros(B, C, dtype=torch.float32)
    for row, c in enumerate(completions):
        prompt, n = prompts[c.prompt_index], len(c.tokens)
        input_ids[row, P - len(prompt):P] = torch.tensor(prompt, dtype=torch.long)
        input_ids[row, P:P + n] = torch.tensor(c.tokens, dtype=torch.long)
        attention_mask[row, P - len(prompt):P + n] = 1
        sampler_logprobs[row, :n] = torch.tensor(c.logprobs_t1, dtype=torch.float32)
    return RolloutBatch(
        input_ids=input_ids, attention_mask=attention_mask,
        completion_mask=attention_mask[:, P:].bool(), sampler_logprobs=sampler_logprobs,
        truncated=torch.tensor([c.finish_reason == "length" for c in completions]),
        completions=completions, references=[references[c.prompt_index] for c in completions],
        prompt_length=P, group_size=group_size)


def rollout(model, prompts: Sequence[list[int]], references: Sequence[Any], params: SamplingParams,
            stop_ids: Sequence[int], tokenizer=None, batch_size: int | None = None) -> RolloutBatch:
    """Sample params.n completions for each prompt (token ids) and pack them; see module doc."""
    if len(prompts) != len(references):
        raise ValueError(f"{len(prompts)} prompts but {len(references)} references")
    model = unwrap(model)  # sampling needs no gradient synchronisation
    completions = generate(model, list(prompts), params, stop_ids, tokenizer=tokenizer, batch_size=batch_size)
    return pack(prompts, completions, references, params.n).to(model.output_weight.device)


def rollout_batches(model, prompts: Sequence[list[int]], references: Sequence[Any], params: SamplingParams,
                    stop_ids: Sequence[int], prompts_per_step: int, tokenizer=None, rank: int = 0,
                    world_size: int = 1, batch_size: int | None = None) -> Iterator[RolloutBatch]:
    """Yield one RolloutBatch per step: global step s covers prompts [s*N, (s+1)*N) (N = prompts_per_step),
    of which rank r owns the contiguous N / world_size block r. A last incomplete step is dropped.

    Sampling seed of step s on rank r: model/generate.py's stream_seed (pass a different params.seed for
    each epoch over the same prompts).
    """
    if prompts_per_step % world_size:
        raise ValueError(f"prompts_per_step ({prompts_per_step}) must be a multiple of world_size ({world_size})")
    per_rank = prompts_per_step // world_size
    for step in range(len(prompts) // prompts_per_step):
        lo = step * prompts_per_step + rank * per_rank
        step_params = replace(params, seed=stream_seed(params.seed, step, rank, world_size))
        yield rollout(model, prompts[lo:lo + per_rank], references[lo:lo + per_rank], step_params,
                      stop_ids, tokenizer, batch_size)
