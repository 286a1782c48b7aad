"""The float64 symmetric eigenproblems: the pair method's (every eigenvalue, the eigenvectors of the top k only) and
the full ``eigh`` by the LAPACK the policy picks for the CPU.

The pair method (:mod:`.pairwise`) needs all of W1's Gram eigenvalues in W0's basis (the spectral drift) but only
the top-k eigenvectors (the angles at k, an eighth of the side by default). A full ``eigh`` reduces the matrix to
tridiagonal form (≈ 4/3·n³ flops), finds every eigenvector of the tridiagonal (divide and conquer) and
back-transforms all n of them (2n³): two thirds of its time is for vectors the angles never read. On a CPU
(where the policy allows it: :func:`weightgeo.linalg.hardware.tridiagonal_route`), :func:`top_eigh` takes LAPACK's
tridiagonal route instead, as ``dsyevr`` does for a range of eigenvectors but with
every eigenvalue kept:

1. ``dsytrd``: ``M = Q T Qᵀ`` (T tridiagonal, Q as Householder reflectors), once;
2. ``dsterf``: every eigenvalue of T (root-free QL/QR, O(n²));
3. ``dstemr`` (MRRR): the k eigenvectors of T for the top k, O(n·k);
4. the reflectors applied to those k vectors (``ormqr``, 2n²k), then one Cholesky QR of the n×k block, which
   makes its columns orthonormal to float64 rounding (MRRR leaves ~1e-13) without moving their span.

Measured on one core of a 2-core AMD EPYC (AVX2; BENCHMARKS.md, "Second stop on issue 22",
``benchmarks/bench_top_eigh.py``): n = 4096, k = 512 in 7.6 s against 17.9 s for torch's ``eigh``; eigenvalues
within 1.6e-14·λ_max of it, the top-k subspace within 1.2e-15 (1 − cos of the largest angle). SciPy's LAPACK runs one thread per call (:func:`lapack_threads`): its results
then do not depend on the thread count (OpenBLAS's reduction rounds differently with two threads than with one),
and no second thread pool spins beside torch's (with two, one 2-thread lane took 88.0 s for the 0.5B pair against
72.2 s). Elsewhere (CUDA; many-core CPUs, where torch's LAPACK has threads to use) and for k above
:data:`TOP_EIGH_MAX_FRACTION` of n, it is a full :func:`eigh`.

The order is the pair method's: the problem is solved for −M, so where M is (nearly) diagonal the top-k vectors
are (nearly) e_1..e_k even inside clusters of equal values (a tie at the k-th value goes to the lower index, as
``eigh(−M)`` has it), and W0 = W1 gives zero angles.

>>> w, Q = top_eigh(torch.diag(torch.tensor([1.0, 3.0, 2.0], dtype=torch.float64)), 1)
>>> w, Q.flatten()
(tensor([3., 2., 1.], dtype=torch.float64), tensor([0., 1., 0.], dtype=torch.float64))
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import sys
import threading
from collections.abc import Callable, Iterator

import numpy as np
import torch

from ..errors import WeightgeoError
from .lapack import dstemr, dsterf, dsyevd, dsytrd

__all__ = ["eigh", "eigvalsh", "top_eigh", "lapack_threads", "lapack_fingerprint", "TOP_EIGH_MAX_FRACTION"]

#: The tridiagonal route is taken for k ≤ this fraction of n. Its vectors cost 2n²k against full ``eigh``'s ~2n³,
#: but its reduction is LAPACK's one-stage ``dsytrd``: on a 2-core AMD EPYC (AVX2), one thread, it took 0.53× torch's
#: ``eigh`` time at k/n = 1/8 and n = 896 (0.40× at 2048, 0.42× at 4096) and 0.96× at 0.4 (n = 896; 0.72× at
#: 2048; bench_top_eigh.py), and 1.18× at 0.5 (n = 896). Above it, ``eigh``.
TOP_EIGH_MAX_FRACTION = 0.4


def eigh(M: torch.Tensor, *, lapack: str = "torch") -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.eigh(M)`` (ascending values, vectors as columns), by SciPy's LAPACK (``dsyevd``) when
    ``lapack="scipy"`` and ``M`` is float64 on a CPU (one thread); the policy picks the library per CPU kind
    (:func:`weightgeo.linalg.hardware.eigh_lapack`).

    >>> w, V = eigh(torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64), lapack="scipy")
    >>> w
    tensor([1., 3.], dtype=torch.float64)

    Args:
        M: [..., n, n] symmetric (its lower triangle is read, as by ``torch.linalg.eigh``).
        lapack: ``"torch"`` (the LAPACK torch was built with: MKL in the pip wheels) or ``"scipy"``.

    Returns:
        ``(w, V)``: [..., n] ascending and [..., n, n], as ``torch.linalg.eigh``.
    """
    if not _scipy_takes(M, lapack, "eigh"):
        return torch.linalg.eigh(M)
    n = M.shape[-1]
    flat = M.reshape(-1, n, n)
    w = torch.empty(flat.shape[0], n, dtype=torch.float64, device=M.device)
    V = torch.empty(flat.shape[0], n, n, dtype=torch.float64, device=M.device)
    with lapack_threads(1):
        for i in range(flat.shape[0]):
            wi, Vi = dsyevd(_fortran_copy(flat[i]))  # overwritten by its eigenvectors
            w[i], V[i] = torch.from_numpy(wi), torch.from_numpy(Vi)
    return w.reshape(M.shape[:-1]), V.reshape(M.shape)


