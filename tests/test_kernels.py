"""kernels/: plain-torch references against independent torch ops, in value and gradient."""
import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels.kl_div import kl_div_reference
from kernels.log_softmax import log_softmax_reference, logsumexp_reference
from kernels.token_logprobs import cross_entropy_reference, token_logprobs_reference


def _logits(n: int, v: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(n, v, generator=g)).to(dtype).requires_grad_()


def _targets(n: int, v: int, ignore_rows=(), seed: int = 1) -> torch.Tensor:
    t = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(seed))
    t[list(ignore_rows)] = -100
    return t


def _value_and_grad(fn, x: torch.Tensor, seed: int = 2):
    """fn(x) and d<fn(x), w>/dx for a fixed random w: checks the whole Jacobian-vector product."""
    x = x.detach().requires_grad_()
    out = fn(x)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    (grad,) = torch.autograd.grad((out * w).sum(), x)
    return out.detach(), grad


def _assert_match(fn, ref, x, atol=1e-5, rtol=1e-5):
    # Gradients hold Σ_j w_j over the row: fp32 summation order alone moves them by ~1e-5·sqrt(V/1000).
    atol, rtol = max(atol, 1e-6 * x.shape[-1] ** 0.5), max(rtol, 1e-6 * x.shape[-1] ** 0.5)
    out, grad = _value_and_grad(fn, x)
    out_ref, grad_ref = _value_and_grad(ref, x)
    torch.testing.assert_close(out, out_ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(grad, grad_ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("n,v", [(3, 1000), (2, 4099), (2, 151936)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_log_softmax_reference(n, v, temperature):
    _assert_match(lambda x: log_softmax_reference(x, temperature),
                  lambda x: torch.log_softmax(x / temperature, dim=-1), _logits(n, v))


@pytest.mark.parametrize("n,v", [(3, 1000), (2, 151936)])
def test_logsumexp_reference(n, v):
    _assert_match(logsumexp_reference, lambda x: torch.logsumexp(x, dim=-1), _logits(n, v))


@pytest.mark.parametrize("n,v", [(5, 1000), (3, 151936)])
def test_cross_entropy_reference(n, v):
    t = _targets(n, v, ignore_rows=[1])
    _assert_match(lambda x: cross_entropy_reference(x, t),
                  lambda x: F.cross_entropy(x, t, reduction="none"), _logits(n, v))


@pytest.mark.parametrize("temperature", [1.0, 1.5])
def test_token_logprobs_reference(temperature):
    t = _targets(4, 4099)
    _assert_match(lambda x: token_logprobs_reference(x, t, temperature),
                  lambda x: torch.log_softmax(x / temperature, -1).gather(1, t[:, None])[:, 0],
                  _logits(4, 4099))


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("n,v,temperature", [(4, 1000, 1.0), (3, 4099, 2.0), (2, 151936, 0.8)])
def test_kl_div_reference(n, v, temperature, reverse):
    teacher = _logits(n, v, seed=5).detach()
    log_p = torch.log_softmax(teacher / temperature, -1)

    def torch_kl(x):
        log_q = torch.log_softmax(x / temperature, -1)
        if reverse:   # F.kl_div(input, target) = KL(target ‖ input) with log-space target
            return F.kl_div(log_p, log_q, log_target=True, reduction="none").sum(-1)
        return F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)

    _assert_match(lambda x: kl_div_reference(x, teacher, temperature, reverse), torch_kl, _logits(n, v))


def test_kl_div_teacher_gets_no_gradient():
    student, teacher = _logits(3, 1000), _logits(3, 1000, seed=4)
    kernels.kl_div(student, teacher).sum().backward()
    assert teacher.grad is None and student.grad is not None


def test_dispatcher_uses_reference_on_cpu():
    x, t = _logits(3, 1000, torch.bfloat16), _targets(3, 1000, ignore_rows=[0])
    teacher = _logits(3, 1000, seed=3)
    pairs = [(kernels.log_softmax(x, 2.0), log_softmax_reference(x, 2.0)),
             (kernels.logsumexp(x), logsumexp_reference(x)),
             (kernels.cross_entropy(x, t), cross_entropy_reference(x, t)),
             (kernels.token_logprobs(x, t), token_logprobs_reference(x, t)),
             (kernels.kl_div(x, teacher, reverse=True), kl_div_reference(x, teacher, reverse=True))]
    for out, ref in pairs:
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, ref, atol=0, rtol=0)


def test_dispatcher_rejects_bad_shapes():
    x = _logits(3, 10)
    with pytest.raises(ValueError, match=r"\(N, V\)"):
        kernels.log_softmax(x[None])
    with pytest.raises(ValueError, match="targets"):
        kernels.cross_entropy(x, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="same shape"):
        kernels.kl_div(x, _logits(3, 11))
    with pytest.raises(ValueError, match="temperature"):
        kernels.token_logprobs(x, torch.zeros(3, dtype=torch.long), temperature=0.0)
