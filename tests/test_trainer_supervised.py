"""trainer/supervised.py against independent references: SFT and KD losses vs full-logit naive ones,
the global-token normalisation vs one big batch, chunked heads only, GKD's on-policy loss."""
from __future__ import annotations

import copy
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from conftest import WidestVocabTensor
from trainer.batches import collate, shifted_targets
from trainer.config import KDConfig, TrainConfig
from trainer.supervised import count_tokens, kd_loss, sft_loss
from trainer_helpers import random_batch, stage_for, tiny


def test_sft_objective_is_the_summed_cross_entropy_of_full_logits():
    model, batch = tiny(), random_batch([9, 5, 7])
    cfg = replace(TrainConfig(), chunk_size=4)
    loss, parts = sft_loss(model, batch, cfg)
    logits = model(batch["input_ids"], batch["attention_mask"])  # (B, T, V)
    expected = F.cross_entropy(logits.flatten(0, 1), shifted_targets(batch["labels"]).flatten(), reduction="sum")
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_global_token_normalisation_equals_one_big_batch():
    """Micro-batches of very different token counts: sum / global count == mean over the merged batch."""
    lengths = [4, 20, 6, 17, 5]
    merged_model, split_model = tiny(), tiny()
    cfg = replace(TrainConfig(), chunk_size=8)
    merged = random_batch(lengths)
    # the same rows, split 2 + 3 (each micro-batch padded to its own longest row)
    split = [collate([(r[m.bool()].tolist(), l[m.bool()].tolist()) for r, l, m in
                      zip(merged["input_ids"][s], merged["labels"][s], merged["attention_mask"][s])], 0, "cpu")
             for s in (slice(0, 2), slice(2, 5))]
    stage = stage_for(cfg)
    stage.forward_backward(merged_model, [merged], on_policy=False)
    sums = stage.forward_backward(split_model, split, on_policy=False)
    logits = tiny()(merged["input_ids"], merged["attention_mask"])
    mean_ce = F.cross_entropy(logits.flatten(0, 1), shifted_targets(merged["labels"]).flatten())
    torch.testing.assert_close(sums["loss"], mean_ce.detach(), rtol=1e-5, atol=1e-6)
    a, b = grads(merged_model), grads(split_model)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)


def test_training_objectives_never_materialise_the_full_logits():
    """SFT and KD (student and teacher heads, forward and backward) hold at most chunk_size rows of
    vocabulary-wide values (V = 37; hidden size 32 < chunk_size, so a transposed head view stays under it)."""
    batch = random_batch([30, 18, 25, 22, 27])
    assert count_tokens(batch) > 2 * 40
    for stage in ("sft", "kd"):
        cfg = replace(TrainConfig(), stage=stage, chunk_size=40)
        widest = WidestVocabTensor(37)
        with widest:
            teacher = tiny(seed=1).requires_grad_(False) if stage == "kd" else None
            stage_for(cfg, teacher).loss(tiny(), batch)[0].backward()
        assert 0 < widest.rows <= 40, stage


def naive_kd(student_logits, teacher_logits, vocab, temperature, beta):
    """Generalized JSD on full logits sliced to `vocab`, written out from its definition (GKD, scaled)."""
    logq = F.log_softmax(student_logits[..., :vocab].double() / temperature, -1)
    logp = F.log_softmax(teacher_logits[..., :vocab].double() / temperature, -1)
    kl = lambda a, b: (a.exp() * (a - b)).sum(-1)  # noqa: E731
    if beta == 0:
        return kl(logp, logq)
    if beta == 1:
        return kl(logq, logp)
    logm = torch.logsumexp(torch.stack([logp + math.log(beta), logq + math.log(1 - beta)]), 0)
    return (beta * kl(logp, logm) + (1 - beta) * kl(logq, logm)) / (beta * (1 - beta))


