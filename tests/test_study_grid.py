"""study.py --config (trainer/grid*.py) on CPU: tiny random checkpoints in HF layout saved here, the real
benchmark files in ../shared/data. Every stage of the paper's grid runs end to end and the report has every
method x benchmark cell; a second run reuses every stage; seq_kd trains on a given trace file as it is, or on
the teacher's samples; config and file errors stop before any stage with one line naming the key; the code
track trains and rewards on HumanEval-format rows; the cost preview's arithmetic is checked by hand.
(Accuracy is not the point: random models with 8 new tokens.)"""
from __future__ import annotations

import copy
import io
import json
import math
import shutil
import statistics
import tomllib
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch

import study
from conftest import shared_data
from data.readers import load_gsm8k, load_humaneval
from data.synthetic import write_jsonl, write_splits
from data.tasks import score
from data.templates import INSTRUCTIONS, render_prompt, tokenize_example
from model.checkpoint import load_pretrained, save_pretrained
from model.config import ModelConfig
from model.tokenizer import load_tokenizer, train_tokenizer
from model.transformer import Transformer
from trainer.config import toml_value
from trainer.grid_config import METHODS

ROOT = Path(__file__).resolve().parents[1]
ALL = [m.name for m in METHODS]
TRAINED = [m.name for m in METHODS if m.stage]
BENCHMARKS = {"gsm8k": "gsm8k/test.jsonl", "math": "math500/test.jsonl", "humaneval": "humaneval/HumanEval.jsonl.gz"}
# The paper's recipes, shrunk: 2 optimizer steps of 4 examples, GRPO 1 step of 2 prompts x 2 samples, fp32 teacher.
TINY = {"max_steps": 2, "save_every": 2, "activation_checkpointing": False,
        "data": {"micro_batch_size": 4, "grad_accum_steps": 1, "max_len": 512}, "optim": {"warmup_steps": 1}}
STAGES = {
    "sft": {"recipe": str(ROOT / "recipes/sft_qwen2.5-0.5b_gsm8k.toml"), "set": TINY},
    "lora": {"recipe": str(ROOT / "recipes/sft_qwen2.5-0.5b_gsm8k_lora.toml"), "set": {**TINY, "lora.rank": 2}},
    "kd": {"recipe": str(ROOT / "recipes/kd_qwen2.5_gsm8k.toml"), "set": {**TINY, "kd.teacher_dtype": "float32"}},
    "rl": {"recipe": str(ROOT / "recipes/rl_qwen2.5-0.5b_gsm8k.toml"),
           "set": {"max_steps": 1, "save_every": 1, "activation_checkpointing": False, "optim.warmup_steps": 1,
                   "grpo": {"prompts_per_step": 2, "group_size": 2, "max_new_tokens": 8, "micro_batch_size": 4}}},
    "gen": {"set": {"gen.n": 2, "gen.max_new_tokens": 8, "gen.only_correct": False}},
}
EVAL = {"limit": 2, "max_new_tokens": 8, "pass_k": 2, "temperature": 1.0, "batch_size": 8}
PAPER = {"source": "the paper", "figures": {"instruct": {"gsm8k": 45.5}, "grpo": {"gsm8k": 54.0}}}


def toml(table: dict, prefix: str = "") -> str:
    """A TOML document of nested dicts (scalars and lists of scalars as values)."""
    def value(v):
        return "[" + ", ".join(value(x) for x in v) + "]" if isinstance(v, list) else toml_value(v)
    lines = [f"[{prefix}]"] if prefix else []
    lines += [f"{json.dumps(k)} = {value(v)}" for k, v in table.items() if not isinstance(v, dict)]
    return "\n".join(lines + [toml(v, f"{prefix}.{k}" if prefix else k) for k, v in table.items()
                              if isinstance(v, dict)]) + "\n"


def tiny_model(root: Path, tokenizer: Path, hidden: int, layers: int, seed: int) -> Path:
    """A random Qwen2-shaped checkpoint in HF layout with the tokenizer's files beside it."""
    torch.manual_seed(seed)
    vocab = load_tokenizer(tokenizer).vocab_size
    config = ModelConfig(model_type="qwen2", vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1, head_dim=hidden // 2,
                         rms_norm_eps=1e-6, rope_theta=10_000.0, max_position_embeddings=1024,
                         tie_word_embeddings=True, attention_bias=True, qk_norm=False)
    save_pretrained(Transformer(config), root)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer / name, root / name)
    return root


