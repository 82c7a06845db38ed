"""Small helpers shared by the benchmarks: median timing, peak RSS, a JSON-reporting subprocess, verdicts.

Every benchmark measures ours and the baseline in the same run and reports their ratio, so a busy
machine slows both; absolute figures are only comparable on the same quiet machine.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


def median_seconds(fns: dict, warmup: int = 1, iters: int = 5) -> dict[str, float]:
    """Median wall-clock seconds of each fn() over `iters` timed calls, after `warmup` untimed ones.

    The functions take turns (round-robin), so background load on a shared machine hits all alike.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB (Linux VmHWM).

    Not getrusage's ru_maxrss: Linux carries that across fork + exec, so a child started by a big
    parent would report the parent's peak.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("/proc/self/status has no VmHWM line (peak RSS needs Linux)")


def run_json_subprocess(args: list[str]) -> dict:
    """Run `python *args` in a fresh process (its own peak RSS) and parse the JSON on its last stdout line."""
    out = subprocess.run([sys.executable, *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def verdict(ratio: float, target: float) -> str:
    return "PASS" if ratio >= target else "MISS"


def print_table(headers: list[str], rows: list[list]) -> None:
    """Plain aligned text table (floats with 2 decimals)."""
    cells = [[f"{c:.2f}" if isinstance(c, float) else str(c) for c in row] for row in [headers, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for i, row in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
