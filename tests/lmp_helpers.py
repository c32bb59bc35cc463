"""Small SPD operators with known eigenpairs for the LMP and PC tests.

``SpectralProblem`` defines, in natural ordering, ``A(x) = Q(x) diag(λ(x)) Q(x)ᵀ``
with an exponentially decaying spectrum, as Trappler & Vidard report for
the Gauss-Newton matrix, and eigenvectors and eigenvalues that vary slowly
with a state ``x``. ``SpectralOperator`` is a MATPYTHON shell with the
interface of the Gauss-Newton operator (``mult_block``, ``products``,
``natural_indices``, ``n``, ``grid_shape``, ``form``) and the state composed
on the Mat as ``"nnpc_state"``. The natural ordering is a seeded permutation
of PETSc's global ordering, so the tests also exercise the layout code.
Dense ``n × n`` matrices appear here only because the problems are tiny.
"""

import numpy as np
from petsc4py import PETSc


class SpectralProblem:
    """Eigenpairs of ``A(x)`` as a function of the state ``x`` (natural ordering).

    Parameters
    ----------
    ny, nx : int
        Grid shape; ``n = ny · nx``.
    lam_max, lam_min : float
        Largest eigenvalue and the floor of the spectrum at the reference
        state: ``λ_i = lam_min + (lam_max − lam_min) exp(−i / decay)``, an
        exponentially decaying head on top of a floor, as ``GᵀR⁻¹G + B⁻¹``
        has above the smallest eigenvalue of ``B⁻¹``.
    decay : float
        e-folding length of the head, in eigenvalue indices (default n / 8).
    seed : int
        Seed of the eigenvectors and of the state dependence.
    """

    def __init__(self, ny=12, nx=16, lam_max=2.0e4, lam_min=0.5, decay=None, seed=3):
        self.grid_shape = (ny, nx)
        self.n = ny * nx
        rng = np.random.default_rng(seed)
        self.Q0, _ = np.linalg.qr(rng.standard_normal((self.n, self.n)))  # (n, n)
        decay = decay or self.n / 8.0
        self.lam0 = lam_min + (lam_max - lam_min) * np.exp(-np.arange(self.n) / decay)  # (n,)
        skew = rng.standard_normal((self.n, self.n))
        self.K = (skew - skew.T) / np.sqrt(self.n)  # skew-symmetric generator of rotations
        self.w = rng.standard_normal(self.n) / np.sqrt(self.n)
        self.phase = rng.uniform(0.0, 2.0 * np.pi, self.n)

    def parameter(self, x):
        """Return the scalar ``s(x) = ⟨w, x⟩`` that drives the state dependence."""
        return float(self.w @ np.asarray(x, dtype=np.float64))

    def eigenpairs(self, x):
        """Return ``(Q, lam)``: all eigenpairs of ``A(x)``, eigenvalues descending."""
        s = self.parameter(x)
        # Cayley transform of s K: an orthogonal rotation close to I for small s.
        identity = np.eye(self.n)
        rotation = np.linalg.solve(identity - 0.05 * s * self.K, identity + 0.05 * s * self.K)
        Q = self.Q0 @ rotation
        lam = self.lam0 * (1.0 + 0.2 * np.tanh(s) * np.sin(self.phase + np.arange(self.n) / 7.0) ** 2)
        order = np.argsort(lam)[::-1]
        return Q[:, order], lam[order]

    def dense(self, x):
        """Return ``A(x)`` as a dense ``(n, n)`` array (tests on tiny problems only)."""
        Q, lam = self.eigenpairs(x)
        return (Q * lam) @ Q.T

    def state(self, s, seed=0):
        """Return a smooth natural-ordering state with ``⟨w, x⟩ = s``."""
        ny, nx = self.grid_shape
        yy, xx = np.meshgrid(np.linspace(0, 1, ny), np.linspace(0, 1, nx), indexing="ij")
        rng = np.random.default_rng(seed)
        a, b = rng.uniform(1.0, 3.0, 2)
        x = (np.sin(a * np.pi * xx) * np.cos(b * np.pi * yy)).reshape(-1)
        x -= (self.parameter(x) - s) * self.w / (self.w @ self.w)
        return x


