"""The subspace analysis of Sec. 7 on matrices whose answer is known by construction."""

from __future__ import annotations

import pytest
import torch

from loralab.lora.analysis import (
    amplification,
    random_subspace_similarity,
    right_singular_vectors,
    subspace_similarity,
)


def rows_in(basis: torch.Tensor, singular_values: list[float], seed: int = 0) -> torch.Tensor:
    """An (r, k) matrix whose right-singular vectors are the first r columns of ``basis``
    (in that order), with the given singular values and random left-singular vectors."""
    r = len(singular_values)
    generator = torch.Generator().manual_seed(seed)
    left, _ = torch.linalg.qr(torch.randn(r, r, generator=generator, dtype=torch.float64))
    return left @ torch.diag(torch.tensor(singular_values, dtype=torch.float64)) @ basis[:, :r].T


def orthonormal(k: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(k, k, generator=generator, dtype=torch.float64))
    return q


def test_right_singular_vectors_are_ordered_columns():
    basis = orthonormal(10)
    A = rows_in(basis, [5.0, 3.0, 1.0])
    U = right_singular_vectors(A)
    assert U.shape == (10, 3)
    # the same directions as the basis, up to sign, in order of singular value
    assert torch.allclose((U.T @ basis[:, :3]).abs(), torch.eye(3, dtype=U.dtype), atol=1e-10)


def test_identical_subspaces_give_one_everywhere():
    A = torch.randn(4, 16, dtype=torch.float64)
    phi = subspace_similarity(A, 3.0 * A)  # a rescaled copy has the same singular vectors
    assert phi.shape == (4, 4)
    assert torch.allclose(phi, torch.ones(4, 4, dtype=phi.dtype), atol=1e-10)


def test_orthogonal_subspaces_give_zero():
    basis = orthonormal(12)
    A1 = rows_in(basis[:, :4], [4.0, 3.0, 2.0, 1.0])
    A2 = rows_in(basis[:, 4:], [4.0, 3.0, 2.0, 1.0, 0.5, 0.2])
    phi = subspace_similarity(A1, A2)
    assert phi.shape == (4, 6)
    assert phi.abs().max() < 1e-10


def test_a_subspace_inside_a_larger_one():
    # A1's 2 directions are A2's 2nd and 4th: φ counts what of the smaller space the
    # larger one holds, direction by direction.
    basis = orthonormal(20)
    A1 = rows_in(basis[:, [1, 3]], [2.0, 1.0])
    A2 = rows_in(basis[:, :5], [5.0, 4.0, 3.0, 2.0, 1.0])
    phi = subspace_similarity(A1, A2)
    expected = torch.tensor(
        [
            [0.0, 1.0, 1.0, 1.0, 1.0],  # U1_1 = e1 appears from j = 2
            [0.0, 1 / 2, 1 / 2, 1.0, 1.0],  # U1_2 = {e1, e3} is whole from j = 4
        ],
        dtype=phi.dtype,
    )
    assert torch.allclose(phi, expected, atol=1e-10)
    assert torch.allclose(subspace_similarity(A2, A1), phi.T, atol=1e-10)  # symmetric


def test_similarity_needs_matching_columns():
    with pytest.raises(ValueError, match="same number of columns"):
        subspace_similarity(torch.randn(2, 5), torch.randn(2, 6))


def test_random_baseline_matches_its_expectation():
    # For uniformly random subspaces E‖U1_iᵀ U2_j‖² = i·j/k, so E φ = max(i, j) / k.
    k = 64
    mean, std = random_subspace_similarity(4, 8, k, draws=200, seed=0)
    i = torch.arange(1, 5, dtype=mean.dtype)[:, None]
    j = torch.arange(1, 9, dtype=mean.dtype)[None, :]
    assert torch.allclose(mean, torch.maximum(i, j) / k, atol=0.01)
    assert (std > 0).all()


def test_amplification_of_a_known_update():
    # W = diag(10, 5, 1, 0.1) padded; ΔW = 2·e3 e3ᵀ points along W's weak third direction.
    W = torch.zeros(6, 5, dtype=torch.float64)
    W[0, 0], W[1, 1], W[2, 2], W[3, 3] = 10.0, 5.0, 1.0, 0.1
    delta = torch.zeros_like(W)
    delta[2, 2] = -2.0  # the sign of a singular pair does not matter
    result = amplification(delta, W, r=1)
    assert result.delta_norm == pytest.approx(2.0)
    assert result.weight_norm == pytest.approx((100 + 25 + 1 + 0.01) ** 0.5)
    assert result.projected == pytest.approx(1.0)  # |e3ᵀ W e3| = 1
    assert result.factor == pytest.approx(2.0)
    assert result.projected_own == pytest.approx(10.0)  # W's own top direction
    assert 0 <= result.projected_random <= result.weight_norm


def test_amplification_at_rank_two():
    W = torch.diag(torch.tensor([10.0, 5.0, 1.0, 0.1], dtype=torch.float64))
    delta = torch.diag(torch.tensor([0.0, 0.0, 3.0, 4.0], dtype=torch.float64))
    result = amplification(delta, W, r=2)
    assert result.projected == pytest.approx((1.0 + 0.01) ** 0.5)
    assert result.projected_own == pytest.approx((100 + 25) ** 0.5)
    assert result.factor == pytest.approx(5.0 / (1.01**0.5))


def test_amplification_refuses_bad_input():
    with pytest.raises(ValueError, match="one 2-d shape"):
        amplification(torch.zeros(3, 4), torch.zeros(4, 3), r=1)
    with pytest.raises(ValueError, match="r must be in"):
        amplification(torch.zeros(3, 4), torch.zeros(3, 4), r=4)
