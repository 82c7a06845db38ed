"""Supervised fine-tuning (SFT), logit knowledge distillation (KD) and GRPO of a Qwen2/Qwen3 decoder.

    python train.py --recipe recipes/sft_tiny.toml --model tiny-student --tokenizer TOK --data train.jsonl --out runs/sft
    torchrun --nproc_per_node 2 train.py ...                       # DDP: gloo on CPU, NCCL on CUDA
    python train.py ... --out runs/sft --resume                    # continue from the latest checkpoint

One optimizer step = `data.grad_accum_steps` micro-batches on each of `world_size` ranks.
Normalisation (the rule torchtitan uses): the step's loss is
    L = (sum over every valid target token t of the step, on all ranks, of loss_t) / N_global
where N_global counts those tokens; it is known before any forward pass (the labels say which
tokens count) and summed over ranks with one all-reduce. Each micro-batch backpropagates its token
SUM / N_global; DDP and FSDP average gradients over ranks, so each rank also multiplies by
world_size. The update is then that of one big batch: 1 rank x 4 accumulation steps, 2 x 2 and
4 x 1 agree. Averaging per-micro-batch means instead would weight a token of a short micro-batch
more than one of a long micro-batch.

Stage "kd" adds a frozen teacher: loss = alpha * CE + (1 - alpha) * KD (trainer/stages.py); with
kd.on_policy_lambda > 0 that fraction of the steps trains on completions the student samples, scored
by the teacher with the KD term alone (GKD; trainer/on_policy.py).
Stage "gen" is sequence-level KD's first half: --model (the teacher) samples solutions to the
--data questions and writes <out>/traces.jsonl, which `--stage sft --set data.format=prompt_completion`
then trains on (trainer/traces.py).
Stage "rl" is GRPO (rl/grpo.py, knobs in the recipe's [grpo] table) on the rows of eval.py's task
data.task (gsm8k, synthetic, math, humaneval, synthetic-code): each step samples group_size
completions for prompts_per_step prompts, rewards them with the task's grader, and takes grpo.mu optimizer
steps on them (train_rl; trainer/rl_stage.py holds its data, rollout and record helpers).
With `--set lora.rank=16` (any stage but gen; model/lora.py) only low-rank adapters train on the frozen
base: checkpoints hold the adapters and a fingerprint of the base, GRPO's reference is the base itself
(adapters off), and the export merges the adapters into final/ and also writes them alone to adapter/.
Outputs in --out: config.toml (resolved config), metrics.jsonl, checkpoints/step_*.pt (training
state), final/ (HF layout + tokenizer files), adapter/ (LoRA only: PEFT layout, for the base
`model`), plots.png, and DONE once everything is written.
"""
from __future__ import annotations

import argparse
import math
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

import torch

from data.readers import load_gsm8k
from data.synthetic import write_jsonl
from model.checkpoint import load_pretrained, save_pretrained
from model.config import PRESETS
from model.lora import adapter_state, apply_lora, merged_state, save_peft_adapter
from model.tokenizer import check_vocab, load_tokenizer
from model.transformer import Transformer
from rl.grpo import grpo_step
from trainer.batches import collate, data_position, load_examples, rank_micro_batches, steps_per_epoch
from trainer.checkpoint import checkpoint_paths, full_model_state, load_checkpoint, save_checkpoint
from trainer.config import OptimConfig, TrainConfig, load_config, to_toml
from trainer.distributed import Dist, all_reduce_sum, barrier, cleanup, init_distributed, unwrap, wrap_model
from trainer.metrics import Metrics, plot_metrics
from trainer.on_policy import on_policy_step, student_examples
from trainer.rl_stage import greedy_accuracy, load_prompts, load_rows, reference_model, rl_record, step_rollouts
from trainer.stages import count_tokens, make_objective
from trainer.traces import summary, teacher_traces

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "chat_template.jinja", "generation_config.json")
CONFIG_MAY_CHANGE_ON_RESUME = ("stop_at",)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=(
        "Any config key (trainer/config.py) is also a flag: --max-steps 10, --optim.lr 1e-4, "
        "or --set kd.loss=reverse_kl. Values are parsed as TOML."))
    p.add_argument("--recipe", help="TOML recipe (recipes/*.toml); flags and overrides win over it")
    p.add_argument("--stage", choices=("sft", "kd", "gen", "rl"))
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


