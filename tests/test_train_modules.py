"""The trainer's parts against independent references: config loading, the LR schedule, sharding,
padding, the global-token normalisation, KD objectives (naive full-logit KL), checkpoints, plots."""
from __future__ import annotations

import copy
import math
import random
import re
import sys
import tomllib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train
from model.config import PRESETS
from model.generate import SamplingParams, generate
from model.transformer import Transformer
from trainer.batches import collate, rank_micro_batches, shifted_targets
from trainer.checkpoint import checkpoint_paths, load_checkpoint, save_checkpoint
from trainer.config import TrainConfig, apply_dict, load_config, to_toml
from trainer.distributed import Dist
from trainer.metrics import Metrics, plot_metrics, read_metrics
from trainer.on_policy import on_policy_step, student_examples
from trainer.stages import count_tokens, make_objective, sft_objective
from conftest import WidestVocabTensor

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = {"model": "tiny-student", "out": "runs/x", "data.path": "train.jsonl"}
CPU = Dist(rank=0, world_size=1, device=torch.device("cpu"))


def tiny(vocab: int = 37, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(replace(PRESETS["tiny-student"], vocab_size=vocab, hidden_size=32, intermediate_size=48,
                               num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16))


def random_batch(lengths: list[int], vocab: int = 37, prompt: int = 3, seed: int = 0) -> dict:
    """Right-padded rows of the given lengths, loss on everything after the first `prompt` tokens."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for n in lengths:
        ids = torch.randint(0, vocab, (n,), generator=g).tolist()
        examples.append((ids, [-100] * prompt + ids[prompt:]))
    return collate(examples, pad_id=0, device="cpu")


# ---------------------------------------------------------------- config

def test_config_precedence_types_and_errors(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('max_steps = 7\nstage = "kd"\n[optim]\nlr = 1\n[kd]\nteacher = "t"\nalpha = 0.25\n')
    cfg = load_config(str(recipe), {**REQUIRED, "stage": None},
                      [("max_steps", "9"), ("kd.loss", "reverse_kl"), ("out", "2024"), ("data.task", '"gsm8k"')])
    assert (cfg.max_steps, cfg.stage, cfg.optim.lr, cfg.kd.alpha, cfg.kd.loss) == (9, "kd", 1.0, 0.25, "reverse_kl")
    assert (cfg.out, cfg.data.task) == ("2024", "gsm8k")  # string fields keep the command-line text
    assert isinstance(cfg.optim.lr, float)  # TOML int accepted for a float field
    again = TrainConfig()
    apply_dict(again, tomllib.loads(to_toml(cfg)), "resolved")
    assert again == cfg  # the written config is a recipe reproducing the run
    cases = [({"max_steps": "x"}, "'max_steps' expects int"), ({"optim.beta2": "1.5"}, "'optim.beta2' must be in [0, 1]"),
             ({"kd.loss": "kl"}, "'kd.loss' must be one of"), ({"data.max_len": "0"}, "'data.max_len' must be > 0"),
             ({"optim": "1"}, "is a section"), ({"optimizer.lr": "1"}, "unknown config key 'optimizer.lr'")]
    for override, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            load_config(None, REQUIRED, list(override.items()))
    with pytest.raises(ValueError, match="'kd.teacher' is required"):
        load_config(None, {**REQUIRED, "stage": "kd"}, [])
    kd = {**REQUIRED, "stage": "kd", "kd.teacher": "t"}
    with pytest.raises(ValueError, match=re.escape("'kd.on_policy_lambda' must be in [0, 1], got 1.5")):
        load_config(None, kd, [("kd.on_policy_lambda", "1.5")])
    with pytest.raises(ValueError, match="'kd.on_policy_lambda' > 0 needs config key 'parallel' = 'ddp'"):
        load_config(None, kd, [("kd.on_policy_lambda", "0.5"), ("parallel", "fsdp")])
    recipe.write_text("[data]\nbatch = 3\n")
    with pytest.raises(ValueError, match=r"r\.toml: unknown config key 'data\.batch'"):
        load_config(str(recipe), REQUIRED, [])


def test_every_recipe_loads():
    recipes = sorted((ROOT / "recipes").glob("*.toml"))
    assert recipes
    for recipe in recipes:
        cfg = load_config(str(recipe), {"model": "m", "out": "o", "data.path": "d", "kd.teacher": "t"}, [])
        assert cfg.stage in ("sft", "kd", "rl"), recipe


def test_cli_overrides_parse():
    args, overrides = train.parse_args(["--max-steps", "3", "--optim.lr", "1e-3", "--set", "kd.alpha=0.5"])
    assert overrides == [("max_steps", "3"), ("optim.lr", "1e-3"), ("kd.alpha", "0.5")]
    with pytest.raises(ValueError, match="--key value"):
        train.parse_args(["--max-steps"])


# ---------------------------------------------------------------- schedule

def test_lr_schedule_matches_closed_form():
    cfg = train.OptimConfig(lr=1.0, warmup_steps=4, min_lr_ratio=0.1)
    assert [train.lr_at(s, cfg, 104) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert train.lr_at(4, cfg, 104) == pytest.approx(1.0)
    assert train.lr_at(54, cfg, 104) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way: cos(pi/2) = 0
    assert train.lr_at(104, cfg, 104) == pytest.approx(0.1)
    for s in range(4, 104):
        assert train.lr_at(s + 1, cfg, 104) <= train.lr_at(s, cfg, 104)


# ---------------------------------------------------------------- batches

def test_rank_shards_are_disjoint_and_cover_the_global_batch():
    examples = [([i], [i]) for i in range(23)]  # 23 examples, global batch 2 x 3 x 2 = 12 -> 1 step per epoch
    def ids(step, rank, world, mb, accum):
        return [e[0][0] for m in rank_micro_batches(examples, step, 5, mb, accum, rank, world) for e in m]
    for step in range(3):
        shards = [ids(step, r, 2, 2, 3) for r in range(2)]
        assert not set(shards[0]) & set(shards[1])
        assert sorted(shards[0] + shards[1]) == sorted(ids(step, 0, 1, 4, 3))  # the same global batch, split differently
        assert len(set(shards[0] + shards[1])) == 12
    assert ids(0, 0, 2, 2, 3) == ids(0, 0, 2, 2, 3)  # deterministic
    assert ids(0, 0, 2, 2, 3) != ids(1, 0, 2, 2, 3)  # a new epoch reshuffles
    with pytest.raises(ValueError, match="fewer than one global batch"):
        rank_micro_batches(examples[:5], 0, 0, 2, 3, 0, 1)


def test_collate_right_pads_and_shifts():
    batch = collate([([5, 6, 7], [-100, 6, 7]), ([8], [8])], pad_id=0, device="cpu")
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert shifted_targets(batch["labels"]).tolist() == [[6, 7, -100], [-100, -100, -100]]
    assert count_tokens(batch).item() == 2


# ---------------------------------------------------------------- objectives and normalisation

def test_sft_objective_is_the_summed_cross_entropy_of_full_logits():
    model, batch = tiny(), random_batch([9, 5, 7])
    cfg = replace(TrainConfig(), chunk_size=4)
    loss, parts = sft_objective(model, batch, cfg)
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
    objective = make_objective(cfg)
    merged = random_batch(lengths)
    # the same rows, split 2 + 3 (each micro-batch padded to its own longest row)
    split = [collate([(r[m.bool()].tolist(), l[m.bool()].tolist()) for r, l, m in
                      zip(merged["input_ids"][s], merged["labels"][s], merged["attention_mask"][s])], 0, "cpu")
             for s in (slice(0, 2), slice(2, 5))]
    train.train_step(merged_model, [merged], objective, cfg, CPU)
    sums = train.train_step(split_model, split, objective, cfg, CPU)
    logits = tiny()(merged["input_ids"], merged["attention_mask"])
    mean_ce = F.cross_entropy(logits.flatten(0, 1), shifted_targets(merged["labels"]).flatten())
    torch.testing.assert_close(sums["loss"], mean_ce.detach(), rtol=1e-5, atol=1e-6)
    a, b = grads(merged_model), grads(split_model)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)


def global_grad_norm(model) -> float:
    return math.sqrt(sum((p.grad.double() ** 2).sum().item() for p in model.parameters()))


def test_clip_grad_norm_reports_the_norm_before_clipping():
    model = tiny()
    sft_objective(model, random_batch([6, 4]), TrainConfig())[0].backward()
    before = global_grad_norm(model)
    assert train.clip_grad_norm(model, max_norm=0.0).item() == pytest.approx(before, rel=1e-5)  # 0: no clipping
    assert global_grad_norm(model) == pytest.approx(before, rel=1e-6)
    assert train.clip_grad_norm(model, max_norm=before / 4).item() == pytest.approx(before, rel=1e-5)
    assert global_grad_norm(model) == pytest.approx(before / 4, rel=1e-4)


def test_training_objectives_never_materialise_the_full_logits():
    """SFT and KD (student and teacher heads, forward and backward) hold at most chunk_size rows of
    vocabulary-wide values (V = 37; hidden size 32 < chunk_size, so a transposed head view stays under it)."""
    batch = random_batch([30, 18, 25, 22, 27])
    assert count_tokens(batch) > 2 * 40
    for stage in ("sft", "kd"):
        cfg = replace(TrainConfig(), stage=stage, chunk_size=40)
        widest = WidestVocabTensor(37)
        with widest:
            make_objective(cfg, tiny(seed=1).requires_grad_(False), vocab_size=37)(tiny(), batch)[0].backward()
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
    cfg.kd = replace(cfg.kd, loss=loss, beta=0.3, temperature=1.7, alpha=0.4)
    total, parts = make_objective(cfg, teacher, vocab_size=37)(student, batch)
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
    cfg = TrainConfig(stage="kd")
    cfg.kd = replace(cfg.kd, alpha=0.0, loss="forward_kl")
    loss, parts = make_objective(cfg, teacher, vocab_size=37)(student, batch)
    assert abs(parts["kd"].item()) < 1e-5 and parts["ce"].item() > 1  # the CE part is live, only weighted 0
    loss.backward()
    assert max(p.grad.abs().max().item() for p in student.parameters()) < 1e-6


def test_bf16_teacher_gives_the_fp32_teacher_loss_and_gradient():
    """kd.teacher_dtype = bfloat16: the teacher's forward in bf16, the loss in fp32, ~ the fp32 teacher's."""
    student, teacher = tiny(), tiny(seed=1)
    batch = random_batch([8, 5, 11])
    cfg = TrainConfig(stage="kd")
    cfg.kd = replace(cfg.kd, alpha=0.0, loss="jsd")
    results = []
    for t in (teacher, copy.deepcopy(teacher).to(torch.bfloat16)):
        student.zero_grad()
        loss = make_objective(cfg, t.requires_grad_(False), vocab_size=37)(student, batch)[0]
        loss.backward()
        results.append((loss.item(), torch.cat([p.grad.flatten() for p in student.parameters()])))
    (fp32, g32), (bf16, g16) = results
    assert bf16 == pytest.approx(fp32, rel=1e-2)
    assert F.cosine_similarity(g32, g16, dim=0) > 0.999


# ---------------------------------------------------------------- on-policy KD (GKD)

def test_on_policy_steps_are_a_seeded_lambda_fraction():
    cfg = TrainConfig(stage="kd", seed=3)
    draws = lambda lam, c=cfg: [on_policy_step(s, replace(c, kd=replace(c.kd, on_policy_lambda=lam)))  # noqa: E731
                                for s in range(2000)]
    assert not any(draws(0.0)) and all(draws(1.0))
    fraction = sum(draws(0.3)) / 2000
    assert abs(fraction - 0.3) < 0.04  # binomial std 0.01
    assert draws(0.3) == draws(0.3)  # a function of (seed, step): the same on every rank and on resume
    assert draws(0.3) != draws(0.3, replace(cfg, seed=4))
    assert not any(draws(1.0, replace(cfg, stage="sft")))


class CharTokenizer:
    """Enough of model.tokenizer.Tokenizer for generate: stop ids and a decode."""
    stop_ids = [0]
    pad_id = 0

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(map(str, ids))


def test_student_examples_replace_completions_by_the_students_samples():
    """Prompt = tokens before the first label; then the sample generate() draws with seed
    seed + step * world_size + rank for that prompt, learned, stop token included; cut at max_len."""
    model = tiny()
    g = torch.Generator().manual_seed(0)
    examples = [(torch.randint(1, 37, (n,), generator=g).tolist(), [-100] * p + [5] * (n - p))
                for n, p in ((9, 4), (6, 2), (12, 7))]
    micro = [examples[:2], examples[2:]]
    cfg = TrainConfig(stage="kd", seed=2)
    cfg.kd = replace(cfg.kd, on_policy_lambda=1.0, on_policy_max_new_tokens=10, on_policy_temperature=0.8)
    cfg.data = replace(cfg.data, max_len=16)
    d = Dist(rank=1, world_size=2, device=torch.device("cpu"))
    out = student_examples(model, micro, step=3, cfg=cfg, tokenizer=CharTokenizer(), d=d)
    prompts = [ids[:p] for (ids, _), p in zip(examples, (4, 2, 7))]
    params = SamplingParams(max_new_tokens=10, temperature=0.8, seed=2 + 3 * 2 + 1)
    samples = [c.tokens for c in generate(model, prompts, params, stop_ids=[0])]
    assert [len(m) for m in out] == [2, 1]
    lengths = []
    for (ids, labels), prompt, sample in zip(out[0] + out[1], prompts, samples):
        n = min(len(prompt) + len(sample), 16)
        assert ids == (prompt + sample)[:n] and labels == ([-100] * len(prompt) + sample)[:n]
        lengths.append(len(sample))
    assert len(set(lengths)) > 1 and max(lengths) + 7 > 16  # ragged samples, and the max_len cut is exercised


def test_on_policy_objective_is_the_divergence_alone():
    """GKD: on student samples the loss is D(teacher || student) only; with teacher == student it is 0."""
    student, teacher = tiny(), tiny(seed=1)
    batch = random_batch([8, 5])
    cfg = TrainConfig(stage="kd")
    cfg.kd = replace(cfg.kd, alpha=0.5)
    loss, parts = make_objective(cfg, teacher, vocab_size=37, on_policy=True)(student, batch)
    assert loss.item() == pytest.approx(parts["kd"].item()) and parts["ce"].item() > 1
    supervised = make_objective(cfg, teacher, vocab_size=37)(student, batch)[0]
    assert supervised.item() == pytest.approx(0.5 * (parts["ce"] + parts["kd"]).item())
    same = make_objective(cfg, tiny(), vocab_size=37, on_policy=True)(student, batch)[0]
    assert abs(same.item()) < 1e-5


# ---------------------------------------------------------------- checkpoints and records

def test_checkpoint_round_trip_restores_everything_and_keeps_last(tmp_path):
    model = tiny()
    optimizer = train.build_optimizer(model, train.OptimConfig())
    sft_objective(model, random_batch([6, 4]), TrainConfig())[0].backward()
    optimizer.step()
    torch.manual_seed(7), random.seed(7), np.random.seed(7)
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, model, optimizer, step, {"config": {"x": 1}}, keep_last=2, is_main=True, sharded=False)
    expected = (torch.rand(3), random.random(), np.random.rand())
    assert [p.name for p in checkpoint_paths(tmp_path)] == ["step_00000002.pt", "step_00000003.pt"]
    fresh = tiny(seed=3)
    fresh_opt = train.build_optimizer(fresh, train.OptimConfig())
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    state = load_checkpoint(checkpoint_paths(tmp_path)[-1], fresh, fresh_opt, 0, 1, sharded=False)
    assert state["step"] == 3 and state["config"] == {"x": 1}
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
    assert torch.equal(optimizer.state_dict()["state"][0]["exp_avg"], fresh_opt.state_dict()["state"][0]["exp_avg"])
    assert torch.equal(torch.rand(3), expected[0]) and (random.random(), np.random.rand()) == expected[1:]
    torn = tmp_path / "checkpoints" / "step_00000009.pt"
    torn.write_bytes(checkpoint_paths(tmp_path)[-1].read_bytes()[:1000])
    with pytest.raises(ValueError, match="step_00000009.pt is unreadable"):
        load_checkpoint(torn, fresh, fresh_opt, 0, 1, sharded=False)
    with pytest.raises(ValueError, match="written by 1 ranks"):
        load_checkpoint(checkpoint_paths(tmp_path)[0], fresh, fresh_opt, 0, 2, sharded=False)


def test_metrics_truncate_on_resume_and_plot(tmp_path):
    m = Metrics(tmp_path, 0, 5, enabled=True)
    for step in range(1, 5):
        m.log({"step": step, "loss": 1.0 / step, "lr": 0.1})
    m.close()
    m = Metrics(tmp_path, 2, 5, enabled=True)  # resumed from the step-2 checkpoint
    m.log({"step": 3, "loss": 0.3, "lr": 0.1})
    m.close()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    note = plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "plots.png")
    assert note.startswith("plots written") and (tmp_path / "plots.png").stat().st_size > 1000


def test_plots_skipped_with_one_line_without_matplotlib(tmp_path, monkeypatch):
    metrics = Metrics(tmp_path, 0, 1, enabled=True)
    metrics.log({"step": 1, "loss": 1.0})
    metrics.close()
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    note = plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "plots.png")
    assert note == "plots skipped: matplotlib is not installed"
    assert not (tmp_path / "plots.png").exists()


# ---------------------------------------------------------------- sequence-level KD traces

def test_teacher_traces_keep_finished_correct_samples(monkeypatch):
    """A scripted teacher: traces are kept iff finished and (only_correct ->) graded correct by gsm8k."""
    from data.graders import gsm8k
    from model.generate import Completion
    from trainer import traces

    class Tok:
        stop_ids = [1]
        def encode(self, text):
            return [2] * len(text)
        def apply_chat_template(self, messages, add_generation_prompt):
            return "<q>" + messages[-1]["content"]

    rows = [{"id": 10, "question": "a?", "reference": "5"}, {"id": 11, "question": "b?", "reference": "7"}]
    texts = {(0, 0): ("so #### 5", "stop"), (0, 1): ("#### 6", "stop"), (0, 2): ("#### 5", "length"),
             (1, 0): ("7 = 3 + 4\n#### 7", "stop"), (1, 1): ("no idea", "stop"), (1, 2): ("#### 7.0", "stop")}
    def fake_generate(model, prompts, params, stop_ids, tokenizer, batch_size):
        assert len(prompts) == 2 and params.n == 3
        return [Completion(i, j, [], [], [], texts[i, j][1], texts[i, j][0]) for i in range(2) for j in range(3)]
    monkeypatch.setattr(traces, "generate", fake_generate)
    cfg = TrainConfig()
    cfg.gen = replace(cfg.gen, n=3)
    kept = traces.teacher_traces(None, Tok(), rows, cfg, CPU)
    assert [(t["id"], t["sample"]) for t in kept] == [(10, 0), (11, 0), (11, 2)]
    cfg.gen = replace(cfg.gen, only_correct=False)
    everything = traces.teacher_traces(None, Tok(), rows, cfg, CPU)
    assert [(t["id"], t["sample"]) for t in everything] == [(10, 0), (10, 1), (11, 0), (11, 1), (11, 2)]
    for t in everything:
        reference = {10: "5", 11: "7"}[t["id"]]
        assert t["score"] == gsm8k.grade(t["completion"], reference).score
        assert t["prompt"].startswith("<q>" + rows[t["id"] - 10]["question"])
