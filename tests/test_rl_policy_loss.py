"""rl/policy_loss.py: hand-computed losses per aggregation mode, padding, KL estimators' values and gradients."""
import math

import pytest
import torch

from rl.grpo import GRPOConfig
from rl.policy_loss import KL_ESTIMATORS, normaliser, policy_loss

# Two sequences, three completion slots; row 0 has one padding slot.
#   row 0: A = +1, ratios 1.5, 0.5, (pad)
#   row 1: A = -2, ratios 0.5, 1.0, 1.2
# eps_low = 0.2, eps_high = 0.3 -> ratios clipped to [0.8, 1.3]. Per-token l = -min(rho A, clip(rho) A):
#   row 0: -min(1.5, 1.3) = -1.3 (clipped) ; -min(0.5, 0.8) = -0.5
#   row 1: -min(-1.0, -1.6) = 1.6 (clipped) ; -min(-2, -2) = 2 ; -min(-2.4, -2.4) = 2.4
OLD = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -1.5, -2.5]])
RATIOS = torch.tensor([[1.5, 0.5, 7.0], [0.5, 1.0, 1.2]])  # 7.0 sits on padding: must not matter
ADV = torch.tensor([1.0, -2.0])
MASK = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
KW = dict(eps_low=0.2, eps_high=0.3)
MAX_NEW_TOKENS = 4


def kl_estimate(logprobs, ref_logprobs, estimator):
    return KL_ESTIMATORS[estimator](ref_logprobs - logprobs)


def _loss(aggregation, logprobs=None, mask=MASK, **kw):
    logprobs = OLD + RATIOS.log() if logprobs is None else logprobs
    return policy_loss(logprobs, OLD, ADV, mask, aggregation=aggregation, **KW, **kw)


@pytest.mark.parametrize("aggregation, loss_sum, norm", [
    ("grpo", (-1.3 - 0.5) / 2 + (1.6 + 2.0 + 2.4) / 3, 2.0),  # per-sequence means -0.9 and 2.0, 2 sequences
    ("dapo", -1.3 - 0.5 + 1.6 + 2.0 + 2.4, 5.0),  # token sum 4.2 over 5 tokens
    ("dr_grpo", -1.3 - 0.5 + 1.6 + 2.0 + 2.4, 2 * 4.0),  # token sum over 2 sequences x max_new_tokens 4
])
def test_aggregation_hand_numbers(aggregation, loss_sum, norm):
    out = _loss(aggregation)
    assert out.loss_sum.item() == pytest.approx(loss_sum, abs=1e-5)
    assert normaliser(MASK, aggregation, MAX_NEW_TOKENS).item() == norm
    assert out.clipped_tokens.item() == 2 and out.num_tokens.item() == 5


@pytest.mark.parametrize("aggregation", ["grpo", "dapo", "dr_grpo"])
def test_padding_contributes_nothing(aggregation):
    logprobs = (OLD + RATIOS.log()).requires_grad_()
    out = _loss(aggregation, logprobs)
    out.loss_sum.backward()
    assert logprobs.grad[0, 2] == 0
    # Changing what sits on the padding slot (even to inf) changes nothing.
    garbage = logprobs.detach().clone()
    garbage[0, 2] = float("inf")
    assert _loss(aggregation, garbage).loss_sum.item() == pytest.approx(out.loss_sum.item())
    # A fully masked row adds neither loss nor normaliser.
    extra_mask = torch.cat([MASK, torch.zeros(1, 3, dtype=torch.bool)])
    extra = policy_loss(torch.cat([logprobs.detach(), torch.randn(1, 3)]), torch.cat([OLD, torch.randn(1, 3)]),
                        torch.cat([ADV, torch.tensor([5.0])]), extra_mask, aggregation=aggregation, **KW)
    assert extra.loss_sum.item() == pytest.approx(out.loss_sum.item())
    assert normaliser(extra_mask, aggregation, MAX_NEW_TOKENS).item() == normaliser(MASK, aggregation, MAX_NEW_TOKENS).item()


