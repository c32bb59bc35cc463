"""``lmpnystrom``: LMP from a randomized Nyström approximation of the operator."""

import logging

import numpy as np
from petsc4py import PETSc

from petsc_nnpc.lmp import allreduce_sum, cholesky_qr, gram, logged, mpi_comm, operator_context, orthonormalize
from petsc_nnpc.pc.base import Eigenpairs, LMPBase, Option

log = logging.getLogger("petsc_nnpc.pc.nystrom")

EVENT_SKETCH = PETSc.Log.Event("LMPNystromSketch")


class LMPNystrom(LMPBase):
    """Spectral LMP from the randomized Nyström approximation ``A ≈ Û Λ̂ Ûᵀ``.

    Follows Frangella, Tropp & Udell (2023), "Randomized Nyström
    preconditioning", SIAM J. Matrix Anal. Appl. 44(2), algorithm 2.1
    (doi:10.1137/21M1466244), with a sketch of ``ℓ`` columns:

    1. ``Ω``: ``n × ℓ`` Gaussian, seeded and drawn in natural ordering (so
       the result does not depend on the ranks), then orthonormalized.
    2. ``Y = A Ω``: one block product, ``ℓ`` products.
    3. Shift ``ν = √n · eps · ‖Y‖_F``, ``Y_ν = Y + ν Ω``.
    4. ``C = chol(Ωᵀ Y_ν)``, ``B = Y_ν C⁻¹`` (``C`` upper triangular).
    5. Thin SVD ``B = Û Σ Vᵀ`` (from the ``ℓ × ℓ`` Gram matrix),
       ``Λ̂ = max(Σ² − ν, 0)``.

    The ``r ≤ ℓ`` leading pairs are kept; ``λ_{r+1} = Λ̂_{r+1}`` is known
    when ``ℓ > r``. Cost: ``ℓ`` products and ``O(n ℓ²)`` flops.

    PETSc Options
    -------------
    -pc_lmpnystrom_rank <int>
        Number ``r`` of eigenpairs (default 10).
    -pc_lmpnystrom_sketch <int>
        Sketch size ``ℓ ≥ r`` (default ``r + 10``).
    -pc_lmpnystrom_seed <int>
        Seed of ``Ω`` (default 0).
    -pc_lmpnystrom_mu <number|min|max|spectral>
        Scaling ``μ`` (default 1).
    -pc_lmpnystrom_orthonormality_tolerance <float>
        Largest accepted deviation of ``UᵀU`` from ``I`` (default 1e-6).
    -pc_lmpnystrom_precision <double|single>
        Storage of ``U`` in the applications (default double); ``single``
        halves the memory traffic of an application.
    """

    type_name = "lmpnystrom"
    OPTIONS = LMPBase.OPTIONS + (
        Option("sketch", "int", None, "sketch size l >= rank (default rank + 10)"),
        Option("seed", "int", 0, "seed of the Gaussian test matrix"),
    )

    def __init__(self):
        super().__init__()
        self.sketch_used = None
        self.shift = None

    def compute_eigenpairs(self, pc, A, products):
        comm = A.getComm()
        mpi = mpi_comm(comm)
        n = A.getSize()[0]
        rank = self.parameters["rank"]
        if rank is None or rank < 1 or rank > n:
            raise ValueError(
                f"{self.class_name}: invalid -pc_lmpnystrom_rank {rank}; use a rank between 1 "
                f"and n = {n}"
            )
        sketch = self.parameters["sketch"] or min(rank + 10, n)
        if sketch < rank or sketch > n:
            raise ValueError(
                f"{self.class_name}: invalid -pc_lmpnystrom_sketch {sketch}; use a sketch size "
                f"between the rank {rank} and n = {n}"
            )

        with logged(EVENT_SKETCH):
            # Step 1: orthonormal Gaussian test matrix.
            Omega = self._test_matrix(A, n, sketch)  # (local_size, l)
            Omega, _ = orthonormalize(comm, Omega)
            if Omega.shape[1] < sketch:
                raise RuntimeError(f"{self.class_name}: the random test matrix is rank deficient")

            # Steps 2 and 3: the sketch and its shift.
            Y = products(Omega)  # (local_size, l)
            norm_Y = np.sqrt(float(allreduce_sum(mpi, np.einsum("ij,ij->j", Y, Y)).sum()))
            shift = np.sqrt(n) * np.finfo(float).eps * norm_Y
            Y_shifted = Y + shift * Omega

            # Step 4: B = Y_ν C⁻¹ with Ωᵀ Y_ν = Cᵀ C.
            core = gram(mpi, Omega, Y_shifted)  # (l, l) = Ωᵀ Y_ν
            core = 0.5 * (core + core.T)
            try:
                C = np.linalg.cholesky(core).T  # upper triangular, core = Cᵀ C
            except np.linalg.LinAlgError:
                raise ValueError(
                    f"{self.class_name}: Omega^T A Omega is not positive definite; the operator "
                    f"must be symmetric positive definite"
                ) from None
            B = np.linalg.solve(C.T, Y_shifted.T).T  # (local_size, l) = Y_ν C⁻¹

            # Step 5: thin SVD of B through its Gram matrix, then remove the shift.
            G = gram(mpi, B)
            sigma2, V = np.linalg.eigh(0.5 * (G + G.T))
            order = np.argsort(sigma2)[::-1]
            sigma2, V = np.maximum(sigma2[order], 0.0), V[:, order]
            # Directions with σ² at round-off level would make U rank deficient.
            significant = sigma2 > 1e-12 * max(sigma2[0], np.finfo(float).tiny)
            U = (B @ V[:, significant]) / np.sqrt(sigma2[significant])
            U = cholesky_qr(comm, U)
            lam = np.maximum(sigma2[significant] - shift, 0.0)

        self.sketch_used = sketch
        self.shift = shift
        available = int(np.count_nonzero(lam > 0))
        if rank > available:
            raise ValueError(
                f"{self.class_name}: the sketch of size {sketch} found only {available} positive "
                f"eigenvalues, fewer than -pc_lmpnystrom_rank {rank}; lower the rank"
            )
        lam_next = float(lam[rank]) if rank < lam.size and lam[rank] > 0 else None
        return Eigenpairs(U=np.ascontiguousarray(U[:, :rank]), lam=lam[:rank].copy(),
                          lam_next=lam_next)

    def _test_matrix(self, A, n, sketch):
        """Return this rank's rows of the seeded Gaussian ``Ω`` drawn in natural ordering."""
        context = operator_context(A)
        indices = getattr(context, "natural_indices", None)
        if callable(indices):
            indices = indices()
        if indices is None:
            start, end = A.getOwnershipRange()
            indices = np.arange(start, end)
        rng = np.random.default_rng(self.parameters["seed"])
        rows = np.empty((len(indices), sketch))
        # Draw Ω in chunks of rows to bound the memory of ranks that own few rows.
        chunk = max(1, 2 ** 22 // max(sketch, 1))
        order = np.argsort(indices)
        sorted_indices = np.asarray(indices)[order]
        position = 0
        for first in range(0, n, chunk):
            block = rng.standard_normal((min(chunk, n - first), sketch))
            stop = np.searchsorted(sorted_indices, first + block.shape[0])
            selected = order[position:stop]
            rows[selected] = block[sorted_indices[position:stop] - first]
            position = stop
        return rows

    def describe_source(self):
        lines = ["source: randomized Nystrom approximation (Frangella, Tropp & Udell 2023)"]
        if self.sketch_used is not None:
            lines.append(f"sketch size: {self.sketch_used}, seed {self.parameters['seed']}, "
                         f"shift nu = {self.shift:.3g}")
        return lines

