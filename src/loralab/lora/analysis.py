"""What a learned update looks like (Sec. 7): subspace similarity and amplification.

Pure functions of tensors, computed in float64:

- ``subspace_similarity(A1, A2)``: the normalised subspace similarity of Sec. 7.2,
  ``φ(A1, A2, i, j) = ‖U1_iᵀ U2_j‖²_F / min(i, j) ∈ [0, 1]``, where ``U_i`` holds the
  top-i right-singular vectors of ``A`` (``A`` is r × k, so they live in R^k). 1 means the
  smaller of the two subspaces lies inside the other; 0 means they are orthogonal.
- ``random_subspace_similarity``: the same for Gaussian matrices, the baseline a learned
  overlap must beat (for uniformly random subspaces ``E φ = max(i, j) / k``).
- ``amplification(ΔW, W, r)``: Sec. 7.3's ``‖ΔW‖_F / ‖Uᵀ W Vᵀ‖_F`` with U, V the top-r
  left/right singular vectors of ΔW: how strongly ΔW amplifies directions that W holds
  only weakly. The paper's Table 7 also projects W onto its own top-r directions and
  onto random ones; ``Amplification`` carries all three.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def right_singular_vectors(A: Tensor) -> Tensor:
    """The right-singular vectors of ``A`` (r, k) as columns, by decreasing singular value:
    (k, min(r, k))."""
    _, _, vh = torch.linalg.svd(A.detach().double(), full_matrices=False)
    return vh.T


def subspace_similarity(A1: Tensor, A2: Tensor) -> Tensor:
    """φ(A1, A2, i, j) for every i ≤ r1 and j ≤ r2, at ``[i - 1, j - 1]``: (r1, r2).

    ``A1`` is (r1, k) and ``A2`` (r2, k), as LoRA's A factors of one weight at two ranks.
    """
    if A1.dim() != 2 or A2.dim() != 2 or A1.shape[1] != A2.shape[1]:
        raise ValueError(
            f"subspace_similarity needs two matrices with the same number of columns, got "
            f"{tuple(A1.shape)} and {tuple(A2.shape)}"
        )
    U1, U2 = right_singular_vectors(A1), right_singular_vectors(A2)
    cosines = (U1.T @ U2) ** 2  # (r1, r2): squared cosines between single directions
    overlap = cosines.cumsum(0).cumsum(1)  # [i-1, j-1] = ‖U1_iᵀ U2_j‖²_F
    i = torch.arange(1, overlap.shape[0] + 1, dtype=overlap.dtype)[:, None]
    j = torch.arange(1, overlap.shape[1] + 1, dtype=overlap.dtype)[None, :]
    return overlap / torch.minimum(i, j)


def random_subspace_similarity(
    r1: int, r2: int, k: int, draws: int = 20, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Mean and standard deviation of φ over ``draws`` pairs of Gaussian (r1, k), (r2, k)
    matrices: what ``subspace_similarity`` gives when nothing is shared."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.stack(
        [
            subspace_similarity(
                torch.randn(r1, k, generator=generator, dtype=torch.float64),
                torch.randn(r2, k, generator=generator, dtype=torch.float64),
            )
            for _ in range(draws)
        ]
    )
    return values.mean(0), values.std(0) if draws > 1 else torch.zeros_like(values[0])


@dataclass(frozen=True)
class Amplification:
    """Sec. 7.3 for one weight: how ΔW relates to W along ΔW's top-r directions."""

    r: int
    """How many singular directions of ΔW (and of W, and random) the projections keep."""
    delta_norm: float
    """‖ΔW‖_F."""
    weight_norm: float
    """‖W‖_F."""
    projected: float
    """‖Uᵀ W Vᵀ‖_F with U, V the top-r left/right singular vectors of ΔW."""
    projected_own: float
    """The same with W's own top-r singular vectors (the directions W emphasises most)."""
    projected_random: float
    """The same with random orthonormal U, V: the baseline for an unrelated subspace."""

    @property
    def factor(self) -> float:
        """The amplification factor ‖ΔW‖_F / ‖Uᵀ W Vᵀ‖_F."""
        return self.delta_norm / self.projected if self.projected > 0 else float("inf")


def projected_norm(W: Tensor, U: Tensor, V: Tensor) -> float:
    """‖Uᵀ W V‖_F for U (d, r) and V (k, r) with orthonormal columns: (r, d)(d, k)(k, r)."""
    return torch.linalg.matrix_norm(U.T @ W @ V).item()


def amplification(delta_w: Tensor, w: Tensor, r: int, seed: int = 0) -> Amplification:
    """Sec. 7.3's projections of ``w`` (d, k) onto the top-``r`` directions of ``delta_w``
    (d, k), of ``w`` itself and of a random subspace (drawn with ``seed``)."""
    if delta_w.shape != w.shape or w.dim() != 2:
        raise ValueError(
            f"amplification needs ΔW and W of one 2-d shape, got {tuple(delta_w.shape)} and "
            f"{tuple(w.shape)}"
        )
    if not 1 <= r <= min(w.shape):
        raise ValueError(f"r must be in [1, {min(w.shape)}] for a {tuple(w.shape)} weight, got {r}")
    delta_w, w = delta_w.detach().double(), w.detach().double()
    u, _, vh = torch.linalg.svd(delta_w, full_matrices=False)
    u_own, _, vh_own = torch.linalg.svd(w, full_matrices=False)
    generator = torch.Generator().manual_seed(seed)
    u_random, _ = torch.linalg.qr(torch.randn(w.shape[0], r, generator=generator, dtype=w.dtype))
    v_random, _ = torch.linalg.qr(torch.randn(w.shape[1], r, generator=generator, dtype=w.dtype))
    return Amplification(
        r=r,
        delta_norm=torch.linalg.matrix_norm(delta_w).item(),
        weight_norm=torch.linalg.matrix_norm(w).item(),
        projected=projected_norm(w, u[:, :r], vh[:r].T),
        projected_own=projected_norm(w, u_own[:, :r], vh_own[:r].T),
        projected_random=projected_norm(w, u_random, v_random),
    )


__all__ = [
    "Amplification",
    "amplification",
    "projected_norm",
    "random_subspace_similarity",
    "right_singular_vectors",
    "subspace_similarity",
]
