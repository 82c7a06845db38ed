"""model/parallel.py: the global gradient norm and clipping (one process)."""
import math

import pytest

import torch

from model.parallel import NonFiniteError, clip_grad_norm
from trainer.config import TrainConfig
from trainer.supervised import sft_loss
from trainer_helpers import random_batch, tiny


def global_grad_norm(model) -> float:
    return math.sqrt(sum((p.grad.double() ** 2).sum().item() for p in model.parameters()))


def test_clip_grad_norm_reports_the_norm_before_clipping():
    model = tiny()
    sft_loss(model, random_batch([6, 4]), TrainConfig())[0].backward()
    before = global_grad_norm(model)
    assert clip_grad_norm(model, max_norm=0.0).item() == pytest.approx(before, rel=1e-5)  # 0: no clipping
    assert global_grad_norm(model) == pytest.approx(before, rel=1e-6)
    assert clip_grad_norm(model, max_norm=before / 4).item() == pytest.approx(before, rel=1e-5)
    assert global_grad_norm(model) == pytest.approx(before / 4, rel=1e-4)


def test_clip_grad_norm_refuses_a_non_finite_gradient():
    model = tiny()
    sft_loss(model, random_batch([6, 4]), TrainConfig())[0].backward()
    before = [p.grad.clone() for p in model.parameters()]
    next(model.parameters()).grad[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="gradient norm is inf"):
        clip_grad_norm(model, max_norm=1.0)
    next(model.parameters()).grad[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="gradient norm is nan"):
        clip_grad_norm(model, max_norm=0.0)
    assert all(torch.equal(p.grad, g) for p, g in list(zip(model.parameters(), before))[1:])  # nothing clipped