def build_model(cfg: TrainConfig, tokenizer, device) -> Transformer:
    """A preset with random init (vocab = the tokenizer's) or a pretrained HF directory; with lora.rank > 0,
    adapters on its frozen projections. Seeded: the same weights on every rank and in every run."""
    torch.manual_seed(cfg.seed)
    if cfg.model in PRESETS:
        model = Transformer(replace(PRESETS[cfg.model], vocab_size=tokenizer.vocab_size))
    elif Path(cfg.model).is_dir():
        model = load_pretrained(cfg.model)
        check_vocab(tokenizer, model.config, cfg.model)
    else:
        raise ValueError(f"--model {cfg.model!r} is neither a preset ({', '.join(PRESETS)}) nor a directory")
    model.activation_checkpointing = cfg.activation_checkpointing
    if cfg.lora.rank:
        apply_lora(model, cfg.lora)
    return model.to(device)


def load_teacher(cfg: TrainConfig, tokenizer, device) -> Transformer:
    """The frozen teacher; it must speak the student's tokenizer (its head may have more padded rows)."""
    if not Path(cfg.kd.teacher).is_dir():
        raise FileNotFoundError(f"teacher directory {cfg.kd.teacher} not found")
    teacher = load_pretrained(cfg.kd.teacher, dtype=DTYPES[cfg.kd.teacher_dtype], device=device)
    check_vocab(tokenizer, teacher.config, cfg.kd.teacher)
    if any((Path(cfg.kd.teacher) / f).exists() for f in ("tokenizer.json", "tokenizer.model")):
        theirs = load_tokenizer(cfg.kd.teacher)
        if not same_tokenizer(tokenizer, theirs):
            raise ValueError(f"teacher {cfg.kd.teacher} has a different tokenizer ({theirs.vocab_size} ids) than "
                             f"the student's {tokenizer.source} ({tokenizer.vocab_size} ids); logit KD needs one vocabulary")
    return teacher.eval().requires_grad_(False)


def same_tokenizer(a, b) -> bool:
    """Same ids for the same strings: equal sizes, special tokens and every id's text."""
    return (a.vocab_size == b.vocab_size and a.special_tokens == b.special_tokens
            and all(a.decode([i]) == b.decode([i]) for i in range(a.vocab_size)))


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Linear warmup over warmup_steps, then cosine decay to lr * min_lr_ratio at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def build_optimizer(model, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not on norms, biases)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def clip_grad_norm(model, max_norm: float) -> torch.Tensor:
    """Global L2 norm of the gradients (before clipping); clip to max_norm unless it is 0."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm or float("inf"))
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2 returns a DTensor


def get_batch(model, examples, step: int, cfg: TrainConfig, d: Dist, tokenizer) -> tuple[list[dict], bool]:
    """This rank's padded micro-batches for optimizer step `step`, and whether their completions are the
    student's samples (on-policy KD, trainer/on_policy.py) rather than the dataset's."""
    micro = rank_micro_batches(examples, step, cfg.seed, cfg.data.micro_batch_size,
                               cfg.data.grad_accum_steps, d.rank, d.world_size)
    on_policy = on_policy_step(step, cfg)
    if on_policy:
        with autocast(cfg, d.device):
            micro = student_examples(model, micro, step, cfg, tokenizer, d)
    return [collate(m, tokenizer.pad_id, d.device) for m in micro], on_policy


def autocast(cfg: TrainConfig, device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if cfg.bf16 and device.type == "cuda" else nullcontext()


def train_step(model, micro_batches, objective, cfg: TrainConfig, d: Dist) -> dict:
    """Forward/backward every micro-batch with the global-token normalisation; return the step's sums."""
    n_global = all_reduce_sum(sum(count_tokens(b) for b in micro_batches).float())
    sums = {}
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        sync = model.no_sync() if hasattr(model, "no_sync") and not last else nullcontext()  # DDP: one all-reduce
        with sync:
            with autocast(cfg, d.device):
                loss_sum, parts = objective(model, batch)
            (loss_sum * d.world_size / n_global.clamp(min=1)).backward()
        for name, value in {"loss": loss_sum.detach(), **parts}.items():
            sums[name] = sums.get(name, 0.0) + value.float()
    sums = {k: all_reduce_sum(v) / n_global.clamp(min=1) for k, v in sums.items()}
    return {"loss_tokens": n_global, **sums}


