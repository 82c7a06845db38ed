"""Logit distillation: forward KL, reverse KL and the generalized Jensen-Shannon divergence, against a
dense teacher (logits or a Head) or a sparse top-k teacher that can be precomputed and stored.

Notation per token: student q = softmax(z_s / T), teacher p = softmax(z_t / T), temperature T
(Hinton et al. 2015, arXiv:1503.02531; their T^2 factor keeps gradient magnitudes comparable across T
and is applied when scale_t2=True).

- forward KL(p || q) = sum_v p_v (log p_v - log q_v): mass-covering; the classic KD loss.
- reverse KL(q || p) = sum_v q_v (log q_v - log p_v): mode-seeking (MiniLLM, arXiv:2306.08543).
- generalized JSD (GKD, Agarwal et al. 2024, arXiv:2306.13649), with the mixture m = beta p + (1 - beta) q:
      JSD_beta = [beta KL(p || m) + (1 - beta) KL(q || m)] / (beta (1 - beta)).
  GKD (and TRL) use the bracket alone, which tends to 0 at both ends; dividing by beta (1 - beta) makes
  it continuous on [0, 1] with JSD_0 = forward KL and JSD_1 = reverse KL (as beta -> 0,
  KL(p || m) -> KL(p || q) and KL(q || m) = O(beta^2)), so one knob slides from mass-covering to
  mode-seeking. At beta = 0.5 it is 4x the usual JSD.

Sparse teacher: the teacher's k most likely tokens (log-probs + ids) and one "rest" bucket holding
the remaining mass 1 - sum_topk p. The student's distribution is coarsened onto the same k + 1
buckets (its top-k ids' probabilities, and the rest summed) and the divergence is taken there.
With k = V there is no rest bucket and the loss equals full KD.

All functions reduce like losses/ce.py (mask, reduction "mean"/"sum"/"none", chunking with a Head).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
import torch

import kernels
from losses.chunked import (DEFAULT_CHUNK_SIZE, Head, Logits, as_logits, flatten_tokens, reduce_tokens, softmax_,
                            upcast)


@dataclass(frozen=True)
class SparseTeacher:
    """Top-k teacher distribution at `temperature`: logprobs / indices [..., k] and rest_logprob [...]
    = log(1 - sum of the top-k probabilities), -inf when k = V. Plain tensors, so a teacher pass can be
    precomputed and saved (torch.save); logprobs may be stored in bf16 and indices in int32: the loss
    upcasts them. Per token this costs 6k + 2 bytes instead of 2V (V = 151,936: 194 bytes at k = 32)."""

    logprobs: torch.Tensor
    indices: torch.Tensor
    rest_logprob: torch.Tensor
    temperature: float


def _topk_rows(logits: torch.Tensor, k: int, temperature: float):
    z = upcast(logits) / temperature  # (n, V)
    lse = z.logsumexp(-1)  # (n,)
    top, indices = z.topk(k, dim=-1)  # (n, k)
    rest = z.scatter(-1, indices, -math.inf).logsumexp(-1)  # (n,) log of the unnormalised rest mass
    return top - lse[:, None], indices, rest - lse


@torch.no_grad()
def sparse_teacher(teacher: Logits, k: int, temperature: float = 1.0,
                   chunk_size: int = DEFAULT_CHUNK_SIZE) -> SparseTeacher:
    """Keep the teacher's top-k log-probs at `temperature` and the rest mass (computed exactly, in
    log space), from logits [..., V] or a Head (processed `chunk_size` tokens at a time)."""
    vocab = teacher.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"k must be in [1, {vocab}] (the vocabulary size), got {k}")
    lead = teacher.shape[:-1]
    flat = flatten_tokens(teacher, lead, "teacher")
    parts = [_topk_rows(as_logits(flat[i:i + chunk_size]), k, temperature)
             for i in range(0, lead.numel(), chunk_size)]
    logprobs, indices, rest = (torch.cat(p) for p in zip(*parts))
    return SparseTeacher(logprobs.reshape(*lead, k), indices.reshape(*lead, k), rest.reshape(lead), temperature)


def _expectation(logp: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """sum_v p_v x_v per row, with 0 * x = 0 where p_v = 0 (a -inf log-prob, e.g. an empty bucket)."""
    p = logp.exp()
    return torch.where(p > 0, p * x, 0.0).sum(-1)


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) per row from log-probs [n, K]."""
    return _expectation(logp, logp - logq)


def _kl_to_mixture(logp: torch.Tensor, logq: torch.Tensor, w: float) -> torch.Tensor:
    """KL(P || (1 - w) P + w Q) = -sum_v p_v log((1 - w) + w q_v / p_v), evaluated as a logaddexp of
    log(1 - w) and log(w) + log q - log p: no overflow, and accurate when w is tiny (near the ends of
    the JSD's beta range, where this KL is O(w^2) and a naive log m - log p cancels catastrophically)."""
    return -_expectation(logp, torch.logaddexp(logp.new_tensor(math.log1p(-w)), math.log(w) + logq - logp))


