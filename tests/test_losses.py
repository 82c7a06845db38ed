"""losses/: every loss against an independent naive torch computation (value and gradient), the
chunked fused-linear path against the unchunked one, normalisation across micro-batches, gradcheck."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import kernels

from losses import (Head, SparseTeacher, cross_entropy, entropy, forward_kl, generalized_jsd, logprob_jsd,
                    reduce_tokens, reverse_kl, sparse_teacher, token_logprobs)


def close(actual, expected, rtol=1e-5, atol=1e-6, msg=None):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=msg)


def grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors, allow_unused=True)


def leaf(*shape, scale=1.0, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).requires_grad_()


# ---- naive references: log_softmax over the full vocabulary, written out -------------------------

def naive_kl(p_logits, q_logits, T):
    """KL(softmax(p/T) || softmax(q/T)) per token, summed over the vocabulary."""
    logp, logq = torch.log_softmax(p_logits / T, -1), torch.log_softmax(q_logits / T, -1)
    return (logp.exp() * (logp - logq)).sum(-1)


def naive_jsd(s_logits, t_logits, beta, T):
    """GKD's generalized JSD bracket from plain probabilities, divided by beta (1 - beta)."""
    q, p = torch.softmax(s_logits / T, -1), torch.softmax(t_logits / T, -1)
    m = beta * p + (1 - beta) * q
    bracket = beta * (p * (p / m).log()).sum(-1) + (1 - beta) * (q * (q / m).log()).sum(-1)
    return bracket / (beta * (1 - beta))


def masked_mean(values, mask):
    return (values * mask).sum() / mask.sum()


# ---- values and gradients against naive torch (3 x 37 x 1000, masks with empty rows, T != 1) ---

B, T_, V = 3, 37, 1000


@pytest.fixture
def batch():
    student = leaf(B, T_, V, scale=3.0, seed=1)
    teacher = leaf(B, T_, V, scale=3.0, seed=2).detach()
    targets = torch.randint(0, V, (B, T_), generator=torch.Generator().manual_seed(3))
    mask = torch.rand(B, T_, generator=torch.Generator().manual_seed(4)) > 0.3
    mask[1] = False  # an empty row
    return student, teacher, targets, mask


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_matches_torch(batch, reduction):
    student, _, targets, mask = batch
    targets = targets.masked_fill(~mask, -100)
    ours = cross_entropy(student, targets, reduction=reduction)
    ref = F.cross_entropy(student.flatten(0, 1), targets.flatten(), reduction=reduction)
    close(ours, ref.reshape(ours.shape))
    upstream = torch.randn_like(ours)
    close(grads((ours * upstream).sum(), student)[0], grads((ref.reshape(ours.shape) * upstream).sum(), student)[0])


def test_token_logprobs_and_entropy_match_naive(batch):
    student, _, targets, mask = batch
    logp = torch.log_softmax(student / 0.7, -1)
    ref_lp = logp.gather(-1, targets[..., None])[..., 0] * mask
    ref_h = -(logp.exp() * logp).sum(-1) * mask
    ours_lp = token_logprobs(student, targets, temperature=0.7, mask=mask)
    ours_h = entropy(student, temperature=0.7, mask=mask)
    close(ours_lp, ref_lp)
    close(ours_h, ref_h)
    upstream = torch.randn(B, T_)
    close(grads((ours_lp * upstream).sum() + ours_h.sum(), student)[0],
          grads((ref_lp * upstream).sum() + ref_h.sum(), student)[0])
    close(entropy(student, 0.7, mask, "mean"), masked_mean(ref_h, mask))


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_kl_matches_naive_and_torch(batch, direction):
    student, teacher, _, mask = batch
    T = 2.0
    if direction == "forward":
        ours = forward_kl(student, teacher, T, mask, scale_t2=True)
        per_token = F.kl_div(torch.log_softmax(student / T, -1), torch.log_softmax(teacher / T, -1),
                             reduction="none", log_target=True).sum(-1)
        close(per_token, naive_kl(teacher, student, T))
    else:
        ours = reverse_kl(student, teacher, T, mask, scale_t2=True)
        per_token = naive_kl(student, teacher, T)
    ref = T ** 2 * masked_mean(per_token, mask)
    close(ours, ref)
    close(grads(ours, student)[0], grads(ref, student)[0])


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_generalized_jsd_matches_gkd_formula(batch, beta):
    student, teacher, _, mask = batch
    ours = generalized_jsd(student, teacher, beta, temperature=1.5, mask=mask)
    ref = masked_mean(naive_jsd(student, teacher, beta, 1.5), mask)
    close(ours, ref, rtol=1e-4)
    close(grads(ours, student)[0], grads(ref, student)[0], rtol=1e-4, atol=1e-6)


