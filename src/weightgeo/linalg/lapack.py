"""SciPy's LAPACK, called without holding the GIL: the four float64 routines of :mod:`.eigen`.

``scipy.linalg.lapack``'s wrappers hold the GIL for the whole call (measured: a 1500² ``dsyevd`` let another
Python thread run 5 times in 0.8 s). For seconds-long calls that stalls everything else in the process: the other
lane of :class:`~weightgeo.linalg.hardware.Lanes` cannot start its next step, and the Ctrl-C watchdog
(:mod:`weightgeo.interrupts`) cannot end the process within its 2 s. So the routines are called through the
function pointers SciPy exports for Cython (``scipy.linalg.cython_lapack``, a public interface) by ``ctypes``,
which releases the GIL around a foreign call. Arguments follow LAPACK's (Fortran, by reference, column-major,
32-bit integers as SciPy's LAPACK is built); workspace sizes come from LAPACK's own query (``lwork = -1``).

>>> import numpy as np
>>> d, e, tau, A = dsytrd(np.asfortranarray([[2.0, 1.0], [1.0, 2.0]]))
>>> dsterf(d, e)
array([1., 3.])
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any

import numpy as np

__all__ = ["dsytrd", "dsterf", "dstemr", "dsyevd"]

_int = ctypes.POINTER(ctypes.c_int)
_dbl = ctypes.POINTER(ctypes.c_double)
_chr = ctypes.c_char_p

#: each routine's argument types, in LAPACK's order
_SIGNATURES: dict[str, list[Any]] = {
    # uplo, n, a, lda, d, e, tau, work, lwork, info
    "dsytrd": [_chr, _int, _dbl, _int, _dbl, _dbl, _dbl, _dbl, _int, _int],
    # n, d, e, info
    "dsterf": [_int, _dbl, _dbl, _int],
    # jobz, range, n, d, e, vl, vu, il, iu, m, w, z, ldz, nzc, isuppz, tryrac, work, lwork, iwork, liwork, info
    "dstemr": [_chr, _chr, _int, _dbl, _dbl, _dbl, _dbl, _int, _int, _int, _dbl, _dbl, _int, _int, _int, _int, _dbl]
    + [_int, _int, _int, _int],
    # jobz, uplo, n, a, lda, w, work, lwork, iwork, liwork, info
    "dsyevd": [_chr, _chr, _int, _dbl, _int, _dbl, _dbl, _int, _int, _int, _int],
}


@functools.cache
def _routine(name: str) -> Any:
    """The ctypes function of SciPy's ``name`` (GIL released while it runs)."""
    from scipy.linalg import cython_lapack

    capsule = cython_lapack.__pyx_capi__[name]
    get_name = ctypes.pythonapi.PyCapsule_GetName
    get_name.restype, get_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
    get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
    get_pointer.restype, get_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    pointer = get_pointer(capsule, get_name(capsule))
    return ctypes.CFUNCTYPE(None, *_SIGNATURES[name])(pointer)


def _i(value: int) -> ctypes.c_int:
    return ctypes.c_int(int(value))


def _p(a: np.ndarray) -> Any:
    return a.ctypes.data_as(_dbl)


def _ip(a: np.ndarray) -> Any:
    return a.ctypes.data_as(_int)


def _check(info: ctypes.c_int, name: str, n: int) -> None:
    if info.value != 0:  # on a finite symmetric matrix: a bug or a broken LAPACK, not bad input
        raise RuntimeError(f"LAPACK {name} returned info = {info.value} on a {n}x{n} float64 problem")


