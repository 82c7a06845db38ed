"""study.py --quick end to end (CPU, one thread): every stage runs and writes its files, a re-run
skips every stage, a stage killed before DONE resumes from its checkpoint, and the report covers
every method x split."""
from __future__ import annotations

import io
import json
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import study

TRAINED = [m.name for m in study.METHODS]


def run_study(out: Path, *extra: str) -> tuple[int, str]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    log = io.StringIO()
    try:
        with redirect_stdout(log):
            rc = study.main(["--quick", "--out", str(out), *extra])
    finally:
        torch.set_num_threads(threads)
    return rc, log.getvalue()


def stage_dirs(out: Path) -> list[Path]:
    seed = out / "seed_0"
    return [out / "data", seed / "seq_kd_traces", *[seed / name for name in TRAINED],
            *[seed / "eval" / name for name in TRAINED]]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    rc, log = run_study(out)
    assert rc == 0, log
    return out, log


def test_every_stage_runs_and_writes_its_files(quick):
    out, log = quick
    for path in stage_dirs(out):
        assert (path / "DONE").exists(), path
        assert f"[study] run {path}\n" in log
    for name in TRAINED:
        assert (out / "seed_0" / name / "final" / "model.safetensors").exists()
        for split in study.SPLITS:
            for mode in ("greedy", "sampled"):
                assert (out / "seed_0" / "eval" / name / f"{split}_{mode}" / "generations.jsonl").exists()
    traces = (out / "seed_0" / "seq_kd_traces" / "traces.jsonl").read_text().splitlines()
    assert len(traces) >= study.QUICK.batch_size  # seq_kd trained on the teacher's traces
    for name in study.RL_METHODS:  # the curve's data: rollout accuracy at every logged step
        records = [json.loads(line) for line in (out / "seed_0" / name / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == list(range(1, study.QUICK.grpo_steps + 1))
        assert all(0 <= r["accuracy"] <= 1 for r in records)
    for name in ("results.json", "results.md", "results.png", "rl_curve.png"):
        assert (out / name).stat().st_size > 0


def test_results_cover_every_method_and_split(quick):
    out, _ = quick
    results = json.loads((out / "results.json").read_text())
    assert list(results["methods"]) == [m.name for m in study.METHODS]
    k = f"sampled pass@{study.QUICK.pass_k}"
    for name in TRAINED:
        method = results["methods"][name]
        assert method["train_seconds"] > 0
        for split, n in (("test", study.QUICK.n_test), ("harder", study.QUICK.n_harder)):
            cell = method["splits"][split]
            assert cell["problems"] == n
            for key in ("greedy pass@1", k):
                low, high = cell[key]["ci95"]
                assert 0 <= low <= cell[key]["mean"] <= high <= 1
                # the proportion is a count of solved problems over n
                assert cell[key]["mean"] * n == pytest.approx(round(cell[key]["mean"] * n))
    md = (out / "results.md").read_text()
    for name in TRAINED:
        assert f"| {name} |" in md


def test_greedy_score_matches_the_generations(quick):
    """The reported greedy pass@1 is the mean of the graded samples eval wrote (independent recount)."""
    out, _ = quick
    results = json.loads((out / "results.json").read_text())
    for name in TRAINED:
        for split in study.SPLITS:
            lines = (out / "seed_0" / "eval" / name / f"{split}_greedy" / "generations.jsonl").read_text().splitlines()
            scores = [json.loads(line)["score"] for line in lines]
            assert results["methods"][name]["splits"][split]["greedy pass@1"]["mean"] == sum(scores) / len(scores)


def test_rerun_skips_every_stage_and_keeps_the_table(quick):
    out, _ = quick
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.parent != out}
    results = (out / "results.json").read_text()
    rc, log = run_study(out)
    assert rc == 0, log
    assert "[study] run" not in log
    for path in stage_dirs(out):
        assert f"[study] skip {path} (done)\n" in log
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert (out / "results.json").read_text() == results


def test_killed_stage_resumes_from_its_checkpoint(quick):
    out, _ = quick
    stage = out / "seed_0" / "kd_reverse"
    weights = (stage / "final" / "model.safetensors").read_bytes()
    (stage / "DONE").unlink()  # as if killed after the last checkpoint, before the export
    rc, log = run_study(out)
    assert rc == 0, log
    assert f"[study] run {stage}\n" in log and "[study] run" not in log.replace(f"[study] run {stage}\n", "")
    assert (stage / "DONE").exists()
    assert (stage / "final" / "model.safetensors").read_bytes() == weights


def test_same_seed_gives_the_same_table(quick, tmp_path):
    """A second study from scratch (same seed, config and machine): the same accuracies, bit-identical weights."""
    out, _ = quick
    rc, log = run_study(tmp_path)
    assert rc == 0, log
    first, second = (json.loads((d / "results.json").read_text())["methods"] for d in (out, tmp_path))
    for name in TRAINED:
        assert first[name]["splits"] == second[name]["splits"], name
        a, b = (load_file(d / "seed_0" / name / "final" / "model.safetensors") for d in (out, tmp_path))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_other_config_in_the_same_directory_is_refused(quick, capsys):
    out, _ = quick
    assert study.main(["--out", str(out)]) == 2
    assert "another config" in capsys.readouterr().err


def test_wilson_interval_matches_closed_form():
    # Reference values (Newcombe 1998, Table I; Brown, Cai & DasGupta 2001): 0/10 -> [0, 0.2775],
    # 5/10 -> [0.2366, 0.7634], 81/263 -> [0.2553, 0.3662]
    for (x, n), expected in (((0, 10), (0.0, 0.2775)), ((5, 10), (0.2366, 0.7634)), ((81, 263), (0.2553, 0.3662))):
        assert study.wilson(x, n) == pytest.approx(expected, abs=1e-4)