def test_generalized_jsd_endpoints_are_the_kls_and_continuous():
    student, teacher = leaf(16, 500, scale=3.0, seed=5), leaf(16, 500, scale=3.0, seed=6)
    fkl = naive_kl(teacher.double(), student.double(), 1.0).mean().float()
    rkl = naive_kl(student.double(), teacher.double(), 1.0).mean().float()
    close(generalized_jsd(student, teacher, 0.0), fkl)
    close(generalized_jsd(student, teacher, 1.0), rkl)
    # continuity: JSD_eps matches GKD's formula in float64 and tends to the KLs as eps -> 0, with no
    # 1/eps blow-up of fp32 rounding (the mixture is taken in log space)
    gaps = []
    for eps in (1e-2, 1e-6, 1e-10):
        near_0, near_1 = generalized_jsd(student, teacher, eps), generalized_jsd(student, teacher, 1 - eps)
        close(near_0, naive_jsd(student.double(), teacher.double(), eps, 1.0).mean().float(), rtol=1e-4, atol=0)
        close(near_1, naive_jsd(student.double(), teacher.double(), 1 - eps, 1.0).mean().float(), rtol=1e-4, atol=0)
        gaps.append((abs(near_0 - fkl) / fkl, abs(near_1 - rkl) / rkl))
    assert gaps[0] > gaps[1] > gaps[2] and max(gaps[2]) < 1e-4


def test_large_vocab_rows():
    """Qwen2.5's 151,936-token head on a few rows."""
    student, teacher = leaf(5, 151936, scale=4.0, seed=7), leaf(5, 151936, scale=4.0, seed=8).detach()
    targets = torch.tensor([0, 151935, 17, 99999, 3])
    close(cross_entropy(student, targets), F.cross_entropy(student, targets))
    ours = forward_kl(student, teacher)
    ref = naive_kl(teacher.double(), student.double(), 1.0).mean()
    close(ours, ref.float(), rtol=5e-5, atol=0)  # a 151,936-term fp32 sum drifts by ~1e-5
    close(grads(ours, student)[0], grads(ref, student)[0].float())


def test_large_vocab_rows_rl_and_other_divergences():
    """The other losses on the 151,936-token head: float64 naive references, T != 1, a masked row."""
    student, teacher = leaf(5, 151936, scale=4.0, seed=7), leaf(5, 151936, scale=4.0, seed=8).detach()
    targets = torch.tensor([0, 151935, 17, 99999, 3])
    mask = torch.tensor([True, True, False, True, True])
    t64 = teacher.double()

    def logq(s):
        return torch.log_softmax(s.double() / 0.7, -1)
    cases = [  # (ours, naive reference, relative tolerance: a 151,936-term fp32 sum drifts by ~1e-5)
        (token_logprobs(student, targets, 0.7, mask),
         lambda s: logq(s).gather(-1, targets[:, None])[:, 0] * mask, 1e-5),
        (entropy(student, 0.7, mask), lambda s: -(logq(s).exp() * logq(s)).sum(-1) * mask, 5e-5),
        (reverse_kl(student, teacher, 1.5, mask), lambda s: masked_mean(naive_kl(s.double(), t64, 1.5), mask), 5e-5),
        (generalized_jsd(student, teacher, 0.3, 1.5, mask),
         lambda s: masked_mean(naive_jsd(s.double(), t64, 0.3, 1.5), mask), 5e-5),
    ]
    for ours, naive, rtol in cases:
        ref = naive(student)
        close(ours, ref.float(), rtol=rtol, atol=1e-6)
        upstream = torch.linspace(0.5, 1.5, ours.numel()).reshape(ours.shape)
        close(grads((ours * upstream).sum(), student)[0], grads((ref * upstream).sum(), student)[0].float())


