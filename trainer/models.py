"""The models of a run: the trained model (a preset with random init or an HF directory, with LoRA adapters
when lora.rank > 0), stage kd's frozen teacher, and the precision their forwards run in."""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import torch

from model.checkpoint import load_pretrained
from model.config import PRESETS
from model.lora import apply_lora
from model.tokenizer import Tokenizer, check_vocab, load_tokenizer
from model.transformer import Transformer
from trainer.config import DTYPES, TrainConfig


def build_model(cfg: TrainConfig, tokenizer: Tokenizer, device) -> Transformer:
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


def load_teacher(cfg: TrainConfig, tokenizer: Tokenizer, device) -> Transformer:
    """The frozen teacher; it must speak the student's tokenizer (its head may have more padded rows)."""
    if not Path(cfg.kd.teacher).is_dir():
        raise FileNotFoundError(f"teacher directory {cfg.kd.teacher} not found")
    teacher = load_pretrained(cfg.kd.teacher, dtype=DTYPES[cfg.kd.teacher_dtype], device=device)
    check_vocab(tokenizer, teacher.config, cfg.kd.teacher)
    if any((Path(cfg.kd.teacher) / f).exists() for f in ("tokenizer.json", "tokenizer.model")):
        theirs = load_tokenizer(cfg.kd.teacher)
        if not same_tokenizer(tokenizer, theirs):
            raise ValueError(f"teacher {cfg.kd.teacher} has a different tokenizer ({theirs.vocab_size} ids) than "
                             f"the student's {tokenizer.source} ({tokenizer.vocab_size} ids); logit KD needs one "
                             f"vocabulary")
    return teacher.eval().requires_grad_(False)


def same_tokenizer(a: Tokenizer, b: Tokenizer) -> bool:
    """Same ids for the same strings: equal sizes, special tokens and every id's text."""
    return (a.vocab_size == b.vocab_size and a.special_tokens == b.special_tokens
            and all(a.decode([i]) == b.decode([i]) for i in range(a.vocab_size)))


def autocast(cfg: TrainConfig, device):
    """bf16 autocast on CUDA when cfg.bf16; fp32 elsewhere (CPU always runs fp32)."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if cfg.bf16 and device.type == "cuda" else nullcontext()
