"""Spectral limited-memory preconditioners (LMPs) with a row-distributed basis.

Notation of Trappler & Vidard, "State-dependent preconditioning for the
inner-loop in Variational Data Assimilation using Machine Learning":
``A`` is the symmetric positive definite Gauss-Newton matrix, ``U`` an
``n × r`` matrix with orthonormal columns (approximate leading eigenvectors
of ``A``), ``lam`` the matching eigenvalues ``Λ`` in descending order and
``mu`` the scaling ``μ``. The scaled spectral family (their eq. 1.21) is

    P_α = β I + U (μ Λ^α − β I) Uᵀ,

whose eigenvalues are ``μ λ_i^α`` on ``range(U)`` and ``β`` on its
orthogonal complement. The split preconditioner of their eq. 2.4 is the
member ``α = −1/2, β = 1``:

    L = I + U (μ Λ^{-1/2} − I) Uᵀ,   P = L Lᵀ = I + U (μ² Λ⁻¹ − I) Uᵀ,

so ``A P`` maps the ``r`` leading eigenvalues to ``θ = μ²`` and leaves the
others alone.

Every rank stores its own rows of ``U`` as a local array of shape
``(local_size, r)``. One application costs two local products with ``U``
(``2 · local_size · r`` flops each) and one allreduce of ``r`` numbers.
"""

import contextlib
import logging
import math

import numpy as np
from mpi4py import MPI
from petsc4py import PETSc

log = logging.getLogger("petsc_nnpc.lmp")

EVENT_APPLY = PETSc.Log.Event("LMPApply")
EVENT_APPLY_SPLIT = PETSc.Log.Event("LMPApplySplit")
EVENT_CHECK = PETSc.Log.Event("LMPCheckBasis")
EVENT_ORTHONORMALIZE = PETSc.Log.Event("LMPOrthonormalize")
EVENT_RAYLEIGH_RITZ = PETSc.Log.Event("LMPRayleighRitz")
EVENT_BLOCK_PRODUCT = PETSc.Log.Event("LMPBlockProduct")

MU_RULES = ("min", "max", "spectral")


@contextlib.contextmanager
def logged(event):
    """Time the enclosed block as the PETSc log event ``event``."""
    event.begin()
    try:
        yield
    finally:
        event.end()


def mpi_comm(comm):
    """Return the mpi4py communicator of a PETSc communicator or object."""
    if hasattr(comm, "getComm"):
        comm = comm.getComm()
    if isinstance(comm, MPI.Comm):
        return comm
    return comm.tompi4py()


def allreduce_sum(mpi, array):
    """Return the sum of ``array`` over the ranks of ``mpi`` (a new array)."""
    result = np.ascontiguousarray(array, dtype=np.float64).copy()
    if mpi.size > 1:
        mpi.Allreduce(MPI.IN_PLACE, result, op=MPI.SUM)
    return result


def gram(mpi, X, Y=None):
    """Return ``Xᵀ Y`` (or ``Xᵀ X``) for row-distributed ``X``, ``Y``.

    ``X`` is ``(local_size, p)`` and ``Y`` ``(local_size, q)``; the result
    ``(p, q)`` is replicated on every rank. Cost: ``2 · local_size · p · q``
    flops and one allreduce of ``p · q`` numbers.
    """
    local = X.T @ (X if Y is None else Y)  # (p, q)
    return allreduce_sum(mpi, local)


