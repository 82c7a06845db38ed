"""Shared test helpers: the real benchmark files live in ../shared/data beside the checkout."""
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from data.synthetic import corpus_texts, make_splits, write_jsonl
from model.tokenizer import train_tokenizer

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_data(relative: str) -> Path:
    """Path to a real benchmark file, or skip the test with the reason when ../shared is absent."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"real benchmark file {path} not found (../shared/data is absent in a fresh clone)")
    return path


@pytest.fixture
def one_thread():
    """Run a test on one torch thread: the tiny end-to-end runs are faster without thread contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def synthetic_workspace(root: Path, n_train: int, n_test: int, vocab_size: int = 400):
    """root/train.jsonl and root/eval.jsonl of the synthetic task (seed 0), and a tokenizer trained on
    the train rows in root/tok (returned): what the end-to-end train.py tests run on."""
    splits = make_splits(seed=0, n_train=n_train, n_test=n_test, n_harder=1)
    write_jsonl(root / "train.jsonl", splits["train"])
    write_jsonl(root / "eval.jsonl", splits["test"])
    return train_tokenizer(corpus_texts(splits["train"]), root / "tok", vocab_size)


class WidestVocabTensor(TorchDispatchMode):
    """Records the most rows of any tensor an op returns (forward or backward) with the vocabulary as its
    last dimension: a [rows, V] block of logits, probabilities or their gradients."""

    def __init__(self, vocab_size):
        super().__init__()
        self.vocab_size, self.rows = vocab_size, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.dim() and t.shape[-1] == self.vocab_size:
                self.rows = max(self.rows, t.numel() // self.vocab_size)
        return out