def test_on_policy_gradient_is_reinforce():
    """old = logprobs.detach(): rho == 1, no clipping, d loss / d logprob_t = -A (dapo token sum)."""
    logprobs = torch.randn(2, 3, requires_grad=True)
    out = policy_loss(logprobs, logprobs.detach(), ADV, MASK, aggregation="dapo", **KW)
    out.loss_sum.backward()
    torch.testing.assert_close(logprobs.grad, -ADV[:, None] * MASK)
    assert out.clipped_tokens.item() == 0


def test_kl_term_added_with_beta():
    ref = OLD + 0.3
    logprobs = OLD + RATIOS.log()
    with_kl = _loss("dapo", ref_logprobs=ref, beta=0.1, kl_estimator="k1")
    # k1 = log pi - log pi_ref, summed over the 5 real tokens.
    k1 = ((logprobs - ref) * MASK).sum().item()
    assert with_kl.kl_sum.item() == pytest.approx(k1, abs=1e-5)
    assert with_kl.loss_sum.item() == pytest.approx(_loss("dapo").loss_sum.item() + 0.1 * k1, abs=1e-5)
    with pytest.raises(ValueError, match="ref_logprobs"):
        _loss("dapo", beta=0.1)


def test_k3_value_nonnegative_and_zero_at_reference():
    lp, ref = torch.randn(1000) - 2, torch.randn(1000) - 2
    k3 = kl_estimate(lp, ref, "k3")
    assert torch.all(k3 >= 0)
    assert torch.all(kl_estimate(lp, lp, "k3") == 0)
    # Closed form at one point: r = e^{0.5} -> r - 1 - log r = e^0.5 - 1.5.
    assert kl_estimate(torch.tensor([-1.0]), torch.tensor([-0.5]), "k3").item() == pytest.approx(math.exp(0.5) - 1.5)


def _grad_wrt_logits(estimator, logits, ref_logits, token):
    logits = logits.clone().requires_grad_()
    lp = logits.log_softmax(-1)[token]
    kl_estimate(lp, ref_logits.log_softmax(-1)[token], estimator).backward()
    return logits.grad


def test_kl_estimator_gradients_match_documented_formulas():
    """grad k3 = (1 - r) grad log pi(x); grad k1 = grad log pi(x), with grad_z log softmax(z)_x = e_x - p.
    In expectation over x ~ pi: k3 gives grad KL(pi_ref || pi) = p - p_ref, k1 gives 0."""
    torch.manual_seed(0)
    V = 7
    logits, ref_logits = torch.randn(V, dtype=torch.float64), torch.randn(V, dtype=torch.float64)
    p, p_ref = logits.softmax(-1), ref_logits.softmax(-1)
    expected_k3, expected_k1 = torch.zeros(V, dtype=torch.float64), torch.zeros(V, dtype=torch.float64)
    for x in range(V):
        grad_log_pi = torch.nn.functional.one_hot(torch.tensor(x), V).double() - p
        r = p_ref[x] / p[x]
        torch.testing.assert_close(_grad_wrt_logits("k3", logits, ref_logits, x), (1 - r) * grad_log_pi)
        torch.testing.assert_close(_grad_wrt_logits("k1", logits, ref_logits, x), grad_log_pi)
        expected_k3 += p[x] * _grad_wrt_logits("k3", logits, ref_logits, x)
        expected_k1 += p[x] * _grad_wrt_logits("k1", logits, ref_logits, x)
    torch.testing.assert_close(expected_k3, p - p_ref)  # gradient of KL(pi_ref || pi) w.r.t. the logits
    torch.testing.assert_close(expected_k1, torch.zeros(V, dtype=torch.float64))
    # ... which is NOT the gradient of KL(pi || pi_ref), the quantity k3's value estimates.
    z = logits.clone().requires_grad_()
    (z.softmax(-1) * (z.log_softmax(-1) - ref_logits.log_softmax(-1))).sum().backward()
    assert not torch.allclose(z.grad, p - p_ref, atol=1e-3)


def test_bad_aggregation_and_estimator_are_config_errors():
    with pytest.raises(ValueError, match="aggregation must be one of"):
        GRPOConfig(aggregation="mean")
    with pytest.raises(ValueError, match="kl_estimator must be one of"):
        GRPOConfig(kl_estimator="k2")