def eigvalsh(M: torch.Tensor, *, lapack: str = "torch") -> torch.Tensor:
    """``torch.linalg.eigvalsh(M)`` (ascending), by SciPy's LAPACK (``dsytrd`` + ``dsterf``, one thread, as NumPy's
    values-only ``dsyevd`` runs them) when ``lapack="scipy"`` and ``M`` is float64 on a CPU; the policy picks the
    library per CPU kind and size (:func:`weightgeo.linalg.hardware.eigvalsh_lapack`).

    >>> eigvalsh(torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64), lapack="scipy")
    tensor([1., 3.], dtype=torch.float64)

    Args:
        M: [..., n, n] symmetric (its lower triangle is read, as by ``torch.linalg.eigvalsh``).
        lapack: ``"torch"`` (the LAPACK torch was built with: MKL in the pip wheels) or ``"scipy"``.

    Returns:
        [..., n] float64 (the input's dtype for ``"torch"``), ascending.
    """
    if not _scipy_takes(M, lapack, "eigvalsh"):
        return torch.linalg.eigvalsh(M)
    n = M.shape[-1]
    flat = M.reshape(-1, n, n)
    w = torch.empty(flat.shape[0], n, dtype=torch.float64, device=M.device)
    with lapack_threads(1):
        for i in range(flat.shape[0]):
            d, e, _, _ = dsytrd(_fortran_copy(flat[i]))
            w[i] = torch.from_numpy(dsterf(d, e))
    return w.reshape(M.shape[:-1])


def _scipy_takes(M: torch.Tensor, lapack: str, fn: str) -> bool:
    """Whether ``lapack`` is SciPy's and ``M`` a float64 CPU problem it solves (else torch's does)."""
    if lapack not in ("torch", "scipy"):
        raise WeightgeoError(f"{fn}: lapack={lapack!r}; give 'torch' or 'scipy'")
    return lapack == "scipy" and M.device.type == "cpu" and M.dtype == torch.float64 and M.shape[-1] >= 2


def _fortran_copy(M: torch.Tensor) -> np.ndarray:
    """A column-major copy of the [n, n] ``M`` for a LAPACK routine that overwrites it (its lower triangle read, as
    torch reads it), whatever the layout of ``M`` (a view of the caller's tensor is never handed over)."""
    return np.array(M.numpy(), order="F", copy=True)