# ---- sparse top-k teacher ----------------------------------------------------------------------

@pytest.mark.parametrize("beta", [0.0, 0.4, 1.0])
def test_topk_teacher_with_k_equal_v_is_full_kd(beta):
    student, teacher = leaf(2, 9, 300, scale=3.0, seed=9), leaf(2, 9, 300, scale=3.0, seed=10).detach()
    full = generalized_jsd(student, teacher, beta, temperature=1.3)
    sparse = generalized_jsd(student, sparse_teacher(teacher, 300, 1.3), beta, temperature=1.3)
    close(sparse, full)
    close(grads(sparse, student)[0], grads(full, student)[0])


def test_topk_teacher_matches_bucketed_kl():
    """k < V: KL over the k teacher tokens + one rest bucket, from plain probabilities."""
    student, teacher, k = leaf(11, 200, scale=3.0, seed=11), leaf(11, 200, scale=3.0, seed=12).detach(), 7
    p = torch.softmax(teacher / 2.0, -1)
    idx = p.topk(k, -1).indices

    def buckets(probs):  # (n, V) -> (n, k + 1): the teacher's top-k tokens, then everything else
        top = probs.gather(-1, idx)
        return torch.cat([top, 1 - top.sum(-1, keepdim=True)], -1)

    st = sparse_teacher(teacher, k, 2.0)
    assert torch.equal(st.indices, idx)
    close(st.rest_logprob.exp(), buckets(p)[:, -1], rtol=1e-4, atol=1e-7)
    stored = SparseTeacher(st.logprobs.bfloat16(), st.indices.int(), st.rest_logprob, st.temperature)
    close(forward_kl(student, stored, 2.0), forward_kl(student, st, 2.0), rtol=1e-2, atol=0)  # bf16 storage
    for beta in (0.0, 1.0):
        p_b, q_b = buckets(p), buckets(torch.softmax(student / 2.0, -1))
        ref = ((p_b * (p_b / q_b).log()).sum(-1) if beta == 0 else (q_b * (q_b / p_b).log()).sum(-1)).mean()
        ours = generalized_jsd(student, st, beta, temperature=2.0)
        close(ours, ref, rtol=1e-4, atol=1e-6)
        close(grads(ours, student)[0], grads(ref, student)[0], rtol=1e-4, atol=1e-6)


def test_sparse_teacher_from_head_equals_from_logits():
    h, W = leaf(4, 5, 8, seed=13), leaf(50, 8, seed=14)
    a, b = sparse_teacher(Head(h, W), 6, 0.8, chunk_size=3), sparse_teacher(h @ W.T, 6, 0.8)
    assert a.indices.shape == (4, 5, 6) and torch.equal(a.indices, b.indices)
    close(a.logprobs, b.logprobs)
    close(a.rest_logprob, b.rest_logprob)


# ---- chunked fused-linear path == unchunked ----------------------------------------------------

N, D, VH = 45, 24, 257  # 45 tokens: chunk 9 divides, chunk 16 does not


def loss_cases(targets, mask, teacher):
    """(name, fn(logits_or_head) -> scalar) for every public loss; teacher is logits or a Head."""
    up = torch.linspace(-1, 2, N)  # a per-token upstream gradient for the "none" outputs
    return [
        ("ce", lambda x, c: cross_entropy(x, targets.masked_fill(~mask, -100), chunk_size=c)),
        ("ce_sum", lambda x, c: cross_entropy(x, targets, reduction="sum", chunk_size=c)),
        ("logprobs", lambda x, c: (token_logprobs(x, targets, 0.8, mask, chunk_size=c) * up).sum()),
        ("entropy", lambda x, c: (entropy(x, 1.2, mask, chunk_size=c) * up).sum()),
        ("entropy_mean", lambda x, c: entropy(x, 1.2, mask, reduction="mean", chunk_size=c)),
        ("fkl", lambda x, c: forward_kl(x, teacher, 2.0, mask, chunk_size=c)),
        ("rkl", lambda x, c: reverse_kl(x, teacher, 0.5, mask, reduction="sum", chunk_size=c)),
        ("jsd", lambda x, c: generalized_jsd(x, teacher, 0.3, 1.0, mask, chunk_size=c)),
        ("sparse", lambda x, c: forward_kl(x, sparse_teacher(teacher, 5), mask=mask, chunk_size=c)),
    ]


