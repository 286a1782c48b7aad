import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """These tests use small matrices: one intra-op thread is faster, and immune to a shared, busy CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
