"""A study as a graph of cached stages: what study.py's embedded study and its configured grid
(trainer/grid.py) share.

A stage is one unit of work that fills its directory and writes DONE there last; a stage whose DONE
exists is skipped, so a re-run redoes only what is missing, and a killed training stage resumes from
its last checkpoint (train.py --resume). Stages run in worker processes of one torch thread each, a
stage as soon as the stages it needs are done. A run directory belongs to the config that made it
(check_config): cached stages are never mixed across configs.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import subprocess
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

import train
from model.generate import SamplingParams
from trainer.checkpoint import checkpoint_paths
from trainer.evaluation import evaluate, load_model

TRAIN_SCRIPT = str(Path(train.__file__).resolve())


@dataclass(frozen=True)
class Stage:
    """One unit of work: job = (function, args) runs in a worker process and fills `path` (its DONE
    marker last); it may start once every path in `needs` is done."""
    path: Path
    job: tuple[Callable, tuple]
    needs: tuple[Path, ...] = ()


def run_job(path: Path, function: Callable, args: tuple) -> float:
    """function(*args), which fills `path`; then path/seconds.txt and path/DONE (unless train.py wrote it)."""
    t0 = time.perf_counter()
    function(*args)
    seconds = round(time.perf_counter() - t0, 1)  # as stored, so a re-run reports the same figure
    path.mkdir(parents=True, exist_ok=True)
    (path / "seconds.txt").write_text(f"{seconds}\n")
    if not (path / "DONE").exists():
        (path / "DONE").write_text("done\n")
    return seconds


def start_worker():
    torch.set_num_threads(1)


def run_stages(stages: list[Stage], jobs: int, force: bool):
    """Run every stage not yet done, each once its needs are done, at most `jobs` at a time in worker
    processes of one torch thread each (spawned: no state is inherited; stages are submitted in list
    order). A stage's error is raised here after the stages already running have finished."""
    for s in stages:
        if force and s.path.exists():
            shutil.rmtree(s.path)
    done = {s.path for s in stages if (s.path / "DONE").exists()}
    for path in done:
        print(f"[study] skip {path} (done)")
    pending = [s for s in stages if s.path not in done]
    if not pending:
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=start_worker) as pool:
        running = {}
        while pending or running:
            for s in [s for s in pending if set(s.needs) <= done][:jobs - len(running)]:
                print(f"[study] run {s.path}", flush=True)
                pending.remove(s)
                running[pool.submit(run_job, s.path, *s.job)] = s
            if not running:
                raise RuntimeError(f"stages wait on stages that are not planned: {[str(s.path) for s in pending]}")
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                stage = running.pop(future)
                future.result()  # the worker's error, raised here
                done.add(stage.path)


def run_train(stage_name: str, args: list[str], torchrun: tuple[str, ...] = ()):
    """train.py's stage: in-process (its errors propagate), or as `*torchrun train.py ...` when a torchrun
    command is given (one process group per stage; a failure is an error naming the stage). Resumes a run
    directory that holds checkpoints (a killed stage)."""
    out = Path(args[args.index("--out") + 1])
    argv = ["--stage", stage_name, *args, *(["--resume"] if checkpoint_paths(out) else [])]
    if not torchrun:
        train.execute(argv)
        return
    code = subprocess.run([*torchrun, TRAIN_SCRIPT, *argv]).returncode
    if code:
        raise ValueError(f"stage {out}: {' '.join(torchrun)} train.py --stage {stage_name} exited with status {code} "
                         f"(its error is printed above)")


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def eval_modes(max_new_tokens: int, pass_k: int, temperature: float, seed: int) -> dict[str, SamplingParams]:
    """Greedy (pass@1) and `pass_k` samples per problem at `temperature` (pass@k, seeded)."""
    return {"greedy": SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0),
            "sampled": SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, n=pass_k, seed=seed)}


def evaluate_model(model_dir: str, tokenizer_dir: str, suites: dict[str, tuple[str, list[dict]]],
                   modes: dict[str, SamplingParams], style: str, batch_size: int, out: Path):
    """A checkpoint on every suite {name: (task, rows)} in every mode, into out/<name>_<mode>/ (generations.jsonl,
    summary.json: trainer/evaluation.py)."""
    model, tokenizer = load_model(model_dir, tokenizer_dir, device())
    for name, (task, rows) in suites.items():
        for mode, params in modes.items():
            evaluate(model, tokenizer, rows, task, params, style, batch_size, out_dir=out / f"{name}_{mode}",
                     progress=False)
    del model
    if torch.cuda.is_available():  # the worker's next stage may be a torchrun job that wants this GPU's memory
        torch.cuda.empty_cache()


def check_config(out: Path, config: dict, force: bool):
    """Cached stages are reused only by the config that made them (<out>/study_config.json)."""
    path, text = out / "study_config.json", json.dumps(config, indent=2) + "\n"
    if path.exists() and path.read_text() != text and not force:
        raise ValueError(f"{out} holds a study with another config ({path}); pass --force or choose another run "
                         f"directory")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def default_jobs() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
