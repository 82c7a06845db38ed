"""trainer/metrics.py: records truncated on resume, plots, and the note without matplotlib."""
import sys

from trainer.metrics import Metrics, plot_metrics, read_metrics


def test_metrics_truncate_on_resume_and_plot(tmp_path):
    m = Metrics(tmp_path, 0, 5, enabled=True)
    for step in range(1, 5):
        m.log({"step": step, "loss": 1.0 / step, "lr": 0.1})
    m.close()
    m = Metrics(tmp_path, 2, 5, enabled=True)  # resumed from the step-2 checkpoint
    m.log({"step": 3, "loss": 0.3, "lr": 0.1})
    m.close()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    note = plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "plots.png")
    assert note.startswith("plots written") and (tmp_path / "plots.png").stat().st_size > 1000


def test_plots_skipped_with_one_line_without_matplotlib(tmp_path, monkeypatch):
    metrics = Metrics(tmp_path, 0, 1, enabled=True)
    metrics.log({"step": 1, "loss": 1.0})
    metrics.close()
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    note = plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "plots.png")
    assert note == "plots skipped: matplotlib is not installed"
    assert not (tmp_path / "plots.png").exists()
