"""One calibration run of the study's sizes (the runs logged in docs/study/experiments.md), one torch thread.

    python docs/study/calibrate.py ROOT NAME KIND steps=N [start=DIR] [data=FILE|skipP] [seed=S] [section.key=value ...]

KIND: teacher (the tiny-teacher preset, SFT on the clean train split), sft (a student, from `start` or the
tiny-student preset, on `data`: train.jsonl, or skipP = the train split with study.instruct_demonstrations
at skip_per_step P) or rl (GRPO from `start`, 16 prompts x 16 samples at lr 1e-4 unless set). The model
trains into ROOT/seed_S/exp/NAME with study.py's common settings (train_args), then its checkpoints and
final model are evaluated greedily on test (and, for students, sampled: 8 samples at temperature 1, so
pass@1..8) on test and harder. One JSON line per run is appended to ROOT/results.jsonl.
ROOT/data is study.py's data stage with the default StudyConfig (made on the first run).
"""
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import study  # noqa: E402
import train  # noqa: E402
from data.readers import load_gsm8k  # noqa: E402
from data.synthetic import write_jsonl  # noqa: E402
from model.generate import SamplingParams  # noqa: E402
from trainer.checkpoint import checkpoint_paths  # noqa: E402
from trainer.evaluation import evaluate, load_model  # noqa: E402
from trainer.stages import evaluate_model  # noqa: E402

GREEDY = SamplingParams(max_new_tokens=176, temperature=0.0)
SAMPLED = SamplingParams(max_new_tokens=176, temperature=1.0, n=8, seed=0)


def evaluate_run(out: Path, data: Path, sampled: bool) -> dict:
    """Greedy test pass@1 of each checkpoint, then the final model on test and harder (study.py's evaluation:
    trainer/stages.py evaluate_model)."""
    model, tokenizer = load_model(str(out / "final"), str(data / "tokenizer"), "cpu")
    test = load_gsm8k(data / "test.jsonl")
    results = {}
    for path in checkpoint_paths(out):
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["model"])
        results[path.stem] = evaluate(model, tokenizer, test, "synthetic", GREEDY, "chat", 200,
                                      out_dir=str(out / "eval" / path.stem), progress=False)["pass@1"]
    splits = ("test", "harder")
    modes = {"greedy": GREEDY, **({"t1": SAMPLED} if sampled else {})}
    evaluate_model(str(out / "final"), str(data / "tokenizer"),
                   {split: ("synthetic", load_gsm8k(data / f"{split}.jsonl")) for split in splits}, modes, "chat", 200,
                   out / "eval")
    for split in splits:
        results[f"{split} greedy"] = json.loads((out / "eval" / f"{split}_greedy" / "summary.json").read_text())["pass@1"]
        if sampled:
            summary = json.loads((out / "eval" / f"{split}_t1" / "summary.json").read_text())
            results[f"{split} T1"] = {k: v for k, v in summary.items() if k.startswith("pass@")}
    return results


def main(argv):
    torch.set_num_threads(1)
    root, name, kind, *settings = argv
    root, cfg = Path(root), study.StudyConfig()
    kw = dict(a.split("=", 1) for a in settings)
    data, steps = root / "data", int(kw.pop("steps"))
    if not (data / "DONE").exists():
        study.prepare_data(cfg, data)
        (data / "DONE").write_text("done\n")
    run = study.Run(cfg, int(kw.pop("seed", 0)), root)
    out = run.dir(f"exp/{name}")
    start, data_file = kw.pop("start", None), kw.pop("data", "train.jsonl")
    if data_file.startswith("skip"):
        rows = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()]
        skipped = study.instruct_demonstrations(rows, float(data_file[len("skip"):]))
        data_file = str(root / f"{data_file}.jsonl")
        write_jsonl(data_file, skipped)
    else:
        data_file = str(data / data_file)
    t0 = time.time()
    if kind == "teacher":
        args = study.train_args(run, f"exp/{name}", cfg.teacher, data_file, steps,
                                {"optim.lr": cfg.teacher_lr, "keep_last": 20, "save_every": steps // 4, **kw})
        train.execute(["--stage", "sft", *args])
    elif kind == "sft":
        args = study.train_args(run, f"exp/{name}", start or cfg.student, data_file, steps,
                                {"keep_last": 20, "save_every": max(1, steps // 5), **kw})
        train.execute(["--stage", "sft", *args])
    elif kind == "rl":
        args = study.train_args(run, f"exp/{name}", start, data_file, steps, {
            "optim.lr": 1e-4, "optim.min_lr_ratio": 1.0, "optim.warmup_steps": 5, "grpo.prompts_per_step": 16,
            "grpo.group_size": 16, "grpo.max_new_tokens": 176, "grpo.seed": run.seed, "keep_last": 20,
            "save_every": max(1, steps // 4), "log_every": 1, **kw})
        train.execute(["--stage", "rl", *args])
    else:
        raise ValueError(f"KIND must be teacher, sft or rl, got {kind!r}")
    result = {"name": name, "kind": kind, "args": settings, "train_s": round(time.time() - t0),
              **evaluate_run(out, data, sampled=kind != "teacher")}
    print(json.dumps(result))
    with open(root / "results.jsonl", "a") as f:
        f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