def count_inputs(micro_batches) -> float:
    """Non-padding input tokens of the step over all ranks (the tokens/s figure)."""
    return all_reduce_sum(sum(b["attention_mask"].sum() for b in micro_batches).float()).item()


@torch.no_grad()
def evaluate(model, examples, objective, cfg: TrainConfig, d: Dist, pad_id: int) -> float:
    """Mean loss per valid token over the eval set (each rank takes every world_size-th micro-batch)."""
    model.eval()
    mb = cfg.data.micro_batch_size
    total, count = torch.zeros((), device=d.device), torch.zeros((), device=d.device)
    for start in range(d.rank * mb, len(examples), mb * d.world_size):
        batch = collate(examples[start:start + mb], pad_id, d.device)
        with autocast(cfg, d.device):
            total += objective(model, batch)[0].float()
        count += count_tokens(batch)
    model.train()
    return (all_reduce_sum(total) / all_reduce_sum(count).clamp(min=1)).item()


def prepare_out(cfg: TrainConfig, resume: str | None, d: Dist) -> Path | None:
    """The run directory (created only now, after every input validated) and the checkpoint to resume."""
    out = Path(cfg.out)
    found = checkpoint_paths(out)
    if resume is None and found:
        raise ValueError(f"{out} already holds checkpoints; pass --resume or choose another --out")
    if resume == "latest" and not found:
        raise FileNotFoundError(f"--resume: no checkpoint in {out / 'checkpoints'}")
    if d.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "DONE").unlink(missing_ok=True)
        (out / "config.toml").write_text(to_toml(cfg))
    barrier()
    return None if resume is None else found[-1] if resume == "latest" else Path(resume)


def check_resumed_config(state: dict, cfg: TrainConfig, num_examples: int, path: Path):
    old, new = flat(state["config"]), flat(asdict(cfg))
    if state["num_examples"] != num_examples:
        raise ValueError(f"--resume: {path} was trained on {state['num_examples']} examples, the data now has {num_examples}")
    changed = [k for k in old.keys() | new.keys() if old.get(k) != new.get(k) and k not in CONFIG_MAY_CHANGE_ON_RESUME]
    if changed:
        raise ValueError(f"--resume: {path} was written with a different config: {', '.join(sorted(changed))}")


def flat(table: dict, prefix: str = "") -> dict:
    return {k2: v2 for k, v in table.items()
            for k2, v2 in (flat(v, f"{prefix}{k}.").items() if isinstance(v, dict) else [(prefix + k, v)])}


def export(cfg: TrainConfig, model, tokenizer_dir: str, is_main: bool, sharded: bool):
    """The final model in HF layout with the tokenizer files beside it (rank 0). With LoRA the adapters
    are merged into it, and written alone to <out>/adapter in PEFT's layout (they apply to the base)."""
    out = Path(cfg.out)
    state = full_model_state(model, sharded)
    if not is_main:
        return
    if cfg.lora.rank:
        save_peft_adapter(adapter_state(state), cfg.lora, out / "adapter", base=cfg.model)
        state = merged_state(state, cfg.lora.scale)
    with torch.device("meta"):
        final = Transformer(unwrap(model).config)
    final.load_state_dict(state, assign=True)
    save_pretrained(final, out / "final")
    for name in TOKENIZER_FILES:
        if (Path(tokenizer_dir) / name).exists():
            shutil.copy2(Path(tokenizer_dir) / name, out / "final" / name)


def main(argv=None) -> int:
    try:
        args, overrides = parse_args(argv)
        d = init_distributed()
        cfg = resolve_config(args, overrides)
        if cfg.stage == "gen":
            if args.resume:
                raise ValueError("--resume applies to training stages; stage 'gen' writes its traces in one go")
            gen(cfg, d)
        elif cfg.stage == "rl":
            train_rl(cfg, args.resume, d)
        else:
            train(cfg, args.resume, d)
        return 0
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        cleanup()


