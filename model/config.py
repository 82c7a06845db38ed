"""ModelConfig: every architectural number of a Qwen2/Qwen3 decoder, written out explicitly.

Nothing is derived silently: `head_dim` in particular is a field, because Qwen3-0.6B has
hidden_size 1024 and 16 heads but head_dim 128 (not 1024 / 16 = 64).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ModelConfig:
    model_type: str  # "qwen2" or "qwen3": selects qkv bias vs per-head q/k RMSNorm on export
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # bias on q/k/v projections (Qwen2); o_proj never has one
    qk_norm: bool  # RMSNorm over head_dim on q and k before RoPE (Qwen3)

    def __post_init__(self):
        if self.model_type not in ("qwen2", "qwen3"):
            raise ValueError(f"ModelConfig.model_type: expected 'qwen2' or 'qwen3', got {self.model_type!r}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"ModelConfig.num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads}) for grouped-query attention")
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim must be even for RoPE, got {self.head_dim}")

    @property
    def num_parameters(self) -> int:
        d, f, L, hd = self.hidden_size, self.intermediate_size, self.num_hidden_layers, self.head_dim
        q, kv = self.num_attention_heads * hd, self.num_key_value_heads * hd
        attn = d * q + 2 * d * kv + q * d + (q + 2 * kv) * self.attention_bias + 2 * hd * self.qk_norm
        per_layer = attn + 3 * d * f + 2 * d
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.vocab_size * d + L * per_layer + d + head

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_hf_config(cls, hf: dict, source: str = "config.json") -> "ModelConfig":
        """Build from a HuggingFace `config.json` dict of model_type "qwen2" or "qwen3"."""
        model_type = hf.get("model_type")
        if model_type not in ("qwen2", "qwen3"):
            raise ValueError(f"{source}: field 'model_type' is {model_type!r}; srlm supports 'qwen2' and 'qwen3'")

        def need(key):
            if key not in hf:
                raise ValueError(f"{source}: missing field {key!r} (model_type {model_type})")
            return hf[key]

        # transformers >= 5 moves rope_theta into `rope_parameters`; older files keep it top-level.
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"{source}: field 'rope_scaling' type {rope_type!r} is not supported (only default RoPE)")
        rope_theta = hf.get("rope_theta", rope.get("rope_theta"))
        if rope_theta is None:
            raise ValueError(f"{source}: missing field 'rope_theta' (top-level or in 'rope_parameters')")
        if hf.get("use_sliding_window", False):
            raise ValueError(f"{source}: field 'use_sliding_window' is true; sliding-window attention is not supported")
        attention_bias = model_type == "qwen2"  # Qwen2 always has q/k/v bias
        if model_type == "qwen3" and hf.get("attention_bias", False):
            raise ValueError(f"{source}: field 'attention_bias' is true for qwen3 (o_proj bias) and is not supported")
        heads = need("num_attention_heads")
        return cls(
            model_type=model_type,
            vocab_size=need("vocab_size"),
            hidden_size=need("hidden_size"),
            intermediate_size=need("intermediate_size"),
            num_hidden_layers=need("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or need("hidden_size") // heads,  # HF's own default when absent
            rms_norm_eps=need("rms_norm_eps"),
            rope_theta=float(rope_theta),
            max_position_embeddings=need("max_position_embeddings"),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            attention_bias=attention_bias,
            qk_norm=model_type == "qwen3",
        )

    def to_hf_config(self, torch_dtype: str = "float32") -> dict:
        """The `config.json` dict that transformers loads as Qwen2ForCausalLM / Qwen3ForCausalLM."""
        arch = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[self.model_type]
        hf = {
            "architectures": [arch],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_dropout": 0.0,
            "use_sliding_window": False,
            "torch_dtype": torch_dtype,
        }
        if self.model_type == "qwen3":
            hf["attention_bias"] = False
        return hf


# Real shapes (for benchmarks and for checking loaded checkpoints) and the embedded defaults.
PRESETS: dict[str, ModelConfig] = {
    "qwen2.5-0.5b": ModelConfig(
        model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
        num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, head_dim=64,
        rms_norm_eps=1e-6, rope_theta=1_000_000.0, max_position_embeddings=32768,
        tie_word_embeddings=True, attention_bias=True, qk_norm=False),
    "qwen3-0.6b": ModelConfig(
        model_type="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072,
        num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
        rms_norm_eps=1e-6, rope_theta=1_000_000.0, max_position_embeddings=40960,
        tie_word_embeddings=True, attention_bias=False, qk_norm=True),
    # Embedded default: the teacher and student of the CPU study (vocab set by the trained tokenizer).
    "tiny-teacher": ModelConfig(
        model_type="qwen2", vocab_size=512, hidden_size=256, intermediate_size=768,
        num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=2, head_dim=32,
        rms_norm_eps=1e-6, rope_theta=10_000.0, max_position_embeddings=1024,
        tie_word_embeddings=True, attention_bias=True, qk_norm=False),
    "tiny-student": ModelConfig(
        model_type="qwen2", vocab_size=512, hidden_size=128, intermediate_size=384,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        rms_norm_eps=1e-6, rope_theta=10_000.0, max_position_embeddings=1024,
        tie_word_embeddings=True, attention_bias=True, qk_norm=False),
    # The benchmark shape of issue #2 (hidden 256, 4 layers, 4 heads / 2 KV, vocab 2048).
    "bench-tiny": ModelConfig(
        model_type="qwen2", vocab_size=2048, hidden_size=256, intermediate_size=704,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        rms_norm_eps=1e-6, rope_theta=10_000.0, max_position_embeddings=1024,
        tie_word_embeddings=True, attention_bias=True, qk_norm=False),
}