class ScaledSpectralLMP:
    """Member ``P_α = β I + U (μ Λ^α − β I) Uᵀ`` of the scaled spectral family.

    Parameters
    ----------
    comm : PETSc.Comm or mpi4py.MPI.Comm
        Communicator over which the rows of ``U`` are distributed.
    U : ndarray, shape (local_size, r)
        This rank's rows of a matrix with orthonormal columns.
    lam : ndarray, shape (r,)
        Positive eigenvalues, replicated on every rank.
    mu, alpha, beta : float
        Scaling ``μ > 0``, exponent ``α`` and complement scaling ``β > 0``.
    dtype : numpy dtype, optional
        Storage of ``U``: float64 (default) or float32. An application is
        bound by reading ``U`` twice, so float32 halves its memory traffic.
        The correction ``U (…) Uᵀ x`` then carries a relative rounding error
        near 1e-7, while ``x`` itself stays in float64.

    Notes
    -----
    ``P_α`` is symmetric, with eigenvalues ``μ λ_i^α`` and ``β``, so it is
    positive definite when ``μ``, ``β`` and every ``λ_i`` are positive and
    the columns of ``U`` are orthonormal. A product costs two local products
    with ``U`` and one allreduce of ``r`` numbers. A block of ``k`` vectors
    costs the same number of messages with ``k`` times the flops.
    """

    def __init__(self, comm, U, lam, mu, alpha=-1.0, beta=1.0, dtype=np.float64):
        self.mpi = mpi_comm(comm)
        if np.dtype(dtype) not in (np.dtype(np.float64), np.dtype(np.float32)):
            raise ValueError(f"ScaledSpectralLMP: invalid dtype {dtype}; use float64 or float32")
        self.U = np.ascontiguousarray(U, dtype=dtype)  # (local_size, r)
        self.lam = np.ascontiguousarray(lam, dtype=np.float64)  # (r,)
        self.mu = float(mu)
        self.alpha = float(alpha)
        self.beta = float(beta)
        if self.U.ndim != 2 or self.U.shape[1] != self.lam.size:
            raise ValueError(
                f"ScaledSpectralLMP: U has shape {self.U.shape} but lam has "
                f"{self.lam.size} entries; U must be (local_size, r) with r = lam.size"
            )
        if not self.mu > 0 or not self.beta > 0:
            raise ValueError(
                f"ScaledSpectralLMP: mu = {self.mu} and beta = {self.beta} must both be positive"
            )
        if self.lam.size and not np.all(self.lam > 0):
            raise ValueError("ScaledSpectralLMP: every eigenvalue must be positive")
        # Diagonal of the update in the basis U: μ λ_i^α − β.
        self.update = self.mu * self.lam ** self.alpha - self.beta  # (r,)

    @property
    def rank(self):
        """Number of columns of ``U``."""
        return self.lam.size

    def eigenvalues(self):
        """Return ``(μ λ^α, β)``: the eigenvalues on ``range(U)`` and on its complement."""
        return self.mu * self.lam ** self.alpha, self.beta

    def mult_array(self, x, out=None):
        """Return ``P_α x`` for a local array ``x`` of shape (local_size,) or (local_size, k)."""
        x_stored = x if x.dtype == self.U.dtype else x.astype(self.U.dtype)
        coefficients = allreduce_sum(self.mpi, self.U.T @ x_stored)  # (r,) or (r, k)
        if not np.all(np.isfinite(coefficients)):
            raise FloatingPointError(
                "ScaledSpectralLMP: the projection U^T x is not finite; "
                "the input vector contains NaN or Inf"
            )
        if x.ndim == 1:
            scaled = self.update * coefficients
        else:
            scaled = self.update[:, None] * coefficients
        result = self.U @ scaled.astype(self.U.dtype, copy=False)
        # Two products with U (2 · local_size · r each) and the update, per column.
        PETSc.Log.logFlops(x.size * (4 * self.rank + 2))
        if out is None:
            return self.beta * x + result
        np.multiply(x, self.beta, out=out)
        out += result
        return out