@pytest.mark.parametrize("chunk_size, teacher_as", [(9, "logits"), (16, "head"), (64, "head")])
def test_chunked_equals_unchunked(chunk_size, teacher_as):
    h, W = leaf(N, D, seed=20), leaf(VH, D, scale=0.5, seed=21)
    targets = torch.randint(0, VH, (N,), generator=torch.Generator().manual_seed(22))
    mask = torch.arange(N) % 4 != 1
    mask[16:32] = False  # an empty chunk for chunk_size 16
    teacher = Head(leaf(N, 12, seed=23).detach(), leaf(VH, 12, seed=24).detach())
    teacher = teacher if teacher_as == "head" else teacher.logits()
    for name, fn in loss_cases(targets, mask, teacher):
        ref = fn(h @ W.T, chunk_size)
        ours = fn(Head(h, W), chunk_size)
        close(ours, ref, rtol=1e-5, atol=1e-6, msg=name)
        for g_ours, g_ref in zip(grads(ours, h, W), grads(ref, h, W)):
            # fp32 gradients from two summation orders (the chunked path's are closed-form for CE, log-probs
            # and KL, the reference's come from autograd): 1e-5 relative to the gradient's scale
            close(g_ours, g_ref, rtol=1e-5, atol=1e-5 * g_ref.abs().max().item(), msg=name)


def test_chunked_forward_kl_with_teacher_zeros():
    """A teacher with p_v = 0 (logits -inf, e.g. banned tokens): 0 log 0 = 0 in the closed-form chunked
    gradient as in the autograd reference, no nan."""
    h, W = leaf(N, D, seed=25), leaf(VH, D, scale=0.5, seed=26)
    teacher = leaf(N, VH, seed=27).detach()
    teacher[:, :40] = -math.inf
    ref, ours = forward_kl(h @ W.T, teacher, 0.7), forward_kl(Head(h, W), teacher, 0.7, chunk_size=16)
    close(ours, ref)
    for g_ours, g_ref in zip(grads(ours, h, W), grads(ref, h, W)):
        assert torch.isfinite(g_ours).all()
        close(g_ours, g_ref, rtol=1e-5, atol=1e-5 * g_ref.abs().max().item())


def test_chunked_tied_weight_frozen_parts_and_teacher_without_grad():
    """Tied embedding: the head's gradient adds to the embedding's; no grad where none is asked."""
    emb = leaf(VH, D, scale=0.5, seed=30)
    ids = torch.randint(0, VH, (N,), generator=torch.Generator().manual_seed(31))
    mix = leaf(D, D, scale=0.2, seed=32)
    teacher_w = leaf(VH, D, seed=33)  # requires grad, must receive none
    losses = []
    for head in (lambda h: h @ emb.T, lambda h: Head(h, emb)):
        hidden = torch.tanh(emb[ids] @ mix)  # (N, D) depends on the embedding too
        losses.append(forward_kl(head(hidden), Head(hidden, teacher_w), 1.5, chunk_size=7))
    ref, ours = losses
    close(ours, ref)
    for a, b in zip(grads(ours, emb, mix), grads(ref, emb, mix)):
        close(a, b)
    assert grads(ours, teacher_w)[0] is None
    frozen = Head(leaf(N, D, seed=34).detach(), emb)  # hidden without grad
    close(grads(cross_entropy(frozen, ids, chunk_size=8), emb)[0], grads(cross_entropy(frozen.logits(), ids), emb)[0])