def params(model: Path) -> int:
    return ModelConfig.from_hf_config(json.loads((model / "config.json").read_text())).num_parameters


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict:
    """A tokenizer on GSM8K and HumanEval text; base, instruct (32 wide, 1 layer) and teacher (48 wide, 2 layers)."""
    root = tmp_path_factory.mktemp("grid")
    rows = load_gsm8k(shared_data("gsm8k/train.jsonl"))[:300]
    code = load_humaneval(shared_data("humaneval/HumanEval.jsonl.gz"))[:20]
    texts = [f"user\n{r['question']}\nPlease reason step by step, and put your final answer within \\boxed{{}}."
             for r in rows] + [f"assistant\n{r['answer']}" for r in rows] + [c["prompt"] for c in code]
    train_tokenizer(texts, root / "tok", 1000)
    models = {"base": tiny_model(root / "base", root / "tok", 32, 1, 1),
              "instruct": tiny_model(root / "instruct", root / "tok", 32, 1, 2),
              "teacher": tiny_model(root / "teacher", root / "tok", 48, 2, 3)}
    tokenizer = load_tokenizer(root / "tok")
    traces = [{"prompt": render_prompt(tokenizer, r["question"], "chat", task="gsm8k"), "completion": r["answer"]}
              for r in rows[:8]]
    write_jsonl(root / "traces.jsonl", traces)
    return {"root": root, "models": models, "traces": root / "traces.jsonl"}


def config(ws: dict, name: str, **changes) -> dict:
    """The paper's grid on the tiny models: every method, GSM8K train (24 rows), the three benchmarks (2 each)."""
    table = copy.deepcopy({"out": str(ws["root"] / name), "seeds": [0], "methods": ALL,
             "models": {key: str(path) for key, path in ws["models"].items()},
             "data": {"task": "gsm8k", "train": str(shared_data("gsm8k/train.jsonl")), "limit": 24,
                      "traces": str(ws["traces"])},
             "eval": {**EVAL, "benchmarks": {name: str(shared_data(path)) for name, path in BENCHMARKS.items()}},
             "stages": STAGES, "paper": PAPER})
    for key, value in changes.items():  # "data.limit": 8 -> table["data"]["limit"] = 8
        *parents, last = key.split(".")
        target = table
        for part in parents:
            target = target[part]
        target[last] = value
    return table


def run_grid(path: Path, table: dict | None = None, *flags: str) -> tuple[int, str, str]:
    """study.main(["--config", path, *flags]) after writing `table` there: (status, stdout, stderr)."""
    if table is not None:
        path.write_text(toml(table))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out, err = io.StringIO(), io.StringIO()
    try:
        with redirect_stdout(out), redirect_stderr(err):
            rc = study.main(["--config", str(path), *flags])
    finally:
        torch.set_num_threads(threads)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def grid(workspace) -> tuple[dict, str]:
    table = config(workspace, "grid")
    rc, log, err = run_grid(workspace["root"] / "grid.toml", table)
    assert rc == 0, err
    return table, log


def stage_dirs(out: Path) -> list[Path]:
    """Every stage of the grid with one seed and a trace file: no seq_kd_traces."""
    return [out / "data", *[out / "seed_0" / name for name in TRAINED],
            *[(out / "seed_0" if name in TRAINED else out) / "eval" / name for name in ALL]]


