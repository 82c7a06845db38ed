"""Evaluate a model on a task (data/tasks.py): render prompts, sample completions, grade, summarise.

Sampling streams: completions come from model/generate.py in chunks of `batch_size` prompts (one
progress-bar step each); chunk c samples with seed + c. Greedy results do not depend on the batch
size; sampled ones are reproducible for a given (seed, batch size).

Outputs (when `out_dir` is given): generations.jsonl (one line per sample: id, sample, prompt,
completion, finish_reason, extracted, score, note) and summary.json.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from data.tasks import graded_text, render_prompts, score, stop_strings
from model.checkpoint import load_pretrained
from model.generate import Completion, SamplingParams, generate
from model.tokenizer import Tokenizer, check_vocab, load_tokenizer


def sample(model, tokenizer: Tokenizer, prompts: list[str], params: SamplingParams, batch_size: int | None,
           progress: bool = True) -> list[Completion]:
    """params.n completions per prompt, ordered by (prompt, sample); see the module docstring on seeds."""
    ids = [tokenizer.encode(prompt) for prompt in prompts]
    batch_size = batch_size or len(ids)
    completions = []
    with tqdm(total=len(ids), desc="generate", unit="prompt", disable=not progress) as bar:
        for chunk, start in enumerate(range(0, len(ids), batch_size)):
            batch = ids[start:start + batch_size]
            out = generate(model, batch, replace(params, seed=params.seed + chunk), tokenizer.stop_ids, tokenizer)
            completions += [replace(c, prompt_index=start + c.prompt_index) for c in out]
            bar.update(len(batch))
    return completions


def evaluate(model, tokenizer: Tokenizer, rows: list[dict], task: str, params: SamplingParams, style: str = "chat",
             batch_size: int | None = None, workers: int | None = None, out_dir: str | Path | None = None,
             progress: bool = True) -> dict:
    """Generate params.n completions per row, grade them, write out_dir (if given); return the summary.

    The stop strings of the prompt format are added to params.stop_strings.
    """
    if not rows:
        raise ValueError("evaluate: no rows to evaluate")
    prompts = render_prompts(tokenizer, rows, task, style)
    params = replace(params, stop_strings=tuple(dict.fromkeys(params.stop_strings + stop_strings(task, style))))
    completions = sample(model, tokenizer, prompts, params, batch_size, progress)
    texts = [[graded_text(c.text, task, style) for c in completions[i * params.n:(i + 1) * params.n]]
             for i in range(len(rows))]
    records, summary = score(rows, task, texts, workers)
    for record, completion in zip(records, completions):
        record["prompt"] = prompts[completion.prompt_index]
        record["finish_reason"] = completion.finish_reason
    summary.update(style=style, temperature=params.temperature, top_p=params.top_p,
                   max_new_tokens=params.max_new_tokens, seed=params.seed)
    if out_dir is not None:
        write_outputs(out_dir, records, summary)
    return summary


def write_outputs(out_dir: str | Path, records: list[dict], summary: dict):
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "generations.jsonl", "w") as f:
        f.writelines(json.dumps(record) + "\n" for record in records)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def load_model(model_dir: str, tokenizer_dir: str, device: str):
    """(model, tokenizer) from a checkpoint directory; bf16 on CUDA, fp32 elsewhere."""
    tokenizer = load_tokenizer(tokenizer_dir)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = load_pretrained(model_dir, dtype=dtype, device=device)
    check_vocab(tokenizer, model.config, tokenizer_dir)
    return model, tokenizer
