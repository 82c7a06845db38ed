"""Stages sft and kd: one optimizer step on a global batch of tokenized examples.

A step's loss (the rule torchtitan uses):
    L = (sum over every valid target token t of the step, on all ranks, of loss_t) / N_global
where N_global counts those tokens; it is known before any forward pass (the labels say which tokens
count) and summed over ranks with one all-reduce. Each micro-batch backpropagates its token SUM /
N_global; DDP and FSDP average gradients over ranks, so each rank also multiplies by world_size. The
update is then that of one big batch: 1 rank x 4 accumulation steps, 2 x 2 and 4 x 1 agree. Averaging
per-micro-batch means instead would weight a token of a short micro-batch more than one of a long one.

The objectives map (model, micro-batch) to (loss SUM over the micro-batch's valid tokens, named part
sums for the records). The lm_head and the loss are fused (losses/, chunked): the model returns its
final hidden states and logits exist only `chunk_size` tokens at a time.
  sft   CE(labels) over completion tokens
  kd    alpha * CE(labels) + (1 - alpha) * D(teacher || student), D = DIVERGENCES[kd.loss] (losses/distill.py);
        with kd.on_policy_lambda > 0 that fraction of the steps trains on completions the student samples,
        scored by the divergence alone (GKD; trainer/on_policy.py)
"""
from __future__ import annotations

import time
from contextlib import nullcontext

import torch

from data.templates import IGNORE_INDEX
from losses import DIVERGENCES, Head, cross_entropy, distill
from model.lora import base_fingerprint
from model.parallel import NonFiniteError, all_reduce_sum, clip_grad_norm, unwrap
from model.tokenizer import Tokenizer
from trainer.batches import collate, data_position, load_examples, rank_micro_batches, shifted_targets, steps_per_epoch
from trainer.config import TrainConfig
from trainer.distributed import Dist
from trainer.models import autocast
from trainer.on_policy import on_policy_step, student_examples
from trainer.run import digest


