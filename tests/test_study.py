"""study.py --quick end to end (CPU, workers of one torch thread, 2 seeds): every stage runs and writes
its files, a re-run skips every stage, a stage killed before DONE resumes from its checkpoint, the
report covers every method x split with paired comparisons and learning curves, and one worker gives
the same weights as two (the schedule does not change results)."""
from __future__ import annotations

import io
import json
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import study
from trainer.report import wilson

TRAINED = [m.name for m in study.METHODS]
SEEDS = 2  # --quick's default


def run_dir(out: Path, seed: int, name: str) -> Path:
    """Where a method's stage lives: the shared teacher once in <out>, the others per seed."""
    return study.Run(study.QUICK, seed, out).dir(name)


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
    dirs = [out / "data", out / "teacher", out / "eval" / "teacher", out / "curve" / "teacher"]
    for seed in range(SEEDS):
        root = out / f"seed_{seed}"
        dirs += [root / "seq_kd_traces", *[root / part / name for name in TRAINED[1:] for part in ("", "eval", "curve")]]
    return dirs


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    rc, log = run_study(out, "--jobs", "2")
    assert rc == 0, log
    return out, log


def test_every_stage_runs_and_writes_its_files(quick):
    out, log = quick
    assert len(set(stage_dirs(out))) == len(list(out.rglob("DONE")))  # nothing else, the teacher once
    for path in stage_dirs(out):
        assert (path / "DONE").exists(), path
        assert f"[study] run {path}\n" in log
    for seed in range(SEEDS):
        run = study.Run(study.QUICK, seed, out)
        for name in TRAINED:
            assert (run.dir(name) / "final" / "model.safetensors").exists()
            for split in study.SPLITS:
                for mode in ("greedy", "sampled"):
                    assert (run.eval_dir(name) / f"{split}_{mode}" / "generations.jsonl").exists()
            # the curve: every checkpoint but the last (final/) evaluated greedy on test
            steps = [int(p.stem.split("_")[1]) for p in study.checkpoint_paths(run.dir(name))]
            assert sorted(p.name for p in run.curve_dir(name).glob("step_*")) == [f"step_{n:08d}" for n in steps[:-1]]
        traces = (run.dir("seq_kd_traces") / "traces.jsonl").read_text().splitlines()
        assert len(traces) >= study.QUICK.batch_size  # seq_kd trained on the teacher's traces
        for name in study.RL_METHODS:  # the GRPO curves' data: rollout accuracy, zero_std_frac at every step
            records = [json.loads(line) for line in (run.dir(name) / "metrics.jsonl").read_text().splitlines()]
            assert [r["step"] for r in records] == list(range(1, study.QUICK.grpo_steps + 1))
            assert all(0 <= r["accuracy"] <= 1 and 0 <= r["zero_std_frac"] <= 1 for r in records)
    assert len(study.checkpoint_paths(out / "teacher")) == study.QUICK.curve_points
    for name in ("results.json", "results.md", "results.png", "curves.png", "rl_curve.png"):
        assert (out / name).stat().st_size > 0


def test_results_cover_every_method_and_split(quick):
    out, _ = quick
    results = json.loads((out / "results.json").read_text())
    assert list(results["methods"]) == [m.name for m in study.METHODS]
    k = f"sampled pass@{study.QUICK.pass_k}"
    assert results["seeds"] == SEEDS
    for name in TRAINED:
        method = results["methods"][name]
        assert method["train_seconds"] > 0
        assert len(method["splits"]["test"]["greedy pass@1"]["per_seed"]) == (1 if name == "teacher" else SEEDS)
        for split, n in (("test", study.QUICK.n_test), ("harder", study.QUICK.n_harder)):
            cell = method["splits"][split]
            assert cell["problems"] == n
            for key in ("greedy pass@1", k):
                low, high = cell[key]["ci95"]
                assert 0 <= low <= cell[key]["mean"] <= high <= 1
                # the proportion is a count of solved problems over n x the seeds
                attempts = n * len(cell[key]["per_seed"])
                assert cell[key]["mean"] * attempts == pytest.approx(round(cell[key]["mean"] * attempts))
    md = (out / "results.md").read_text()
    for name in TRAINED:
        assert f"| {name} |" in md
    assert [(r["a"], r["b"], r["split"]) for r in results["comparisons"]] == [
        (a, b, split) for a, b in study.COMPARISONS for split in study.SPLITS]
    for r in results["comparisons"]:
        assert (r["seeds"], r["problems"]) == (SEEDS, study.QUICK.n_test if r["split"] == "test" else study.QUICK.n_harder)
        assert r["ci95"][0] <= r["delta"] <= r["ci95"][1]
        assert f"| {r['a']} - {r['b']} | {r['split']} |" in md
    assert "Commit: " in md and "Machine: " in md and "Wall time" in md


