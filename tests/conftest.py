import atexit
import os
import shutil
import tempfile

# Tests never touch the network: huggingface_hub reads this at import time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The result cache is on by default (docs/caching.md): tests, their doctests and the subprocesses they start
# use one fresh folder per session, never the user's ~/.cache/weightgeo (nor a WEIGHTGEO_CACHE they set).
_CACHE = tempfile.mkdtemp(prefix="weightgeo-test-cache-")
os.environ["WEIGHTGEO_CACHE"] = _CACHE
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)

import numpy as np
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


@pytest.fixture(autouse=True)
def _global_rng_untouched(request):
    """Tests, and the code they run, use explicit generators: torch's and NumPy's global RNG states must be
    the same after every test as before it. Exempt (the states are restored instead of checked): tests marked
    ``global_rng`` (third-party code, e.g. transformers' Trainer, seeds and draws from it)."""
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()
    yield
    exempt = request.node.get_closest_marker("global_rng") is not None
    after = np.random.get_state()
    same_np = np_state[0] == after[0] and bool((np_state[1] == after[1]).all()) and np_state[2:] == after[2:]
    same_torch = torch.equal(torch_state, torch.get_rng_state())
    if exempt:
        torch.set_rng_state(torch_state)
        np.random.set_state(np_state)
        return
    assert same_torch, f"{request.node.nodeid} used torch's global RNG; pass a torch.Generator"
    assert same_np, f"{request.node.nodeid} used NumPy's global RNG; use np.random.default_rng(seed)"


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Every test that skips without CUDA carries the ``cuda`` marker (written on it, or added here from its
    ``skipif`` reason), so that ``pytest -m cuda`` (what benchmarks/gpu_suite.py runs on a GPU) selects them all.
    Runs before ``-m`` deselects."""
    for item in items:
        if item.get_closest_marker("cuda") is None and any(
            "cuda" in str(m.kwargs.get("reason", "")).lower() for m in item.iter_markers("skipif")
        ):
            item.add_marker(pytest.mark.cuda)
