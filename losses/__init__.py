"""Token-level losses for SFT, knowledge distillation and RL, as pure functions of tensors.

Every function takes either logits [..., V] or a `Head(hidden [..., d], weight [V, d])` (the final
hidden states and the lm_head matrix); with a Head the full [N, V] logits never exist, only
`chunk_size` tokens at a time, with exact gradients for hidden and weight (losses/chunked.py). Any
per-token function of logits gets the same treatment through `reduce_tokens`, e.g. SFT + KD in one
pass over the vocabulary:

    kd = lambda z, y, t: alpha * kernels.cross_entropy(z, y) + (1 - alpha) * kernels.kl_div(z, t)
    loss_sum = reduce_tokens(kd, Head(h, W), (targets, Head(h_teacher, W_teacher)), mask, "sum")

Normalisation (the rule that survives batching; torchtitan's): the loss of an optimizer step is
    L = sum over all valid tokens of the step (every micro-batch, every rank) of l_i  /  N_valid_global.
So call the losses with reduction="sum", count the valid tokens of each micro-batch, all-reduce the
count over ranks once per step, and divide each micro-batch's sum by that global count before
backward. The default reduction="mean" (sum / valid tokens of *this* call) is right for a single
batch but wrong under accumulation: averaging per-micro-batch means weights a token in a micro-batch
of 10 valid tokens 50x more than one in a micro-batch of 500, so the result depends on how the batch
was split (and on padding), and 1 rank x 4 accumulation steps no longer equals 2 ranks x 2.
(DDP then *averages* gradients over ranks: multiply the loss by the world size to keep the sum.)

Per-token masks: cross_entropy drops targets equal to ignore_index; the others take `mask` (bool, or
float per-token weights, e.g. 1/|o_i| for a per-sequence mean). Masked tokens are removed before any
vocabulary-sized work, so prompt tokens cost nothing.
"""
from losses.ce import cross_entropy, entropy, token_logprobs
from losses.chunked import DEFAULT_CHUNK_SIZE, Head, reduce_tokens
from losses.distill import (DIVERGENCES, Divergence, SparseTeacher, distill, forward_kl, generalized_jsd, logprob_jsd,
                            reverse_kl, sparse_teacher)

__all__ = ["Head", "reduce_tokens", "DEFAULT_CHUNK_SIZE", "cross_entropy", "token_logprobs", "entropy",
           "forward_kl", "reverse_kl", "generalized_jsd", "logprob_jsd", "distill", "Divergence", "DIVERGENCES",
           "SparseTeacher", "sparse_teacher"]
