"""top_eigh (linalg.eigen): every eigenvalue and the top-k eigenvectors, against float64 NumPy ``eigh``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from weightgeo.errors import WeightgeoError
from weightgeo.linalg import eigen
from weightgeo.linalg.eigen import TOP_EIGH_MAX_FRACTION, top_eigh


def near_diagonal(n: int, rel: float, seed: int) -> torch.Tensor:
    """The pair method's problem: a Gram's spectrum (descending) on the diagonal plus a symmetric perturbation."""
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((n + n // 4 + 1, n))
    lam = np.linalg.eigvalsh(A.T @ A)[::-1]
    E = rng.standard_normal((n, n)) * rel * lam[0]
    return torch.from_numpy(np.diag(lam) + (E + E.T) / 2)


def check_against_numpy(M: torch.Tensor, k: int, w: torch.Tensor, Q: torch.Tensor) -> None:
    ref_w, ref_V = np.linalg.eigh(M.numpy())
    ref_w, ref_V = ref_w[::-1], ref_V[:, ::-1]
    scale = abs(ref_w).max()
    np.testing.assert_allclose(w.numpy(), ref_w, rtol=0, atol=1e-13 * scale)
    assert Q.shape == (M.shape[0], k)
    np.testing.assert_allclose((Q.mT @ Q).numpy(), np.eye(k), rtol=0, atol=1e-14)
    residual = M.numpy() @ Q.numpy() - Q.numpy() * w[:k].numpy()
    assert np.abs(residual).max(initial=0.0) <= 1e-13 * scale
    if k and k < M.shape[0] and ref_w[k - 1] - ref_w[k] > 1e-6 * scale:  # the top-k subspace is well defined
        cos = np.linalg.svd(ref_V[:, :k].T @ Q.numpy(), compute_uv=False)
        assert 1 - cos.min() < 1e-12


@pytest.mark.parametrize("n,k", [(64, 8), (200, 25), (200, 80), (301, 1), (128, 0), (96, 60), (40, 40)])
@pytest.mark.parametrize("rel", [1e-6, 1e-2])
def test_matches_numpy(n, k, rel):
    M = near_diagonal(n, rel, seed=n + k)
    w, Q = top_eigh(M, k)
    check_against_numpy(M, k, w, Q)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 60), frac=st.floats(0.0, 1.0), seed=st.integers(0, 2**31 - 1), dense=st.booleans())
def test_property_any_symmetric_matrix(n, frac, seed, dense):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, n))
    M = torch.from_numpy((X + X.T) / 2 if dense else np.diag(rng.standard_normal(n)) + 1e-3 * (X + X.T))
    k = int(round(frac * n))
    w, Q = top_eigh(M, k)
    check_against_numpy(M, k, w, Q)


def test_tridiagonal_route_is_taken_below_the_fraction(monkeypatch):
    """On a CPU, k ≤ TOP_EIGH_MAX_FRACTION·n never calls a full eigh (the point of the route); above it, it does."""
    calls = []
    real = torch.linalg.eigh

    def counting(*a, **kw):
        calls.append(a[0].shape)
        return real(*a, **kw)

    monkeypatch.setattr(torch.linalg, "eigh", counting)
    M = near_diagonal(100, 1e-3, seed=1)
    top_eigh(M, int(TOP_EIGH_MAX_FRACTION * 100))
    assert calls == []
    top_eigh(M, int(TOP_EIGH_MAX_FRACTION * 100) + 1)
    assert calls == [M.shape]


def test_diagonal_with_ties_keeps_the_basis():
    """A (block) diagonal matrix keeps e_1..e_k, ties at the k-th value included: W0 = W1 gives zero angles."""
    for d in ([1.0] * 10, [3.0, 2, 2, 2, 2, 1, 1, 1, 1, 1], [5.0, 4, 4, 1, 1, 1, 1, 1, 1, 0]):
        M = torch.diag(torch.tensor(d, dtype=torch.float64))
        for k in range(0, 5):
            w, Q = top_eigh(M, k)
            assert torch.equal(w, torch.tensor(sorted(d, reverse=True), dtype=torch.float64))
            assert torch.equal(Q.abs(), torch.eye(10, dtype=torch.float64)[:, :k]), (d, k)


def test_batched_equals_each_member_alone():
    Ms = torch.stack([near_diagonal(80, rel, seed=s) for s, rel in enumerate((1e-6, 1e-3, 1e-1))])
    w, Q = top_eigh(Ms.reshape(3, 1, 80, 80), 10)
    assert w.shape == (3, 1, 80) and Q.shape == (3, 1, 80, 10)
    for i in range(3):
        wi, Qi = top_eigh(Ms[i], 10)
        assert torch.equal(w[i, 0], wi) and torch.equal(Q[i, 0], Qi)


def test_bad_k():
    with pytest.raises(WeightgeoError, match="k = 5"):
        top_eigh(torch.eye(4, dtype=torch.float64), 5)


def test_lapack_in_the_policy_fingerprint(monkeypatch):
    """Another SciPy or LAPACK may round the CPU route differently: the result caches' policy key changes with it."""
    from weightgeo.linalg import hardware

    fp = eigen.lapack_fingerprint()
    assert fp["scipy"] and fp["lapack"]
    before = hardware.policy_fingerprint("cpu")
    monkeypatch.setattr(hardware, "lapack_fingerprint", lambda: {"scipy": "0.0", "lapack": "another"})
    hardware._fingerprint.cache_clear()
    try:
        assert hardware.policy_fingerprint("cpu") != before
    finally:
        monkeypatch.undo()
        hardware._fingerprint.cache_clear()
    assert hardware.policy_fingerprint("cpu") == before


