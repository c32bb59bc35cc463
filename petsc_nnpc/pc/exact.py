"""``lmpexact``: the oracle LMP from the leading eigenpairs of the operator."""

import logging

import numpy as np
from petsc4py import PETSc

from petsc_nnpc.lmp import (
    allreduce_sum,
    logged,
    mpi_comm,
    orthonormalize,
    rayleigh_ritz,
)
from petsc_nnpc.pc.base import Eigenpairs, LMPBase, Option

log = logging.getLogger("petsc_nnpc.pc.exact")

EVENT_EIGENSOLVE = PETSc.Log.Event("LMPExactEigensolve")

METHODS = ("auto", "lanczos", "slepc")


#: Relative norm below which a new Lanczos direction counts as already spanned.
BREAKDOWN_TOLERANCE = 1e-10


class LMPExact(LMPBase):
    """Spectral LMP from the ``r`` leading eigenpairs of the operator (the oracle).

    The eigenpairs come from one of:

    * ``lanczos``: block Lanczos with full reorthogonalization and thick
      restarts on the block product. Each cycle extends a block Krylov basis
      by blocks of ``b = r + 1 + oversampling`` vectors up to ``ncv``
      columns and takes Ritz pairs (Rayleigh-Ritz on the basis). It then
      restarts from the leading ``b`` Ritz vectors, whose products are kept.
      The cycles stop when the ``r + 1`` leading residuals satisfy
      ``‖A y_i − θ_i y_i‖ ≤ tol · θ_1``.
    * ``slepc``: SLEPc's Krylov-Schur solver on the operator, when slepc4py
      is importable.

    ``λ_{r+1}`` is computed as well, for ``-pc_lmpexact_mu spectral``. Every
    product of the operator is counted in the setup products.

    PETSc Options
    -------------
    -pc_lmpexact_rank <int>
        Number ``r`` of eigenpairs (default 10).
    -pc_lmpexact_mu <number|min|max|spectral>
        Scaling ``μ`` (default 1).
    -pc_lmpexact_method <auto|lanczos|slepc>
        Eigensolver; ``auto`` (default) is ``slepc`` when importable, else
        ``lanczos``. No solver forms the ``n × n`` matrix.
    -pc_lmpexact_tol <float>
        Relative residual tolerance of the iterative solvers (default 1e-8).
    -pc_lmpexact_max_it <int>
        Restart cycles of ``lanczos`` or iterations of ``slepc`` (default 100).
    -pc_lmpexact_ncv <int>
        Largest basis size of ``lanczos`` (default ``max(6 b, b + 40)``, at
        most ``n``). The basis and its products take ``2 ncv`` local vectors.
        On the ``small`` shallow-water preset at ``r = 50``, ``6 b`` needed
        896 products where ``4 b`` needed 1904.
    -pc_lmpexact_seed <int>
        Seed of the random start block (default 0).
    -pc_lmpexact_orthonormality_tolerance <float>
        Largest accepted deviation of ``UᵀU`` from ``I`` (default 1e-6).
    -pc_lmpexact_precision <double|single>
        Storage of ``U`` in the applications (default double); ``single``
        halves the memory traffic of an application.
    """

    type_name = "lmpexact"
    OPTIONS = LMPBase.OPTIONS + (
        Option("method", "str", "auto", "eigensolver: auto, lanczos or slepc"),
        Option("tol", "float", 1e-8, "relative residual tolerance of the iterative eigensolvers"),
        Option("max_it", "int", 100, "restart cycles (lanczos) or iterations (slepc)"),
        Option("ncv", "int", None, "largest basis size of the block Lanczos solver"),
        Option("seed", "int", 0, "seed of the random start block"),
    )

    def __init__(self):
        super().__init__()
        self.method_used = None
        self.largest_residual = None

    def _method(self):
        method = str(self.parameters["method"]).lower()
        if method not in METHODS:
            raise ValueError(
                f"{self.class_name}: invalid -pc_lmpexact_method {method!r}; "
                f"use one of {', '.join(METHODS)}"
            )
        if method == "auto":
            return "slepc" if _slepc_available() else "lanczos"
        if method == "slepc" and not _slepc_available():
            raise ValueError(
                f"{self.class_name}: -pc_lmpexact_method slepc needs slepc4py, which is not "
                f"importable; use -pc_lmpexact_method lanczos"
            )
        return method

    def compute_eigenpairs(self, pc, A, products):
        n = A.getSize()[0]
        rank = self.parameters["rank"]
        if rank is None or rank < 1 or rank > n:
            raise ValueError(
                f"{self.class_name}: invalid -pc_lmpexact_rank {rank}; use a rank between 1 and "
                f"n = {n}"
            )
        wanted = min(rank + 1, n)
        method = self._method()
        with logged(EVENT_EIGENSOLVE):
            if method == "slepc":
                theta, Y, residuals = self._slepc(A, products, wanted)
            else:
                theta, Y, residuals = self._lanczos(A, products, wanted)
        self.method_used = method
        self.largest_residual = float(residuals[:wanted].max()) if residuals.size else 0.0
        lam_next = float(theta[rank]) if rank < theta.size else None
        return Eigenpairs(U=np.ascontiguousarray(Y[:, :rank]), lam=theta[:rank].copy(),
                          lam_next=lam_next)

    def _lanczos(self, A, products, wanted):
        """Block Lanczos with full reorthogonalization and thick restarts."""
        comm = A.getComm()
        mpi = mpi_comm(comm)
        n = A.getSize()[0]
        start, end = A.getOwnershipRange()
        block = min(wanted + max(5, wanted // 10), n)
        ncv = self.parameters["ncv"] or max(6 * block, block + 40)
        ncv = min(ncv, n)
        if ncv < block + 1 and ncv < n:
            raise ValueError(
                f"{self.class_name}: -pc_lmpexact_ncv {ncv} is too small for {wanted} "
                f"eigenpairs; use at least {block + 1}"
            )
        # Start block drawn in the global ordering so that it does not depend on the ranks.
        rng = np.random.default_rng(self.parameters["seed"])
        X = rng.standard_normal((n, block))[start:end]  # (local_size, b)
        V, _ = orthonormalize(comm, X)
        AV = products(V)
        tolerance = self.parameters["tol"]

        theta, Y, residuals = None, None, None
        next_block = AV  # products of the block that the next Krylov block extends
        for cycle in range(self.parameters["max_it"]):
            # Extend the basis block by block, orthogonal to all earlier blocks.
            while V.shape[1] < ncv:
                W = next_block[:, :min(block, ncv - V.shape[1])]
                scale = np.sqrt(allreduce_sum(mpi, np.sum(W * W, axis=0)).max())
                for _ in range(2):
                    W = W - V @ allreduce_sum(mpi, V.T @ W)
                # Directions that the basis already spans leave only round-off
                # after the projection. Normalizing that noise would fill the
                # basis with vectors unrelated to A. The Krylov space of the
                # identity plus a low-rank term (the bhalf form) saturates so.
                norms = np.sqrt(allreduce_sum(mpi, np.sum(W * W, axis=0)))
                W = W[:, norms > BREAKDOWN_TOLERANCE * scale]
                if W.shape[1] > 0:
                    W, _ = orthonormalize(comm, W)
                if W.shape[1] == 0:
                    break
                AW = products(W)
                V = np.hstack([V, W])
                AV = np.hstack([AV, AW])
                next_block = AW
            theta, Y, AY, residuals = rayleigh_ritz(comm, V, AV)
            converged = residuals[:wanted] <= tolerance * abs(theta[0])
            log.debug("%s: cycle %d, basis %d, %d of %d pairs converged",
                      self.class_name, cycle, V.shape[1], int(converged.sum()), wanted)
            if np.all(converged) or V.shape[1] >= n:
                return theta, Y, residuals
            # Thick restart: keep the leading Ritz vectors and their products.
            keep = min(max(block, wanted + 1), Y.shape[1] - 1)
            V, AV = Y[:, :keep], AY[:, :keep]
            next_block = AV[:, :block]
        raise RuntimeError(
            f"{self.class_name}: block Lanczos did not reach -pc_lmpexact_tol {tolerance:g} "
            f"in {self.parameters['max_it']} cycles (largest residual "
            f"{residuals[:wanted].max() / abs(theta[0]):.3g}); raise -pc_lmpexact_max_it "
            f"or -pc_lmpexact_ncv"
        )

    def _slepc(self, A, products, wanted):
        """Leading eigenpairs from SLEPc's EPS on the shell operator."""
        # NOTE: slepc4py was not installed where this was written, so this
        # path has not been run; the other methods are tested.
        from slepc4py import SLEPc

        comm = A.getComm()
        counted = PETSc.Mat().createPython(A.getSizes(), _CountedOperator(products), comm=comm)
        counted.setUp()
        eps = SLEPc.EPS().create(comm=comm)
        eps.setOperators(counted)
        eps.setProblemType(SLEPc.EPS.ProblemType.HEP)
        eps.setWhichEigenpairs(SLEPc.EPS.Which.LARGEST_REAL)
        eps.setDimensions(nev=wanted)
        eps.setTolerances(tol=self.parameters["tol"], max_it=self.parameters["max_it"])
        eps.solve()
        if eps.getConverged() < wanted:
            raise RuntimeError(
                f"{self.class_name}: SLEPc converged {eps.getConverged()} of {wanted} "
                f"eigenpairs; raise -pc_lmpexact_max_it"
            )
        vector = counted.createVecRight()
        theta = np.empty(wanted)
        Y = np.empty((vector.getLocalSize(), wanted))
        residuals = np.empty(wanted)
        for i in range(wanted):
            theta[i] = eps.getEigenpair(i, vector).real
            Y[:, i] = vector.getArray(readonly=True)
            residuals[i] = eps.computeError(i, SLEPc.EPS.ErrorType.ABSOLUTE)
        order = np.argsort(theta)[::-1]
        Y, _ = orthonormalize(comm, Y[:, order])
        return theta[order], Y, residuals[order]

    def describe_source(self):
        lines = [f"source: leading eigenpairs of the operator ({self.method_used or 'not computed yet'})"]
        if self.largest_residual is not None:
            lines.append(f"largest residual |A y - theta y|: {self.largest_residual:.3g}")
        return lines


class _CountedOperator:
    """MATPYTHON context that forwards products to a Mat through a counting BlockProduct."""

    def __init__(self, products):
        self.products = products

    def mult(self, mat, x, y):
        y.getArray()[:] = self.products(x.getArray(readonly=True)[:, None])[:, 0]


def _slepc_available():
    try:
        import slepc4py  # noqa: F401
    except ImportError:
        return False
    return True
