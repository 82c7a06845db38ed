"""Supervised fine-tuning (SFT), logit knowledge distillation (KD) and GRPO of a Qwen2/Qwen3 decoder.

    python train.py --recipe recipes/sft_tiny.toml --model tiny-student --tokenizer TOK --data train.jsonl --out runs/sft
    torchrun --nproc_per_node 2 train.py ...                       # DDP: gloo on CPU, NCCL on CUDA
    python train.py ... --out runs/sft --resume                    # continue from the latest checkpoint

Every training stage runs the one loop below; a stage supplies what one optimizer step does and
what it records:
  sft, kd   trainer/supervised.py: a global batch of examples, the token-sum loss / the global token
            count (CE; alpha * CE + (1 - alpha) * KD with a frozen --teacher; GKD's on-policy steps)
  rl        trainer/rl_stage.py: GRPO (rl/grpo.py) on data/tasks.py's task data.task: sample, reward
            with the task's grader, grpo.mu optimizer steps
Stage "gen" is sequence-level KD's first half: --model (the teacher) samples solutions to the --data
questions and writes <out>/traces.jsonl, which `--stage sft --set data.format=prompt_completion` then
trains on (trainer/traces.py).
With `--set lora.rank=16` (any stage but gen; model/lora.py) only low-rank adapters train on the frozen
base: checkpoints hold the adapters and a fingerprint of the base, GRPO's reference is the base itself
(adapters off), and the export merges the adapters into final/ and also writes them alone to adapter/.
The run directory's files: trainer/run.py.
"""
from __future__ import annotations

import sys
import time

from model.parallel import NonFiniteError
from model.tokenizer import load_tokenizer
from trainer import cli
from trainer.config import STAGES, TrainConfig, load_config
from trainer.distributed import Dist, cleanup, init_distributed
from trainer.metrics import Metrics
from trainer.models import build_model, load_teacher
from trainer.rl_stage import GRPOStage
from trainer.run import evaluate_now, finish, input_digests, lr_at, open_run, prepare_out, save, set_lr
from trainer.supervised import SupervisedStage
from trainer.traces import write_traces


def parse_args(argv):
    p = cli.ArgumentParser(description=__doc__.split("\n")[0], epilog=(
        "Any config key (trainer/config.py) is also a flag: --max-steps 10, --optim.lr 1e-4, "
        "or --set kd.loss=reverse_kl. Values are parsed as TOML."))
    p.add_argument("--recipe", help="TOML recipe (recipes/*.toml); flags and overrides win over it")
    p.add_argument("--stage", choices=STAGES)
    p.add_argument("--model", help="preset name (random init) or HF-layout directory")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the model directory)")
    p.add_argument("--data", help="training JSONL")
    p.add_argument("--teacher", help="teacher HF-layout directory (stage kd)")
    p.add_argument("--out", help="run directory")
    p.add_argument("--resume", nargs="?", const="latest", help="resume from the latest checkpoint in --out, or a path")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. optim.lr=1e-4")
    args, rest = p.parse_known_args(argv)
    overrides = [tuple(item.split("=", 1)) for item in args.set if "=" in item]
    if len(overrides) != len(args.set):
        raise ValueError(f"--set expects KEY=VALUE, got {[s for s in args.set if '=' not in s]}")
    if len(rest) % 2 or not all(k.startswith("--") for k in rest[::2]):
        raise ValueError(f"unrecognised arguments {rest}: overrides are `--key value` pairs or --set key=value")
    overrides = [(k[2:].replace("-", "_"), v) for k, v in zip(rest[::2], rest[1::2])] + overrides
    return args, overrides


def resolve_config(args, overrides) -> TrainConfig:
    named = {"stage": args.stage, "model": args.model, "tokenizer": args.tokenizer, "data.path": args.data,
             "kd.teacher": args.teacher, "out": args.out}
    return load_config(args.recipe, named, overrides)


def main(argv=None) -> int:
    """0 when the run is complete (or stopped at stop_at), 2 with a one-line error otherwise."""
    try:
        return cli.run(execute, argv)
    finally:
        cleanup()


def execute(argv):
    """Stage gen, or a training stage through the loop below."""
    args, overrides = parse_args(argv)
    d = init_distributed()
    cfg = resolve_config(args, overrides)
    if cfg.stage == "gen":
        if args.resume:
            raise ValueError("--resume applies to training stages; stage 'gen' writes its traces in one go")
        write_traces(cfg, d)
    else:
        model, stage = build_stage(cfg, d)
        train(cfg, model, stage, args.resume, d)


def build_stage(cfg: TrainConfig, d: Dist):
    """The model to train and its stage, every input read and validated (before the run directory exists)."""
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model)
    model = build_model(cfg, tokenizer, d.device)
    if cfg.stage == "rl":
        return model, GRPOStage.load(cfg, d, tokenizer, model)
    teacher = load_teacher(cfg, tokenizer, d.device) if cfg.stage == "kd" else None
    return model, SupervisedStage.load(cfg, d, tokenizer, teacher)


def train(cfg: TrainConfig, model, stage: SupervisedStage | GRPOStage, resume: str | None, d: Dist):
    """The training loop of every stage: stage.step(model, optimizer, step, record) does one step's work
    (its optimizer steps included) and returns its figures when `record`; everything else is here."""
    resume_path, lock = prepare_out(cfg, resume, d)
    inputs = input_digests(model, stage)
    model, optimizer, start, sharded = open_run(cfg, model, resume_path, inputs, d)
    stop = min(cfg.stop_at or cfg.max_steps, cfg.max_steps)
    t_start = time.perf_counter()

    model.train()
    with Metrics(cfg.out, start, cfg.max_steps, d.is_main) as metrics:
        for step in range(start, stop):
            lr = lr_at(step, cfg.optim, cfg.max_steps)
            set_lr(optimizer, lr)
            done = step + 1
            evaluating = stage.evaluates and evaluate_now(done, cfg)
            logging = evaluating or done % cfg.log_every == 0 or done == stop
            try:
                record = stage.step(model, optimizer, step, record=logging)
            except NonFiniteError as e:  # nothing of this step was saved: the last checkpoint is the one to resume
                raise ValueError(f"step {done}: {e}; stopped before saving it (the last checkpoint in {cfg.out} is "
                                 f"intact: fix the cause, e.g. a lower optim.lr, and --resume)") from None
            if logging:
                record = {"step": done, **record, "lr": lr, "elapsed_s": time.perf_counter() - t_start}
                if evaluating:
                    record.update(stage.evaluate(model))
                metrics.log(record)
            metrics.advance()
            if done % cfg.save_every == 0 or done == stop:
                save(cfg, model, optimizer, done, stage, inputs, d, sharded)
    if stop == cfg.max_steps:  # else stopped early on purpose (stop_at): resume later with --resume
        finish(cfg, model, d, sharded)
    if lock is not None:
        lock.close()


if __name__ == "__main__":
    sys.exit(main())
