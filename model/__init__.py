"""Hand-written Qwen2/Qwen3 decoder, KV cache, generation, tokenizer and HF checkpoint I/O."""
from model.checkpoint import load_pretrained, save_pretrained
from model.config import PRESETS, ModelConfig
from model.generate import Completion, SamplingParams, generate
from model.tokenizer import Tokenizer, load_tokenizer
from model.transformer import KVCache, Transformer

__all__ = ["ModelConfig", "PRESETS", "Transformer", "KVCache", "load_pretrained", "save_pretrained",
           "SamplingParams", "Completion", "generate", "Tokenizer", "load_tokenizer"]