def test_custom_token_loss_in_one_pass_equals_sum_of_losses():
    """The losses/__init__ example: alpha * CE + (1 - alpha) * KD over one pass of the student head."""
    h, W = leaf(N, D, seed=35), leaf(VH, D, scale=0.5, seed=36)
    teacher = Head(leaf(N, 12, seed=37).detach(), leaf(VH, 12, seed=38).detach())
    targets = torch.randint(0, VH, (N,), generator=torch.Generator().manual_seed(39))
    mask = torch.arange(N) % 3 != 0
    alpha = 0.3
    kd = lambda z, y, t: alpha * kernels.cross_entropy(z, y) + (1 - alpha) * kernels.kl_div(z, t)  # noqa: E731
    ours = reduce_tokens(kd, Head(h, W), (targets, teacher), mask, "sum", chunk_size=10)
    ref = (alpha * cross_entropy(h @ W.T, targets.masked_fill(~mask, -100), reduction="sum")
           + (1 - alpha) * forward_kl(h @ W.T, teacher.logits(), mask=mask, reduction="sum"))
    close(ours, ref)
    for a, b in zip(grads(ours, h, W), grads(ref, h, W)):
        close(a, b)


def test_fully_masked_batch_gives_zero_loss_and_zero_gradient():
    h, W = leaf(10, D, seed=40), leaf(VH, D, seed=41)
    targets = torch.full((10,), -100)
    for reduction in ("mean", "sum"):
        loss = cross_entropy(Head(h, W), targets, reduction=reduction, chunk_size=4)
        assert loss.item() == 0.0
        assert all(g.abs().sum() == 0 for g in grads(loss, h, W))


def test_sum_over_micro_batches_over_global_count_equals_one_batch():
    """torchtitan's rule: sum-reduced micro-batch losses / global valid-token count == the big batch mean."""
    h, W = leaf(2, 30, D, seed=50), leaf(VH, D, seed=51)
    targets = torch.randint(0, VH, (2, 30), generator=torch.Generator().manual_seed(52))
    targets[0, 5:] = -100  # micro-batch 0 has 5 valid tokens, micro-batch 1 has 30
    big = cross_entropy(Head(h, W), targets)
    big_grads = grads(big, h, W)
    count = (targets != -100).sum()
    acc = [torch.zeros_like(h), torch.zeros_like(W)]
    for i in range(2):
        part = cross_entropy(Head(h[i], W), targets[i], reduction="sum", chunk_size=8) / count
        for a, g in zip(acc, grads(part, h, W)):
            a += g
    close(acc[0], big_grads[0])
    close(acc[1], big_grads[1])
    mean_of_means = sum(cross_entropy(Head(h[i], W), targets[i]) for i in range(2)) / 2
    assert abs(mean_of_means - big) > 1e-3  # the rule matters here


def test_gradcheck_fused_linear_sum_and_checkpointed_rows():
    """Finite differences in float64 through both chunked paths, with a per-token loss written in
    plain torch (the kernels compute in fp32 by design)."""
    h = leaf(5, 3, dtype=torch.float64, seed=60)
    W = leaf(7, 3, dtype=torch.float64, seed=61)
    teacher = Head(leaf(5, 2, dtype=torch.float64, seed=62).detach(), leaf(7, 2, dtype=torch.float64, seed=63).detach())
    mask = torch.tensor([1, 0, 1, 1, 1], dtype=torch.bool)

    def jsd(z, t):  # a user-written per-token loss on logits
        return logprob_jsd(torch.log_softmax(z / 1.7, -1), torch.log_softmax(t / 1.7, -1), 0.3)

    def loss(reduction, h, W):
        return reduce_tokens(jsd, Head(h, W), (teacher,), mask, reduction, chunk_size=3)

    assert torch.autograd.gradcheck(lambda h, W: loss("none", h, W), (h, W), fast_mode=True)
    # "sum" scales its stored gradients in place, so it allows one backward per graph, and gradcheck
    # needs several: the same check by hand, a central difference along a random direction
    u_h, u_W = torch.randn_like(h), torch.randn_like(W)
    eps = 1e-6
    numeric = (loss("sum", h + eps * u_h, W + eps * u_W) - loss("sum", h - eps * u_h, W - eps * u_W)) / (2 * eps)
    g_h, g_W = torch.autograd.grad(loss("sum", h, W), (h, W))
    torch.testing.assert_close((g_h * u_h).sum() + (g_W * u_W).sum(), numeric.detach(), rtol=1e-6, atol=1e-8)
    with pytest.raises(RuntimeError, match="retain_graph=True is not supported"):
        out = loss("sum", h, W)
        torch.autograd.grad(out, (h, W), retain_graph=True)
        torch.autograd.grad(out, (h, W))


