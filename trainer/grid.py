"""The study grid on real checkpoints: `python study.py --config FILE.toml [--preview]`.

The config (trainer/grid_config.py) names the models, the training data, the methods, a train.py recipe
per stage kind, the evaluation suite, the seeds and how stages are launched. Everything it names is read
and checked first: an error names the config key (and for a file, the file and line) before any stage
starts. Then the cost preview (trainer/grid_cost.py) is printed and written to <out>/cost.md and cost.json
(--preview stops there; it alone accepts absent model directories, its figures then stated by config [cost]
assume or "?"), the stages run (trainer/stages.py: cached, a killed training stage resumed,
launch.jobs at a time) and the report is written (trainer/grid_report.py).

Stages, under the config's `out`:
    data                    train.jsonl: the first data.limit training rows; on the code track also sft.jsonl,
                            those rows as prompt/completion (the task's prompt; the canonical solution in a
                            ```python block, or as it is for fewshot's raw code prompt: the code grader runs
                            prompt + code), which SFT and logit KD train on (GRPO samples from the rows)
    seed_<s>/<method>       train.py --stage sft | kd | rl with its [stages] recipe and set, from the method's
                            start (grid_config.METHODS: a [models] directory, or another method's final/)
    seed_<s>/seq_kd_traces  train.py --stage gen: the teacher's traces for seq_kd, only when data.traces is not
                            given (seq_kd then trains on that file as it is)
    [seed_<s>/]eval/<method>/<benchmark>_<greedy|sampled>
                            every benchmark, greedy (pass@1) and eval.pass_k samples (pass@k); the untrained
                            methods (teacher, base, instruct) once, with the first seed, in <out>/eval
"""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import train
from data.synthetic import write_jsonl
from data.tasks import raw_code_prompt, render_prompts
from model.checkpoint import read_config
from model.tokenizer import Tokenizer, load_tokenizer
from trainer.config import TrainConfig, toml_value
from trainer.grid_config import (BY_NAME, MODEL_KEYS, STAGE_KINDS, GridConfig, Inputs, Method, about, load_grid,
                                 missing_models, read_inputs)
from trainer.grid_cost import AssumedTokenizer, Measures, Planned, stage_cost, write_cost
from trainer.grid_report import write_report
from trainer.report import provenance
from trainer.stages import Stage, check_config, eval_modes, evaluate_model, run_stages, run_train

SAMPLED_TRACES = "seq_kd_traces"


def home(g: GridConfig, name: str, seed: int) -> Path:
    """Where a method's stages live: per seed when it trains, once in `out` when it is evaluated as it is."""
    return Path(g.out) / f"seed_{seed}" if BY_NAME[name].stage else Path(g.out)


def checkpoint(g: GridConfig, name: str, seed: int) -> str:
    """A method's model: its stage's final/ when it trains, else its [models] directory."""
    m = BY_NAME[name]
    return str(home(g, name, seed) / name / "final") if m.stage else getattr(g.models, m.start)


def architecture(name: str) -> str:
    """The [models] key whose architecture a method's model has (a trained method: its start's)."""
    start = BY_NAME[name].start
    return start if start in MODEL_KEYS else architecture(start)


# ------------------------------------------------------------------ data

def code_sft_rows(records: list[dict], task: str, style: str, tokenizer: Tokenizer) -> list[dict]:
    """HumanEval rows as prompt/completion: eval's prompt; the canonical solution in a ```python block (chat), or
    as it is after fewshot's raw code prompt. The code grader runs prompt + code either way."""
    prompts = render_prompts(tokenizer, records, task, style)
    fence = not raw_code_prompt(task, style)
    return [{"prompt": prompt, "completion": f"```python\n{r['canonical_solution']}```" if fence
             else r["canonical_solution"]} for prompt, r in zip(prompts, records)]


def data_files(g: GridConfig, records: list[dict], tokenizer: Tokenizer) -> dict[str, list[dict]]:
    """The data stage's files {name: rows}: train.jsonl, and on the code track sft.jsonl."""
    files = {"train.jsonl": records}
    if g.data.code:
        files["sft.jsonl"] = code_sft_rows(records, g.data.task, g.data.style, tokenizer)
    return files


def prepare_data(g: GridConfig, records: list[dict], out: Path):
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in data_files(g, records, load_tokenizer(g.models.tokenizer_dir)).items():
        write_jsonl(out / name, rows)


# ------------------------------------------------------------------ plan

def train_stage(g: GridConfig, kind: str, sets: dict, model: str, data: Path | str, out: Path,
                teacher: str = "") -> tuple[list[str], TrainConfig]:
    """train.py's arguments for a stage of [stages] `kind` (its recipe and set, then the grid's `sets`), and the
    config train.py resolves from them: a bad recipe or setting is an error naming the stage kind now."""
    spec = g.stages[kind]
    sets = {**spec.set, "data.task": g.data.task, "data.style": g.data.style, **sets}
    args = [*(["--recipe", spec.recipe] if spec.recipe else []), "--model", model,
            "--tokenizer", g.models.tokenizer_dir, "--data", str(data), "--out", str(out),
            *(["--teacher", teacher] if teacher else []), *[f"--set={k}={toml_value(v)}" for k, v in sets.items()]]
    try:
        config = train.resolve_config(*train.parse_args(["--stage", STAGE_KINDS[kind], *args]))
    except (ValueError, OSError) as e:
        raise ValueError(f"stages.{kind}: {e}") from None
    if kind == "lora" and not config.lora.rank:
        raise ValueError("stages.lora: lora.rank is 0, so method sft_lora would train every weight: set it > 0 "
                         "(recipes/sft_qwen2.5-0.5b_gsm8k_lora.toml does)")
    return args, config


