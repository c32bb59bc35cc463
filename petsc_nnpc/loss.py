"""Randomized Frobenius loss of a low-rank eigen-decomposition.

For ``Z ∈ R^{n×k}`` with i.i.d. N(0, 1) entries, ``E‖D z‖² = ‖D‖_F²``, so

    L(θ; x) = (1/k) Σ_j ‖U Λ Uᵀ z_j − A_x z_j‖²

is an unbiased estimate of ``‖U Λ Uᵀ − A_x‖_F²`` (Trappler & Vidard,
"State-dependent preconditioning for the inner-loop in Variational Data
Assimilation using Machine Learning", eq. 2.10). Dividing by
``(1/k) Σ_j ‖A_x z_j‖²``, an estimate of ``‖A_x‖_F² = Σ λ_i²``, gives the
relative loss (their eq. 2.11): the fraction of unexplained variance.

The product is formed as ``U (Λ (Uᵀ Z))``: cost ``O(n r k)`` and memory
``O(n (r + k))`` per state. No ``n × n`` matrix is formed.
"""

import torch

LOSS_KINDS = ("relative", "absolute")


def residual_norms(U, lam, Z, AZ):
    """Return ``(1/k) Σ_j ‖U Λ Uᵀ z_j − A z_j‖²`` and ``(1/k) Σ_j ‖A z_j‖²``.

    Parameters
    ----------
    U : Tensor, shape (B, n, r)
        Orthonormal columns (not checked).
    lam : Tensor, shape (B, r)
        Eigenvalues ``Λ``.
    Z : Tensor, shape (B, n, k)
        Gaussian probe vectors.
    AZ : Tensor, shape (B, n, k)
        ``A_x Z`` for each state.

    Returns
    -------
    residual, reference : Tensor, shape (B,)
    """
    if U.dim() != 3 or Z.shape != AZ.shape or Z.shape[:2] != U.shape[:2] \
            or lam.shape != (U.shape[0], U.shape[2]):
        raise ValueError(
            "inconsistent shapes: expected U (B, n, r), lam (B, r), Z and AZ (B, n, k); got "
            f"U {tuple(U.shape)}, lam {tuple(lam.shape)}, Z {tuple(Z.shape)}, AZ {tuple(AZ.shape)}"
        )
    k = Z.shape[2]
    UtZ = U.transpose(1, 2) @ Z  # (B, r, k)
    R = U @ (lam.unsqueeze(2) * UtZ) - AZ  # (B, n, k)
    residual = R.square().sum(dim=(1, 2)) / k  # (B,)
    reference = AZ.square().sum(dim=(1, 2)) / k  # (B,)
    return residual, reference


def frobenius_loss(U, lam, Z, AZ, kind="relative"):
    """Return the per-state randomized Frobenius loss, shape ``(B,)``.

    ``kind="absolute"`` is the estimate itself (Trappler & Vidard, eq. 2.10),
    ``kind="relative"`` the estimate divided by ``(1/k) Σ_j ‖A z_j‖²``
    (their eq. 2.11).
    """
    residual, reference = residual_norms(U, lam, Z, AZ)
    if kind == "absolute":
        return residual
    if kind == "relative":
        return residual / reference
    raise ValueError(f"loss kind {kind!r} is invalid: expected one of {LOSS_KINDS}")
