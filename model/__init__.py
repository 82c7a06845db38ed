"""Hand-written Qwen2/Qwen3 decoder, KV cache, generation and HF checkpoint I/O."""
from model.config import PRESETS, ModelConfig
from model.transformer import KVCache, Transformer

__all__ = ["ModelConfig", "PRESETS", "Transformer", "KVCache"]
