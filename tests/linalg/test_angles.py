"""subspace_angles against scipy.linalg.subspace_angles; small angles; batching."""

import numpy as np
import pytest
import reference as R
import scipy.linalg
import torch

from weightgeo import WeightgeoError
from weightgeo.linalg import subspace_angles


def _rotated_basis(n, k, angles, rng):
    """Orthonormal Q1, Q2 [n, k] with prescribed principal angles (needs n >= 2k)."""
    Q = R.orthogonal(rng, n, 2 * k)
    Q1 = Q[:, :k]
    Q2 = Q[:, :k] * np.cos(angles) + Q[:, k:] * np.sin(angles)
    return Q1, Q2


@pytest.mark.parametrize("scale", [1e-9, 1e-5, 1e-2, 1.0])
def test_prescribed_angles_float64(scale):
    rng = np.random.default_rng(0)
    ang = np.sort(scale * rng.uniform(0.1, 1.5, 6))
    Q1, Q2 = _rotated_basis(30, 6, ang, rng)
    got = subspace_angles(torch.from_numpy(Q1), torch.from_numpy(Q2)).numpy()
    np.testing.assert_allclose(got, ang, rtol=1e-6, atol=1e-15)


def test_small_angles_float32_values():
    """float64 bases + float32 small SVDs: absolute error ~1e-7 rad even at 1e-6 rad (arccos: 3e-4)."""
    rng = np.random.default_rng(1)
    ang = np.array([1e-6, 3e-6, 1e-5, 1e-4])
    Q1, Q2 = _rotated_basis(40, 4, ang, rng)
    got = subspace_angles(torch.from_numpy(Q1), torch.from_numpy(Q2), values_dtype=torch.float32).double().numpy()
    np.testing.assert_allclose(got, ang, atol=2e-7)


@pytest.mark.parametrize("k1,k2", [(5, 5), (7, 3), (3, 7)])
def test_vs_scipy_random(k1, k2):
    rng = np.random.default_rng(2)
    Q1, Q2 = R.orthogonal(rng, 20, k1), R.orthogonal(rng, 20, k2)
    ref = np.sort(scipy.linalg.subspace_angles(Q1, Q2))
    got = subspace_angles(torch.from_numpy(Q1), torch.from_numpy(Q2)).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-12)
    # symmetric
    got2 = subspace_angles(torch.from_numpy(Q2), torch.from_numpy(Q1)).numpy()
    np.testing.assert_allclose(got2, got, atol=1e-12)


def test_identical_and_orthogonal():
    Q = torch.from_numpy(R.orthogonal(np.random.default_rng(3), 10, 6))
    assert float(subspace_angles(Q[:, :3], Q[:, :3]).max()) < 1e-7
    np.testing.assert_allclose(subspace_angles(Q[:, :3], Q[:, 3:]).numpy(), np.full(3, np.pi / 2), atol=1e-12)


def test_batched_equals_looped():
    rng = np.random.default_rng(4)
    Q1 = torch.from_numpy(np.stack([R.orthogonal(rng, 12, 4) for _ in range(5)]))
    Q2 = torch.from_numpy(np.stack([R.orthogonal(rng, 12, 4) for _ in range(5)]))
    batched = subspace_angles(Q1, Q2)
    for i in range(5):
        torch.testing.assert_close(batched[i], subspace_angles(Q1[i], Q2[i]))


def test_shape_mismatch():
    with pytest.raises(WeightgeoError, match="same n"):
        subspace_angles(torch.eye(3)[:, :2], torch.eye(4)[:, :2])
