"""On-policy distillation for stage kd: the student writes the completions, the teacher scores them.

GKD (Agarwal et al. 2024, "On-Policy Distillation of Language Models", arXiv:2306.13649): with
probability lambda an optimizer step trains on sequences the STUDENT samples from the step's prompts
instead of the dataset's completions, and the divergence D(teacher || student) is taken at every
token of those samples. The student then learns from the teacher on the prefixes it actually
produces, which removes the train/inference mismatch of training on fixed outputs only.

- lambda (`kd.on_policy_lambda`): the draw is a function of (seed, step) only, the same on every rank
  and on resume; 0 = purely supervised KD (the default), 1 = every step on-policy.
- On an on-policy step the loss is the divergence alone (GKD): CE on the student's own samples would
  teach it to imitate itself. The records still report that CE (the student's NLL of its samples).
- Prompt of an example: its tokens before the first learned label (for multi-turn chat rows, the
  conversation up to the first assistant answer). The samples replace everything after it; the
  stop token (or the one completing a stop string) is learned, as a dataset end token is.
- Sampling seed of step s on rank r: model/generate.py's stream_seed(seed, s, r, world_size).
"""
from __future__ import annotations

import numpy as np

from data.templates import IGNORE_INDEX, STOP_STRINGS
from model.generate import SamplingParams, generate, stream_seed
from model.parallel import unwrap
from trainer.batches import Example
from trainer.config import TrainConfig
from trainer.distributed import Dist


def on_policy_step(step: int, cfg: TrainConfig) -> bool:
    """Whether optimizer step `step` trains on student samples: u < lambda, u uniform in [0, 1) drawn
    from numpy's stream (seed, step) (no global RNG is touched)."""
    if cfg.stage != "kd" or cfg.kd.on_policy_lambda == 0:
        return False
    return np.random.default_rng((cfg.seed, step)).random() < cfg.kd.on_policy_lambda


def prompt_of(example: Example) -> list[int]:
    """The tokens before the first learned label."""
    ids, labels = example
    return ids[:next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)]


def student_examples(model, micro: list[list[Example]], step: int, cfg: TrainConfig, tokenizer,
                     d: Dist) -> list[list[Example]]:
    """The same micro-batches with every completion replaced by one the student samples (one generate
    call for all of them); each example is cut at data.max_len like a dataset example."""
    prompts = [[prompt_of(e) for e in m] for m in micro]
    params = SamplingParams(max_new_tokens=cfg.kd.on_policy_max_new_tokens, temperature=cfg.kd.on_policy_temperature,
                            stop_strings=STOP_STRINGS[cfg.data.style],
                            seed=stream_seed(cfg.seed, step, d.rank, d.world_size))
    samples = iter(generate(unwrap(model), [p for ps in prompts for p in ps], params, tokenizer.stop_ids, tokenizer))
    return [[sampled_example(p, next(samples).tokens, cfg.data.max_len) for p in ps] for ps in prompts]


def sampled_example(prompt: list[int], tokens: list[int], max_len: int) -> Example:
    """prompt + sampled tokens, learning the sampled ones, cut at max_len (the prompt is shorter: the
    dataset example had a learned token within max_len)."""
    return (prompt + tokens)[:max_len], ([IGNORE_INDEX] * len(prompt) + tokens)[:max_len]
