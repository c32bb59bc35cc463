"""``lmpritz``: LMP from Ritz pairs recycled from the previous CG solve."""

import logging

import numpy as np
from petsc4py import PETSc

from petsc_nnpc.lmp import allreduce_sum, logged, mpi_comm, orthonormalize, rayleigh_ritz
from petsc_nnpc.pc.base import Eigenpairs, LMPBase, Option

log = logging.getLogger("petsc_nnpc.pc.ritz")

EVENT_RITZ = PETSc.Log.Event("LMPRitzPairs")


class LMPRitz(LMPBase):
    """Spectral LMP built from Ritz pairs of the previous CG solve of the same KSP.

    The idea is the spectral LMP of Tshimanga, Gratton, Weaver & Sartenaer
    (2008), "Limited-memory preconditioners, with application to
    incremental four-dimensional variational data assimilation", Q. J. R.
    Meteorol. Soc. 134(632), doi:10.1002/qj.228: the Krylov information of
    one inner loop preconditions the next.

    PETSc's CG exposes neither its Lanczos vectors nor its coefficients, so
    this PC records two sequences during each solve. The iterates ``x_j``
    come from a KSP monitor, which PETSc's CG calls after it updates the
    solution in place. The residuals ``r_j = b − A x_j`` are the inputs of
    the PC applications, one per iteration. Then ``d_j = x_{j+1} − x_j`` spans the Krylov
    subspace of the solve and ``A d_j = r_j − r_{j+1}`` is known without any
    new product. A Rayleigh-Ritz step of ``A`` on ``span(d_0, …, d_{m−1})``
    gives Ritz pairs ``(θ_i, y_i)`` of ``A`` itself, whatever preconditioner
    the solve used, with exact residual norms ``‖A y_i − θ_i y_i‖``. (With
    the Lanczos tridiagonal matrix one only has the bound ``β_m |s_{m,i}|``.)
    Pairs with ``‖A y_i − θ_i y_i‖ ≤ tol · θ_i`` are kept, the largest
    ``θ_i`` first, up to the rank, and precondition the next solve.

    The first solve is unpreconditioned. The memory is ``2 · max_vectors``
    local vectors, plus ``2 r`` for the kept pairs and their products. A
    solve that runs longer records only its first ``max_vectors`` iterations.

    PETSc Options
    -------------
    -pc_lmpritz_rank <int>
        Largest number of Ritz pairs kept (default 10).
    -pc_lmpritz_mu <number|min|max|spectral>
        Scaling ``μ`` (default 1).
    -pc_lmpritz_tol <float>
        Relative residual ``‖A y − θ y‖ / θ`` below which a pair counts as
        converged (default 1e-2).
    -pc_lmpritz_max_vectors <int>
        Largest number of iterates and residuals recorded per solve (default 100).
    -pc_lmpritz_keep_previous <bool>
        Add the pairs that preconditioned a solve to the Rayleigh-Ritz basis
        built after it (default true). A solve preconditioned with them has
        deflated their directions, so without them its own Krylov subspace
        rarely contains converged leading pairs and every other solve would run
        unpreconditioned. Their products ``A y`` are those of the operator
        of their own solve, so for a changed operator their residuals are
        estimates. No new product is spent.
    -pc_lmpritz_orthonormality_tolerance <float>
        Largest accepted deviation of ``UᵀU`` from ``I`` (default 1e-6).
    -pc_lmpritz_precision <double|single>
        Storage of ``U`` in the applications (default double); ``single``
        halves the memory traffic of an application.
    """

    type_name = "lmpritz"
    OPTIONS = LMPBase.OPTIONS + (
        Option("tol", "float", 1e-2, "relative residual of a converged Ritz pair"),
        Option("max_vectors", "int", 100, "iterates and residuals recorded per solve"),
        Option("keep_previous", "bool", True,
               "add the previous pairs to the Rayleigh-Ritz basis of the next solve"),
    )

    def __init__(self):
        super().__init__()
        self.generation = 0
        self.pending = None
        self.pending_products = None
        self.recording = False
        self.iterates = {}
        self.residuals = []
        self.pairs_found = 0
        self.pairs_converged = 0
        self.vectors_recorded = 0
        self._monitored = set()
        self._ksp_warning_given = False

    def operator_state_key(self, A):
        # The eigenpairs depend on the previous solves only, not on the operator.
        return ("ritz", self.generation)

    def compute_eigenpairs(self, pc, A, products):
        return self.pending

    def preSolve(self, pc, ksp, b, x):
        """Build the LMP from the last pairs and start recording this solve."""
        super().preSolve(pc, ksp, b, x)
        if self.parameters["max_vectors"] < 2:
            raise ValueError(
                f"{self.class_name}: invalid -pc_lmpritz_max_vectors "
                f"{self.parameters['max_vectors']}; use at least 2"
            )
        if ksp.getType() != PETSc.KSP.Type.CG:
            if not self._ksp_warning_given:
                self._ksp_warning_given = True
                log.warning("%s: KSP type %s is not cg; no Ritz pairs are recorded",
                            self.class_name, ksp.getType())
            self.recording = False
            return
        if ksp.handle not in self._monitored:
            ksp.setMonitor(self._monitor)
            self._monitored.add(ksp.handle)
        self.iterates = {}
        self.residuals = []
        self.recording = True

    def _monitor(self, ksp, its, rnorm):
        if self.recording and its < self.parameters["max_vectors"]:
            self.iterates[its] = ksp.getSolution().getArray(readonly=True).copy()

    def apply(self, pc, x, y):
        if self.recording and len(self.residuals) < self.parameters["max_vectors"]:
            self.residuals.append(x.getArray(readonly=True).copy())
        super().apply(pc, x, y)

    def postSolve(self, pc, ksp, b, x):
        """Compute the Ritz pairs of the finished solve for the next one."""
        if not self.recording:
            return
        self.recording = False
        A, _ = pc.getOperators()
        with logged(EVENT_RITZ):
            self.pending = self._ritz_pairs(A.getComm())
        self.generation += 1
        self.iterates = {}
        self.residuals = []

    def _ritz_pairs(self, comm):
        mpi = mpi_comm(comm)
        steps = 0
        while steps in self.iterates and steps + 1 in self.iterates and steps + 1 < len(self.residuals):
            steps += 1
        self.vectors_recorded = steps

        bases, products = [], []
        if self.parameters["keep_previous"] and self.pending is not None:
            # Products from the previous operator: no new product, an estimate for this one.
            bases.append(self.pending.U)
            products.append(self.pending_products)
        if steps > 0:
            X = np.column_stack([self.iterates[j] for j in range(steps + 1)])  # (local_size, m + 1)
            R = np.column_stack(self.residuals[:steps + 1])  # (local_size, m + 1)
            D = X[:, 1:] - X[:, :-1]  # (local_size, m): d_j = x_{j+1} - x_j
            AD = R[:, :-1] - R[:, 1:]  # (local_size, m): A d_j = r_j - r_{j+1}
            norms = np.sqrt(allreduce_sum(mpi, np.einsum("ij,ij->j", D, D)))  # (m,)
            nonzero = norms > 0
            bases.append(D[:, nonzero] / norms[nonzero])
            products.append(AD[:, nonzero] / norms[nonzero])
        if not bases:
            self.pairs_found = self.pairs_converged = 0
            return None

        Q, transform = orthonormalize(comm, np.hstack(bases))
        AQ = np.hstack(products) @ transform
        theta, Y, AY, residuals = rayleigh_ritz(comm, Q, AQ)
        converged = (theta > 0) & (residuals <= self.parameters["tol"] * np.abs(theta))

        self.pairs_found = theta.size
        self.pairs_converged = int(converged.sum())
        keep = np.flatnonzero(converged)[:self.parameters["rank"]]
        carried = bases[0].shape[1] if self.parameters["keep_previous"] and self.pending is not None else 0
        log.info("%s: %d Ritz pairs from %d iterations and %d pairs carried over, %d converged, %d kept",
                 self.class_name, theta.size, steps, carried, self.pairs_converged, keep.size)
        if keep.size == 0:
            self.pending_products = None
            return None
        self.pending_products = np.ascontiguousarray(AY[:, keep])
        return Eigenpairs(U=np.ascontiguousarray(Y[:, keep]), lam=theta[keep].copy(),
                          lam_next=None)

    def describe_source(self):
        return [
            "source: Ritz pairs of the previous CG solve (first solve unpreconditioned)",
            f"previous solve: {self.vectors_recorded} iterations recorded, {self.pairs_found} "
            f"Ritz pairs, {self.pairs_converged} with |A y - theta y| <= "
            f"{self.parameters['tol']:g} theta",
        ]
