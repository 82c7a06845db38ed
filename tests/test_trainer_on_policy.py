"""trainer/on_policy.py: the seeded lambda draws and the student's samples (GKD)."""
from dataclasses import replace

import torch

from model.generate import SamplingParams, generate, stream_seed
from trainer.config import DataConfig, KDConfig, TrainConfig
from trainer.distributed import Dist
from trainer.on_policy import on_policy_step, student_examples
from trainer_helpers import tiny


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
    stream_seed(seed, step, rank, world_size) for that prompt, learned, stop token included; cut at max_len."""
    model = tiny()
    g = torch.Generator().manual_seed(0)
    examples = [(torch.randint(1, 37, (n,), generator=g).tolist(), [-100] * p + [5] * (n - p))
                for n, p in ((9, 4), (6, 2), (12, 7))]
    micro = [examples[:2], examples[2:]]
    cfg = TrainConfig(stage="kd", seed=2, data=DataConfig(max_len=16),
                      kd=KDConfig(on_policy_lambda=1.0, on_policy_max_new_tokens=10, on_policy_temperature=0.8))
    d = Dist(rank=1, world_size=2, device=torch.device("cpu"))
    out = student_examples(model, micro, step=3, cfg=cfg, tokenizer=CharTokenizer(), d=d)
    prompts = [ids[:p] for (ids, _), p in zip(examples, (4, 2, 7))]
    params = SamplingParams(max_new_tokens=10, temperature=0.8, seed=stream_seed(2, 3, 1, 2))
    samples = [c.tokens for c in generate(model, prompts, params, stop_ids=[0])]
    assert [len(m) for m in out] == [2, 1]
    lengths = []
    for (ids, labels), prompt, sample in zip(out[0] + out[1], prompts, samples):
        n = min(len(prompt) + len(sample), 16)
        assert ids == (prompt + sample)[:n] and labels == ([-100] * len(prompt) + sample)[:n]
        lengths.append(len(sample))
    assert len(set(lengths)) > 1 and max(lengths) + 7 > 16  # ragged samples, and the max_len cut is exercised
