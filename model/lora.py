"""LoRA: low-rank adapters on the linear projections, merged into the base weights on export.

LoRA (Hu et al. 2021, arXiv:2106.09685) freezes a pretrained weight W [out, in] and learns a rank-r
update beside it:

    y = x W^T + b + (alpha / r) * dropout(x) A^T B^T        A [r, in], B [out, r]
    W' = W + (alpha / r) * B A                              (the merged weight)

B starts at zero, so the adapted model starts exactly as the base; A starts Kaiming-uniform as in
`nn.Linear` (and PEFT). Dropout acts on the adapter input only; the base path is untouched.

`LoRALinear` is an `nn.Linear` that keeps the names `weight` / `bias` (the very tensors of the
base), so base checkpoints, WEIGHT_MAP and the data-parallel wrappers see the usual names and only
`lora_A` / `lora_B` are new. Targets are projection names (`q_proj` ... `down_proj`) in every layer.
Exports: the merged model (any HF loader), or the adapters alone in PEFT's layout
(adapter_config.json + adapter_model.safetensors), to load with `PeftModel.from_pretrained` on the base.
"""
from __future__ import annotations

import hashlib
import json
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from model.checkpoint import local_to_hf
from model.transformer import Transformer

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_SUFFIXES = (".lora_A", ".lora_B")


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 0  # r; 0 = off (full fine-tuning)
    alpha: float = 32.0  # the update is scaled by alpha / rank
    dropout: float = 0.0  # on the adapter input only
    targets: str = ",".join(PROJECTIONS)  # comma-separated projection names that get adapters

    def __post_init__(self):
        unknown = [t for t in self.target_names if t not in PROJECTIONS]
        checks = [("rank", self.rank >= 0, ">= 0 (0 = off)"), ("alpha", self.alpha > 0, "> 0"),
                  ("dropout", 0 <= self.dropout < 1, "in [0, 1)"),
                  ("targets", self.target_names and not unknown, f"a comma-separated subset of {PROJECTIONS}")]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"LoRAConfig.{name} must be {expected}, got {getattr(self, name)!r}")

    @property
    def target_names(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.targets.split(",") if t.strip())

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoRALinear(nn.Linear):
    """y = x W^T + b + scale * dropout(x) A^T B^T; W and b are the base layer's own (frozen) tensors."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight, self.bias = base.weight, base.bias  # shared, not copied: names and memory unchanged
        like = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **like))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **like))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's init: U(+-1/sqrt(in))
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout)
        self.adapter_enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)  # (..., out)
        if not self.adapter_enabled:
            return y
        return y + self.scale * F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)  # (..., out)


def apply_lora(model: Transformer, cfg: LoRAConfig) -> Transformer:
    """Swap every targeted projection for a LoRALinear (in place) and freeze all base parameters."""
    model.requires_grad_(False)
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if name in cfg.target_names and type(child) is nn.Linear:
                setattr(parent, name, LoRALinear(child, cfg.rank, cfg.alpha, cfg.dropout))
    return model


def lora_layers(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


@contextmanager
def adapters_disabled(model: nn.Module):
    """Run the base model: every adapter off inside the block, on again after it."""
    layers = lora_layers(model)
    for layer in layers:
        layer.adapter_enabled = False
    try:
        yield model
    finally:
        for layer in layers:
            layer.adapter_enabled = True


class WithoutAdapters:
    """The frozen base inside a LoRA model, called like the model (GRPO's reference: no second copy)."""

    def __init__(self, model: Transformer):
        self.model = model

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        with adapters_disabled(self.model):
            return self.model(*args, **kwargs)

    @property
    def output_weight(self) -> torch.Tensor:
        return self.model.output_weight  # the lm_head carries no adapter


def is_adapter(name: str) -> bool:
    return name.endswith(ADAPTER_SUFFIXES)


def adapter_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter entries of a model state dict (`layers.{i}.attn.q_proj.lora_A`, ...)."""
    return {name: t for name, t in state.items() if is_adapter(name)}


def load_adapter_state(model: nn.Module, adapters: dict[str, torch.Tensor], source: str):
    """Load adapters saved by `adapter_state` into a model built with the same LoRAConfig."""
    ours = adapter_state(model.state_dict())
    bad = sorted(k for k in ours.keys() | adapters.keys()
                 if k not in ours or k not in adapters or ours[k].shape != adapters[k].shape)
    if bad:
        raise ValueError(f"{source}: adapters do not match this run's [lora] config ({', '.join(bad[:3])} ...)")
    model.load_state_dict(adapters, strict=False)


def merged_state(state: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """A plain Transformer state dict: each adapter folded into its weight, W' = W + scale * B A (in fp32)."""
    merged = {name: t for name, t in state.items() if not is_adapter(name)}
    for name in state:
        if name.endswith(".lora_A"):
            prefix = name.removesuffix(".lora_A")
            W, A, B = state[prefix + ".weight"], state[name], state[prefix + ".lora_B"]  # (out, in) (r, in) (out, r)
            merged[prefix + ".weight"] = (W.float() + scale * (B.float() @ A.float())).to(W.dtype)
    return merged


def base_fingerprint(model: nn.Module) -> str:
    """A cheap hash of the base weights: each tensor's name, shape and <= 1024 evenly strided values.
    A checkpoint of adapters stores it, so resuming on another base is an error, not silent garbage."""
    digest = hashlib.sha256()
    for name, t in model.state_dict().items():
        if not is_adapter(name):
            flat = t.detach().flatten()
            digest.update(f"{name}{tuple(t.shape)}".encode())
            digest.update(flat[::max(1, flat.numel() // 1024)].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def peft_name(name: str) -> str:
    """`layers.3.attn.q_proj.lora_A` -> `base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`."""
    module, part = name.rsplit(".", 1)
    return f"base_model.model.{local_to_hf(module + '.weight').removesuffix('.weight')}.{part}.weight"


def save_peft_adapter(adapters: dict[str, torch.Tensor], cfg: LoRAConfig, directory, base: str):
    """The adapters in PEFT's layout for a causal LM: `PeftModel.from_pretrained(<base>, directory)`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "r": cfg.rank,
              "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "target_modules": list(cfg.target_names),
              "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
              "init_lora_weights": True, "inference_mode": True, "modules_to_save": None}
    tensors = {peft_name(name): t.detach().contiguous() for name, t in adapters.items()}
    save_file(tensors, directory / "adapter_model.safetensors", metadata={"format": "pt"})
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2))