def top_eigh(
    M: torch.Tensor, k: int, *, lapack: str = "torch", tridiagonal: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """All eigenvalues of the symmetric float64 ``M`` and the eigenvectors of its ``k`` largest.

    >>> w, Q = top_eigh(torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64), 1)
    >>> w, Q.abs()
    (tensor([3., 1.], dtype=torch.float64), tensor([[0.7071],
            [0.7071]], dtype=torch.float64))

    Args:
        M: [..., n, n] float64, exactly symmetric.
        k: how many eigenvectors, 0 ≤ k ≤ n.
        lapack: the library of the full ``eigh`` where that is the route (:func:`eigh`).
        tridiagonal: whether the CPU route may be taken (the policy: :func:`weightgeo.linalg.hardware.tridiagonal_route`).

    Returns:
        ``(w, Q)``: eigenvalues [..., n] float64, descending, and eigenvectors [..., n, k] float64 (columns, in the
        order of ``w[..., :k]``, orthonormal). Method and cost: module docstring.
    """
    n = M.shape[-1]
    if not 0 <= k <= n:
        raise WeightgeoError(f"top_eigh: k = {k} outside [0, {n}] for a {n}x{n} matrix; ask for at most {n} vectors")
    cpu64 = M.device.type == "cpu" and M.dtype == torch.float64
    if not (tridiagonal and cpu64) or k > TOP_EIGH_MAX_FRACTION * n or n < 2:
        mu, Q = eigh(-M, lapack=lapack)
        return -mu, Q[..., :k]
    lead = M.shape[:-2]
    flat = M.reshape(-1, n, n)
    w = torch.empty(flat.shape[0], n, dtype=torch.float64, device=M.device)
    Q = torch.empty(flat.shape[0], n, k, dtype=torch.float64, device=M.device)
    for i in range(flat.shape[0]):  # LAPACK is unbatched; each member is what it would be alone
        w[i], Q[i] = _top_eigh_one(flat[i], k)
    return w.reshape(*lead, n), Q.reshape(*lead, n, k)


def _top_eigh_one(M: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`top_eigh` of one [n, n] float64 CPU matrix by the tridiagonal route (``0 ≤ k < n``), in one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the back-transform's torch calls too: the same bits whatever the caller's threads
    try:
        with lapack_threads(1):
            return _tridiagonal_route(M, k)
    finally:
        torch.set_num_threads(before)


def _tridiagonal_route(M: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = M.shape[-1]
    # −M in column-major order (its lower triangle is read): the row-major (−M)ᵀ read column-major is −M
    d, e, tau, refl = dsytrd((-M).mT.contiguous().numpy().T)
    w = -torch.from_numpy(dsterf(d, e))  # every eigenvalue of −M, ascending: M's, descending
    if k == 0:
        return w, torch.empty(n, 0, dtype=torch.float64, device=M.device)
    _, Z = dstemr(d, e, 1, k)  # the k lowest of −M: M's top k
    Zt = torch.from_numpy(np.ascontiguousarray(Z))
    # Q = H(1)···H(n−1): H(i)'s vector has its 1 in row i+1 and the rest below it in column i of `refl`, a QR
    # factor's layout for rows 2..n (what LAPACK's dormtr does for a lower reduction)
    R = torch.from_numpy(refl)
    Zt[1:] = torch.ormqr(R[1:, : n - 1], torch.from_numpy(tau), Zt[1:], left=True, transpose=False)
    # Cholesky QR: orthonormal columns, the same span (ZᵀZ = I + O(1e-13), so the factor is near I and stable)
    L = torch.linalg.cholesky(Zt.mT @ Zt)
    Q = torch.linalg.solve_triangular(L, Zt.mT, upper=False).mT
    return w, Q


@contextlib.contextmanager
def lapack_threads(n: int) -> Iterator[None]:
    """Run SciPy's LAPACK with ``n`` threads while the block runs (the routes of this module use 1: their results then
    do not depend on the machine's or the caller's thread count, and no OpenBLAS thread pool spins beside torch's).

    Through OpenBLAS's ``openblas_set_num_threads_local`` (OpenBLAS ≥ 0.3.27, SciPy's wheels on Linux), which despite
    its name sets the count of the whole process in these builds. So the blocks of all threads share one setting: the
    first block to enter sets ``n`` and the last to leave restores what was there before. (Each lane restoring its own
    saved count, a lane's block ended while the other lane's LAPACK call ran and set it back to the machine's count
    there: a second thread's reduction then rounded differently, in 2–4 of 12 concurrent calls.) Blocks that overlap
    must ask for the same ``n``. Where there is no such function it changes nothing (that LAPACK keeps its own
    default).

    >>> with lapack_threads(1):
    ...     pass
    """
    global _users, _saved
    setters = _openblas_local_setters()
    with _users_lock:
        if _users == 0:
            _saved = (n, [set_local(n) for set_local in setters])
        elif _saved[0] != n:
            raise RuntimeError(f"lapack_threads({n}) inside another thread's lapack_threads({_saved[0]})")
        _users += 1
    try:
        yield
    finally:
        with _users_lock:
            _users -= 1
            if _users == 0:
                for set_local, old in zip(setters, _saved[1]):
                    set_local(old)


#: the blocks of :func:`lapack_threads` open in any thread, and (their count, what the setters returned) of the first
_users_lock = threading.Lock()
_users = 0
_saved: tuple[int, list[int]] = (0, [])


@functools.cache
def _openblas_local_setters() -> tuple[Callable[[int], int], ...]:
    """``openblas_set_num_threads_local`` of every OpenBLAS this process has loaded once SciPy's LAPACK is (it returns
    the previous count), found through the process's memory map; ``()`` where there is no such map or function."""
    import scipy.linalg.cython_lapack  # noqa: F401  (loads SciPy's LAPACK and BLAS)

    if not sys.platform.startswith("linux"):
        return ()
    try:
        with open("/proc/self/maps") as fh:
            paths = sorted({ln.split()[-1] for ln in fh if "openblas" in ln.split()[-1].rsplit("/", 1)[-1].lower()})
    except (OSError, IndexError):
        return ()
    setters = []
    for path in paths:
        try:
            fn = ctypes.CDLL(path).openblas_set_num_threads_local
        except (OSError, AttributeError):  # not loadable again, or an OpenBLAS before 0.3.27
            continue
        fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
        setters.append(fn)
    return tuple(setters)


def lapack_fingerprint() -> dict[str, str]:
    """The LAPACK that :func:`top_eigh` and :func:`eigh` run on a CPU (SciPy's), for the numerical policy's fingerprint.

    >>> sorted(lapack_fingerprint())
    ['lapack', 'scipy']
    """
    import scipy

    try:
        info = scipy.show_config(mode="dicts")
        lib = info["Build Dependencies"]["lapack"]
        name = f"{lib.get('name', '?')} {lib.get('version', '?')}"
    except Exception:  # the build report is informational; its layout is not a contract
        name = "unknown"
    return {"scipy": scipy.__version__, "lapack": name}
