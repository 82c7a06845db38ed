"""HumanEval's 164 canonical solutions graded end to end through the sandbox (data/sandbox.py run_check:
a candidate process and a trusted runner process per task, isolated as isolation() says).

    python bench/bench_humaneval.py [--data ../shared/data/humaneval/HumanEval.jsonl.gz] [--workers N]

Prints the wall time against the target (<= 30 s on 2 cores), the worker count, the isolation mode
and the mean time per task; every canonical solution must pass, otherwise the run is reported as broken.
"""
import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.graders import grade_batch  # noqa: E402
from data.readers import load_humaneval  # noqa: E402
from data.sandbox import default_workers, isolation  # noqa: E402

TARGET_S = 30.0
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "humaneval" / "HumanEval.jsonl.gz"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--workers", type=int, default=default_workers())
    args = parser.parse_args()
    rows = load_humaneval(args.data)
    mode = isolation()  # chosen once, before the clock starts
    start = time.perf_counter()
    grades = grade_batch("code", [r["canonical_solution"] for r in rows], [r["reference"] for r in rows], args.workers)
    seconds = time.perf_counter() - start
    failed = [(r["task_id"], g.note) for r, g in zip(rows, grades) if g.score != 1.0]
    print(f"HumanEval canonical solutions: {len(rows) - len(failed)}/{len(rows)} passed")
    for task_id, note in failed:
        print(f"  BROKEN {task_id}: {note}")
    print(f"wall {seconds:.1f} s with {args.workers} workers on {os.cpu_count()} cores, isolation {mode!r} "
          f"({1000 * seconds * args.workers / len(rows):.0f} ms per task per worker); "
          f"target <= {TARGET_S:.0f} s: {'PASS' if seconds <= TARGET_S and not failed else 'MISS'}")


if __name__ == "__main__":
    main()
