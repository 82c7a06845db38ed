"""Per-stage objectives: the seam between the training loop and what is being learned.

An objective maps (model, micro-batch) to (loss SUM over the micro-batch's valid tokens, a dict of
named part sums for the records). The loop divides by the global token count (`count_tokens`
summed over every micro-batch of the optimizer step on every rank), so an objective never
normalises. A new stage (GRPO) is one more function of this shape plus its own count.

The lm_head and the loss are fused (losses/, chunked): the model returns its final hidden states
and logits exist only `chunk_size` tokens at a time.
"""
from __future__ import annotations

from functools import partial

import torch

from data.templates import IGNORE_INDEX
from losses import Head, cross_entropy, generalized_jsd
from trainer.batches import shifted_targets
from trainer.config import TrainConfig
from trainer.distributed import unwrap


def count_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Valid next-token targets in a micro-batch (completion tokens; prompt and padding excluded)."""
    return (shifted_targets(batch["labels"]) != IGNORE_INDEX).sum()


def student_head(model, batch) -> Head:
    hidden = model(batch["input_ids"], batch["attention_mask"], return_hidden=True)  # (B, T, d)
    return Head(hidden, unwrap(model).output_weight)


def sft_objective(model, batch, cfg: TrainConfig):
    """Sum over completion tokens of -log p(y_t | y_<t) (completion-only SFT)."""
    ce = cross_entropy(student_head(model, batch), shifted_targets(batch["labels"]),
                       reduction="sum", chunk_size=cfg.chunk_size)
    return ce, {"ce": ce.detach()}


def kd_objective(model, batch, cfg: TrainConfig, teacher, vocab_size: int, alpha: float):
    """alpha * CE(labels) + (1 - alpha) * D(teacher || student), both summed over completion tokens
    (alpha = kd.alpha; 0 on GKD's on-policy steps, where the labels are the student's own samples).

    D is forward KL(p_T || q_S) (Hinton et al. 2015; mode-covering), reverse KL(q_S || p_T)
    (MiniLLM, Gu et al. 2024; mode-seeking) or the generalized JSD_beta of GKD (Agarwal et al.
    2024; losses/distill.py scales it so beta=0/1 are the two KLs), at temperature `kd.temperature`,
    times T^2 when `kd.scale_t2`. Both heads are sliced to the tokenizer's `vocab_size`
    rows: checkpoints pad their heads to different sizes (Qwen2.5-7B 152,064 vs 0.5B 151,936 rows),
    and the padded rows are not tokens, so the distributions are compared on the real ids only.
    """
    targets = shifted_targets(batch["labels"])  # (B, T)
    mask = targets != IGNORE_INDEX
    student = student_head(model, batch)
    with torch.no_grad():
        teacher_hidden = teacher(batch["input_ids"], batch["attention_mask"], return_hidden=True)  # (B, T, d_T)
    student_v = Head(student.hidden, student.weight[:vocab_size])
    teacher_v = Head(teacher_hidden, teacher.output_weight[:vocab_size])
    beta = {"forward_kl": 0.0, "reverse_kl": 1.0, "jsd": cfg.kd.beta}[cfg.kd.loss]
    kd = generalized_jsd(student_v, teacher_v, beta, cfg.kd.temperature, mask, cfg.kd.scale_t2,
                         reduction="sum", chunk_size=cfg.chunk_size)
    with torch.set_grad_enabled(torch.is_grad_enabled() and alpha > 0):  # alpha = 0: CE for the record only
        ce = cross_entropy(student, targets, reduction="sum", chunk_size=cfg.chunk_size)
    loss = alpha * ce + (1 - alpha) * kd
    return loss, {"ce": ce.detach(), "kd": kd.detach()}


def make_objective(cfg: TrainConfig, teacher=None, vocab_size: int | None = None, on_policy: bool = False):
    """The (model, batch) -> (loss_sum, parts) function of cfg.stage; `on_policy`: for KD batches of
    student samples (trainer/on_policy.py), the divergence alone."""
    if cfg.stage == "kd":
        alpha = 0.0 if on_policy else cfg.kd.alpha
        return partial(kd_objective, cfg=cfg, teacher=teacher, vocab_size=vocab_size, alpha=alpha)
    return partial(sft_objective, cfg=cfg)