def test_bf16_chunked_close_to_fp32():
    h, W = leaf(N, D, seed=70), leaf(VH, D, scale=0.5, seed=71)
    targets = torch.randint(0, VH, (N,), generator=torch.Generator().manual_seed(72))
    ref = cross_entropy(h @ W.T, targets)
    ref_grads = grads(ref, h, W)
    hb, Wb = h.detach().bfloat16().requires_grad_(), W.detach().bfloat16().requires_grad_()
    ours = cross_entropy(Head(hb, Wb), targets, chunk_size=16)
    g_h, g_w = grads(ours, hb, Wb)
    assert g_h.dtype == g_w.dtype == torch.bfloat16
    close(ours, ref, rtol=2e-2, atol=1e-2)
    close(g_h.float(), ref_grads[0], rtol=5e-2, atol=2e-3)
    close(g_w.float(), ref_grads[1], rtol=5e-2, atol=2e-3)


def test_autocast_bf16_matches_naive_autocast():
    """Under bf16 autocast (fp32 parameters) the chunked matmuls run in bf16 like nn.Linear's would."""
    h, W = leaf(N, D, seed=80), leaf(VH, D, scale=0.5, seed=81)
    targets = torch.randint(0, VH, (N,), generator=torch.Generator().manual_seed(82))
    up = torch.linspace(-1, 1, N)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy((h @ W.T).float(), targets)
        ours = cross_entropy(Head(h, W), targets, chunk_size=16)
        ref_lp = torch.log_softmax((h @ W.T).float(), -1).gather(-1, targets[:, None])[:, 0]
        ours_lp = token_logprobs(Head(h, W), targets, chunk_size=16)  # backward recomputes under bf16 too
    g_ours, g_ref = grads(ours, h, W), grads(ref, h, W)
    assert g_ours[1].dtype == torch.float32
    close(ours, ref, rtol=1e-3, atol=1e-4)
    close(ours_lp, ref_lp, rtol=1e-3, atol=1e-4)
    g_ours += grads((ours_lp * up).sum(), h, W)
    g_ref += grads((ref_lp * up).sum(), h, W)
    for a, b in zip(g_ours, g_ref):  # both round to bf16, at different places: 1% of the largest entry
        close(a, b, rtol=2e-2, atol=1e-2 * b.abs().max().item())


def test_logprobs_without_grad_and_frozen_head():
    """Old-policy log-probs under no_grad (no graph kept), and a frozen head (LoRA): grad for hidden only."""
    h, W = leaf(N, D, seed=90), leaf(VH, D, scale=0.5, seed=91)
    targets = torch.randint(0, VH, (N,), generator=torch.Generator().manual_seed(92))
    with torch.no_grad():
        old = token_logprobs(Head(h, W), targets, chunk_size=8)
    assert not old.requires_grad
    close(old, torch.log_softmax(h @ W.T, -1).gather(-1, targets[:, None])[:, 0].detach())
    frozen = W.detach()
    ours = cross_entropy(Head(h, frozen), targets, reduction="sum", chunk_size=8)
    close(grads(ours, h)[0], grads(F.cross_entropy(h @ frozen.T, targets, reduction="sum"), h)[0])


def test_clear_errors():
    x = torch.randn(4, 10)
    with pytest.raises(ValueError, match="targets have shape"):
        cross_entropy(x, torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="reduction"):
        cross_entropy(x, torch.zeros(4, dtype=torch.long), reduction="avg")
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd(x, x, 1.5)
    with pytest.raises(ValueError, match="vocabulary"):
        forward_kl(x, torch.randn(4, 11))
    with pytest.raises(ValueError, match="temperature 1.0"):
        forward_kl(x, sparse_teacher(x, 3), temperature=2.0)
    with pytest.raises(ValueError, match="mask"):
        forward_kl(x, x, mask=torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="Head"):
        Head(torch.randn(4, 3), torch.randn(10, 4))