def test_every_stage_runs_and_the_report_has_every_cell(grid):
    table, log = grid
    out = Path(table["out"])
    assert sorted(p.parent for p in out.rglob("DONE") if "final" not in p.parts) == sorted(stage_dirs(out))
    for path in stage_dirs(out):
        assert f"[study] run {path}\n" in log
    results = json.loads((out / "results.json").read_text())
    assert list(results["methods"]) == ALL
    for name, method in results["methods"].items():
        assert list(method["benchmarks"]) == list(BENCHMARKS)
        assert (method["train_seconds"] is None) == (name not in TRAINED)
        for bench, cell in method["benchmarks"].items():
            assert cell["problems"] == 2
            for key in ("greedy pass@1", "sampled pass@2"):
                low, high = cell[key]["ci95"]
                assert 0 <= low <= cell[key]["mean"] <= high <= 1
            assert cell.get("paper") == PAPER["figures"].get(name, {}).get(bench)
    md = (out / "results.md").read_text()
    assert "gsm8k paper (reported, not reproduced)" in md and "| 45.5 |" in md and "| 54.0 |" in md
    for name in ALL:
        assert f"| {name} |" in md
    assert [s["stage"] for s in results["stages"]] == [str(p.relative_to(out)) for p in (
        out / "data", *[p for name in ALL for p in ((out / "seed_0" / name,) if name in TRAINED else ())
                        + ((out / "seed_0" if name in TRAINED else out) / "eval" / name,)])]
    assert all(s["seconds"] >= 0 for s in results["stages"])
    assert (out / "cost.md").exists() and json.loads((out / "cost.json").read_text())["missing"] == []


def test_a_second_run_reuses_every_stage(grid, workspace):
    table, _ = grid
    out = Path(table["out"])
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.parent != out}
    results = (out / "results.json").read_text()
    rc, log, err = run_grid(workspace["root"] / "grid.toml")
    assert rc == 0, err
    assert "[study] run" not in log
    assert sorted(line for line in log.splitlines() if line.startswith("[study] skip")) == sorted(
        f"[study] skip {path} (done)" for path in stage_dirs(out))
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert (out / "results.json").read_text() == results


def test_a_killed_training_stage_resumes_from_its_checkpoint(grid, workspace):
    table, _ = grid
    stage = Path(table["out"]) / "seed_0" / "kd_reverse"
    weights = (stage / "final" / "model.safetensors").read_bytes()
    (stage / "DONE").unlink()  # as if killed after the last checkpoint, before the export
    rc, log, err = run_grid(workspace["root"] / "grid.toml")
    assert rc == 0, err
    assert [line for line in log.splitlines() if line.startswith("[study] run")] == [f"[study] run {stage}"]
    assert (stage / "final" / "model.safetensors").read_bytes() == weights


def test_stages_use_the_recipes_methods_and_trace_file(grid, workspace):
    table, _ = grid
    run = Path(table["out"]) / "seed_0"
    resolved = {name: tomllib.loads((run / name / "config.toml").read_text()) for name in TRAINED}
    assert resolved["seq_kd"]["data"]["path"] == str(workspace["traces"])  # as it is: no copy, no sampling
    assert resolved["seq_kd"]["data"]["format"] == "prompt_completion" and not (run / "seq_kd_traces").exists()
    assert resolved["sft"]["optim"]["lr"] == 1e-5 and resolved["sft"]["data"]["path"].endswith("data/train.jsonl")
    assert resolved["sft_lora"]["lora"]["rank"] == 2 and resolved["sft_lora"]["optim"]["lr"] == 1e-4
    assert [resolved[n]["kd"]["loss"] for n in ("kd_forward", "kd_reverse")] == ["forward_kl", "reverse_kl"]
    assert resolved["kd_forward"]["kd"]["teacher"] == table["models"]["teacher"]
    assert resolved["grpo"]["model"] == table["models"]["instruct"]
    assert resolved["sft_grpo"]["model"] == str(run / "sft" / "final")
    assert resolved["kd_grpo"]["model"] == str(run / "kd_forward" / "final")
    assert all(r["seed"] == 0 and r["data"]["task"] == "gsm8k" for r in resolved.values())
    assert len((Path(table["out"]) / "data" / "train.jsonl").read_text().splitlines()) == 24


def test_a_malformed_trace_file_stops_before_any_stage(workspace, tmp_path):
    traces = tmp_path / "traces.jsonl"
    traces.write_text('{"prompt": "p", "completion": "c"}\n{"prompt": "p"}\n')
    rc, log, err = run_grid(tmp_path / "bad.toml", config(workspace, "bad", **{"data.traces": str(traces)}))
    assert rc == 2 and err.count("\n") == 1
    assert "data.traces" in err and f"{traces}:2: field 'completion' missing" in err
    assert "[study]" not in log and not (workspace["root"] / "bad").exists()


