"""``lmpfile``: a spectral LMP from eigenpairs stored in a file.

The eigenpairs do not follow the linearization state: the same ``(U, Λ)``
precondition every system. With the exact leading eigenpairs of the
Gauss-Newton matrix at the background state, this is the state-independent
baseline that shows whether a state-dependent preconditioner pays.
"""

import logging
import os

import numpy as np
from petsc4py import PETSc

from petsc_nnpc.layout import NaturalLayout
from petsc_nnpc.lmp import check_eigenvalues, logged, mpi_comm, operator_context
from petsc_nnpc.pc.base import Eigenpairs, LMPBase, Option
from petsc_nnpc.utils import atomic_save_npz, read_npz

log = logging.getLogger("petsc_nnpc.pc.static")

EVENT_READ = PETSc.Log.Event("LMPFileRead")

# Files read by every LMPFile of the process, keyed by (path, modification time).
_file_cache = {}


def save_eigenpairs(path, U, lam, lam_next=None, **metadata):
    """Write eigenpairs for ``-pc_lmpfile_path`` atomically.

    Parameters
    ----------
    path : str
        Output ``.npz`` file.
    U : ndarray, shape (n, R)
        Orthonormal eigenvectors in natural ordering.
    lam : ndarray, shape (R,)
        Eigenvalues in descending order.
    lam_next : float, optional
        ``λ_{R+1}``, for ``-pc_lmpfile_mu spectral``.
    **metadata
        Scalars or strings stored beside them (grid, form, state).
    """
    U = np.asarray(U, dtype=np.float64)
    lam = np.asarray(lam, dtype=np.float64).reshape(-1)
    if U.ndim != 2 or U.shape[1] != lam.size:
        raise ValueError(
            f"U of shape {U.shape} does not match {lam.size} eigenvalues: "
            "give U of shape (n, R) with R eigenvalues"
        )
    extra = {key: np.asarray(value) for key, value in metadata.items()}
    atomic_save_npz(
        path, U=U, lam=lam, lam_next=np.asarray(np.nan if lam_next is None else lam_next),
        **extra,
    )


def _read(path):
    key = (path, os.path.getmtime(path))
    cached = _file_cache.get(key)
    if cached is None:
        archive = read_npz(path)
        missing = {"U", "lam"} - set(archive)
        if missing:
            raise ValueError(
                f"{path} lacks the arrays {', '.join(sorted(missing))}: write it with "
                "petsc_nnpc.pc.static.save_eigenpairs"
            )
        lam_next = float(archive["lam_next"]) if "lam_next" in archive else np.nan
        cached = (archive["U"], archive["lam"].reshape(-1), lam_next)
        _file_cache.clear()
        _file_cache[key] = cached
    return cached


class LMPFile(LMPBase):
    """Spectral LMP from eigenpairs read from a ``.npz`` file, fixed over states.

    The file contains ``U`` ``(n, R)`` in natural ordering and ``lam`` ``(R,)``
    in descending order (see :func:`save_eigenpairs`). Rank 0 reads it and
    each rank receives its own rows of the first ``r`` columns. Setup costs
    no operator product.

    PETSc Options
    -------------
    -pc_lmpfile_path <path>
        The eigenpair file (required).
    -pc_lmpfile_rank <int>
        Number ``r`` of eigenpairs kept, at most ``R`` (default ``R``).
    -pc_lmpfile_mu <number|min|max|spectral>
        Scaling ``μ`` (default 1); see :func:`petsc_nnpc.lmp.choose_mu`.
    -pc_lmpfile_orthonormality_tolerance <float>
        Largest accepted deviation of ``UᵀU`` from ``I`` (default 1e-6).
    """

    type_name = "lmpfile"
    OPTIONS = LMPBase.OPTIONS[1:] + (
        Option("rank", "int", None, "number r of eigenpairs, at most the number in the file"),
        Option("path", "str", None, "npz file with U (n, R) in natural ordering and lam (R,)"),
    )

    def __init__(self):
        super().__init__()
        self.file_rank = None

    def _layout(self, A):
        context = operator_context(A)
        indices = getattr(context, "natural_indices", None)
        if callable(indices):
            indices = indices()
        n = getattr(context, "n", None)
        if indices is None or n is None:
            start, end = A.getOwnershipRange()
            indices, n = np.arange(start, end, dtype=np.int64), A.getSize()[0]
        return NaturalLayout(A.getComm(), indices, n)

    def compute_eigenpairs(self, pc, A, products):
        path = self.parameters["path"]
        if path is None:
            raise ValueError(
                f"{self.class_name}: no eigenpair file given; set -pc_lmpfile_path FILE "
                "(written by petsc_nnpc.pc.static.save_eigenpairs)"
            )
        path = os.path.abspath(os.path.expanduser(path))
        mpi = mpi_comm(A.getComm())
        layout = self._layout(A)
        rank = self.parameters["rank"]
        U_natural, lam, lam_next, error = None, None, None, None
        if mpi.rank == 0:
            try:
                with logged(EVENT_READ):
                    U_all, lam_all, lam_after = _read(path)
                if U_all.ndim != 2 or U_all.shape[0] != layout.n or U_all.shape[1] != lam_all.size:
                    raise ValueError(
                        f"{path} contains U of shape {U_all.shape} with {lam_all.size} eigenvalues, "
                        f"but the operator has n = {layout.n}: use a file made for this operator"
                    )
                available = lam_all.size
                wanted = available if rank is None else rank
                if wanted < 1 or wanted > available:
                    raise ValueError(
                        f"invalid -pc_lmpfile_rank {wanted}: {path} contains {available} "
                        f"eigenpairs; use a rank between 1 and {available}"
                    )
                check_eigenvalues(path, lam_all[:wanted])
                U_natural = np.ascontiguousarray(U_all[:, :wanted])
                lam = lam_all[:wanted].copy()
                if wanted < available:
                    lam_next = float(lam_all[wanted])
                elif np.isfinite(lam_after):
                    lam_next = float(lam_after)
                self.file_rank = available
            except (OSError, ValueError) as caught:
                error = f"{type(caught).__name__}: {caught}"
        error = mpi.bcast(error, root=0)
        if error is not None:
            raise ValueError(f"{self.class_name}: cannot use -pc_lmpfile_path {path}: {error}")
        lam = mpi.bcast(lam, root=0)
        lam_next = mpi.bcast(lam_next, root=0)
        self.file_rank = mpi.bcast(self.file_rank, root=0)
        U = layout.scatter(U_natural, root=0)  # (local_size, r)
        return Eigenpairs(U=np.ascontiguousarray(U), lam=lam, lam_next=lam_next)

    def describe_source(self):
        lines = [f"source: eigenpairs from {self.parameters['path']}, fixed over states"]
        if self.file_rank is not None:
            lines.append(f"pairs in the file: {self.file_rank}")
        return lines
