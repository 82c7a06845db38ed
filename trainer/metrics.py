"""Run records: `metrics.jsonl` (one JSON object per logged step), a tqdm bar, and `plots.png`.

A record: step, loss (and its parts ce / kd), each a sum over the step's valid target tokens divided
by their global count `loss_tokens`; lr; grad_norm (before clipping); tokens_per_s (non-padding
input tokens of all ranks per second of the step); epoch; elapsed_s; eval_loss when evaluated; stage kd:
on_policy (1 when the step trained on student samples, trainer/on_policy.py).
Stage rl (trainer/rl_stage.py): reward, reward/<fn> and reward_std/<fn> per reward function,
accuracy (the correctness reward's mean), completion_len (mean) and completion_len_max,
truncated_frac, zero_std_frac, clip_frac, kl, entropy, loss, grad_norm, rollout_s and update_s,
tokens_per_s (sampled tokens), eval_accuracy (greedy pass@1) when evaluated.

Only rank 0 records. On resume the file is cut back to the checkpoint's step, so the records of
steps that were redone after a crash appear once.
"""
from __future__ import annotations

import json
from pathlib import Path

from tqdm import tqdm


PLOTTED = ("loss", "ce", "kd", "eval_loss", "reward", "accuracy", "eval_accuracy", "completion_len", "kl",
           "entropy", "clip_frac", "lr", "grad_norm", "tokens_per_s")


class Metrics:
    def __init__(self, out: str | Path, start_step: int, max_steps: int, enabled: bool):
        self.enabled = enabled
        self.path = Path(out) / "metrics.jsonl"
        if not enabled:
            return
        kept = [r for r in read_metrics(self.path) if r["step"] <= start_step] if start_step else []
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self.bar = tqdm(total=max_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def log(self, record: dict):
        """Append one record and show its main figures on the bar (tqdm's ETA is the remaining time)."""
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")
        shown = {k: record[k] for k in ("loss", "eval_loss", "reward", "accuracy", "eval_accuracy", "lr",
                                        "tokens_per_s") if k in record}
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)

    def advance(self, steps: int = 1):
        if self.enabled:
            self.bar.update(steps)

    def close(self):
        if self.enabled:
            self.bar.close()

    def __enter__(self) -> "Metrics":
        return self

    def __exit__(self, *exc):
        self.close()


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def plot_metrics(metrics_path: str | Path, png_path: str | Path) -> str:
    """Curves of every numeric metric against step; returns a one-line note of what was done."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plots skipped: matplotlib is not installed"
    records = read_metrics(metrics_path)
    names = [k for k in PLOTTED if any(k in r for r in records)]
    if not names:
        return "plots skipped: no metrics recorded"
    fig, axes = plt.subplots(len(names), 1, figsize=(7, 2.2 * len(names)), sharex=True, squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        points = [(r["step"], r[name]) for r in records if name in r]
        ax.plot(*zip(*points), marker="." if len(points) < 50 else None)
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return f"plots written to {png_path}"