class SpectralOperator:
    """MATPYTHON context ``A(x)`` over a :class:`SpectralProblem`, distributed by rows.

    ``natural_indices`` maps each locally owned entry (PETSc global
    ordering) to its natural index through a seeded permutation.
    """

    def __init__(self, problem, comm=None, seed=11, form="paper"):
        self.problem = problem
        self.comm = comm or PETSc.COMM_WORLD
        self.mpi = self.comm.tompi4py()
        self.n = problem.n
        self.grid_shape = problem.grid_shape
        self.form = form
        self.products = 0
        self.mult_calls = 0
        layout = PETSc.Vec().createMPI(self.n, comm=self.comm)
        self.start, self.end = layout.getOwnershipRange()
        layout.destroy()
        self.global_to_natural = np.random.default_rng(seed).permutation(self.n)
        self.natural_indices = self.global_to_natural[self.start:self.end].astype(np.int64)
        self.state = None
        self.mat = None
        self.A_rows = None

    @property
    def local_size(self):
        """Number of locally owned rows."""
        return self.end - self.start

    def create_mat(self):
        """Return the MATPYTHON Mat, flagged symmetric."""
        mat = PETSc.Mat().createPython(
            [(self.local_size, self.n), (self.local_size, self.n)], self, comm=self.comm)
        mat.setOption(PETSc.Mat.Option.SYMMETRIC, True)
        mat.setUp()
        self.mat = mat
        return mat

    def create_state(self):
        """Return a zero state Vec in the distributed layout."""
        return PETSc.Vec().createMPI((self.local_size, self.n), comm=self.comm)

    def natural_to_vec(self, natural, vec=None):
        """Fill (or create) a Vec from a natural-ordering array held on every rank."""
        vec = vec or self.create_state()
        vec.getArray()[:] = np.asarray(natural)[self.natural_indices]
        return vec

    def linearize(self, x_natural):
        """Set the state to ``x_natural`` and compose it on the Mat as ``nnpc_state``."""
        x_natural = np.asarray(x_natural, dtype=np.float64)
        dense = self.problem.dense(x_natural)  # (n, n), natural ordering
        # Rows owned here and all columns, in PETSc's global ordering.
        self.A_rows = dense[np.ix_(self.natural_indices, self.global_to_natural)]
        self.state = self.natural_to_vec(x_natural)
        if self.mat is not None:
            self.mat.compose("nnpc_state", self.state)
        return self.state

    def _full(self, local):
        pieces = self.mpi.allgather(np.ascontiguousarray(local))
        return np.concatenate(pieces, axis=0)

    def mult_block(self, Z):
        """Return ``A Z`` for a local array ``Z`` of shape (local_size, k)."""
        if self.A_rows is None:
            raise RuntimeError("SpectralOperator: call linearize(x) before the first product")
        Z = np.asarray(Z, dtype=np.float64)
        self.products += Z.shape[1]
        return self.A_rows @ self._full(Z)

    def mult(self, mat, x, y):
        """MATPYTHON product ``y = A x``."""
        if self.A_rows is None:
            raise RuntimeError("SpectralOperator: call linearize(x) before the first product")
        self.products += 1
        self.mult_calls += 1
        y.getArray()[:] = self.A_rows @ self._full(x.getArray(readonly=True))

    def multTranspose(self, mat, x, y):
        """``Aᵀ x = A x``: the operator is symmetric."""
        self.mult(mat, x, y)


class StandInPredictor:
    """Stand-in for the trained network with the ``predict`` interface.

    ``predict(x_natural)`` returns the ``rank`` leading eigenpairs of
    ``A(x)`` in natural ordering, optionally perturbed: ``noise`` adds a
    seeded Gaussian perturbation of that relative size to ``U`` (then
    re-orthonormalized by QR) and to ``lam``.
    """

    def __init__(self, problem, rank, noise=0.0, seed=5, form="paper"):
        self.problem = problem
        self.rank = rank
        self.n = problem.n
        self.grid_shape = problem.grid_shape
        self.form = form
        self.noise = noise
        self.seed = seed
        self.calls = 0

    def predict(self, x_natural):
        """Return ``U`` (n, rank) orthonormal and ``lam`` (rank,) descending."""
        self.calls += 1
        Q, lam = self.problem.eigenpairs(x_natural)
        U = Q[:, :self.rank].copy()  # (n, r)
        lam = lam[:self.rank].copy()  # (r,)
        if self.noise:
            rng = np.random.default_rng(self.seed)
            U += self.noise * rng.standard_normal(U.shape) / np.sqrt(self.n)
            U, _ = np.linalg.qr(U)
            lam *= 1.0 + self.noise * rng.uniform(-1.0, 1.0, lam.size)
            lam = np.sort(lam)[::-1]
        return U, lam


class FixedPredictor:
    """Predictor that returns given arrays, to test bad network output."""

    def __init__(self, U, lam, rank=None):
        self.U = U
        self.lam = lam
        self.rank = rank if rank is not None else np.asarray(lam).size
        self.calls = 0

    def predict(self, x_natural):
        """Return the stored ``(U, lam)``."""
        self.calls += 1
        return self.U, self.lam


def make_ksp(mat, pc_type=None, rtol=1e-7, max_it=2000, prefix=None):
    """Return a CG KSP on ``mat`` that tests the unpreconditioned residual norm."""
    ksp = PETSc.KSP().create(comm=mat.getComm())
    if prefix:
        ksp.setOptionsPrefix(prefix)
    ksp.setOperators(mat)
    ksp.setType(PETSc.KSP.Type.CG)
    ksp.setNormType(PETSc.KSP.NormType.UNPRECONDITIONED)
    ksp.setTolerances(rtol=rtol, atol=0.0, max_it=max_it)
    if pc_type is not None:
        ksp.getPC().setType(pc_type)
    return ksp


def solve(ksp, b):
    """Solve from a zero initial guess; return ``(x, iterations, reason)``."""
    x = b.duplicate()
    x.set(0.0)
    ksp.solve(b, x)
    return x, ksp.getIterationNumber(), ksp.getConvergedReason()


def true_relative_residual(mat, b, x):
    """Return ``‖b − A x‖ / ‖b‖`` computed with a fresh product."""
    r = b.duplicate()
    mat.mult(x, r)
    r.aypx(-1.0, b)
    return r.norm() / b.norm()


def clear_options(prefix="pc_"):
    """Remove every option whose name starts with ``prefix`` from the database."""
    options = PETSc.Options()
    for name in list(options.getAll()):
        if name.startswith(prefix):
            options.delValue(name)
