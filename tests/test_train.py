"""train.py end to end on a tiny model (CPU): ranks vs accumulation, exact resume, crash safety,
overfitting, and one-line errors for bad inputs. Runs use one thread: two cores are shared."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train
from conftest import synthetic_workspace
from model.checkpoint import export_temp_prefix, load_pretrained, save_pretrained
from model.config import PRESETS
from model.tokenizer import train_tokenizer
from model.transformer import Transformer
from trainer.checkpoint import checkpoint_paths, load_checkpoint
from trainer.config import OptimConfig
from trainer.models import load_teacher
from trainer.run import build_optimizer

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="session")
def workspace(tmp_path_factory):
    """Tokenizer, train/eval JSONL of the synthetic task, and a teacher whose head has 8 padded rows."""
    root = tmp_path_factory.mktemp("train_ws")
    tokenizer = synthetic_workspace(root, n_train=24, n_test=8)
    torch.manual_seed(1)
    save_pretrained(Transformer(replace(PRESETS["tiny-student"], vocab_size=tokenizer.vocab_size + 8)),
                    root / "teacher")
    return root


pytestmark = pytest.mark.usefixtures("one_thread")


def base_args(ws: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", "tiny-student", "--tokenizer", str(ws / "tok"), "--data", str(ws / "train.jsonl"),
            "--out", str(out), "--max-steps", "4", "--set", "data.max_len=256", "--set", "optim.lr=3e-3",
            "--set", "optim.warmup_steps=1", "--set", "save_every=1", *extra]


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    assert (out / "DONE").exists(), f"{out} did not complete"
    return load_file(out / "final" / "model.safetensors")


def run_main(args: list[str]) -> int:
    return train.main(args)


def torchrun(args: list[str]):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train.py"), *args]
    result = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


# Adam's default eps (1e-8) makes an update ~lr * sign(g) for |g| >> eps, so a gradient element near 0
# whose sign differs by float rounding (other padding, other matmul shapes) moves by 2 lr; eps = 1e-3
# keeps the update Lipschitz in g, so a 1e-5 tolerance checks the gradients, not rounding luck.
RANKS_COMMON = ("--max-steps", "3", "--set", "data.grad_accum_steps=2", "--set", "optim.eps=1e-3")


@pytest.fixture(scope="module")
def one_process_run(workspace, tmp_path_factory):
    out = tmp_path_factory.mktemp("one_process")
    assert run_main(base_args(workspace, out, *RANKS_COMMON, "--set", "data.micro_batch_size=2")) == 0
    return out


def assert_weights_close(a: dict, b: dict, atol: float):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=atol, msg=name)


def test_two_ranks_equal_one_rank_with_accumulation(workspace, tmp_path, one_process_run):
    """torchrun DDP 2 ranks x 2 micro-batches of 1 == 1 process x 2 micro-batches of 2 == 1 process x 4
    micro-batches of 1 (the same global batch of 4)."""
    multi = tmp_path / "multi"
    torchrun(base_args(workspace, multi, *RANKS_COMMON, "--set", "data.micro_batch_size=1"))
    assert_weights_close(final_weights(one_process_run), final_weights(multi), atol=1e-5)
    four = tmp_path / "four"
    assert run_main(base_args(workspace, four, *RANKS_COMMON, "--set", "data.micro_batch_size=1",
                              "--set", "data.grad_accum_steps=4")) == 0
    assert_weights_close(final_weights(four), final_weights(multi), atol=1e-5)
    records = [json.loads(line) for line in (multi / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        assert {"loss", "ce", "loss_tokens", "lr", "grad_norm", "tokens_per_s", "elapsed_s"} <= r.keys()
        assert r["loss"] == r["ce"] > 0 and r["tokens_per_s"] > 0


def test_fsdp_two_ranks_with_resume_equal_one_rank(workspace, tmp_path, one_process_run):
    """FSDP2 (gloo, CPU): stopped after step 2, resumed from the gathered checkpoint, == 1 process."""
    out = tmp_path / "fsdp"
    args = base_args(workspace, out, *RANKS_COMMON, "--set", "data.micro_batch_size=1", "--set", "parallel=fsdp")
    torchrun(args + ["--set", "stop_at=2"])
    torchrun(args + ["--resume"])
    assert_weights_close(final_weights(one_process_run), final_weights(out), atol=1e-5)


def stage_args(ws: Path, stage: str) -> list[str]:
    """sft, kd, or "kd_on_policy": kd whose steps 1 and 3 (of 4) train on student samples (seed 0, lambda 0.7)."""
    extra = ["--stage", stage.removesuffix("_on_policy"), "--set", "data.micro_batch_size=2",
             "--set", "data.grad_accum_steps=2"]
    if stage.startswith("kd"):
        extra += ["--teacher", str(ws / "teacher"), "--set", "kd.loss=\"jsd\"", "--set", "kd.temperature=2.0"]
    if stage == "kd_on_policy":
        extra += ["--set", "kd.on_policy_lambda=0.7", "--set", "kd.on_policy_max_new_tokens=24"]
    return extra


@pytest.fixture(scope="module")
def uninterrupted(workspace, tmp_path_factory):
    """stage -> final weights of an uninterrupted 4-step run."""
    def run(stage, cache={}):
        if stage not in cache:
            out = tmp_path_factory.mktemp(f"full_{stage}")
            assert run_main(base_args(workspace, out, *stage_args(workspace, stage))) == 0
            cache[stage] = final_weights(out)
        return cache[stage]
    return run


@pytest.mark.parametrize("stage", ["sft", "kd", "kd_on_policy"])
def test_resume_is_bit_exact(workspace, tmp_path, uninterrupted, stage):
    """Stopped after step 2 and resumed == uninterrupted, parameter for parameter (torch.equal)."""
    extra = stage_args(workspace, stage)
    resumed = tmp_path / "resumed"
    assert run_main(base_args(workspace, resumed, *extra, "--set", "stop_at=2")) == 0
    assert not (resumed / "DONE").exists() and [p.name for p in checkpoint_paths(resumed)][-1] == "step_00000002.pt"
    torch.manual_seed(123)  # the resumed run must restore RNG states, not inherit this process's
    assert run_main(base_args(workspace, resumed, *extra, "--resume")) == 0
    a, b = uninterrupted(stage), final_weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    records = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    if stage.startswith("kd"):
        assert all(r["kd"] > 0 and r["ce"] > 0 for r in records)
        assert [r["on_policy"] for r in records] == ([1, 0, 1, 0] if stage == "kd_on_policy" else [0] * 4)
        on_policy = [r for r in records if r["on_policy"]]
        assert all(r["loss"] == pytest.approx(r["kd"]) for r in on_policy)  # GKD: the divergence alone


DYING_SAVE = """
import os, signal, sys, torch
real_save, calls = torch.save, []
def dying_save(obj, f, *args, **kwargs):
    calls.append(1)
    if len(calls) == int(os.environ["DIE_AT_SAVE"]):  # half a checkpoint on disk, then SIGKILL
        real_save(obj, f, *args, **kwargs)
        f.flush()
        f.truncate(f.tell() // 2)
        os.kill(os.getpid(), signal.SIGKILL)
    real_save(obj, f, *args, **kwargs)
torch.save = dying_save
import train
sys.exit(train.main(sys.argv[1:]))
"""


def test_sigkill_while_writing_a_checkpoint_keeps_the_previous_one(workspace, tmp_path, uninterrupted):
    out = tmp_path / "killed"
    args = base_args(workspace, out, *stage_args(workspace, "sft"))
    result = subprocess.run([sys.executable, "-c", DYING_SAVE, *args], env={**ENV, "DIE_AT_SAVE": "2"},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == -9, result.stderr[-2000:]
    assert [p.name for p in checkpoint_paths(out)] == ["step_00000001.pt"]  # the torn step 2 is a hidden temp file
    assert list((out / "checkpoints").glob(".step_00000002.pt.tmp"))
    assert not (out / "DONE").exists()
    model = Transformer(replace(PRESETS["tiny-student"], vocab_size=400))
    optimizer = build_optimizer(model, OptimConfig())
    state = load_checkpoint(checkpoint_paths(out)[-1], model, optimizer, rank=0, world_size=1, sharded=False)
    assert state["step"] == 1
    torn_export = out / (export_temp_prefix(out / "final") + "ab_cd123")  # as a kill during export leaves it
    torn_export.mkdir()
    (torn_export / "model.safetensors").write_bytes(b"half")
    assert run_main(args + ["--resume"]) == 0
    assert not list((out / "checkpoints").glob(".*.tmp"))  # a dead run's temps are removed at the next start
    assert not torn_export.exists()
    a, b = final_weights(out), uninterrupted("sft")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sft_overfits_one_batch(workspace, tmp_path):
    data = tmp_path / "two.jsonl"
    data.write_text("".join((workspace / "train.jsonl").read_text().splitlines(keepends=True)[:2]))
    out = tmp_path / "overfit"
    args = base_args(workspace, out, "--data", str(data), "--max-steps", "50", "--set", "data.micro_batch_size=2",
                     "--set", "data.style=fewshot", "--set", "save_every=50", "--set", "optim.min_lr_ratio=1.0")
    assert run_main(args) == 0
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert losses[0] > 4 and losses[-1] < 0.05, losses[::10]
    assert (out / "plots.png").exists()
    assert all((out / "final" / f.name).read_bytes() == f.read_bytes() for f in (workspace / "tok").iterdir())
    # The export loads in transformers (no missing or unexpected weights) and in load_pretrained, same logits.
    import transformers
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(out / "final", output_loading_info=True)
    assert not any(info.values()), info
    ours = load_pretrained(out / "final")
    ids = torch.tensor([[5, 17, 3, 250, 9, 41]])  # (1, 6)
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), rtol=0, atol=1e-4)


def bad_inputs(ws: Path, tmp: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (extra args, text the error line must contain)."""
    malformed = tmp / "malformed.jsonl"
    malformed.write_text((ws / "train.jsonl").read_text().splitlines()[0] + "\n{not json\n")
    missing_field = tmp / "missing_field.jsonl"
    missing_field.write_text((ws / "train.jsonl").read_text().splitlines()[0] + '\n{"question": "2 + 2?"}\n')
    recipe = tmp / "recipe.toml"
    recipe.write_text("max_steps = 4\n[optim]\nlearning_rate = 1e-3\n")
    small_teacher = tmp / "small_teacher"
    save_pretrained(Transformer(replace(PRESETS["tiny-student"], vocab_size=300)), small_teacher)
    other_tokenizer = tmp / "other_tokenizer"  # big enough head, but a tokenizer trained on other text
    save_pretrained(Transformer(replace(PRESETS["tiny-student"], vocab_size=400)), other_tokenizer)
    train_tokenizer([f"{i} apples and {i + 1} pears\n" for i in range(200)], other_tokenizer, vocab_size=330)
    return {
        "missing data file": (["--data", str(tmp / "nope.jsonl")], "nope.jsonl not found"),
        "malformed JSONL line": (["--data", str(malformed)], "malformed.jsonl:2: invalid JSON"),
        "missing field": (["--data", str(missing_field)], "missing_field.jsonl:2: field 'answer' missing"),
        "wrong eval file": (["--set", f"data.eval_path={tmp / 'no_eval.jsonl'}"], "no_eval.jsonl not found"),
        "unknown config key": (["--recipe", str(recipe)], "recipe.toml: unknown config key 'optim.learning_rate'"),
        "unknown override": (["--set", "optim.lrr=1"], "unknown config key 'optim.lrr'"),
        "out of range": (["--set", "optim.lr=-1.0"], "'optim.lr' must be > 0"),
        "wrong type": (["--set", "data.micro_batch_size=two"], "'data.micro_batch_size' expects int"),
        "vocab mismatch": (["--stage", "kd", "--teacher", str(small_teacher)], "model's vocab_size is 300"),
        "tokenizer mismatch": (["--stage", "kd", "--teacher", str(other_tokenizer)], "has a different tokenizer"),
        "missing teacher": (["--stage", "kd", "--teacher", str(tmp / "no_teacher")], "no_teacher not found"),
        "unknown model": (["--model", "gpt-9"], "neither a preset"),
    }


def test_bad_inputs_fail_with_one_line_and_no_run_directory(workspace, tmp_path, capsys):
    for name, (extra, expected) in bad_inputs(workspace, tmp_path).items():
        out = tmp_path / f"run_{name.replace(' ', '_')}"
        code = run_main(base_args(workspace, out, *extra))
        err = capsys.readouterr().err.strip()
        assert code == 2, name
        assert err.startswith("error: ") and "\n" not in err and expected in err, (name, err)
        assert not out.exists(), name


def test_existing_run_needs_resume_and_same_config(workspace, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_main(base_args(workspace, out, "--set", "stop_at=1")) == 0
    assert run_main(base_args(workspace, out)) == 2
    assert "already holds checkpoints" in capsys.readouterr().err
    assert run_main(base_args(workspace, out, "--resume", "--set", "optim.lr=1e-3")) == 2
    assert "different config: optim.lr" in capsys.readouterr().err


def test_gen_stage_writes_traces_that_sft_trains_on(workspace, tmp_path):
    """Sequence-level KD end to end: a (random) teacher samples traces, SFT reads them."""
    from data.graders import gsm8k
    from data.readers import load_gsm8k
    teacher = tmp_path / "teacher"
    torch.manual_seed(2)
    save_pretrained(Transformer(replace(PRESETS["tiny-student"], vocab_size=400)), teacher)
    for f in (workspace / "tok").iterdir():
        (teacher / f.name).write_bytes(f.read_bytes())
    out = tmp_path / "gen"
    assert run_main(["--stage", "gen", "--model", str(teacher), "--data", str(workspace / "eval.jsonl"), "--out", str(out),
                     "--set", "gen.n=4", "--set", "gen.max_new_tokens=48", "--set", "gen.only_correct=false",
                     "--set", "gen.temperature=1.0"]) == 0
    assert (out / "DONE").exists()
    rows = {r["id"]: r for r in load_gsm8k(workspace / "eval.jsonl")}
    traces = [json.loads(line) for line in (out / "traces.jsonl").read_text().splitlines()]
    assert traces and len({(t["id"], t["sample"]) for t in traces}) == len(traces)
    for t in traces:
        assert rows[t["id"]]["question"] in t["prompt"]
        assert t["score"] == gsm8k.grade(t["completion"], rows[t["id"]]["reference"]).score
    sft = tmp_path / "sft"
    assert run_main(base_args(workspace, sft, "--data", str(out / "traces.jsonl"), "--max-steps", "1",
                              "--set", "data.format=prompt_completion", "--set", "data.micro_batch_size=1")) == 0
    assert (sft / "DONE").exists()


def test_teacher_is_frozen_in_the_configured_dtype(workspace):
    from model.tokenizer import load_tokenizer
    from trainer.config import load_config
    cfg = load_config(None, {"stage": "kd", "model": "tiny-student", "out": "-", "data.path": "-",
                             "kd.teacher": str(workspace / "teacher")}, [("kd.teacher_dtype", "bfloat16")])
    teacher = load_teacher(cfg, load_tokenizer(workspace / "tok"), torch.device("cpu"))
    assert not teacher.training
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in teacher.parameters())


def test_non_finite_loss_stops_before_saving_and_the_run_resumes(workspace, tmp_path, uninterrupted, monkeypatch,
                                                                  capsys):
    """A NaN loss at step 3 (a test hook in the SFT loss): one-line error naming the step, no step-3 checkpoint,
    no final/, finite records only; --resume without the hook then ends bit-identical to an uninterrupted run."""
    import trainer.supervised as supervised
    extra = stage_args(workspace, "sft")  # 2 micro-batches per step: call 5 is step 3's first
    out = tmp_path / "nan"
    real, calls = supervised.sft_loss, []

    def poisoned(model, batch, cfg):
        calls.append(1)
        loss, parts = real(model, batch, cfg)
        return (loss * float("nan"), parts) if len(calls) == 5 else (loss, parts)
    monkeypatch.setattr(supervised, "sft_loss", poisoned)
    assert run_main(base_args(workspace, out, *extra)) == 2
    err = capsys.readouterr().err  # the progress bar's lines, then the error
    assert err.splitlines()[-1].startswith("error: step 3: the loss is nan") and "Traceback" not in err, err
    assert [p.name for p in checkpoint_paths(out)] == ["step_00000001.pt", "step_00000002.pt"]
    assert not (out / "final").exists() and not (out / "DONE").exists()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    monkeypatch.undo()
    assert run_main(base_args(workspace, out, *extra, "--resume")) == 0
    a, b = uninterrupted("sft"), final_weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_moved_run_resumes_bit_exact_and_changed_content_refuses(workspace, tmp_path, uninterrupted, capsys):
    """Stop after step 2, move the run directory, copy the data and tokenizer elsewhere, resume through a
    relative path: bit-identical to an uninterrupted run. Data of other content is refused, naming it."""
    extra = stage_args(workspace, "sft")
    first = tmp_path / "first"
    assert run_main(base_args(workspace, first, *extra, "--set", "stop_at=2")) == 0
    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    first.rename(moved)
    data, tok = tmp_path / "copied.jsonl", tmp_path / "tok_copy"
    shutil.copy(workspace / "train.jsonl", data)
    shutil.copytree(workspace / "tok", tok)
    edited = tmp_path / "edited.jsonl"
    rows = data.read_text().splitlines()
    edited.write_text("\n".join([rows[1], rows[0], *rows[2:]]) + "\n")  # same rows, another order
    relative = os.path.relpath(moved)
    assert run_main(base_args(workspace, Path(relative), *extra, "--resume", "--data", str(edited))) == 2
    assert "was trained on other content: training data changed" in capsys.readouterr().err
    assert run_main(base_args(workspace, Path(relative), *extra, "--resume", "--data", str(data),
                              "--tokenizer", str(tok))) == 0
    a, b = uninterrupted("sft"), final_weights(moved)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_second_run_on_the_same_out_fails_at_once(workspace, tmp_path, capsys):
    """Run A holds <out>/.lock; run B on the same --out stops at once naming A's pid and writes nothing; A ends
    with its own records only."""
    out = tmp_path / "shared"
    args = base_args(workspace, out, "--max-steps", "40", "--set", "save_every=10")
    first = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], env=ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "config.toml").exists():  # written once A holds the lock
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()
            time.sleep(0.05)
        started = time.monotonic()
        assert run_main(base_args(workspace, out, "--max-steps", "40", "--resume")) == 2
        assert run_main(base_args(workspace, out, "--max-steps", "40")) == 2
        assert time.monotonic() - started < 30
        err = capsys.readouterr().err
        assert err.count(f"is in use by process {first.pid}") == 2, err
        assert first.wait(timeout=300) == 0, first.stderr.read()
    finally:
        first.kill()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 41)) and (out / "DONE").exists()
