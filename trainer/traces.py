"""Sequence-level knowledge distillation data (Kim & Rush 2016, arXiv:1606.07947): the teacher
samples n solutions per training question, optionally only the correct ones are kept (graded
against the reference, i.e. rejection sampling as in STaR / RFT), and the student is then
fine-tuned on them with plain SFT (`--stage sft --set data.format=prompt_completion`).

Rows: {"id", "prompt" (the rendered prompt string), "completion" (the teacher's text, without
the end token: tokenize_example adds it), "score", "sample"}. Completions cut by max_new_tokens are
always dropped: an unfinished trace would teach the student to stop mid-solution.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from data.graders import gsm8k
from data.readers import load_gsm8k
from data.synthetic import write_jsonl
from data.templates import STOP_STRINGS, render_prompt
from model.generate import SamplingParams, generate
from model.parallel import all_gather_objects, barrier
from model.tokenizer import load_tokenizer
from trainer.config import TrainConfig
from trainer.distributed import Dist
from trainer.models import autocast, build_model
from trainer.run import prepare_out


def sampling_params(cfg: TrainConfig) -> SamplingParams:
    g = cfg.gen
    return SamplingParams(max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p, n=g.n,
                          stop_strings=STOP_STRINGS[cfg.data.style], seed=cfg.seed)


def teacher_traces(model, tokenizer, rows: list[dict], cfg: TrainConfig, d: Dist) -> list[dict]:
    """Each rank samples a contiguous block of the rows; rank 0 gets every trace, in row order.

    The sampling streams are seeded per (seed, row within the block, sample), so the traces depend
    on the world size; for a given world size they are reproducible.
    """
    block = -(-len(rows) // d.world_size)
    mine = rows[d.rank * block:(d.rank + 1) * block]
    prompts = [render_prompt(tokenizer, row["question"], cfg.data.style, task=cfg.data.task) for row in mine]
    completions = generate(model, [tokenizer.encode(p) for p in prompts], sampling_params(cfg),
                           tokenizer.stop_ids, tokenizer, batch_size=cfg.gen.batch_size) if mine else []
    traces = []
    for c in completions:
        if c.finish_reason != "stop":
            continue
        row = mine[c.prompt_index]
        score = gsm8k.grade(c.text, row["reference"]).score
        if score == 1.0 or not cfg.gen.only_correct:
            traces.append({"id": row["id"], "sample": c.sample_index, "prompt": prompts[c.prompt_index],
                           "completion": c.text, "score": score})
    return [t for shard in all_gather_objects(traces) for t in shard]


def summary(rows: list[dict], traces: list[dict], cfg: TrainConfig) -> str:
    kept = len({t["id"] for t in traces})
    return (f"{len(traces)} traces for {kept}/{len(rows)} questions "
            f"(n={cfg.gen.n}, only_correct={cfg.gen.only_correct}, sampling {asdict(sampling_params(cfg))})")


def write_traces(cfg: TrainConfig, d: Dist):
    """Stage gen: <out>/traces.jsonl (prompt/completion rows) from --model's samples, then DONE."""
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model)
    model = build_model(cfg, tokenizer, d.device)
    if not Path(cfg.data.path).is_file():
        raise FileNotFoundError(f"data file {cfg.data.path} not found")
    rows = load_gsm8k(cfg.data.path)
    with autocast(cfg, d.device):
        traces = teacher_traces(model, tokenizer, rows, cfg, d)
    _, lock = prepare_out(cfg, None, d)
    if d.is_main:
        out = Path(cfg.out)
        write_jsonl(out / "traces.jsonl", traces)
        print(summary(rows, traces, cfg))
        (out / "DONE").write_text(f"{len(traces)} traces\n")
        lock.close()
    barrier()