def test_lapack_threads_follow_the_block_and_restore():
    """Inside the block SciPy's OpenBLAS runs with the given threads in this thread; after it, with what it had."""
    setters = eigen._openblas_local_setters()
    if not setters:
        pytest.skip("no OpenBLAS with thread-local thread counts in this process (OpenBLAS < 0.3.27, or not Linux)")
    before = [set_local(3) for set_local in setters]
    try:
        with eigen.lapack_threads(1):
            inside = [set_local(1) for set_local in setters]
        after = [set_local(3) for set_local in setters]
    finally:
        for set_local, old in zip(setters, before):
            set_local(old)
    assert inside == [1] * len(setters) and after == [3] * len(setters)


def test_lapack_threads_hold_while_any_thread_is_inside():
    """OpenBLAS's thread count is one setting of the process: a lane leaving its block must not restore it while the
    other lane's LAPACK call runs (its reduction then ran with the machine's threads and rounded differently)."""
    import threading

    setters = eigen._openblas_local_setters()
    if not setters:
        pytest.skip("no OpenBLAS with thread-local thread counts in this process (OpenBLAS < 0.3.27, or not Linux)")
    before = [set_local(3) for set_local in setters]
    entered, first_left, seen = threading.Event(), threading.Event(), []

    def second_lane() -> None:
        with eigen.lapack_threads(1):
            entered.set()
            first_left.wait(10)
            seen.extend(set_local(1) for set_local in setters)  # each returns the count in force

    try:
        lane = threading.Thread(target=second_lane)
        with eigen.lapack_threads(1):
            lane.start()
            assert entered.wait(10)
        first_left.set()
        lane.join(10)
        after = [set_local(3) for set_local in setters]
    finally:
        for set_local, old in zip(setters, before):
            set_local(old)
    assert seen == [1] * len(setters) and after == [3] * len(setters)
    with pytest.raises(RuntimeError, match="inside another"):
        with eigen.lapack_threads(1), eigen.lapack_threads(2):
            pass


@pytest.mark.parametrize("lapack", ["torch", "scipy"])
def test_full_eigh_either_lapack_matches_numpy(lapack):
    Ms = torch.stack(
        [near_diagonal(90, 1e-3, seed=3), torch.from_numpy(np.cov(np.random.default_rng(5).random((90, 200))))]
    )
    w, V = eigen.eigh(Ms, lapack=lapack)
    for i in range(2):
        ref = np.linalg.eigvalsh(Ms[i].numpy())
        scale = abs(ref).max()
        np.testing.assert_allclose(w[i].numpy(), ref, rtol=0, atol=1e-13 * scale)
        np.testing.assert_allclose((V[i].mT @ V[i]).numpy(), np.eye(90), rtol=0, atol=1e-13)
        assert float((Ms[i] @ V[i] - V[i] * w[i]).abs().max()) <= 1e-13 * scale
    cm = Ms[0].mT.contiguous().mT  # column-major: the routine's argument must be a copy, not a view of it
    before = cm.clone()
    torch.testing.assert_close(eigen.eigh(cm, lapack=lapack)[0], w[0], rtol=0, atol=1e-12 * float(w[0].abs().max()))
    assert torch.equal(cm, before)
    with pytest.raises(WeightgeoError, match="lapack="):
        eigen.eigh(Ms, lapack="mkl")


def test_eigh_lapack_policy(monkeypatch):
    from weightgeo.linalg import hardware

    amd = hardware.hardware("cpu").name.upper().startswith("AMD")
    assert hardware.eigh_lapack("cpu") == ("scipy" if amd and hardware.tridiagonal_route("cpu") else "torch")
    monkeypatch.setattr(hardware, "EIGH_LAPACK", "torch")
    torch_route = hardware.policy_fingerprint("cpu")
    monkeypatch.setattr(hardware, "EIGH_LAPACK", "scipy")
    assert hardware.policy_fingerprint("cpu") != torch_route  # another route may round differently


