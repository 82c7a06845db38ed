"""Small models, batches and stages shared by the tests of trainer/ modules."""
from __future__ import annotations

from dataclasses import replace

import torch

from data.readers import load_gsm8k, load_humaneval
from data.synthetic import corpus_texts, write_splits
from model.checkpoint import save_pretrained
from model.config import PRESETS
from model.tokenizer import train_tokenizer
from model.transformer import Transformer
from trainer.batches import collate
from trainer.config import TrainConfig
from trainer.distributed import Dist
from trainer.supervised import SupervisedStage

CPU = Dist(rank=0, world_size=1, device=torch.device("cpu"))


class VocabOnly:
    """The one tokenizer attribute a loss reads."""
    vocab_size = 37


def tiny(vocab: int = 37, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(replace(PRESETS["tiny-student"], vocab_size=vocab, hidden_size=32, intermediate_size=48,
                               num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16))


def random_batch(lengths: list[int], vocab: int = 37, prompt: int = 3, seed: int = 0) -> dict:
    """Right-padded rows of the given lengths, loss on everything after the first `prompt` tokens."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for n in lengths:
        ids = torch.randint(0, vocab, (n,), generator=g).tolist()
        examples.append((ids, [-100] * prompt + ids[prompt:]))
    return collate(examples, pad_id=0, device="cpu")


def stage_for(cfg: TrainConfig, teacher=None) -> SupervisedStage:
    """A stage over placeholder examples (enough for one global batch), for its loss and forward_backward."""
    return SupervisedStage(cfg, CPU, VocabOnly(), teacher, [([0], [0])] * cfg.data.micro_batch_size, [])


def tiny_checkpoint(root):
    """A random tiny-student checkpoint with a tokenizer trained on the synthetic task, saved in root/model:
    (model, tokenizer, data split paths, model directory)."""
    paths = write_splits(root / "data", seed=0, n_train=200, n_test=4, n_harder=1, n_code=2)
    texts = corpus_texts(load_gsm8k(paths["train"]), load_humaneval(paths["code"]))
    tokenizer = train_tokenizer(texts, root / "model", vocab_size=512)
    torch.manual_seed(0)
    model = Transformer(PRESETS["tiny-student"])
    save_pretrained(model, root / "model")
    return model, tokenizer, paths, root / "model"