def gen(cfg: TrainConfig, d: Dist):
    """Teacher traces for sequence-level KD: <out>/traces.jsonl (prompt/completion rows), then DONE."""
    tokenizer_dir = cfg.tokenizer or cfg.model
    tokenizer = load_tokenizer(tokenizer_dir)
    model = build_model(cfg, tokenizer, d.device)
    if not Path(cfg.data.path).is_file():
        raise FileNotFoundError(f"data file {cfg.data.path} not found")
    rows = load_gsm8k(cfg.data.path)
    with autocast(cfg, d.device):
        traces = teacher_traces(model, tokenizer, rows, cfg, d)
    prepare_out(cfg, None, d)
    if d.is_main:
        out = Path(cfg.out)
        write_jsonl(out / "traces.jsonl", traces)
        print(summary(rows, traces, cfg))
        (out / "DONE").write_text(f"{len(traces)} traces\n")
    barrier()


def open_run(cfg: TrainConfig, model, resume_path: Path | None, num_examples: int, d: Dist):
    """Wrap the model for data parallelism, build the optimizer, restore a checkpoint:
    (model, optimizer, first step, sharded)."""
    model = wrap_model(model, cfg.parallel, d.device)
    sharded = cfg.parallel == "fsdp" and d.world_size > 1
    optimizer = build_optimizer(model, cfg.optim)
    if resume_path is None:
        return model, optimizer, 0, sharded
    state = load_checkpoint(resume_path, model, optimizer, d.rank, d.world_size, sharded)
    check_resumed_config(state, cfg, num_examples, resume_path)
    return model, optimizer, state["step"], sharded


def set_lr(optimizer, lr: float):
    for group in optimizer.param_groups:
        group["lr"] = lr


def save(cfg: TrainConfig, model, optimizer, done: int, num_examples: int, global_batch: int, d: Dist, sharded: bool):
    """The training-state checkpoint after step `done` (collective)."""
    save_checkpoint(cfg.out, model, optimizer, done, {
        "config": asdict(cfg), "data_position": data_position(done, num_examples, global_batch),
        "num_examples": num_examples}, cfg.keep_last, d.is_main, sharded)


def finish(cfg: TrainConfig, model, tokenizer_dir: str, d: Dist, sharded: bool):
    """HF export, plots, and the DONE marker last."""
    out = Path(cfg.out)
    export(cfg, model, tokenizer_dir, d.is_main, sharded)
    if d.is_main:
        print(plot_metrics(out / "metrics.jsonl", out / "plots.png"))
        (out / "DONE").write_text(f"completed {cfg.max_steps} steps\n")
    barrier()