@pytest.mark.parametrize("loss,beta", [("forward_kl", 0.0), ("reverse_kl", 1.0), ("jsd", 0.3)])
def test_kd_objective_aligns_padded_heads_and_matches_naive(loss, beta):
    """Teacher head padded with 5 rows beyond the 37-id tokenizer: compared on the 37 real ids only."""
    student, teacher = tiny(vocab=37), tiny(vocab=42, seed=1)
    with torch.no_grad():
        teacher.embed_tokens.weight[37:] = 10.0  # padded rows that would dominate if not sliced away
    batch = random_batch([8, 5, 11])
    cfg = replace(TrainConfig(), stage="kd", chunk_size=5)
    cfg = replace(cfg, kd=replace(cfg.kd, loss=loss, beta=0.3, temperature=1.7, alpha=0.4))
    total, parts = kd_loss(student, batch, cfg, teacher, vocab_size=37, alpha=cfg.kd.alpha)
    targets = shifted_targets(batch["labels"])
    mask = targets != -100
    s_logits = student(batch["input_ids"], batch["attention_mask"])
    t_logits = teacher(batch["input_ids"], batch["attention_mask"])
    kd = naive_kd(s_logits, t_logits, 37, 1.7, beta)[mask].sum()
    ce = F.cross_entropy(s_logits.flatten(0, 1), targets.flatten(), reduction="sum")
    torch.testing.assert_close(parts["kd"].double(), kd.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(total.double(), (0.4 * ce + 0.6 * kd).detach(), rtol=1e-4, atol=1e-5)


def test_kd_with_teacher_equal_to_student_is_zero_with_zero_gradient():
    student, teacher = tiny(), tiny()
    teacher.requires_grad_(False)
    batch = random_batch([7, 9])
    cfg = TrainConfig(stage="kd", kd=KDConfig(alpha=0.0, loss="forward_kl"))
    loss, parts = kd_loss(student, batch, cfg, teacher, vocab_size=37, alpha=0.0)
    assert abs(parts["kd"].item()) < 1e-5 and parts["ce"].item() > 1  # the CE part is live, only weighted 0
    loss.backward()
    assert max(p.grad.abs().max().item() for p in student.parameters()) < 1e-6


def test_bf16_teacher_gives_the_fp32_teacher_loss_and_gradient():
    """kd.teacher_dtype = bfloat16: the teacher's forward in bf16, the loss in fp32, ~ the fp32 teacher's."""
    student, teacher = tiny(), tiny(seed=1)
    batch = random_batch([8, 5, 11])
    cfg = TrainConfig(stage="kd", kd=KDConfig(alpha=0.0, loss="jsd"))
    results = []
    for t in (teacher, copy.deepcopy(teacher).to(torch.bfloat16)):
        student.zero_grad()
        loss = kd_loss(student, batch, cfg, t.requires_grad_(False), vocab_size=37, alpha=0.0)[0]
        loss.backward()
        results.append((loss.item(), torch.cat([p.grad.flatten() for p in student.parameters()])))
    (fp32, g32), (bf16, g16) = results
    assert bf16 == pytest.approx(fp32, rel=1e-2)
    assert F.cosine_similarity(g32, g16, dim=0) > 0.999


def test_on_policy_objective_is_the_divergence_alone():
    """GKD: on student samples the loss is D(teacher || student) only; with teacher == student it is 0."""
    student, teacher = tiny(), tiny(seed=1)
    batch = random_batch([8, 5])
    cfg = TrainConfig(stage="kd", kd=KDConfig(alpha=0.5))
    stage = stage_for(cfg, teacher)
    loss, parts = stage.loss(student, batch, on_policy=True)
    assert loss.item() == pytest.approx(parts["kd"].item()) and parts["ce"].item() > 1
    supervised = stage.loss(student, batch)[0]
    assert supervised.item() == pytest.approx(0.5 * (parts["ce"] + parts["kd"]).item())
    same = stage_for(cfg, tiny()).loss(student, batch, on_policy=True)[0]
    assert abs(same.item()) < 1e-5
