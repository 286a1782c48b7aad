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

import sys
from pathlib import Path

# tests/factories.py (checkpoint builders) is importable as `factories` from every test folder.
sys.path.insert(0, str(Path(__file__).parent))