def count_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Valid next-token targets in a micro-batch (completion tokens; prompt and padding excluded)."""
    return (shifted_targets(batch["labels"]) != IGNORE_INDEX).sum()


def student_head(model, batch) -> Head:
    hidden = model(batch["input_ids"], batch["attention_mask"], return_hidden=True)  # (B, T, d)
    return Head(hidden, unwrap(model).output_weight)


def sft_loss(model, batch, cfg: TrainConfig):
    """Sum over completion tokens of -log p(y_t | y_<t) (completion-only SFT)."""
    ce = cross_entropy(student_head(model, batch), shifted_targets(batch["labels"]),
                       reduction="sum", chunk_size=cfg.chunk_size)
    return ce, {"ce": ce.detach()}


def kd_loss(model, batch, cfg: TrainConfig, teacher, vocab_size: int, alpha: float):
    """alpha * CE(labels) + (1 - alpha) * D(teacher || student), both summed over completion tokens
    (alpha = kd.alpha; 0 on GKD's on-policy steps, where the labels are the student's own samples).

    D is DIVERGENCES[kd.loss] at temperature `kd.temperature`, times T^2 when `kd.scale_t2`: forward KL
    (Hinton et al. 2015; mode-covering), reverse KL (MiniLLM, Gu et al. 2024; mode-seeking), the
    generalized JSD_beta of GKD (Agarwal et al. 2024), ... Both heads are sliced to the tokenizer's
    `vocab_size` rows: checkpoints pad their heads to different sizes (Qwen2.5-7B 152,064 vs 0.5B
    151,936 rows), and the padded rows are not tokens, so the distributions are compared on real ids only.
    """
    targets = shifted_targets(batch["labels"])  # (B, T)
    student = student_head(model, batch)
    with torch.no_grad():
        teacher_hidden = teacher(batch["input_ids"], batch["attention_mask"], return_hidden=True)  # (B, T, d_T)
    divergence = DIVERGENCES[cfg.kd.loss](temperature=cfg.kd.temperature, beta=cfg.kd.beta)
    student_v = Head(student.hidden, student.weight[:vocab_size])
    teacher_v = Head(teacher_hidden, teacher.output_weight[:vocab_size])
    kd = distill(student_v, teacher_v, divergence, targets != IGNORE_INDEX, cfg.kd.scale_t2, reduction="sum",
                 chunk_size=cfg.chunk_size)
    with torch.set_grad_enabled(torch.is_grad_enabled() and alpha > 0):  # alpha = 0: CE for the record only
        ce = cross_entropy(student, targets, reduction="sum", chunk_size=cfg.chunk_size)
    return alpha * ce + (1 - alpha) * kd, {"ce": ce.detach(), "kd": kd.detach()}


class SupervisedStage:
    """sft (teacher None) or kd on `examples`; `eval_examples` give the eval loss."""

    def __init__(self, cfg: TrainConfig, d: Dist, tokenizer: Tokenizer, teacher, examples, eval_examples):
        self.cfg, self.d, self.tokenizer, self.teacher = cfg, d, tokenizer, teacher
        self.examples, self.eval_examples = examples, eval_examples
        self.num_examples, self.evaluates = len(examples), bool(eval_examples)
        self.examples_per_step = cfg.data.micro_batch_size * cfg.data.grad_accum_steps * d.world_size
        steps_per_epoch(self.num_examples, self.examples_per_step, cfg.data.path)

    @classmethod
    def load(cls, cfg: TrainConfig, d: Dist, tokenizer: Tokenizer, teacher) -> "SupervisedStage":
        """Read and tokenize the training (and eval) data; errors name the file and row."""
        examples = load_examples(cfg.data.path, cfg.data, tokenizer)
        eval_examples = load_examples(cfg.data.eval_path, cfg.data, tokenizer) if cfg.data.eval_path else []
        return cls(cfg, d, tokenizer, teacher, examples, eval_examples)

    def input_digests(self) -> dict[str, str]:
        digests = {"training data": digest(self.examples), "eval data": digest(self.eval_examples)}
        return {**digests, "teacher weights": base_fingerprint(self.teacher)} if self.teacher is not None else digests

    def loss(self, model, batch, on_policy: bool = False):
        if self.teacher is None:
            return sft_loss(model, batch, self.cfg)
        alpha = 0.0 if on_policy else self.cfg.kd.alpha
        return kd_loss(model, batch, self.cfg, self.teacher, self.tokenizer.vocab_size, alpha)

    def step(self, model, optimizer, step: int, record: bool) -> dict:
        """One optimizer step; its record (collective) when `record`."""
        t0 = time.perf_counter()
        micro_batches, on_policy = self.get_batch(model, step)
        sums = self.forward_backward(model, micro_batches, on_policy)
        if not torch.isfinite(sums["loss"]):
            raise NonFiniteError(f"the loss is {sums['loss'].item()}")
        grad_norm = clip_grad_norm(model, self.cfg.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if not record:
            return {}
        inputs = all_reduce_sum(sum(b["attention_mask"].sum() for b in micro_batches).float()).item()
        out = {**{k: v.item() for k, v in sums.items()}, "grad_norm": grad_norm.item(),
               "epoch": data_position(step, self.num_examples, self.examples_per_step)[0],
               "tokens_per_s": inputs / (time.perf_counter() - t0)}  # non-padding input tokens, all ranks
        return {**out, "on_policy": int(on_policy)} if self.teacher is not None else out

    def get_batch(self, model, step: int) -> tuple[list[dict], bool]:
        """This rank's padded micro-batches for optimizer step `step`, and whether their completions are
        the student's samples (on-policy KD, trainer/on_policy.py) rather than the dataset's."""
        cfg, d = self.cfg, self.d
        micro = rank_micro_batches(self.examples, step, cfg.seed, cfg.data.micro_batch_size,
                                   cfg.data.grad_accum_steps, d.rank, d.world_size)
        on_policy = on_policy_step(step, cfg)
        if on_policy:
            with autocast(cfg, d.device):
                micro = student_examples(model, micro, step, cfg, self.tokenizer, d)
        return [collate(m, self.tokenizer.pad_id, d.device) for m in micro], on_policy

    def forward_backward(self, model, micro_batches: list[dict], on_policy: bool) -> dict:
        """Forward/backward every micro-batch with the global-token normalisation; return the step's means."""
        n_global = all_reduce_sum(sum(count_tokens(b) for b in micro_batches).float())
        norm = n_global.clamp(min=1)
        sums = {}
        for i, batch in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            sync = model.no_sync() if hasattr(model, "no_sync") and not last else nullcontext()  # DDP: one all-reduce
            with sync:
                with autocast(self.cfg, self.d.device):
                    loss_sum, parts = self.loss(model, batch, on_policy)
                (loss_sum * self.d.world_size / norm).backward()
            for name, value in {"loss": loss_sum.detach(), **parts}.items():
                sums[name] = sums.get(name, 0.0) + value.float()
        return {"loss_tokens": n_global, **{k: all_reduce_sum(v) / norm for k, v in sums.items()}}

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        """Mean loss per valid token over the eval set (each rank takes every world_size-th micro-batch)."""
        model.eval()
        mb, d = self.cfg.data.micro_batch_size, self.d
        total, count = torch.zeros((), device=d.device), torch.zeros((), device=d.device)
        for start in range(d.rank * mb, len(self.eval_examples), mb * d.world_size):
            batch = collate(self.eval_examples[start:start + mb], self.tokenizer.pad_id, d.device)
            with autocast(self.cfg, d.device):
                total += self.loss(model, batch)[0].float()
            count += count_tokens(batch)
        model.train()
        return {"eval_loss": (all_reduce_sum(total) / all_reduce_sum(count).clamp(min=1)).item()}