def train(cfg: TrainConfig, resume: str | None, d: Dist):
    # 1. Validate every input before the run directory exists.
    tokenizer_dir = cfg.tokenizer or cfg.model
    tokenizer = load_tokenizer(tokenizer_dir)
    model = build_model(cfg, tokenizer, d.device)
    teacher = load_teacher(cfg, tokenizer, d.device) if cfg.stage == "kd" else None
    examples = load_examples(cfg.data.path, cfg.data, tokenizer)
    eval_examples = load_examples(cfg.data.eval_path, cfg.data, tokenizer) if cfg.data.eval_path else []
    global_batch = cfg.data.micro_batch_size * cfg.data.grad_accum_steps * d.world_size
    steps_per_epoch(len(examples), global_batch, cfg.data.path)
    resume_path = prepare_out(cfg, resume, d)

    # 2. Model, optimizer, state.
    model, optimizer, start, sharded = open_run(cfg, model, resume_path, len(examples), d)
    objective = make_objective(cfg, teacher, tokenizer.vocab_size)
    on_policy_objective = make_objective(cfg, teacher, tokenizer.vocab_size, on_policy=True)
    stop = min(cfg.stop_at or cfg.max_steps, cfg.max_steps)
    metrics = Metrics(cfg.out, start, cfg.max_steps, d.is_main)
    t_start = time.perf_counter()

    # 3. The loop: one optimizer step per iteration.
    model.train()
    for step in range(start, stop):
        t0 = time.perf_counter()
        lr = lr_at(step, cfg.optim, cfg.max_steps)
        set_lr(optimizer, lr)
        micro_batches, on_policy = get_batch(model, examples, step, cfg, d, tokenizer)
        sums = train_step(model, micro_batches, on_policy_objective if on_policy else objective, cfg, d)
        grad_norm = clip_grad_norm(model, cfg.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        evaluating = bool(eval_examples) and evaluate_now(done, cfg)
        if evaluating or done % cfg.log_every == 0 or done == stop:
            record = {"step": done, **{k: v.item() for k, v in sums.items()}, "lr": lr,
                      "grad_norm": grad_norm.item(), "epoch": data_position(step, len(examples), global_batch)[0],
                      "tokens_per_s": count_inputs(micro_batches) / (time.perf_counter() - t0),
                      "elapsed_s": time.perf_counter() - t_start}
            if cfg.stage == "kd":
                record["on_policy"] = int(on_policy)
            if evaluating:
                record["eval_loss"] = evaluate(model, eval_examples, objective, cfg, d, tokenizer.pad_id)
            metrics.log(record)
        metrics.advance()
        if done % cfg.save_every == 0 or done == stop:
            save(cfg, model, optimizer, done, len(examples), global_batch, d, sharded)
    metrics.close()
    if stop == cfg.max_steps:  # else stopped early on purpose (stop_at): resume later with --resume
        finish(cfg, model, tokenizer_dir, d, sharded)


def evaluate_now(done: int, cfg: TrainConfig) -> bool:
    """Evaluate after the last step and every `eval_every` steps."""
    return done == cfg.max_steps or cfg.eval_every > 0 and done % cfg.eval_every == 0


def train_rl(cfg: TrainConfig, resume: str | None, d: Dist):
    """GRPO (rl/grpo.py): each step samples group_size completions for prompts_per_step prompts, scores
    them, and takes grpo.mu optimizer steps on them. The prompt order is a function of (seed, step) and
    step s samples with seed grpo.seed + s * world_size + rank, so a resumed run repeats the same steps."""
    # 1. Validate every input before the run directory exists.
    tokenizer_dir = cfg.tokenizer or cfg.model
    tokenizer = load_tokenizer(tokenizer_dir)
    model = build_model(cfg, tokenizer, d.device)
    ref_model = reference_model(model) if cfg.grpo.beta > 0 else None  # the initial policy, also when resuming
    prompts = load_prompts(cfg.data.path, cfg.data, tokenizer)
    if cfg.grpo.prompts_per_step % d.world_size:  # each rank samples whole groups of its own prompts
        raise ValueError(f"config key 'grpo.prompts_per_step' ({cfg.grpo.prompts_per_step}) must be a multiple "
                         f"of the number of ranks ({d.world_size})")
    eval_rows = load_rows(cfg.data.eval_path, cfg.data) if cfg.data.eval_path else []
    steps_per_epoch(len(prompts), cfg.grpo.prompts_per_step, cfg.data.path)
    resume_path = prepare_out(cfg, resume, d)

    # 2. Model, optimizer, state.
    model, optimizer, start, sharded = open_run(cfg, model, resume_path, len(prompts), d)
    reward_fns = cfg.grpo.reward_fns()
    forward_context = partial(autocast, cfg, d.device)
    stop = min(cfg.stop_at or cfg.max_steps, cfg.max_steps)
    metrics = Metrics(cfg.out, start, cfg.max_steps, d.is_main)
    t_start = time.perf_counter()

    # 3. The loop: one rollout batch per iteration (grpo_step takes the optimizer steps itself).
    model.train()
    for step in range(start, stop):
        t0 = time.perf_counter()
        lr = lr_at(step, cfg.optim, cfg.max_steps)
        set_lr(optimizer, lr)
        with forward_context():
            batch = step_rollouts(model, prompts, step, cfg, tokenizer, d)
        t1 = time.perf_counter()
        out = grpo_step(model, ref_model, optimizer, batch, reward_fns, cfg.grpo, forward_context=forward_context)
        done = step + 1
        evaluating = bool(eval_rows) and evaluate_now(done, cfg)
        if evaluating or done % cfg.log_every == 0 or done == stop:
            record = {"step": done, **rl_record(out, batch, t1 - t0, time.perf_counter() - t1), "lr": lr,
                      "epoch": data_position(step, len(prompts), cfg.grpo.prompts_per_step)[0],
                      "elapsed_s": time.perf_counter() - t_start}
            if evaluating:
                with forward_context():
                    record["eval_accuracy"] = greedy_accuracy(model, tokenizer, eval_rows, cfg, d)
            metrics.log(record)
        metrics.advance()
        if done % cfg.save_every == 0 or done == stop:
            save(cfg, model, optimizer, done, len(prompts), cfg.grpo.prompts_per_step, d, sharded)
    metrics.close()
    if stop == cfg.max_steps:  # else stopped early on purpose (stop_at): resume later with --resume
        finish(cfg, model, tokenizer_dir, d, sharded)


if __name__ == "__main__":
    sys.exit(main())
