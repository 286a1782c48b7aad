"""resolve_device: one rule for every entry point, checked before any work (also without a GPU, by faking one)."""

import pytest
import torch

from weightgeo import WeightgeoError
from weightgeo.devices import resolve_device


def test_none_is_cpu_and_bad_names_are_errors():
    assert resolve_device(None) == torch.device("cpu")
    with pytest.raises(WeightgeoError, match="not a torch device"):
        resolve_device("gpu0")


def test_cuda_index_beyond_the_machine_is_an_error(monkeypatch):
    """On a 1-GPU machine ``cuda:7`` is refused up front (it used to pass and fail later with a raw CUDA
    error from the group budget's ``mem_get_info``)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda") == torch.device("cuda")
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(WeightgeoError, match=r"1 CUDA device\(s\), cuda:0 to cuda:0"):
        resolve_device("cuda:7")


def test_cuda_without_cuda_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(WeightgeoError, match="CUDA is not available"):
        resolve_device("cuda")


def test_kernels_create_nothing_on_the_default_device():
    """The CUDA paths cannot run here, but their commonest bug can be caught: a tensor made without
    ``device=`` lands on the default device (CPU) beside CUDA operands. With the default device set to
    ``meta``, any such tensor meeting the CPU inputs below raises; rank-deficient inputs take the
    Householder fallback of the randomized SVD and the LAPACK refinement of the pair kernel."""
    from weightgeo.linalg.rsvd import randomized_svd_with_info
    from weightgeo.metrics.pair import PAIR_METRICS, batched_pair_metrics
    from weightgeo.metrics.trajectory import update_spectra

    g = torch.Generator().manual_seed(0)
    W0 = torch.randn(2, 96, 40, generator=g).bfloat16()
    W1 = (W0.float() + 1e-2 * torch.randn(2, 96, 40, generator=g)).bfloat16()
    low = torch.randn(2, 96, 6, generator=g) @ torch.randn(6, 80, generator=g)  # rank 6 < the sketch
    with torch.device("meta"):
        rows = batched_pair_metrics(
            W0, W1, metrics=frozenset(PAIR_METRICS), k=8, side="right", rank=4, alpha=0.5, eta=1e-3, angles=True
        )
        rows += batched_pair_metrics(
            low,
            low + 1e-3,
            metrics=frozenset(PAIR_METRICS),
            k=8,
            side="right",
            rank=4,
            alpha=0.5,
            eta=1e-3,
            angles=True,
        )
        r = randomized_svd_with_info(low, 12, seed=0)
        spectra = update_spectra(low, r=10, k=4)
    assert len(rows) == 4 and all(0 <= row["k_effective"] <= 8 for row in rows)
    assert r.U.device.type == "cpu" and r.method == "randomized"
    assert all(s.S.device.type == "cpu" for s in spectra)