def dsytrd(A: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Reduce the symmetric ``A`` (float64, column-major, [n, n], its lower triangle read; overwritten) to
    tridiagonal form: ``(d, e, tau, A)``, the diagonal, the subdiagonal and the reflectors (in ``A`` below the
    subdiagonal, LAPACK's ``uplo = 'L'`` layout)."""
    n = A.shape[0]
    assert A.dtype == np.float64 and A.flags.f_contiguous and A.shape == (n, n)
    d, e, tau = np.empty(n), np.empty(max(n - 1, 1)), np.empty(max(n - 1, 1))
    info, query = ctypes.c_int(0), np.empty(1)
    f = _routine("dsytrd")
    args = (b"L", ctypes.byref(_i(n)), _p(A), ctypes.byref(_i(max(n, 1))), _p(d), _p(e), _p(tau))
    f(*args, _p(query), ctypes.byref(_i(-1)), ctypes.byref(info))
    _check(info, "dsytrd (workspace query)", n)
    work = np.empty(max(int(query[0]), 1))
    f(*args, _p(work), ctypes.byref(_i(work.size)), ctypes.byref(info))
    _check(info, "dsytrd", n)
    return d, e[: n - 1], tau[: n - 1], A


def dsterf(d: np.ndarray, e: np.ndarray) -> np.ndarray:
    """Every eigenvalue, ascending, of the symmetric tridiagonal ``(d, e)`` (root-free QL/QR; inputs kept)."""
    n = d.shape[0]
    w, off, info = np.array(d, dtype=np.float64), np.zeros(max(n, 1)), ctypes.c_int(0)
    off[: n - 1] = e
    _routine("dsterf")(ctypes.byref(_i(n)), _p(w), _p(off), ctypes.byref(info))
    _check(info, "dsterf", n)
    return w


def dstemr(d: np.ndarray, e: np.ndarray, il: int, iu: int) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues ``il..iu`` (1-based, ascending order) of the tridiagonal ``(d, e)`` and their eigenvectors
    (MRRR, with LAPACK's test for high relative accuracy on, as ``dsyevr`` runs it): ``(w [m], Z [n, m])``."""
    n, m_want = d.shape[0], iu - il + 1
    dd, ee = np.array(d, dtype=np.float64), np.zeros(max(n, 1))
    ee[: n - 1] = e
    w = np.empty(max(n, 1))
    Z = np.empty((max(n, 1), max(m_want, 1)), order="F")
    isuppz = np.empty(2 * max(m_want, 1), dtype=np.int32)
    m, info, tryrac = ctypes.c_int(0), ctypes.c_int(0), ctypes.c_int(1)
    f = _routine("dstemr")
    zero = ctypes.c_double(0.0)

    def call(work: np.ndarray, lwork: int, iwork: np.ndarray, liwork: int) -> None:
        f(
            b"V",
            b"I",
            ctypes.byref(_i(n)),
            _p(dd),
            _p(ee),
            ctypes.byref(zero),
            ctypes.byref(zero),
            ctypes.byref(_i(il)),
            ctypes.byref(_i(iu)),
            ctypes.byref(m),
            _p(w),
            _p(Z),
            ctypes.byref(_i(max(n, 1))),
            ctypes.byref(_i(max(m_want, 1))),
            _ip(isuppz),
            ctypes.byref(tryrac),
            _p(work),
            ctypes.byref(_i(lwork)),
            _ip(iwork),
            ctypes.byref(_i(liwork)),
            ctypes.byref(info),
        )

    query, iquery = np.empty(1), np.empty(1, dtype=np.int32)
    call(query, -1, iquery, -1)
    _check(info, "dstemr (workspace query)", n)
    work, iwork = np.empty(max(int(query[0]), 1)), np.empty(max(int(iquery[0]), 1), dtype=np.int32)
    call(work, work.size, iwork, iwork.size)
    _check(info, "dstemr", n)
    if m.value != m_want:
        raise RuntimeError(f"LAPACK dstemr found {m.value} of the {m_want} eigenvectors asked of a {n}x{n} problem")
    return w[:m_want], Z[:, :m_want]


def dsyevd(A: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every eigenvalue (ascending) and eigenvector of the symmetric ``A`` (float64, column-major, [n, n], its
    lower triangle read; overwritten by the vectors), by divide and conquer: ``(w, A)``."""
    n = A.shape[0]
    assert A.dtype == np.float64 and A.flags.f_contiguous and A.shape == (n, n)
    w, info = np.empty(max(n, 1)), ctypes.c_int(0)
    f = _routine("dsyevd")
    head = (b"V", b"L", ctypes.byref(_i(n)), _p(A), ctypes.byref(_i(max(n, 1))), _p(w))
    query, iquery = np.empty(1), np.empty(1, dtype=np.int32)
    f(*head, _p(query), ctypes.byref(_i(-1)), _ip(iquery), ctypes.byref(_i(-1)), ctypes.byref(info))
    _check(info, "dsyevd (workspace query)", n)
    work, iwork = np.empty(max(int(query[0]), 1)), np.empty(max(int(iquery[0]), 1), dtype=np.int32)
    f(*head, _p(work), ctypes.byref(_i(work.size)), _ip(iwork), ctypes.byref(_i(iwork.size)), ctypes.byref(info))
    _check(info, "dsyevd", n)
    return w[:n], A
