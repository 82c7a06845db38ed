"""Every command-line entry point (train.py's stages, eval.py, study.py) on bad input: exit status 2, exactly
one line on stderr that names the flag, file or field, no traceback, and no run or output directory left
behind for a later run to trip over. Plus the real entry points as processes, and the run-directory lock."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import eval as evaluation
import study
import train
from conftest import synthetic_workspace
from model.checkpoint import save_pretrained
from model.config import PRESETS
from model.transformer import Transformer
from trainer import cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """Tokenizer, training data, a tiny model directory, and bad files of every kind."""
    root = tmp_path_factory.mktemp("cli_ws")
    tokenizer = synthetic_workspace(root, n_train=16, n_test=4)
    torch.manual_seed(0)
    save_pretrained(Transformer(replace(PRESETS["tiny-student"], vocab_size=tokenizer.vocab_size)), root / "model")
    save_pretrained(Transformer(replace(PRESETS["tiny-student"], vocab_size=tokenizer.vocab_size - 7)), root / "small")
    (root / "model_broken").mkdir()
    (root / "model_broken" / "config.json").write_text((root / "model" / "config.json").read_text())
    (root / "model_broken" / "model.safetensors").write_bytes(b"not a safetensors file")
    rows = (root / "train.jsonl").read_text().splitlines()
    (root / "bad_json.jsonl").write_text(rows[0] + "\n{not json\n")
    (root / "missing_field.jsonl").write_text(rows[0] + "\n" + json.dumps({"question": "q"}) + "\n")
    (root / "not_utf8.jsonl").write_bytes(rows[0].encode() + b"\n" + rows[1].encode() + b"\n\xff\xfe\n")
    (root / "bad_tok").mkdir()
    (root / "bad_tok" / "tokenizer.json").write_text("{garbage")
    (root / "bad.toml").write_text("max_steps = [\n")
    (root / "completions.jsonl").write_text('{"id": 99, "completion": "1"}\n')
    (root / "a_file").write_text("x")
    return root


def train_case(*extra):
    return ("train", lambda ws, out: ["--model", "tiny-student", "--tokenizer", str(ws / "tok"), "--data",
                                      str(ws / "train.jsonl"), "--out", str(out), "--max-steps", "2", *extra])


def train_with(**named):
    """train.py with some of --model/--tokenizer/--data replaced (values: file names in the workspace)."""
    def argv(ws, out):
        paths = {"model": "tiny-student", "tokenizer": str(ws / "tok"), "data": str(ws / "train.jsonl"),
                 **{k: (str(ws / v) if k != "model" or "/" in v or (ws / v).exists() else v) for k, v in named.items()}}
        return [f"--{k}={v}" for k, v in paths.items()] + ["--out", str(out), "--max-steps", "2"]
    return ("train", argv)


def eval_case(*extra, model=True):
    def argv(ws, out):
        source = ["--model", str(ws / "model"), "--tokenizer", str(ws / "tok")] if model else []
        return ["--task", "synthetic", "--data", str(ws / "eval.jsonl"), *source, "--out", str(out), *extra]
    return ("eval", argv)


def study_case(*extra):
    return ("study", lambda ws, out: ["--out", str(out), *extra])


CASES = {
    # train.py: flags and config
    "unknown stage": (train_case("--stage", "bogus"), "argument --stage: invalid choice: 'bogus'"),
    "lr inf": (train_case("--set", "optim.lr=inf"), "'optim.lr' must be a finite number, got inf"),
    "lr nan": (train_case("--set", "optim.lr=nan"), "'optim.lr' must be a finite number, got nan"),
    "max_steps 0": (train_case("--set", "max_steps=0"), "'max_steps' must be > 0, got 0"),
    "wrong type": (train_case("--set", "data.max_len=abc"), "'data.max_len' expects int, got 'abc'"),
    "unknown key": (train_case("--set", "optim.lrr=1"), "unknown config key 'optim.lrr'"),
    "set without =": (train_case("--set", "optim.lr"), "--set expects KEY=VALUE"),
    "recipe missing": (train_case("--recipe", "nope.toml"), "recipe nope.toml not found"),
    "kd without teacher": (train_case("--stage", "kd"), "config key 'kd.teacher' is required"),
    "kd teacher missing": (train_case("--stage", "kd", "--teacher", "/nonexistent/teacher"),
                           "teacher directory /nonexistent/teacher not found"),
    "rl unknown task": (train_case("--stage", "rl", "--set", "data.task=chat"), "'data.task' must be one of"),
    "rl group of one": (train_case("--stage", "rl", "--set", "grpo.group_size=1"),
                        "[grpo]: GRPOConfig.group_size must be >= 2"),
    "unknown kd loss": (train_case("--stage", "kd", "--teacher", "t", "--set", "kd.loss=kl"),
                        "'kd.loss' must be one of ('forward_kl'"),
    "resume without checkpoint": (train_case("--resume"), "--resume: no checkpoint in"),
    # train.py: files
    "data missing": (train_with(data="nope.jsonl"), "nope.jsonl not found"),
    "data bad json": (train_with(data="bad_json.jsonl"), "bad_json.jsonl:2: invalid JSON"),
    "data missing field": (train_with(data="missing_field.jsonl"), "missing_field.jsonl:2: field 'answer' missing"),
    "data not utf-8": (train_with(data="not_utf8.jsonl"), "not_utf8.jsonl:3"),
    "model neither preset nor dir": (train_with(model="tiny-studnet"), "neither a preset"),
    "tokenizer dir missing": (train_with(tokenizer="no_tok"), "no_tok not found"),
    "tokenizer garbage": (train_with(tokenizer="bad_tok"), "tokenizer.json"),
    "model vocab mismatch": (train_with(model="small"), "small"),
    "model weights unreadable": (train_with(model="model_broken"), "model.safetensors"),
    # eval.py
    "eval limit negative": (eval_case("--limit", "-3"), "--limit must be >= 1, got -3"),
    "eval batch negative": (eval_case("--batch-size", "-1"), "--batch-size must be >= 1, got -1"),
    "eval top-p": (eval_case("--top-p", "2"), "--top-p must be in (0, 1], got 2.0"),
    "eval greedy n": (eval_case("--n-samples", "4"), "--n-samples > 1 with --temperature 0"),
    "eval cuda without gpu": (eval_case("--device", "cuda"), "--device cuda: no CUDA GPU is available here"),
    "eval unknown task": (("eval", lambda ws, out: ["--task", "gsm9k", "--data", "x", "--completions", "y"]),
                          "argument --task: invalid choice: 'gsm9k'"),
    "eval no source": (eval_case(model=False), "give exactly one of --model"),
    "eval data missing": (("eval", lambda ws, out: ["--task", "gsm8k", "--data", str(ws / "nope.jsonl"),
                                                    "--model", str(ws / "model")]), "--data: file"),
    "eval model missing": (("eval", lambda ws, out: ["--task", "synthetic", "--data", str(ws / "eval.jsonl"),
                                                     "--model", str(ws / "no_model")]), "--model: directory"),
    "eval completions unknown id": (("eval", lambda ws, out: ["--task", "synthetic", "--data", str(ws / "eval.jsonl"),
                                                              "--completions", str(ws / "completions.jsonl"),
                                                              "--out", str(out)]),
                                    "completions.jsonl:1: field 'id' 99 matches no row"),
    "eval out is a file": (("eval", lambda ws, out: ["--task", "synthetic", "--data", str(ws / "eval.jsonl"),
                                                     "--model", str(ws / "model"), "--out", str(ws / "a_file")]),
                           "--out: "),
    # study.py
    "study seeds 0": (study_case("--seeds", "0"), "--seeds must be >= 1, got 0"),
    "study unknown flag": (study_case("--bogus"), "unrecognized arguments: --bogus"),
}


def run_cli(which: str, argv: list[str]) -> int:
    if which == "train":
        return train.main(argv)
    if which == "eval":
        return cli.run(evaluation.main, argv)
    return study.main(argv)


@pytest.mark.parametrize("name", CASES)
def test_bad_input_is_one_line_error(ws, tmp_path, capsys, name):
    (which, argv), message = CASES[name]
    out = tmp_path / "out"
    assert run_cli(which, argv(ws, out)) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.err.startswith("error: "), captured.err
    assert message in captured.err, captured.err
    assert "Traceback" not in captured.err + captured.out
    assert not out.exists()  # nothing written that a later run would find


def test_entry_points_as_processes(ws, tmp_path):
    """The scripts themselves (not just their main functions) exit 2 with one line and no traceback."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for script, argv in (("train.py", ["--model", "tiny-student", "--set", "optim.lr=inf"]),
                         ("eval.py", ["--task", "synthetic", "--data", str(ws / "eval.jsonl"), "--completions",
                                      str(ws / "completions.jsonl")]),
                         ("study.py", ["--seeds", "0"])):
        result = subprocess.run([sys.executable, str(ROOT / script), *argv], env=env, capture_output=True, text=True,
                                timeout=120, cwd=tmp_path)
        assert result.returncode == 2, (script, result.stderr)
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), (script, result.stderr)
