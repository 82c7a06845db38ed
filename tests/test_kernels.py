"""kernels/: the plain-torch references against independent torch ops, the Triton kernels (in
Triton's CPU interpreter) against the references, and the dispatcher; values and gradients."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels.kl_div import KLDiv, kl_div_reference
from kernels.log_softmax import LogSoftmax, LogSumExp, log_softmax_reference, logsumexp_reference
from kernels.online_softmax import HAS_TRITON, triton
from kernels.token_logprobs import TokenLogprobs, cross_entropy_reference, token_logprobs_reference

INTERPRETED = HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1"   # see the Triton sections below


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
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.device)
    (grad,) = torch.autograd.grad((out * w).sum(), x)
    return out.detach(), grad


def _assert_match(fn, ref, x, atol=1e-5, rtol=1e-5):
    # Gradients hold Σ_j w_j over the row: fp32 summation order alone moves them by ~1e-5·sqrt(V/1000).
    atol, rtol = max(atol, 1e-6 * x.shape[-1] ** 0.5), max(rtol, 1e-6 * x.shape[-1] ** 0.5)
    out, grad = _value_and_grad(fn, x)
    out_ref, grad_ref = _value_and_grad(ref, x)
    torch.testing.assert_close(out, out_ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(grad, grad_ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("n,v,temperature", [(3, 1000, 1.0), (2, 4099, 0.7), (2, 151936, 1.3)])
def test_log_softmax_reference(n, v, temperature):
    _assert_match(lambda x: log_softmax_reference(x, temperature),
                  lambda x: (x.double() / temperature - _logsumexp64(x.double() / temperature)[:, None]).float(),
                  _logits(n, v))


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_log_softmax_reference_is_normalised_on_a_large_vocab(temperature):
    # Σ_i p_i = 1 up to the fp32 rounding of lse (half an ulp: 1e-6 for lse in [16, 32)) plus that of each
    # z_i - lse (averaging out under p) and a cascade sum's ~1e-7: 4e-6 bounds it (measured <= 1.1e-6).
    # torch.log_softmax misses by 1.3e-5 to 3.7e-5 here on an AVX2 CPU (it sums its lse in one SIMD register).
    logp = log_softmax_reference(_logits(4, 151936), temperature)
    assert logp.double().logsumexp(-1).abs().max() < 4e-6


def _logsumexp64(x: torch.Tensor) -> torch.Tensor:
    """log Σ exp from its definition in float64 (3·randn logits cannot overflow exp there)."""
    return x.double().exp().sum(dim=-1).log()


@pytest.mark.parametrize("n,v", [(3, 1000), (2, 151936)])
def test_logsumexp_reference(n, v):
    _assert_match(logsumexp_reference, lambda x: _logsumexp64(x).float(), _logits(n, v))


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


def _torch_kl(teacher: torch.Tensor, temperature: float, reverse: bool):
    """Per-row KL from F.kl_div, which computes KL(target ‖ input) for log-probability input."""
    p = torch.softmax(teacher / temperature, -1)

    def kl(student: torch.Tensor) -> torch.Tensor:
        log_q = torch.log_softmax(student / temperature, -1)
        if reverse:
            return F.kl_div(torch.log(p), log_q, log_target=True, reduction="none").sum(-1)
        return F.kl_div(log_q, p, reduction="none").sum(-1)   # xlogy form: p = 0 terms give 0
    return kl


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("n,v,temperature", [(4, 1000, 1.0), (2, 151936, 2.0)])
def test_kl_div_reference(n, v, temperature, reverse):
    teacher = _logits(n, v, seed=5).detach()
    _assert_match(lambda x: kl_div_reference(x, teacher, temperature, reverse),
                  _torch_kl(teacher, temperature, reverse), _logits(n, v))


def test_kl_div_reference_teacher_masked_with_minus_inf():
    teacher = _logits(3, 1000, seed=5).detach()
    teacher[:, 500:] = float("-inf")   # p = 0 there: those terms count 0 (0 log 0 = 0)
    _assert_match(lambda x: kl_div_reference(x, teacher, 1.5), _torch_kl(teacher, 1.5, False), _logits(3, 1000))


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


def test_kernels_import_and_run_without_triton():
    code = ("import sys; sys.modules['triton'] = None\n"      # makes `import triton` raise ImportError
            "import torch, kernels\n"
            "x = torch.randn(3, 50, requires_grad=True)\n"
            "kernels.cross_entropy(x, torch.tensor([1, -100, 7])).sum().backward()\n"
            "assert not kernels.HAS_TRITON and x.grad.abs().sum() > 0\n")
    child = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1],
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stderr


def _autograd_nodes(out: torch.Tensor) -> set[str]:
    """Names of the autograd nodes that produced out."""
    names, stack = set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None:
            names.add(node.name())
            stack.extend(parent for parent, _ in node.next_functions)
    return names


@pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON), reason="needs a CUDA GPU and triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dispatcher_runs_triton_on_cuda(dtype):
    n, v = 4, 151936
    x = _logits(n, v, dtype).detach().cuda().requires_grad_()
    t, y = _targets(n, v, ignore_rows=[1]).cuda(), _logits(n, v, seed=3).detach().cuda()
    calls = [(kernels.log_softmax, log_softmax_reference, (0.7,), LogSoftmax),
             (kernels.logsumexp, logsumexp_reference, (), LogSumExp),
             (kernels.cross_entropy, cross_entropy_reference, (t,), TokenLogprobs),
             (kernels.token_logprobs, token_logprobs_reference, (t, 1.3), TokenLogprobs),
             (kernels.kl_div, kl_div_reference, (y, 2.0), KLDiv),
             (kernels.kl_div, kl_div_reference, (y, 0.8, True), KLDiv)]
    # GPU exp is an approximation (ex2.approx) and sums run in another order: 1e-4 in fp32, and
    # gradients, which hold a sum over the row, sqrt(V)·1e-6 as in _assert_match.
    tol = dict(atol=1e-4, rtol=1e-4)
    grad_tol = dict(atol=1e-6 * v ** 0.5, rtol=1e-6 * v ** 0.5) if dtype == torch.float32 else {}
    for op, ref, args, function in calls:
        assert function.__name__ + "Backward" in _autograd_nodes(op(x, *args)), "CUDA must take the Triton path"
        out, grad = _value_and_grad(lambda z: op(z, *args), x)
        out_ref, grad_ref = _value_and_grad(lambda z: ref(z, *args), x)
        torch.testing.assert_close(out, out_ref, **tol)
        torch.testing.assert_close(grad, grad_ref, **grad_tol)


# ---- Triton kernels compiled for CUDA GPUs, which needs no GPU ----------------------------------------
# The interpreter below checks what the kernels compute but accepts code the compiler rejects;
# compiling each kernel to a Hopper cubin (sm_90a) checks that the GPU path builds at all.

def _cuda_kernels():
    from kernels.kl_div import _kl_div_backward_kernel, _kl_div_kernel
    from kernels.log_softmax import (_log_softmax_backward_kernel, _log_softmax_kernel,
                                     _logsumexp_backward_kernel, _logsumexp_kernel)
    from kernels.token_logprobs import _token_logprobs_backward_kernel, _token_logprobs_kernel
    vocab = dict(V=151936, BLOCK_V=4096)
    return [(kernel, vocab) for kernel in (_logsumexp_kernel, _logsumexp_backward_kernel, _log_softmax_kernel,
                                           _log_softmax_backward_kernel, _token_logprobs_kernel,
                                           _token_logprobs_backward_kernel, _kl_div_kernel)] + \
           [(_kl_div_backward_kernel, {**vocab, "STUDENT_IS_A": reverse}) for reverse in (False, True)]


def _argument_type(name: str) -> str:
    """Triton type of a kernel argument, by naming convention: bf16 logits and their gradient,
    int64 targets, fp32 everything else."""
    if name in ("x_ptr", "a_ptr", "b_ptr", "dx_ptr"):
        return "*bf16"
    if name.endswith("_ptr"):
        return "*i64" if name == "target_ptr" else "*fp32"
    return "fp32" if name == "scale" else "i32"


@pytest.mark.skipif(not HAS_TRITON or INTERPRETED, reason="needs triton, compiling (not interpreting) kernels")
@pytest.mark.parametrize("kernel,constants", _cuda_kernels() if HAS_TRITON else [],
                         ids=lambda arg: arg.__name__ if callable(arg) else str(arg.get("STUDENT_IS_A", "")))
def test_triton_kernels_compile_for_cuda(kernel, constants):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    signature = {p.name: "constexpr" if p.is_constexpr else _argument_type(p.name) for p in kernel.params}
    compiled = triton.compile(ASTSource(kernel, signature, constants), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": 8})
    assert compiled.asm["cubin"]


# ---- Triton kernels under Triton's CPU interpreter -------------------------------------------------
# The interpreter is chosen when `triton` is first imported (tl.max & co. are @triton.jit functions
# too), and all test files share one process that must keep compiled kernels. So these tests run
# in a child process started with TRITON_INTERPRET=1 (test_triton_kernels_under_interpreter); the
# parent does not collect them. `TRITON_INTERPRET=1 pytest tests/test_kernels.py -k Interpreted`
# runs them directly.


def test_triton_kernels_under_interpreter():
    if not HAS_TRITON:
        pytest.skip("triton is not installed: only the references can be tested")
    if INTERPRETED:
        pytest.skip("this process already interprets the Triton kernels")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [sys.executable, "-m", "pytest", __file__, "-q", "-o", "addopts=", "-p", "no:cacheprovider",
               "-k", "TestTritonInterpreted"]
    child = subprocess.run(command, cwd=Path(__file__).parents[1], env=env, capture_output=True, text=True,
                           timeout=600)
    assert child.returncode == 0, child.stdout[-6000:] + child.stderr[-2000:]
    assert " passed" in child.stdout and "skipped" not in child.stdout, child.stdout[-2000:]


# op -> (Triton call, reference call) given targets t (one row ignore_index) and teacher logits y.
# Temperatures ≠ 1 wherever the op takes one.
TRITON_CASES = {
    "logsumexp": lambda t, y: (LogSumExp.apply, logsumexp_reference),
    "log_softmax": lambda t, y: (lambda x: LogSoftmax.apply(x, 0.7), lambda x: log_softmax_reference(x, 0.7)),
    "token_logprobs": lambda t, y: (lambda x: TokenLogprobs.apply(x, t, 1.3, -100),
                                    lambda x: token_logprobs_reference(x, t, 1.3)),
    "cross_entropy": lambda t, y: (lambda x: -TokenLogprobs.apply(x, t, 1.0, -100),   # as kernels.cross_entropy
                                   lambda x: cross_entropy_reference(x, t)),
    "kl_forward": lambda t, y: (lambda x: KLDiv.apply(x, y, 2.0, False), lambda x: kl_div_reference(x, y, 2.0)),
    "kl_reverse": lambda t, y: (lambda x: KLDiv.apply(x, y, 0.8, True),
                                lambda x: kl_div_reference(x, y, 0.8, reverse=True)),
}
FP32 = dict(atol=1e-5, rtol=1e-5)


def _check_triton(op, x, grad_tol=FP32):
    t = _targets(x.shape[0], x.shape[1], ignore_rows=[1])
    y = _logits(x.shape[0], x.shape[1], torch.bfloat16, seed=7).detach()   # teacher in another dtype
    fn, ref = TRITON_CASES[op](t, y)
    before = x.detach().clone()
    out, grad = _value_and_grad(fn, x)
    out_ref, grad_ref = _value_and_grad(ref, x)
    assert out.dtype == torch.float32 and grad.dtype == x.dtype
    torch.testing.assert_close(out, out_ref, **FP32)
    torch.testing.assert_close(grad, grad_ref, **grad_tol)
    assert torch.equal(x.detach(), before), "the kernel wrote into its input"


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # -inf - -inf in masked lanes
class TestTritonInterpreted:
    __test__ = INTERPRETED   # collected only where the kernels are interpreted (the child process)

    @pytest.mark.parametrize("v", [1000, 4099, 32000])
    @pytest.mark.parametrize("op", list(TRITON_CASES))
    def test_fp32_matches_reference(self, op, v):
        _check_triton(op, _logits(3, v))

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
    @pytest.mark.parametrize("op", list(TRITON_CASES))
    def test_half_matches_reference(self, op, dtype):
        # Both sides upcast the same half logits and do fp32 math, so outputs agree to fp32 rounding;
        # gradients are rounded once to the half dtype, so they agree to its resolution.
        _check_triton(op, _logits(3, 4099, dtype), grad_tol={})

    def test_strided_rows_and_broadcast_gradient(self):
        x = _logits(3, 5000).detach()[:, :4099].requires_grad_()   # row stride 5000 ≠ V
        out = LogSoftmax.apply(x, 1.0)
        out.sum().backward()                                       # all-ones gradient, stride 0
        torch.testing.assert_close(out, torch.log_softmax(x.detach(), -1), **FP32)
        torch.testing.assert_close(x.grad, 1 - 4099 * torch.softmax(x.detach(), -1), **FP32)

    def test_minus_inf_logits(self):
        x = _logits(2, 4099).detach()
        x[0, :4096] = float("-inf")                                # row 0's whole first tile is masked
        x[1, ::3] = float("-inf")
        t = torch.tensor([4097, 1])
        _assert_match(lambda z: TokenLogprobs.apply(z, t, 1.0, -100),
                      lambda z: torch.log_softmax(z, -1).gather(1, t[:, None])[:, 0], x)
        torch.testing.assert_close(LogSumExp.apply(x), torch.logsumexp(x, -1), **FP32)

    def test_kl_teacher_masked_with_minus_inf(self):
        teacher = _logits(3, 1000, seed=5).detach()
        teacher[:, 500:] = float("-inf")
        _assert_match(lambda x: KLDiv.apply(x, teacher, 1.5, False), _torch_kl(teacher, 1.5, False),
                      _logits(3, 1000))

    def test_target_outside_vocab_gives_nan(self):
        out = TokenLogprobs.apply(_logits(2, 1000), torch.tensor([1000, 3]), 1.0, -100)
        assert out[0].isnan() and out[1].isfinite()
