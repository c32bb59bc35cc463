"""Tests of the spectral LMP core on tiny dense references."""

import numpy as np
import pytest
from petsc4py import PETSc

import petsc_nnpc  # noqa: F401  (initializes PETSc)
from petsc_nnpc.lmp import (
    ScaledSpectralLMP,
    SplitLMP,
    check_eigenvalues,
    check_orthonormal,
    choose_mu,
    cholesky_qr,
    orthonormalize,
)

N, R = 40, 6


@pytest.fixture
def pairs():
    rng = np.random.default_rng(7)
    U, _ = np.linalg.qr(rng.standard_normal((N, R)))  # (n, r)
    lam = np.sort(rng.uniform(2.0, 50.0, R))[::-1]  # (r,)
    return U, lam


def dense_of(apply, n=N):
    """Return the matrix of a linear map given on local arrays (one rank)."""
    return np.column_stack([apply(np.eye(n)[:, j]) for j in range(n)])


def test_p_is_symmetric_positive_definite(pairs):
    U, lam = pairs
    lmp = SplitLMP(PETSc.COMM_SELF, U, lam, mu=1.7)
    P = dense_of(lmp.P.mult_array)
    assert np.abs(P - P.T).max() < 1e-13
    eigenvalues = np.sort(np.linalg.eigvalsh(P))
    expected = np.sort(np.concatenate([1.7 ** 2 / lam, np.ones(N - R)]))
    assert np.abs(eigenvalues - expected).max() < 1e-12
    assert eigenvalues.min() > 0


def test_split_squares_to_p(pairs):
    U, lam = pairs
    lmp = SplitLMP(PETSc.COMM_SELF, U, lam, mu=0.8)
    L = dense_of(lmp.L.mult_array)
    P = dense_of(lmp.P.mult_array)
    assert np.abs(L @ L.T - P).max() < 1e-13
    assert np.abs(L - L.T).max() < 1e-13


def test_exact_pairs_cluster_at_theta(pairs):
    U, lam = pairs
    rng = np.random.default_rng(8)
    complement, _ = np.linalg.qr(rng.standard_normal((N, N)) - U @ (U.T @ rng.standard_normal((N, N))))
    Q = np.linalg.qr(np.hstack([U, complement[:, :N - R]]))[0]
    tail = np.linspace(1.5, 0.5, N - R)
    A = (Q * np.concatenate([lam, tail])) @ Q.T
    A = 0.5 * (A + A.T)
    mu = 1.3
    lmp = SplitLMP(PETSc.COMM_SELF, Q[:, :R], lam, mu)
    P = dense_of(lmp.P.mult_array)
    spectrum = np.sort(np.linalg.eigvals(A @ P).real)
    expected = np.sort(np.concatenate([np.full(R, mu ** 2), tail]))
    assert np.abs(spectrum - expected).max() < 1e-10


def test_scaled_family_eigenvalues(pairs):
    U, lam = pairs
    family = ScaledSpectralLMP(PETSc.COMM_SELF, U, lam, mu=2.0, alpha=-1.0, beta=3.0)
    P = dense_of(family.mult_array)
    eigenvalues = np.sort(np.linalg.eigvalsh(P))
    expected = np.sort(np.concatenate([2.0 / lam, np.full(N - R, 3.0)]))
    assert np.abs(eigenvalues - expected).max() < 1e-12


def test_block_apply_equals_columns(pairs):
    U, lam = pairs
    lmp = SplitLMP(PETSc.COMM_SELF, U, lam, mu=1.0)
    Z = np.random.default_rng(9).standard_normal((N, 4))
    block = lmp.P.mult_array(Z)
    for j in range(4):
        assert np.abs(block[:, j] - lmp.P.mult_array(Z[:, j])).max() < 1e-13


def test_mu_rules():
    lam = np.array([100.0, 50.0, 25.0])
    assert choose_mu(lam, 2.0)[0] == 2.0
    assert choose_mu(lam, "min")[0] == pytest.approx(5.0)
    assert choose_mu(lam, "max")[0] == pytest.approx(10.0)
    mu, rule = choose_mu(lam, "spectral", lam_next=16.0)
    assert mu == pytest.approx(4.0)
    assert "known" in rule
    mu, rule = choose_mu(lam, "spectral")
    assert mu ** 2 == pytest.approx(12.5)
    assert "estimated" in rule


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), "median"])
def test_mu_rule_rejects_bad_value(bad):
    with pytest.raises(ValueError, match="mu"):
        choose_mu(np.array([3.0, 2.0]), bad)


def test_eigenvalue_checks():
    with pytest.raises(ValueError, match="NaN"):
        check_eigenvalues("Test", np.array([2.0, np.nan]))
    with pytest.raises(ValueError, match="not positive"):
        check_eigenvalues("Test", np.array([2.0, 0.0]))
    with pytest.raises(ValueError, match="at most 3"):
        check_eigenvalues("Test", np.array([3.0, 2.0, 1.0]), rank_requested=4, available=3)


def test_orthonormality_check(pairs):
    U, _ = pairs
    assert check_orthonormal("Test", PETSc.COMM_SELF, U) < 1e-12
    skewed = U.copy()
    skewed[:, 1] += 0.1 * skewed[:, 0]
    with pytest.raises(ValueError, match="not orthonormal"):
        check_orthonormal("Test", PETSc.COMM_SELF, skewed)


def test_orthonormalize_drops_dependent_columns():
    rng = np.random.default_rng(10)
    V = rng.standard_normal((N, 3))
    V = np.hstack([V, V[:, :1] + V[:, 1:2]])
    Q, transform = orthonormalize(PETSc.COMM_SELF, V)
    assert Q.shape == (N, 3)
    assert np.abs(Q.T @ Q - np.eye(3)).max() < 1e-12
    assert np.abs(V @ transform - Q).max() < 1e-12


def test_cholesky_qr_keeps_column_order(pairs):
    U, _ = pairs
    Q = cholesky_qr(PETSc.COMM_SELF, U * (1.0 + 1e-3))
    assert np.abs(np.abs(np.sum(Q * U, axis=0)) - 1.0).max() < 1e-10