@pytest.mark.parametrize("change, key", [
    ({"methods": ["sft", "distill"]}, "methods: unknown method 'distill'"),
    ({"models.teacher": "/nonexistent/teacher"}, "models.teacher: directory /nonexistent/teacher not found"),
    ({"eval.benchmarks.gsm9k": "x.jsonl"}, "eval.benchmarks.gsm9k: unknown benchmark"),
    ({"eval.passk": 4}, "eval.passk: unknown key"),
    ({"stages.kd.set.seed": 3}, "stages.kd.set.seed: the grid sets this key itself"),
    ({"stages.sft.set.optim.lr": "fast"}, "stages.sft: override optim.lr="),
    ({"data.train": "/nonexistent/train.jsonl"}, "data.train: file /nonexistent/train.jsonl not found"),
    ({"methods": ["grpo"], "models.instruct": ""}, "models.instruct: method 'grpo' starts from it"),
    ({"cost": {"assume": {"params": {"student": 5}}}}, "cost.assume.params.student: unknown model key"),
    ({"cost": {"assume": {"params": {"teacher": 0}}}}, "cost.assume.params.teacher: must be > 0"),
    ({"cost": {"assume": {"chars_per_token": -1}}}, "cost.assume.chars_per_token: must be > 0"),
])
def test_config_errors_stop_before_any_stage_naming_the_key(workspace, tmp_path, change, key):
    rc, log, err = run_grid(tmp_path / "bad.toml", config(workspace, "bad", **change))
    assert rc == 2 and err.count("\n") == 1 and key in err, err
    assert err.startswith(f"error: {tmp_path / 'bad.toml'}: ")
    assert "[study]" not in log and not (workspace["root"] / "bad").exists()


@pytest.mark.parametrize("argv, message", [
    (["--config", "grid.toml", "--seeds", "0"], "--seeds applies to the embedded study"),
    (["--config", "grid.toml", "--out", "x"], "--out applies to the embedded study"),
    (["--preview"], "--preview needs --config"),
    (["--config", "/nonexistent/grid.toml"], "study config /nonexistent/grid.toml not found"),
])
def test_flags_that_do_not_apply_are_refused(argv, message, capsys):
    assert study.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_seq_kd_samples_the_teacher_without_a_trace_file(workspace, tmp_path):
    """Stage gen then SFT on its traces. The teacher here always ends at once (every residual block writes
    nothing, every embedding points one way and <|im_end|>'s ten times further), so no trace is cut short."""
    teacher = tiny_model(tmp_path / "teacher", workspace["root"] / "tok", 32, 1, 0)
    weights = load_pretrained(teacher)
    with torch.no_grad():
        for block in weights.layers:
            block.attn.o_proj.weight.zero_()
            block.mlp.down_proj.weight.zero_()
        weights.embed_tokens.weight.fill_(1.0)
        weights.embed_tokens.weight[load_tokenizer(teacher).special_tokens["<|im_end|>"]] = 10.0
    save_pretrained(weights, teacher)
    table = config(workspace, "sampled", **{"methods": ["seq_kd"], "data.traces": "", "models.teacher": str(teacher),
                                            "data.limit": 4, "eval.limit": 1, "paper": {}, "eval.benchmarks": {
                                                "gsm8k": str(shared_data("gsm8k/test.jsonl"))}})
    rc, log, err = run_grid(tmp_path / "sampled.toml", table)
    assert rc == 0, err
    run = Path(table["out"]) / "seed_0"
    traces = [json.loads(line) for line in (run / "seq_kd_traces" / "traces.jsonl").read_text().splitlines()]
    assert len(traces) == 4 * 2 and all(t["completion"] == "" for t in traces)
    assert tomllib.loads((run / "seq_kd" / "config.toml").read_text())["data"]["path"] == str(
        run / "seq_kd_traces" / "traces.jsonl")