def sampling(g: GridConfig, m: Method, seed: int) -> Planned:
    """Stage gen: the teacher's traces of the training questions, for seq_kd without data.traces."""
    out, data = home(g, m.name, seed) / SAMPLED_TRACES, Path(g.out) / "data"
    args, config = train_stage(g, "gen", {"seed": seed, "data.format": "gsm8k"}, g.models.teacher,
                               data / "train.jsonl", out)
    return Planned(Stage(out, (run_train, ("gen", args, g.launch.torchrun)), (data,)), "gen", m.name, seed, "teacher",
                   "stages.gen", config)


def training(g: GridConfig, m: Method, seed: int) -> list[Planned]:
    """A trained method's stages: its training stage from its start, after stage gen for seq_kd's sampled traces.
    It reads the data stage's train.jsonl (GSM8K rows; GRPO's questions on either track), sft.jsonl (SFT and
    logit KD on the code track), or teacher traces (seq_kd: data.traces as it is, or stage gen's)."""
    run, data = home(g, m.name, seed), Path(g.out) / "data"
    from_model = m.start in MODEL_KEYS
    start = getattr(g.models, m.start) if from_model else checkpoint(g, m.start, seed)
    needs = (data,) if from_model else (data, run / m.start)
    sets, gen = {"seed": seed, **m.sets}, []
    if m.stage == "rl":
        path, sets["grpo.seed"] = data / "train.jsonl", seed
    elif m.traces and not g.data.traces:
        gen = [sampling(g, m, seed)]
        needs += (gen[0].stage.path,)
        path, sets["data.format"] = gen[0].stage.path / "traces.jsonl", "prompt_completion"
    elif m.traces:
        path, sets["data.format"] = g.data.traces, "prompt_completion"
    elif g.data.code:
        path, sets["data.format"] = data / "sft.jsonl", "prompt_completion"
    else:
        path, sets["data.format"] = data / "train.jsonl", "gsm8k"
    args, config = train_stage(g, m.stage, sets, start, path, run / m.name, g.models.teacher if m.stage == "kd" else "")
    stage = Stage(run / m.name, (run_train, (STAGE_KINDS[m.stage], args, g.launch.torchrun)), needs)
    return [*gen, Planned(stage, config.stage, m.name, seed, architecture(m.name), f"stages.{m.stage}", config,
                          gen[0].config if gen else None)]


def plan(g: GridConfig, inputs: Inputs) -> list[Planned]:
    """Every stage, each once (the untrained methods' evals: with the first seed), seed by seed in config order."""
    out = Path(g.out)
    planned = {out / "data": Planned(Stage(out / "data", (prepare_data, (g, inputs.records, out / "data"))),
                                     "data", "", g.seeds[0], "", "data")}
    suites = {name: (name, rows) for name, rows in inputs.benchmarks.items()}
    e = g.eval
    for seed in g.seeds:
        for name in g.methods:
            m = BY_NAME[name]
            eval_seed = seed if m.stage else g.seeds[0]
            stages = training(g, m, seed) if m.stage else []
            path = home(g, name, eval_seed) / "eval" / name
            job = (evaluate_model, (checkpoint(g, name, eval_seed), g.models.tokenizer_dir, suites,
                                    eval_modes(e.max_new_tokens, e.pass_k, e.temperature, eval_seed), g.data.style,
                                    e.batch_size, path))
            needs = (home(g, name, seed) / name,) if m.stage else ()
            stages.append(Planned(Stage(path, job, needs), "eval", name, eval_seed, architecture(name), "eval"))
            for p in stages:
                planned.setdefault(p.stage.path, p)
    return list(planned.values())


def measure(g: GridConfig, inputs: Inputs) -> Measures:
    """The cost preview's inputs: parameters from each present model's config.json, the tokenizer when present,
    in place of absent ones config [cost] assume's figures when it states them (else None), and the rows of every
    training file (the data stage's, data.traces)."""
    assume = g.cost.assume
    dirs = {key: Path(path) for key in MODEL_KEYS if (path := getattr(g.models, key))}
    params = {key: read_config(d).num_parameters if d.is_dir() else assume.params.get(key) for key, d in dirs.items()}
    assumed = tuple(key for key, d in dirs.items() if not d.is_dir() and key in assume.params)
    tokenizer = (load_tokenizer(g.models.tokenizer_dir) if Path(g.models.tokenizer_dir).is_dir()
                 else AssumedTokenizer(assume.chars_per_token) if assume.chars_per_token else None)
    data = Path(g.out) / "data"
    files = {str(data / "train.jsonl"): inputs.records}
    if tokenizer is not None:
        files = {str(data / name): rows for name, rows in data_files(g, inputs.records, tokenizer).items()}
    if g.data.traces:
        files[g.data.traces] = inputs.traces
    return Measures(g, params, tokenizer, files, inputs, assumed)


def run_grid(path: str, preview: bool, force: bool):
    """Check the config and everything it names, preview the cost, then (unless `preview`) run and report."""
    t0 = time.perf_counter()
    g = load_grid(path)
    out = Path(g.out)
    with about(path):
        inputs = read_inputs(g)
        missing = missing_models(g)
        if missing and not preview:
            raise FileNotFoundError(missing[0])
        planned = plan(g, inputs)
        measures = measure(g, inputs)
        costs = [stage_cost(p, measures, out) for p in planned if p.kind != "data"]
    check_config(out, asdict(g), force)
    print(write_cost(out, g, costs, missing, measures.assumptions(), path))
    if preview:
        return
    run_stages([p.stage for p in planned], g.launch.jobs, force)
    write_report(out, g, planned, costs, inputs, path, provenance(g.launch.jobs, time.perf_counter() - t0))
