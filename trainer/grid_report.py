"""The report of a study grid run (trainer/grid.py): results.json, results.md and results.png in its directory.

Per method x benchmark: greedy pass@1 and sampled pass@k (eval.pass_k samples; the share of problems with a
correct sample), the mean over the method's seeds with the 95% Wilson interval of the attempts pooled over
seeds (trainer/report.py); beside it the paper's figure where [paper] gives one, reported there and not
reproduced here. Per stage: the seconds it stored and its tokens from the cost preview (trainer/grid_cost.py;
generated text counted at max_new_tokens, "<="). results.json is the same on a re-run that reuses every stage.
"""
from __future__ import annotations

import json
import statistics
from dataclasses import asdict
from pathlib import Path

from trainer.grid_config import BY_NAME, GridConfig, Inputs
from trainer.grid_cost import Planned, StageCost, human
from trainer.report import cell, metric, plot_results, stage_seconds, table


def seconds(path: Path) -> float:
    return float((path / "seconds.txt").read_text())


def cost_of(p: Planned, costs: dict[str, StageCost], out: Path) -> StageCost | None:
    """The cost preview's figures of a stage (None for the data stage)."""
    return costs.get(str(p.stage.path.relative_to(out)))


def summary(p: Planned, benchmark: str, mode: str) -> dict:
    return json.loads((p.stage.path / f"{benchmark}_{mode}" / "summary.json").read_text())


def method_results(g: GridConfig, planned: list[Planned], costs: dict[str, StageCost], inputs: Inputs,
                   out: Path) -> dict:
    """{method: {what, start, params, train_seconds, train_tokens (an upper bound when train_tokens_bound),
    benchmarks: {name: {problems, greedy pass@1, sampled pass@k, paper (when reported)}}}}: means over the
    method's seeds (the untrained methods: one)."""
    k, methods = f"pass@{g.eval.pass_k}", {}
    for name in g.methods:
        evals = [p for p in planned if p.kind == "eval" and p.method == name]
        trained = [[p for p in planned if p.method == name and p.kind != "eval" and p.seed == e.seed] for e in evals]
        benchmarks = {}
        for bench, rows in inputs.benchmarks.items():
            greedy, sampled = ([summary(e, bench, mode)[key] for e in evals]
                               for mode, key in (("greedy", "pass@1"), ("sampled", k)))
            benchmarks[bench] = {"problems": len(rows), "greedy pass@1": metric(greedy, len(rows)),
                                 f"sampled {k}": metric(sampled, len(rows))}
            if bench in g.paper.figures.get(name, {}):
                benchmarks[bench]["paper"] = g.paper.figures[name][bench]
        methods[name] = {
            "what": BY_NAME[name].what, "start": BY_NAME[name].start, "params": cost_of(evals[0], costs, out).params,
            "train_seconds": statistics.fmean(sum(seconds(p.stage.path) for p in run) for run in trained)
            if trained[0] else None,
            "train_tokens": sum(cost_of(p, costs, out).tokens for p in trained[0]) if trained[0] else None,
            "train_tokens_bound": any(cost_of(p, costs, out).bound for p in trained[0]),
            "benchmarks": benchmarks}
    return methods


def results_table(g: GridConfig, methods: dict) -> list[str]:
    """One row per method: start, params, train seconds and tokens, then per benchmark greedy pass@1, sampled
    pass@k and (where [paper] gives any figure for the benchmark) the paper's."""
    k = f"sampled pass@{g.eval.pass_k}"
    reported = [b for b in g.eval.benchmarks if any(b in figures for figures in g.paper.figures.values())]
    head = ["method", "starts from", "params", "train s", "train tokens"]
    for bench in g.eval.benchmarks:
        head += [f"{bench} greedy pass@1", f"{bench} {k}",
                 *([f"{bench} paper (reported, not reproduced)"] if bench in reported else [])]
    rows = []
    for name, m in methods.items():
        row = [name, m["start"], human(m["params"]), "" if m["train_seconds"] is None else f"{m['train_seconds']:.0f}",
               "" if m["train_tokens"] is None else "<= " * m["train_tokens_bound"] + human(m["train_tokens"])]
        for bench, b in m["benchmarks"].items():
            row += [cell(b["greedy pass@1"]), cell(b[k]),
                    *([f"{b['paper']:.1f}" if "paper" in b else ""] if bench in reported else [])]
        rows.append(row)
    return table(head, rows)


def stage_table(planned: list[Planned], costs: dict[str, StageCost], out: Path) -> list[str]:
    rows = []
    for p in planned:
        c = cost_of(p, costs, out)
        tokens = "" if c is None else ("<= " if c.bound else "") + human(c.tokens)
        rows.append([str(p.stage.path.relative_to(out)), p.kind, f"{seconds(p.stage.path):.0f}", tokens])
    return table(["stage", "kind", "seconds", "tokens (cost preview)"], rows)


def write_report(out: Path, g: GridConfig, planned: list[Planned], costs: list[StageCost], inputs: Inputs,
                 source: str, footer: list[str]):
    by_path = {c.stage: c for c in costs}
    methods = method_results(g, planned, by_path, inputs, out)
    stages = [{"stage": str(p.stage.path.relative_to(out)), "kind": p.kind, "seconds": seconds(p.stage.path),
               "tokens": None if p.kind == "data" else cost_of(p, by_path, out).tokens} for p in planned]
    total = stage_seconds(out)
    (out / "results.json").write_text(json.dumps({"config": asdict(g), "methods": methods, "stages": stages,
                                                  "stage_seconds": total}, indent=2) + "\n")
    e = g.eval
    problems = ", ".join(f"{name} {len(rows)} ({e.benchmarks[name]})" for name, rows in inputs.benchmarks.items())
    lines = ["# Study grid results", "",
             f"Config {source}: training rows {len(inputs.rows)} of {g.data.train} (task {g.data.task}, style "
             f"{g.data.style}); seeds {', '.join(map(str, g.seeds))} (the untrained methods: evaluated once, seed "
             f"{g.seeds[0]}). Benchmarks: {problems}. Accuracy in %: mean over seeds "
             f"[95% Wilson interval of the attempts]; greedy pass@1, and pass@{e.pass_k} from {e.pass_k} samples at "
             f"temperature {e.temperature}; at most {e.max_new_tokens} new tokens.", "",
             *results_table(g, methods), ""]
    if g.paper.figures:
        lines += [f"paper: the figure reported for that cell in {g.paper.source or 'the paper'}; reported, not "
                  "reproduced by this run.", ""]
    lines += ["Stages (train tokens and the tokens below: the cost preview's count, cost.md):", "",
              *stage_table(planned, by_path, out), "", "Methods:",
              *[f"- {name}: {m['what']}" for name, m in methods.items()], "",
              f"All stages: {total:.0f} s of stage time.", "", *footer]
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    print(text)
    print(plot_results({name: {b: m["benchmarks"][b]["greedy pass@1"] for b in m["benchmarks"]}
                        for name, m in methods.items()}, out / "results.png"))