class SplitLMP:
    """Split spectral LMP ``L = I + U (μ Λ^{-1/2} − I) Uᵀ`` and ``P = L Lᵀ``.

    ``L`` is symmetric, so ``P = L² = I + U (μ² Λ⁻¹ − I) Uᵀ``, the member
    ``α = −1, β = 1`` of the scaled spectral family with scaling ``μ²``.
    ``A P`` has the eigenvalue ``θ = μ²`` on ``range(U)`` when ``U`` and
    ``lam`` are exact eigenpairs of ``A``.

    Parameters
    ----------
    comm : PETSc.Comm or mpi4py.MPI.Comm
        Communicator of the Vecs.
    U : ndarray, shape (local_size, r)
        This rank's rows of the orthonormal basis.
    lam : ndarray, shape (r,)
        Positive eigenvalues, descending, replicated.
    mu : float
        Scaling ``μ > 0``.
    dtype : numpy dtype, optional
        Storage of ``U`` (float64 or float32), see :class:`ScaledSpectralLMP`.
        ``P`` and ``L`` share one copy.
    """

    def __init__(self, comm, U, lam, mu, dtype=np.float64):
        U = np.ascontiguousarray(U, dtype=dtype)
        self.P = ScaledSpectralLMP(comm, U, lam, float(mu) ** 2, alpha=-1.0, beta=1.0, dtype=dtype)
        self.L = ScaledSpectralLMP(comm, U, lam, mu, alpha=-0.5, beta=1.0, dtype=dtype)
        self.mu = float(mu)

    @property
    def rank(self):
        """Number of eigenpairs in the preconditioner."""
        return self.P.rank

    @property
    def U(self):
        """This rank's rows of the basis, shape (local_size, r)."""
        return self.P.U

    @property
    def lam(self):
        """Eigenvalues of the basis, shape (r,)."""
        return self.P.lam

    def apply(self, x, y):
        """Set the Vec ``y`` to ``P x`` (``PCApply``)."""
        with logged(EVENT_APPLY):
            self.P.mult_array(x.getArray(readonly=True), out=y.getArray())

    def apply_split(self, x, y):
        """Set the Vec ``y`` to ``L x``; ``L`` is symmetric so this is also ``Lᵀ x``."""
        with logged(EVENT_APPLY_SPLIT):
            self.L.mult_array(x.getArray(readonly=True), out=y.getArray())


def choose_mu(lam, rule, lam_next=None):
    """Return ``(μ, description)`` for a scaling rule.

    Parameters
    ----------
    lam : ndarray, shape (r,)
        Eigenvalues used by the preconditioner, descending.
    rule : float or str
        A positive number is ``μ`` itself. ``"min"`` and ``"max"`` set
        ``θ = μ² = min λ`` or ``max λ``, so that ``A P`` maps the ``r``
        leading eigenvalues onto the smallest or largest of them.
        ``"spectral"`` is the scaled spectral choice of Diouane, Gürol,
        Mouhtal and Orban (2024), "An efficient scaled spectral
        preconditioner for sequences of symmetric positive definite linear
        systems" (arXiv:2410.02204): ``θ`` kept inside ``[λ_{r+1}, λ_r]``.
        Here ``θ = λ_{r+1}``, the end of that interval that gives the smallest
        condition number ``max(θ, λ_{r+1}) / λ_n`` for exact eigenpairs.
    lam_next : float, optional
        ``λ_{r+1}``. When missing, it is estimated by continuing the
        geometric decay of the last two eigenvalues,
        ``λ_r² / λ_{r−1}``, and kept inside ``(0, λ_r]``.

    Notes
    -----
    Trappler & Vidard write the scaling ``μ`` of eq. 2.4 directly; a number
    given here is that ``μ``. For ``min`` and ``max`` this module scales
    ``θ = μ²`` rather than ``μ``, so that the clustered eigenvalue of
    ``A P`` lies inside the predicted spectrum whatever its units.
    """
    lam = np.asarray(lam, dtype=np.float64)
    if isinstance(rule, str):
        rule_name = rule.strip().lower()
        if rule_name == "min":
            theta = float(lam.min())
            return math.sqrt(theta), f"min: theta = mu^2 = min(lambda) = {theta:.6g}"
        if rule_name == "max":
            theta = float(lam.max())
            return math.sqrt(theta), f"max: theta = mu^2 = max(lambda) = {theta:.6g}"
        if rule_name == "spectral":
            lam_r = float(lam[-1])
            if lam_next is not None and np.isfinite(lam_next) and lam_next > 0:
                theta = min(float(lam_next), lam_r)
                origin = "known"
            else:
                if lam.size >= 2:
                    estimate = lam_r * lam_r / float(lam[-2])
                else:
                    estimate = lam_r
                theta = min(max(estimate, np.finfo(float).tiny), lam_r)
                origin = "estimated"
            return math.sqrt(theta), (
                f"spectral: theta = mu^2 = lambda_(r+1) = {theta:.6g} ({origin}), "
                f"inside [lambda_(r+1), lambda_r = {lam_r:.6g}]"
            )
        try:
            rule = float(rule_name)
        except ValueError:
            raise ValueError(
                f"invalid mu rule {rule!r}: give a positive number or one of {', '.join(MU_RULES)}"
            ) from None
    mu = float(rule)
    if not (mu > 0 and np.isfinite(mu)):
        raise ValueError(f"invalid mu = {mu}: mu must be a positive finite number")
    return mu, f"fixed: theta = mu^2 = {mu * mu:.6g}"