def test_code_track_trains_and_rewards_on_humaneval_rows(workspace, tmp_path):
    """synthetic-code rows: SFT on their fenced canonical solutions (which the code grader passes), GRPO
    with the sandbox reward, each stage under torchrun (one CPU process)."""
    train = write_splits(tmp_path / "code", seed=0, n_train=1, n_test=1, n_harder=1, n_code=8)["code"]
    test = write_splits(tmp_path / "code_test", seed=1, n_train=1, n_test=1, n_harder=1, n_code=2)["code"]
    table = config(workspace, "code", **{"methods": ["base", "sft", "sft_grpo"], "data.task": "synthetic-code",
                                         "data.train": str(train), "data.limit": 0, "data.traces": "",
                                         "eval.benchmarks": {"synthetic-code": str(test)}, "paper": {},
                                         "launch": {"nproc_per_node": 1, "torchrun_args": ["--standalone"]}})
    rc, log, err = run_grid(tmp_path / "code.toml", table)
    assert rc == 0, err
    out = Path(table["out"])
    rows = load_humaneval(train)
    sft = [json.loads(line) for line in (out / "data" / "sft.jsonl").read_text().splitlines()]
    assert [r["completion"] for r in sft] == [f"```python\n{r['canonical_solution']}```" for r in rows]
    _, summary = score(rows, "synthetic-code", [[r["completion"]] for r in sft], workers=2)
    assert summary["pass@1"] == 1.0
    resolved = {n: tomllib.loads((out / "seed_0" / n / "config.toml").read_text()) for n in ("sft", "sft_grpo")}
    assert resolved["sft"]["data"]["path"] == str(out / "data" / "sft.jsonl")
    assert resolved["sft_grpo"]["data"]["task"] == "synthetic-code" and resolved["sft_grpo"]["stage"] == "rl"
    records = [json.loads(line) for line in (out / "seed_0" / "sft_grpo" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 1 and 0 <= records[0]["accuracy"] <= 1
    results = json.loads((out / "results.json").read_text())
    assert all(m["benchmarks"]["synthetic-code"]["problems"] == 2 for m in results["methods"].values())


def test_cost_preview_by_hand(workspace, tmp_path):
    """--preview runs no stage; the sft stage's tokens are 2 steps x 4 examples x their mean length, its FLOPs
    6 x params x tokens; the kd stage adds 2 x the teacher's params per token; hours at 989 TFLOP/s x 0.35.
    Assumptions in the config are not used: every directory is present."""
    table = config(workspace, "preview", cost={"assume": {"params": {"base": 7}, "chars_per_token": 4}})
    rc, log, err = run_grid(tmp_path / "preview.toml", table, "--preview")
    assert rc == 0, err
    out = Path(table["out"])
    assert not list(out.rglob("DONE")) and not (out / "data").exists()
    costs = {s["stage"]: s for s in json.loads((out / "cost.json").read_text())["stages"]}
    tokenizer = load_tokenizer(workspace["models"]["base"])
    rows = load_gsm8k(shared_data("gsm8k/train.jsonl"))[:24]
    length = statistics.fmean(len(tokenize_example(tokenizer, render_prompt(tokenizer, r["question"], "chat",
                                                                            task="gsm8k"), r["answer"], 512)[0])
                              for r in rows)
    tokens = 2 * 4 * length
    base, teacher = params(workspace["models"]["base"]), params(workspace["models"]["teacher"])
    sft, kd = costs["seed_0/sft"], costs["seed_0/kd_forward"]
    assert (sft["sequences"], sft["epochs"], sft["gpus"], sft["bound"]) == (8, 8 / 24, 1, False)
    assert sft["tokens"] == pytest.approx(tokens) and kd["tokens"] == pytest.approx(tokens)
    assert sft["flops"] == pytest.approx(6 * base * tokens)
    assert kd["flops"] == pytest.approx((6 * base + 2 * teacher) * tokens)
    assert sft["hours"] == pytest.approx(6 * base * tokens / (989e12 * 0.35) / 3600)
    assert "seed_0/sft" in log and "GPU-hours" in (out / "cost.md").read_text()
    assert sft["params"] == base and not any(s["assumed"] for s in costs.values()) and "~" not in log
    assert json.loads((out / "cost.json").read_text())["assumed"] == {"params": {}, "chars_per_token": None}


def test_preview_without_the_model_directories_says_what_is_missing(workspace, tmp_path):
    table = config(workspace, "absent", **{"models.base": str(tmp_path / "no-base")})
    rc, log, err = run_grid(tmp_path / "absent.toml", table, "--preview")
    assert rc == 0, err
    assert f"Missing: models.base: directory {tmp_path / 'no-base'} not found" in log
    assert "| seed_0/sft | sft | base | ? |" in log
    rc, log, err = run_grid(tmp_path / "absent.toml")
    assert rc == 2 and f"models.base: directory {tmp_path / 'no-base'} not found" in err


def test_preview_assumes_what_the_config_states_in_place_of_absent_directories(workspace, tmp_path):
    """Every directory absent, config [cost] assume gives params and 4 characters per token: the sft stage's
    tokens are 2 steps x 4 examples x the mean of ceil(characters / 4) over prompt, answer and <|im_end|>; the
    base model's eval 2 problems x (1 + 2 samples) x (ceil(prompt characters / 4) + 8 new tokens). Each figure is
    marked ~; a run still refuses the absent directory."""
    absent = {f"models.{key}": str(tmp_path / f"no-{key}") for key in ("base", "instruct", "teacher")}
    assume = {"params": {"base": 3000, "instruct": 3000, "teacher": 5000}, "chars_per_token": 4}
    table = config(workspace, "assumed", **absent, cost={"assume": assume},
                   **{"eval.benchmarks": {"gsm8k": str(shared_data("gsm8k/test.jsonl"))}})
    rc, log, err = run_grid(tmp_path / "assumed.toml", table, "--preview")
    assert rc == 0, err
    out = Path(table["out"])
    costs = {s["stage"]: s for s in json.loads((out / "cost.json").read_text())["stages"]}

    def chars(text: str) -> int:
        return math.ceil(len(text) / 4)

    def prompt(question: str) -> str:  # ChatML by hand
        return f"<|im_start|>user\n{question}\n{INSTRUCTIONS['gsm8k']}<|im_end|>\n<|im_start|>assistant\n"

    rows = load_gsm8k(shared_data("gsm8k/train.jsonl"))[:24]
    sft_tokens = 2 * 4 * statistics.fmean(chars(prompt(r["question"])) + chars(r["answer"]) + chars("<|im_end|>")
                                          for r in rows)
    problems = load_gsm8k(shared_data("gsm8k/test.jsonl"))[:2]
    eval_tokens = 2 * 3 * (statistics.fmean(chars(prompt(r["question"])) for r in problems) + 8)
    sft, kd, evaluation = costs["seed_0/sft"], costs["seed_0/kd_forward"], costs["eval/base"]
    assert (sft["params"], sft["sequences"], sft["tokens"]) == (3000, 8, pytest.approx(sft_tokens))
    assert sft["flops"] == pytest.approx(6 * 3000 * sft_tokens)
    assert kd["flops"] == pytest.approx((6 * 3000 + 2 * 5000) * sft_tokens)
    assert (evaluation["sequences"], evaluation["tokens"]) == (6, pytest.approx(eval_tokens))
    assert evaluation["hours"] == pytest.approx(2 * 3000 * eval_tokens / (989e12 * 0.35) / 3600)
    assert all(s["assumed"] == ["params", "tokens", "flops"] for s in costs.values())
    assert json.loads((out / "cost.json").read_text())["assumed"] == {"params": assume["params"],
                                                                       "chars_per_token": 4}
    assert "| seed_0/sft | sft | base | ~3.0K | 2 | 8 | 0.33 | ~" in log
    assert "| eval/base | eval | base | ~3.0K |  | 6 |  | <= ~" in log
    assert ("Assumed: models.base params 3.00K, models.instruct params 3.00K, models.teacher params 5.00K "
            "(config [cost] assume.params); tokens at 4 characters per token (no tokenizer read).") in log
    rc, log, err = run_grid(tmp_path / "assumed.toml")
    assert rc == 2 and f"models.base: directory {tmp_path / 'no-base'} not found" in err


def test_the_paper_recipe_previews(tmp_path, monkeypatch):
    """recipes/study_qwen2.5-0.5b_gsm8k.toml is a valid config; here its checkpoints are absent."""
    monkeypatch.chdir(ROOT)  # its paths are relative to the repository root
    text = (ROOT / "recipes" / "study_qwen2.5-0.5b_gsm8k.toml").read_text()
    recipe = tomllib.loads(text)
    recipe["out"] = str(tmp_path / "paper")
    rc, log, err = run_grid(tmp_path / "paper.toml", recipe, "--preview")
    assert rc == 0, err
    assert "Missing: models.base" in log and "seed_0/grpo" in log
    assert "| ? |" not in log and "Assumed: models.base params 494.03M" in log  # every figure, from its assumptions