def logprob_jsd(student_logp: torch.Tensor, teacher_logp: torch.Tensor, beta: float) -> torch.Tensor:
    """Generalized JSD_beta per row between log-prob vectors [n, K] (see the module docstring):
    beta = 0 -> KL(p || q), beta = 1 -> KL(q || p)."""
    if beta == 0:
        return _kl(teacher_logp, student_logp)
    if beta == 1:
        return _kl(student_logp, teacher_logp)
    # m = beta p + (1 - beta) q:  KL(p || m) / (1 - beta) + KL(q || m) / beta
    return (_kl_to_mixture(teacher_logp, student_logp, 1 - beta) / (1 - beta)
            + _kl_to_mixture(student_logp, teacher_logp, beta) / beta)


@dataclass(frozen=True)
class Divergence:
    """A per-token divergence D(p_teacher, q_student) of logit rows: __call__(student [n, V], teacher [n, V])
    -> [n]. Every divergence receives the two [kd] knobs: the temperature T (q = softmax(z_s / T),
    p = softmax(z_t / T)) and beta, the mixture weight of the JSD (the others ignore it). A subclass may
    add `value_and_grad_` (losses/chunked.py) to skip autograd on the chunked path."""

    temperature: float = 1.0
    beta: float = 0.5

    def __call__(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class ForwardKL(Divergence):
    """KL(p || q) = sum_v p_v (log p_v - log q_v) (Hinton et al. 2015); d KL / dz = (q - p) / T."""

    def __call__(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return kernels.kl_div(student, teacher, self.temperature, False)  # (n,)

    def value_and_grad_(self, student: torch.Tensor, weights: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """KL [n]; the student logits [n, V] are overwritten with d(sum_i weights_i KL_i)/dz (with q when
        weights is None)."""
        scale = 1.0 / self.temperature
        logp = torch.log_softmax(upcast(teacher) * scale if scale != 1 else upcast(teacher), -1)  # (n, V)
        logp.clamp_(min=torch.finfo(logp.dtype).min)  # -inf -> finite: the 0 * log 0 terms below give 0, not nan
        p = logp.exp()  # (n, V)
        # renormalise with torch.sum's cascade sum: torch's CPU log_softmax sums exp in one fp32 SIMD register,
        # its lse ~3e-5 low at V = 151,936 (kernels/log_softmax.py), which would add ~3e-5 nats to every KL
        total = p.sum(-1, keepdim=True)  # (n, 1)
        p.div_(total)
        logp.sub_(total.log())
        kl = (p * logp.sub_(student, alpha=scale)).sum(-1)  # (n,) sum p (log p - z / T), before z is overwritten
        # + lse(z / T) * sum_v p_v = sum p (log p - log q), with the computed sum p (its rounding times lse
        # matters for a small KL). student now holds q
        kl += softmax_(student, scale) * p.sum(-1)  # (n,)
        if weights is not None:
            student.sub_(p).mul_((scale * weights)[:, None])
        return kl


class ReverseKL(Divergence):
    """KL(q || p) = sum_v q_v (log q_v - log p_v) (MiniLLM, Gu et al. 2024);
    d KL / dz = q * (log q - log p - KL) / T."""

    def __call__(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return kernels.kl_div(student, teacher, self.temperature, True)  # (n,)

    def value_and_grad_(self, student: torch.Tensor, weights: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """As ForwardKL.value_and_grad_, for KL(q || p)."""
        scale = 1.0 / self.temperature
        logp = torch.log_softmax(upcast(teacher) * scale if scale != 1 else upcast(teacher), -1)  # (n, V)
        logq = torch.log_softmax(student if scale == 1 else student * scale, -1)  # (n, V)
        torch.exp(logq, out=student)  # student now holds q
        # renormalise both with torch.sum's cascade sum (torch's CPU log_softmax lse is ~3e-5 low at V = 151,936,
        # kernels/log_softmax.py): q and log q with q's sum, log p with its logsumexp (one [n, V] temporary)
        total = student.sum(-1, keepdim=True)  # (n, 1)
        student.div_(total)
        logq.sub_(total.log())
        logp.sub_(logp.logsumexp(-1, keepdim=True))
        kl = (student * logq.sub_(logp)).sum(-1)  # (n,) logq now holds log q - log p
        if weights is not None:
            student.mul_(logq.sub_(kl[:, None])).mul_((scale * weights)[:, None])
        return kl


class JSD(Divergence):
    """Generalized JSD_beta (GKD, Agarwal et al. 2024; scaled so beta = 0 / 1 are the two KLs, see the
    module docstring)."""

    def __call__(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        T = self.temperature
        return logprob_jsd(kernels.log_softmax(student, T), kernels.log_softmax(teacher, T), self.beta)


class TotalVariation(Divergence):
    """TV(p, q) = 1/2 sum_v |p_v - q_v|: symmetric and bounded in [0, 1] (as a distillation objective: Wen et al.
    2023, "f-Divergence Minimization for Sequence-Level Knowledge Distillation", arXiv:2307.15190)."""

    def __call__(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        q = torch.softmax(upcast(student) / self.temperature, -1)  # (n, V)
        p = torch.softmax(upcast(teacher) / self.temperature, -1)  # (n, V)
        return 0.5 * (p - q).abs().sum(-1)


# kd.loss -> divergence; a new one is a Divergence subclass and one entry here.
DIVERGENCES: dict[str, type[Divergence]] = {"forward_kl": ForwardKL, "reverse_kl": ReverseKL, "jsd": JSD,
                                            "tvd": TotalVariation}


def distill(student: Logits, teacher: Logits, token_divergence: Divergence, mask: torch.Tensor | None = None,
            scale_t2: bool = False, reduction: str = "mean", chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """`token_divergence` between a student and a dense teacher (logits [..., V] or Heads of the same
    vocabulary; the teacher is a constant), reduced over the tokens of `mask`, times T^2 when scale_t2."""
    if teacher.shape[-1] != student.shape[-1]:
        raise ValueError(f"teacher vocabulary {teacher.shape[-1]} != student vocabulary {student.shape[-1]}: "
                         "slice both heads to the shared tokenizer's ids")
    constant = Head(teacher.hidden.detach(), teacher.weight.detach()) if isinstance(teacher, Head) else teacher.detach()
    loss = reduce_tokens(token_divergence, student, (constant,), mask=mask, reduction=reduction, chunk_size=chunk_size)
    return loss * token_divergence.temperature ** 2 if scale_t2 else loss


class SparseDivergence(Divergence):
    """JSD_beta over a sparse teacher's k buckets, plus the rest bucket when k < V (module docstring)."""

    def __call__(self, student, logprobs, indices, rest_logprob) -> torch.Tensor:
        z = student / self.temperature  # (n, V)
        lse = kernels.logsumexp(z)  # (n,)
        indices = indices.long()  # (n, k) may be stored as int32
        student_logp = z.gather(-1, indices) - lse[:, None]  # (n, k)
        teacher_logp = upcast(logprobs)
        if indices.shape[-1] < z.shape[-1]:
            student_rest = kernels.logsumexp(z.scatter(-1, indices, -math.inf)) - lse  # (n,)
            student_logp = torch.cat([student_logp, student_rest[:, None]], -1)  # (n, k + 1)
            teacher_logp = torch.cat([teacher_logp, upcast(rest_logprob)[:, None]], -1)  # (n, k + 1)
        return logprob_jsd(student_logp, teacher_logp, self.beta)


def generalized_jsd(student: Logits, teacher: Logits | SparseTeacher, beta: float = 0.5,
                    temperature: float = 1.0, mask: torch.Tensor | None = None, scale_t2: bool = False,
                    reduction: str = "mean", chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """Distillation loss JSD_beta(p_teacher, q_student) per token at temperature T (module docstring),
    times T^2 when scale_t2. student: logits [..., V] or a Head; teacher: logits, a Head (projected
    chunk by chunk, never differentiated) or a SparseTeacher built at the same temperature. A dense
    teacher at beta 0 or 1 gets ForwardKL / ReverseKL: the fused kernel and a closed-form gradient."""
    if not 0 <= beta <= 1:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not isinstance(teacher, SparseTeacher):
        kind = ForwardKL if beta == 0 else ReverseKL if beta == 1 else JSD
        return distill(student, teacher, kind(temperature, beta), mask, scale_t2, reduction, chunk_size)
    if teacher.temperature != temperature:
        raise ValueError(f"the sparse teacher was built at temperature {teacher.temperature}, "
                         f"the loss asks for {temperature}: rebuild it (the rest bucket cannot be re-tempered)")
    if teacher.indices.shape[-1] > student.shape[-1]:
        raise ValueError(f"the sparse teacher keeps {teacher.indices.shape[-1]} tokens, more than the "
                         f"student's vocabulary of {student.shape[-1]}")
    rows = (teacher.logprobs.detach(), teacher.indices, teacher.rest_logprob.detach())
    loss = reduce_tokens(SparseDivergence(temperature, beta), student, rows, mask=mask, reduction=reduction,
                         chunk_size=chunk_size)
    return loss * temperature ** 2 if scale_t2 else loss


def forward_kl(student: Logits, teacher: Logits | SparseTeacher, temperature: float = 1.0,
               mask: torch.Tensor | None = None, scale_t2: bool = False, reduction: str = "mean",
               chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """KL(p_teacher || q_student) per token (Hinton et al. 2015): generalized_jsd at beta = 0."""
    return generalized_jsd(student, teacher, 0.0, temperature, mask, scale_t2, reduction, chunk_size)


def reverse_kl(student: Logits, teacher: Logits | SparseTeacher, temperature: float = 1.0,
               mask: torch.Tensor | None = None, scale_t2: bool = False, reduction: str = "mean",
               chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """KL(q_student || p_teacher) per token (MiniLLM, Gu et al. 2024): generalized_jsd at beta = 1."""
    return generalized_jsd(student, teacher, 1.0, temperature, mask, scale_t2, reduction, chunk_size)

