"""Shared test helpers: the real benchmark files live in ../shared/data beside the checkout."""
from pathlib import Path

import pytest
import torch

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
