import os

# Tests never touch the network: huggingface_hub reads this at import time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch


@pytest.fixture
def gen() -> torch.Generator:
    """A seeded generator; tests never touch the global RNG."""
    return torch.Generator().manual_seed(0)