def check_eigenvalues(owner, lam, rank_requested=None, available=None):
    """Raise a ValueError naming ``owner`` when ``lam`` is unusable.

    Checks that the eigenvalues are finite and positive and that the rank
    requested does not exceed what the source provides.
    """
    lam = np.asarray(lam, dtype=np.float64)
    if rank_requested is not None and available is not None and rank_requested > available:
        raise ValueError(
            f"{owner}: rank {rank_requested} requested but the source provides only "
            f"{available} eigenpairs; lower the rank option to at most {available}"
        )
    if not np.all(np.isfinite(lam)):
        bad = int(np.count_nonzero(~np.isfinite(lam)))
        raise ValueError(f"{owner}: {bad} of {lam.size} eigenvalues are NaN or Inf")
    if lam.size and lam.min() <= 0:
        bad = int(np.count_nonzero(lam <= 0))
        raise ValueError(
            f"{owner}: {bad} of {lam.size} eigenvalues are not positive "
            f"(smallest {lam.min():.6g}); a spectral LMP needs positive eigenvalues, "
            f"so lower the rank or fix the source"
        )


def check_orthonormal(owner, comm, U, tolerance=1e-6, seed=0):
    """Raise a ValueError naming ``owner`` unless ``UᵀU ≈ I``.

    The check costs ``O(n r)`` instead of the ``O(n r²)`` of forming
    ``UᵀU``: it compares every column norm with 1 and ``Uᵀ(U w)`` with
    ``w`` for one seeded random ``w``, which is exact for orthonormal ``U``.
    """
    with logged(EVENT_CHECK):
        mpi = mpi_comm(comm)
        r = U.shape[1]
        if not np.all(np.isfinite(U)):
            local_bad = 1
        else:
            local_bad = 0
        if mpi.allreduce(local_bad, op=MPI.MAX):
            raise ValueError(f"{owner}: the eigenvectors contain NaN or Inf")
        if r == 0:
            return 0.0
        norms = allreduce_sum(mpi, np.einsum("ij,ij->j", U, U))  # (r,)
        w = np.random.default_rng(seed).standard_normal(r)
        w /= np.linalg.norm(w)
        back = allreduce_sum(mpi, U.T @ (U @ w))  # (r,)
        error = max(float(np.abs(norms - 1.0).max()), float(np.linalg.norm(back - w)))
        if error > tolerance:
            raise ValueError(
                f"{owner}: the eigenvectors are not orthonormal (deviation {error:.3g} "
                f"from U^T U = I, tolerance {tolerance:g}); orthonormalize them (QR) first"
            )
        return error


def orthonormalize(comm, V, drop_tolerance=1e-10):
    """Return an orthonormal basis of the columns of row-distributed ``V``.

    Uses SVQB twice (Stathopoulos & Wu, 2002): with ``VᵀV = W D Wᵀ``, the
    basis is ``V W D^{-1/2}``, and directions with ``D_i`` below
    ``drop_tolerance · max D`` are dropped, so a rank-deficient ``V`` gives
    fewer columns. Also returns the matrix ``C`` with ``Q = V C``.
    Cost: ``O(n p²)`` flops and two allreduces of ``p²`` numbers per pass.
    """
    with logged(EVENT_ORTHONORMALIZE):
        mpi = mpi_comm(comm)
        Q = V
        transform = np.eye(V.shape[1])
        for _ in range(2):
            G = gram(mpi, Q)
            G = 0.5 * (G + G.T)
            d, W = np.linalg.eigh(G)
            keep = d > drop_tolerance * max(d.max(initial=0.0), np.finfo(float).tiny)
            step = W[:, keep] / np.sqrt(d[keep])  # (p, p_kept)
            Q = Q @ step
            transform = transform @ step
        return np.ascontiguousarray(Q), transform


