"""Randomized Frobenius loss: unbiasedness, exactness, gradients through QR."""

import numpy as np
import pytest
import torch

from petsc_nnpc.loss import frobenius_loss, residual_norms
from petsc_nnpc.network import postprocess

torch.set_num_threads(1)


def _spd(rng, n):
    G = rng.standard_normal((n, n))
    return G @ G.T / n + np.eye(n)


def _orthonormal(rng, n, r):
    Q, _ = np.linalg.qr(rng.standard_normal((n, r)))
    return Q


def _tensors(*arrays):
    return [torch.from_numpy(np.asarray(a, dtype=np.float64)).unsqueeze(0) for a in arrays]


def test_estimator_mean_is_frobenius_norm():
    # Dense reference on a tiny problem. For Gaussian z, the estimate of
    # ‖D‖_F² from k probes has a relative standard deviation below sqrt(2/k).
    rng = np.random.default_rng(1)
    n, r, k = 30, 4, 20000
    A = _spd(rng, n)
    U = _orthonormal(rng, n, r)
    lam = np.array([5.0, 3.0, 2.0, 1.5])
    exact = np.linalg.norm(U @ np.diag(lam) @ U.T - A, "fro") ** 2
    Z = rng.standard_normal((n, k))
    estimate = frobenius_loss(*_tensors(U, lam, Z, A @ Z), kind="absolute").item()
    assert abs(estimate - exact) / exact < 4 * np.sqrt(2 / k)


def test_relative_estimator_is_unexplained_fraction():
    rng = np.random.default_rng(2)
    n, r, k = 30, 4, 20000
    A = _spd(rng, n)
    U = _orthonormal(rng, n, r)
    lam = np.linspace(4.0, 1.0, r)
    exact = np.linalg.norm(U @ np.diag(lam) @ U.T - A, "fro") ** 2 / np.linalg.norm(A, "fro") ** 2
    Z = rng.standard_normal((n, k))
    estimate = frobenius_loss(*_tensors(U, lam, Z, A @ Z), kind="relative").item()
    assert abs(estimate - exact) / exact < 8 * np.sqrt(2 / k)


def test_loss_zero_at_exact_eigenpairs():
    rng = np.random.default_rng(3)
    n, r, k = 40, 5, 12
    V = _orthonormal(rng, n, r)
    lam = np.array([9.0, 7.0, 4.0, 2.0, 1.0])
    A = V @ np.diag(lam) @ V.T
    Z = rng.standard_normal((n, k))
    U_t, lam_t, Z_t, AZ_t = _tensors(V, lam, Z, A @ Z)
    assert frobenius_loss(U_t, lam_t, Z_t, AZ_t, kind="absolute").item() < 1e-20
    assert frobenius_loss(U_t, lam_t, Z_t, AZ_t, kind="relative").item() < 1e-24
    # Any other eigenvalues leave a residual.
    assert frobenius_loss(U_t, lam_t * 0.5, Z_t, AZ_t, kind="relative").item() > 0.1


def test_loss_zero_after_postprocess_of_exact_vectors():
    # Raw vectors spanning the eigenvectors column by column, and logits
    # that map to the eigenvalues, give zero loss after QR and S_M.
    rng = np.random.default_rng(4)
    n, r, k, M = 25, 3, 8, 10.0
    V = _orthonormal(rng, n, r)
    lam = np.array([6.0, 3.0, 1.0])
    A = V @ np.diag(lam) @ V.T
    raw = V * np.array([2.0, 0.5, 3.0])  # scaled columns, same directions
    logits = np.log(lam / (M - lam))  # S_M^{-1}(lam)
    U, lam_out = postprocess(*_tensors(raw, logits), M)
    Z = rng.standard_normal((n, k))
    _, _, Z_t, AZ_t = _tensors(V, lam, Z, A @ Z)
    assert frobenius_loss(U, lam_out, Z_t, AZ_t, kind="relative").item() < 1e-24


def test_gradients_flow_through_qr():
    rng = np.random.default_rng(5)
    n, r, k = 12, 3, 5
    A = _spd(rng, n)
    Z = rng.standard_normal((n, k))
    _, Z_t, AZ_t = _tensors(np.zeros(1), Z, A @ Z)
    raw = torch.from_numpy(rng.standard_normal((1, n, r))).requires_grad_(True)
    logits = torch.from_numpy(rng.standard_normal((1, r))).requires_grad_(True)

    def loss_of(raw, logits):
        U, lam = postprocess(raw, logits, 8.0)
        return frobenius_loss(U, lam, Z_t, AZ_t, kind="absolute").sum()

    loss_of(raw, logits).backward()
    assert torch.all(torch.isfinite(raw.grad))
    assert raw.grad.abs().max() > 1e-6
    assert logits.grad.abs().max() > 1e-6
    assert torch.autograd.gradcheck(loss_of, (raw.detach().requires_grad_(), logits.detach().requires_grad_()))


def test_memory_is_linear_in_n():
    # The residual is formed as U(Λ(UᵀZ)): no n×n intermediate.
    n, r, k = 2000, 3, 4
    U = torch.zeros(1, n, r, dtype=torch.float64)
    seen = []

    def pack(tensor):
        seen.append(tensor.numel())
        return tensor

    U.requires_grad_(True)
    lam = torch.ones(1, r, dtype=torch.float64, requires_grad=True)
    Z = torch.ones(1, n, k, dtype=torch.float64)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        frobenius_loss(U, lam, Z, Z).sum()
    assert max(seen) <= n * max(r, k)


def test_inconsistent_shapes_rejected():
    U = torch.zeros(1, 10, 2)
    with pytest.raises(ValueError, match="inconsistent shapes"):
        residual_norms(U, torch.zeros(1, 2), torch.zeros(1, 9, 3), torch.zeros(1, 9, 3))


def test_unknown_loss_kind_rejected():
    U = torch.eye(4).unsqueeze(0)[:, :, :2]
    Z = torch.ones(1, 4, 3)
    with pytest.raises(ValueError, match="'frobenius' is invalid"):
        frobenius_loss(U, torch.ones(1, 2), Z, Z, kind="frobenius")