# ---- the reused logits buffer, precision of the closed-form KL, no_grad ----------------------------

def test_token_function_returning_a_view_of_its_logits():
    """The chunk loop reuses one logits buffer: values must not alias it."""
    g = torch.Generator().manual_seed(0)
    h, W = torch.randn(10, 8, generator=g, requires_grad=True), torch.randn(50, 8, generator=g)
    first = lambda z: z[:, 0]  # noqa: E731
    for reduction in ("none", "sum"):
        torch.testing.assert_close(reduce_tokens(first, Head(h, W), reduction=reduction, chunk_size=4),
                                   reduce_tokens(first, h @ W.T, reduction=reduction))


def test_chunked_forward_kl_value_when_teacher_is_close():
    """KL ~ 3e-4 nats on the 151,936-token head: the chunked value within 2% of float64 per token
    (fp32 alone, summing log p - log q elementwise, is ~0.5% off here)."""
    g = torch.Generator().manual_seed(0)
    h, W = torch.randn(16, 64, generator=g), 0.3 * torch.randn(151936, 64, generator=g)
    W_t = W + 0.003 * torch.randn(W.shape, generator=g)
    ours = forward_kl(Head(h, W), Head(h, W_t), reduction="none", chunk_size=8)
    logq, logp = (h @ W.T).double().log_softmax(-1), (h @ W_t.T).double().log_softmax(-1)
    ref = (logp.exp() * (logp - logq)).sum(-1)
    assert ((ours.double() - ref).abs() / ref).max() < 0.02


def test_no_grad_sum_does_one_matmul_per_chunk():
    """Under no_grad (an eval loss) the fused sum computes values only: no gradient matmuls."""
    class CountMatmuls(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            CountMatmuls.count += func in (torch.ops.aten.mm.default, torch.ops.aten.mm.out, torch.ops.aten.addmm_.default)
            return func(*args, **(kwargs or {}))
    h, W = torch.randn(40, 8), torch.randn(50, 8, requires_grad=True)
    targets = torch.randint(0, 50, (40,))
    with torch.no_grad(), CountMatmuls():
        loss = cross_entropy(Head(h, W), targets, reduction="sum", chunk_size=10)
    assert CountMatmuls.count == 4
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(h @ W.T, targets, reduction="sum"))


def test_total_variation_hand_numbers_and_gradient():
    """kd.loss = "tvd": TV = 1/2 sum |p - q|. Student uniform over 2 ids, teacher (3/4, 1/4): TV = 1/4; at
    T = 2 the teacher softens to softmax(log 3 / 2, 0) = (sqrt 3, 1) / (sqrt 3 + 1). Gradient of the chunked
    Head path vs autograd through the plain formula on a 37-token vocabulary."""
    from losses import DIVERGENCES, distill
    student, teacher = torch.zeros(1, 2), torch.tensor([[math.log(3.0), 0.0]])
    assert DIVERGENCES["tvd"](temperature=1.0)(student, teacher).item() == pytest.approx(0.25)
    soft = math.sqrt(3) / (math.sqrt(3) + 1)
    assert DIVERGENCES["tvd"](temperature=2.0)(student, teacher).item() == pytest.approx(soft - 0.5)
    hidden, weight = leaf(6, 16, seed=1), leaf(37, 16, seed=2)
    teacher_logits = leaf(6, 37, scale=2.0, seed=3).detach()
    ours = distill(Head(hidden, weight), teacher_logits, DIVERGENCES["tvd"](temperature=1.5), reduction="sum",
                   chunk_size=4)
    q, p = torch.softmax(hidden @ weight.T / 1.5, -1), torch.softmax(teacher_logits / 1.5, -1)
    ref = 0.5 * (p - q).abs().sum()
    close(ours, ref)
    for g_ours, g_ref in zip(grads(ours, hidden, weight), grads(ref, hidden, weight)):
        close(g_ours, g_ref)
