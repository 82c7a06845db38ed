"""A run's bookkeeping around train.py's loop: run directory, optimizer and schedule, resume, checkpoints,
export and the DONE marker. Every stage goes through these; none of them knows what is being learned.

Run directory (`--out`): config.toml (the resolved config, itself a recipe), metrics.jsonl,
checkpoints/step_*.pt (training state), final/ (HF layout + tokenizer files), adapter/ (LoRA only: PEFT
layout, for the base `model`), plots.png, and DONE once everything is written.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from model.checkpoint import save_pretrained
from model.lora import adapter_state, base_fingerprint, merged_state, save_peft_adapter
from model.parallel import all_gather_objects, barrier, unwrap
from model.transformer import Transformer
from trainer.batches import data_position
from trainer.checkpoint import (checkpoint_paths, full_model_state, load_checkpoint, lock_run_dir, remove_stale_temps,
                                save_checkpoint)
from trainer.config import OptimConfig, TrainConfig, to_toml
from trainer.distributed import Dist, wrap_model
from trainer.metrics import plot_metrics

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "chat_template.jinja", "generation_config.json")
CONFIG_MAY_CHANGE_ON_RESUME = ("stop_at",)
# Where the inputs live, not what they are: a resumed run compares their content (`input_digests`) instead.
PATH_KEYS = ("out", "model", "tokenizer", "data.path", "data.eval_path", "kd.teacher")


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Linear warmup over warmup_steps, then cosine decay to lr * min_lr_ratio at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(optimizer, lr: float):
    for group in optimizer.param_groups:
        group["lr"] = lr


def build_optimizer(model, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not on norms, biases)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def evaluate_now(done: int, cfg: TrainConfig) -> bool:
    """Evaluate after the last step and every `eval_every` steps."""
    return done == cfg.max_steps or cfg.eval_every > 0 and done % cfg.eval_every == 0


def prepare_out(cfg: TrainConfig, resume: str | None, d: Dist):
    """Take the run directory (created now, after every input was validated; rank 0 holds its lock for the
    run) and find the checkpoint to resume: (checkpoint path or None, the lock file to keep open)."""
    out = Path(cfg.out)
    missing = FileNotFoundError(f"--resume: no checkpoint in {out / 'checkpoints'}")
    if resume == "latest" and not out.is_dir():  # before the lock creates the directory
        raise missing
    lock, error = None, None
    if d.is_main:
        try:
            lock = lock_run_dir(out)
        except ValueError as e:  # another run holds it: every rank stops, not only rank 0
            error = str(e)
    if error := all_gather_objects(error)[0]:
        raise ValueError(error)
    found = checkpoint_paths(out)
    if resume is None and found:
        raise ValueError(f"{out} already holds checkpoints; pass --resume or choose another --out")
    if resume == "latest" and not found:
        raise missing
    if d.is_main:
        remove_stale_temps(out)  # what a killed run of this directory left half-written
        (out / "DONE").unlink(missing_ok=True)
        (out / "config.toml").write_text(to_toml(cfg))
    barrier()
    return (None if resume is None else found[-1] if resume == "latest" else Path(resume)), lock


def digest(value) -> str:
    """A short hash of JSON-able content (token ids, rows)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def input_digests(model, stage) -> dict[str, str]:
    """What the run learns from, by content: the initial weights and the stage's inputs (tokenized data,
    the teacher's weights): a resumed run must find the same."""
    return {"initial weights": base_fingerprint(model), **stage.input_digests()}


def open_run(cfg: TrainConfig, model, resume_path: Path | None, inputs: dict[str, str], d: Dist):
    """Wrap the model for data parallelism, build the optimizer, restore a checkpoint:
    (model, optimizer, first step, sharded)."""
    model = wrap_model(model, cfg.parallel, d.device)
    sharded = cfg.parallel == "fsdp" and d.world_size > 1
    optimizer = build_optimizer(model, cfg.optim)
    if resume_path is None:
        return model, optimizer, 0, sharded
    state = load_checkpoint(resume_path, model, optimizer, d.rank, d.world_size, sharded)
    check_resumed_run(state, cfg, inputs, resume_path)
    return model, optimizer, state["step"], sharded


def check_resumed_run(state: dict, cfg: TrainConfig, inputs: dict[str, str], path: Path):
    """The checkpoint's run has this run's mathematics: the same config but for stop_at and where the inputs
    live, and inputs of the same content (a moved or respelled run directory, data or tokenizer resumes)."""
    old, new = flat(state["config"]), flat(asdict(cfg))
    ignored = CONFIG_MAY_CHANGE_ON_RESUME + PATH_KEYS
    changed = [k for k in old.keys() | new.keys() if old.get(k) != new.get(k) and k not in ignored]
    if changed:
        raise ValueError(f"--resume: {path} was written with a different config: {', '.join(sorted(changed))}")
    if "inputs" not in state:
        raise ValueError(f"--resume: {path} was written by an older srlm (no digests of its inputs); resume it "
                         f"with that version, or start a new run")
    other = [k for k in inputs if state["inputs"].get(k) != inputs[k]]
    if other:
        raise ValueError(f"--resume: {path} was trained on other content: {', '.join(other)} changed")


def flat(table: dict, prefix: str = "") -> dict:
    return {k2: v2 for k, v in table.items()
            for k2, v2 in (flat(v, f"{prefix}{k}.").items() if isinstance(v, dict) else [(prefix + k, v)])}


def save(cfg: TrainConfig, model, optimizer, done: int, stage, inputs: dict[str, str], d: Dist, sharded: bool):
    """The training-state checkpoint after step `done` (collective)."""
    save_checkpoint(cfg.out, model, optimizer, done, {
        "config": asdict(cfg), "data_position": data_position(done, stage.num_examples, stage.examples_per_step),
        "num_examples": stage.num_examples, "inputs": inputs}, cfg.keep_last, d.is_main, sharded)


def export(cfg: TrainConfig, model, is_main: bool, sharded: bool):
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
    tokenizer_dir = Path(cfg.tokenizer or cfg.model)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy2(tokenizer_dir / name, out / "final" / name)


def finish(cfg: TrainConfig, model, d: Dist, sharded: bool):
    """HF export, plots, and the DONE marker last."""
    out = Path(cfg.out)
    export(cfg, model, d.is_main, sharded)
    if d.is_main:
        print(plot_metrics(out / "metrics.jsonl", out / "plots.png"))
        (out / "DONE").write_text(f"completed {cfg.max_steps} steps\n")
    barrier()