def test_routes_follow_the_policy_flags(monkeypatch):
    """``tridiagonal=False`` (the policy on many-core machines and CUDA) and ``lapack="torch"`` are torch's full eigh,
    whatever the thread count; the policy's flags are machine facts, not the calling thread's."""
    from weightgeo.linalg import hardware

    calls = []
    real = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    M = near_diagonal(60, 1e-3, seed=2)
    top_eigh(M, 6)
    eigen.eigh(M, lapack="scipy")
    assert calls == []
    top_eigh(M, 6, tridiagonal=False)
    eigen.eigh(M, lapack="torch")
    assert calls == [1, 1]
    before = torch.get_num_threads()
    try:
        route = hardware.tridiagonal_route("cpu")
        torch.set_num_threads(1 if before > 1 else 2)
        assert hardware.tridiagonal_route("cpu") == route
    finally:
        torch.set_num_threads(before)
    monkeypatch.setattr(hardware, "SCIPY_LAPACK_MAX_CORES", 0)
    assert not hardware.tridiagonal_route("cpu") and hardware.eigh_lapack("cpu") == "torch"
    assert not hardware.tridiagonal_route("meta")


def test_results_do_not_depend_on_the_thread_count():
    """SciPy's LAPACK runs one thread per call: the same bits with 1 or 2 torch threads (live equals offline)."""
    M = near_diagonal(300, 1e-3, seed=4)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = top_eigh(M, 30), eigen.eigh(M, lapack="scipy")
        torch.set_num_threads(2)
        two = top_eigh(M, 30), eigen.eigh(M, lapack="scipy")
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, two):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("shape", [(1,), (3,), (2, 2), (0,)])
def test_scipy_eigvalsh_matches_torch_and_numpy(shape, gen):
    """SciPy's values-only route (dsytrd + dsterf) gives torch's eigenvalues to rounding, batched, and reads (without
    changing) the lower triangle of a row-major or a column-major input."""
    n = 90
    A = torch.randn(*shape, n + 7, n, generator=gen, dtype=torch.float64)
    M = A.mT @ A + torch.diag(torch.linspace(0, 3, n, dtype=torch.float64))
    for X in (M, M.mT.contiguous().mT):  # row-major, and the same values column-major
        before = X.clone()
        w = eigen.eigvalsh(X, lapack="scipy")
        assert torch.equal(X, before)  # dsytrd overwrites its argument: a copy
        assert w.shape == (*shape, n) and bool((w[..., 1:] >= w[..., :-1]).all())
        scale = float(M.abs().max()) if M.numel() else 1.0
        torch.testing.assert_close(w, torch.linalg.eigvalsh(M), rtol=0, atol=1e-13 * scale)
        if M.numel():
            ref = np.linalg.eigvalsh(M.reshape(-1, n, n).numpy()).reshape(w.shape)
            assert np.abs(w.numpy() - ref).max() <= 1e-13 * scale
    U = M.tril() + 7.0 * torch.ones_like(M).triu(1)  # what lies above the diagonal is ignored, as torch ignores it
    torch.testing.assert_close(eigen.eigvalsh(U, lapack="scipy"), torch.linalg.eigvalsh(U), rtol=0, atol=1e-12 * scale)
    with pytest.raises(WeightgeoError, match="lapack="):
        eigen.eigvalsh(M, lapack="openblas")


def test_eigvalsh_lapack_policy(monkeypatch):
    """SciPy's eigvalsh where the policy takes SciPy's eigh and the side is at most EIGVALSH_SCIPY_MAX_N; torch's
    elsewhere (above it MKL's reduction is the faster one, BENCHMARKS.md); the callers follow it."""
    from weightgeo.linalg import hardware, pairwise, svd

    big = hardware.EIGVALSH_SCIPY_MAX_N
    monkeypatch.setattr(hardware, "EIGH_LAPACK", "scipy")
    assert hardware.eigvalsh_lapack(big, "cpu") == "scipy" and hardware.eigvalsh_lapack(big + 1, "cpu") == "torch"
    monkeypatch.setattr(hardware, "EIGH_LAPACK", "torch")
    assert hardware.eigvalsh_lapack(8, "cpu") == "torch"
    monkeypatch.setattr(hardware, "EIGH_LAPACK", "scipy")
    routes = []
    real = eigen.eigvalsh
    monkeypatch.setattr(svd, "eigvalsh", lambda M, *, lapack: routes.append(lapack) or real(M, lapack=lapack))
    g = torch.Generator().manual_seed(5)
    W0 = torch.randn(40, 30, generator=g)
    pairwise.pair_geometry(W0, W0 + 1e-3 * torch.randn(40, 30, generator=g), k=4, sides=("right", "left"))
    assert routes and set(routes) == {"scipy"}  # the angles' small problems (svd.symmetric_eigenvalues)