def test_grpo_summary_is_the_mean_of_the_logged_steps(quick):
    out, _ = quick
    results = json.loads((out / "results.json").read_text())
    window = max(1, study.QUICK.grpo_steps // 8)
    for name in study.RL_METHODS:
        runs = [[json.loads(line) for line in (run_dir(out, seed, name) / "metrics.jsonl").read_text().splitlines()]
                for seed in range(SEEDS)]
        assert all([r["step"] for r in run] == list(range(1, study.QUICK.grpo_steps + 1)) for run in runs)
        mean = lambda values: sum(values) / len(values)  # noqa: E731
        expected = {"accuracy_first": mean([mean([r["accuracy"] for r in run[:window]]) for run in runs]),
                    "accuracy_last": mean([mean([r["accuracy"] for r in run[-window:]]) for run in runs]),
                    "zero_std_all": mean([mean([r["zero_std_frac"] for r in run]) for run in runs])}
        for key, value in expected.items():
            assert results["grpo"][name][key] == pytest.approx(value), (name, key)
        assert f"| {name} | {100 * expected['accuracy_first']:.1f} |" in (out / "results.md").read_text()


def test_curves_start_at_the_start_and_end_at_the_final_eval(quick):
    out, _ = quick
    results = json.loads((out / "results.json").read_text())
    methods, curves = results["methods"], results["curves"]
    for method in study.METHODS:
        runs = curves[method.name]
        assert len(runs) == (1 if method.name == "teacher" else SEEDS)
        for seed, points in enumerate(runs):
            steps = [p["step"] for p in points]
            assert steps == sorted(steps) and steps[-1] == method.steps(study.QUICK)
            assert points[-1]["accuracy"] == methods[method.name]["splits"]["test"]["greedy pass@1"]["per_seed"][seed]
            assert all(p["seconds"] is not None and p["seconds"] >= 0 for p in points)
            if method.start:  # step 0: the start's final model
                start = methods[method.start]["splits"]["test"]["greedy pass@1"]["per_seed"][seed]
                assert points[0] == {"step": 0, "seconds": 0.0, "accuracy": start}


def test_greedy_score_matches_the_generations(quick):
    """The reported greedy pass@1 is the mean of the graded samples eval wrote (independent recount)."""
    out, _ = quick
    results = json.loads((out / "results.json").read_text())
    for name in TRAINED:
        for split in study.SPLITS:
            per_seed = []
            for seed in range(1 if name == "teacher" else SEEDS):
                path = study.Run(study.QUICK, seed, out).eval_dir(name) / f"{split}_greedy" / "generations.jsonl"
                scores = [json.loads(line)["score"] for line in path.read_text().splitlines()]
                per_seed.append(sum(scores) / len(scores))
            assert results["methods"][name]["splits"][split]["greedy pass@1"]["per_seed"] == per_seed


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
    stage = out / "seed_1" / "kd_reverse"
    weights = (stage / "final" / "model.safetensors").read_bytes()
    (stage / "DONE").unlink()  # as if killed after the last checkpoint, before the export
    rc, log = run_study(out)
    assert rc == 0, log
    assert f"[study] run {stage}\n" in log and "[study] run" not in log.replace(f"[study] run {stage}\n", "")
    assert (stage / "DONE").exists()
    assert (stage / "final" / "model.safetensors").read_bytes() == weights


def test_one_worker_gives_the_same_table_and_weights_as_two(quick, tmp_path):
    """A second study from scratch with --jobs 1 (stages one after another in one worker process) against the
    fixture's --jobs 2 (concurrent stages): the same accuracies, comparisons and bit-identical weights of every
    seed's every model."""
    out, _ = quick
    rc, log = run_study(tmp_path, "--jobs", "1")
    assert rc == 0, log
    first, second = (json.loads((d / "results.json").read_text()) for d in (out, tmp_path))
    assert first["comparisons"] == second["comparisons"]
    for name in TRAINED:
        assert first["methods"][name]["splits"] == second["methods"][name]["splits"], name
        for seed in range(SEEDS):
            a, b = (load_file(run_dir(d, seed, name) / "final" / "model.safetensors") for d in (out, tmp_path))
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (name, seed)


def test_other_config_in_the_same_directory_is_refused(quick, capsys):
    out, _ = quick
    assert study.main(["--out", str(out)]) == 2
    assert "another config" in capsys.readouterr().err


def test_wilson_interval_matches_closed_form():
    # Reference values (Newcombe 1998, Table I; Brown, Cai & DasGupta 2001): 0/10 -> [0, 0.2775],
    # 5/10 -> [0.2366, 0.7634], 81/263 -> [0.2553, 0.3662]
    for (x, n), expected in (((0, 10), (0.0, 0.2775)), ((5, 10), (0.2366, 0.7634)), ((81, 263), (0.2553, 0.3662))):
        assert wilson(x, n) == pytest.approx(expected, abs=1e-4)


def test_instruct_demonstrations_stop_a_seeded_share_one_step_early():
    one = {"question": "q1", "answer": "After losing 4, Leo has 11-4 = <<11-4=7>>7 pens.\n#### 7"}
    three = {"question": "q3", "answer": "After finding 6 more, Ava has 8+6 = <<8+6=14>>14 apples.\n"
                                         "After giving 5 to Eva, Ava has 14-5 = <<14-5=9>>9 apples.\n"
                                         "After giving 9 to Eva, Ava has 9-9 = <<9-9=0>>0 apples.\n#### 0"}
    assert study.skip_last_step(one["answer"]) == "#### 11"
    assert study.skip_last_step(three["answer"]) == ("After finding 6 more, Ava has 8+6 = <<8+6=14>>14 apples.\n"
                                                     "After giving 5 to Eva, Ava has 14-5 = <<14-5=9>>9 apples.\n#### 9")
    rows = [{**(one, three)[i % 2], "question": f"q{i}", "steps": (1, 3)[i % 2]} for i in range(400)]
    skipped = study.instruct_demonstrations(rows, 0.25)
    assert skipped == study.instruct_demonstrations(rows, 0.25)  # seeded
    assert skipped != study.instruct_demonstrations(rows, 0.25, seed=1)
    for steps, share in ((1, 0.25), (3, 0.75)):  # n * 0.25 of the n-step solutions, within 4 binomial std
        changed = [b for a, b in zip(rows, skipped) if a["steps"] == steps and a != b]
        assert all(b["answer"] == study.skip_last_step(a["answer"]) for a, b in zip(rows, skipped) if a != b)
        assert abs(len(changed) - 200 * share) < 4 * (200 * share * (1 - share)) ** 0.5, (steps, len(changed))
    assert all(a != b for a, b in zip(rows, study.instruct_demonstrations(rows, 0.5)) if a["steps"] == 3)  # capped at 1
    assert study.instruct_demonstrations(rows, 0.0) == rows
    with pytest.raises(ValueError, match="not a synthetic solution line"):
        study.skip_last_step("x = 3\n#### 3")