def cholesky_qr(comm, V):
    """Return ``V R⁻¹`` with ``R`` the Cholesky factor of ``VᵀV`` (CholeskyQR).

    Unlike :func:`orthonormalize`, the triangular ``R`` keeps each column in
    the span of the columns before it, so columns that are already nearly
    orthonormal keep their order and meaning. ``V`` must have full column
    rank. Cost: ``O(n p²)`` flops and one allreduce of ``p²`` numbers.
    """
    with logged(EVENT_ORTHONORMALIZE):
        G = gram(mpi_comm(comm), V)
        R = np.linalg.cholesky(0.5 * (G + G.T)).T  # upper triangular, G = Rᵀ R
        return np.ascontiguousarray(np.linalg.solve(R.T, V.T).T)


def rayleigh_ritz(comm, Q, AQ):
    """Return Ritz pairs of ``A`` on the span of orthonormal ``Q``.

    Parameters
    ----------
    Q, AQ : ndarray, shape (local_size, m)
        Orthonormal basis and its product with ``A``.

    Returns
    -------
    theta : ndarray, shape (m,)
        Ritz values, descending.
    Y, AY : ndarray, shape (local_size, m)
        Ritz vectors ``Q S`` and their products ``A Q S``.
    residuals : ndarray, shape (m,)
        ``‖A y_i − θ_i y_i‖``, computed from ``AY`` without new products.
    """
    with logged(EVENT_RAYLEIGH_RITZ):
        mpi = mpi_comm(comm)
        H = gram(mpi, Q, AQ)
        H = 0.5 * (H + H.T)
        theta, S = np.linalg.eigh(H)
        order = np.argsort(theta)[::-1]
        theta = theta[order]
        S = S[:, order]
        Y = Q @ S
        AY = AQ @ S
        R = AY - Y * theta
        residuals = np.sqrt(np.maximum(allreduce_sum(mpi, np.einsum("ij,ij->j", R, R)), 0.0))
        return theta, Y, AY, residuals


class BlockProduct:
    """Products ``A Z`` with the operator of a PC, counted.

    Uses the operator context's ``mult_block(Z)`` when the Mat is a
    MATPYTHON shell that offers one (one batched run for ``k`` vectors), and
    ``A.mult`` column by column otherwise. ``products`` counts single
    products: a block of ``k`` vectors counts ``k``.
    """

    def __init__(self, A):
        self.A = A
        self.products = 0
        self.context = operator_context(A)
        self._block = getattr(self.context, "mult_block", None)
        self._x = None
        self._y = None

    def __call__(self, Z):
        """Return ``A Z`` for a local array ``Z`` of shape (local_size, k)."""
        Z = np.ascontiguousarray(Z, dtype=np.float64)  # (local_size, k)
        with logged(EVENT_BLOCK_PRODUCT):
            if self._block is not None:
                AZ = np.asarray(self._block(Z), dtype=np.float64)
            else:
                if self._x is None:
                    self._x, self._y = self.A.createVecs()
                AZ = np.empty_like(Z)
                for j in range(Z.shape[1]):
                    self._x.getArray()[:] = Z[:, j]
                    self.A.mult(self._x, self._y)
                    AZ[:, j] = self._y.getArray(readonly=True)
        self.products += Z.shape[1]
        return AZ


def operator_context(A):
    """Return the Python context of a MATPYTHON Mat, or ``None``."""
    try:
        if A.getType() == PETSc.Mat.Type.PYTHON:
            return A.getPythonContext()
    except PETSc.Error:
        return None
    return None
