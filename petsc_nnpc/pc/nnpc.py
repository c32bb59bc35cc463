"""``nnpc``: the learned state-dependent LMP.

A trained network maps the linearization state ``x`` to approximate leading
eigenpairs ``(U, Λ)`` of the Gauss-Newton matrix ``A_x`` (Trappler & Vidard,
"State-dependent preconditioning for the inner-loop in Variational Data
Assimilation using Machine Learning", eqs. 2.1 and 2.4).
"""

import logging
import os
import re
import time

import numpy as np
from petsc4py import PETSc

from petsc_nnpc.layout import NaturalLayout
from petsc_nnpc.lmp import (
    EVENT_ORTHONORMALIZE,
    check_eigenvalues,
    logged,
    mpi_comm,
    operator_context,
    orthonormalize,
    rayleigh_ritz,
)
from petsc_nnpc.pc.base import STATE_NAME, Eigenpairs, LMPBase, Option

log = logging.getLogger("petsc_nnpc.pc.nnpc")

EVENT_LOAD = PETSc.Log.Event("NNPCLoad")
EVENT_GATHER = PETSc.Log.Event("NNPCGather")
EVENT_INFERENCE = PETSc.Log.Event("NNPCInference")
EVENT_SCATTER = PETSc.Log.Event("NNPCScatter")
EVENT_REFINE = PETSc.Log.Event("NNPCRefine")

_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")

# Loaded predictors shared by every NNPC of the process, keyed by
# (absolute path, modification time, device).
_predictor_cache = {}


class NNPC(LMPBase):
    """Spectral LMP whose eigenpairs come from a trained network.

    At each new linearization state, the state Vec composed on the operator
    as ``"nnpc_state"`` is gathered in natural ordering on rank 0. The
    network predicts ``U`` ``(n, R)`` and ``lam`` ``(R,)`` there, and the
    first ``r ≤ R`` pairs are kept. The rows of ``U`` are then scattered so
    that each rank stores its own. ``λ_{r+1}`` is known when ``r < R``.

    With refinement (predict-then-correct), one block product ``W = A U``
    (``r`` products) and a Rayleigh-Ritz step on ``range(U)`` replace the
    predicted pairs by the Ritz pairs of ``A`` on that subspace. Cost:
    ``r`` products and ``O(n r²)`` flops.

    PETSc Options
    -------------
    -pc_nnpc_model <path>
        Checkpoint written by the trainer (required unless a predictor is
        given with :meth:`set_predictor`).
    -pc_nnpc_rank <int>
        Number ``r`` of eigenpairs kept; at most the network's rank.
        Default: the network's rank.
    -pc_nnpc_mu <number|min|max|spectral>
        Scaling ``μ`` (default 1); see :func:`petsc_nnpc.lmp.choose_mu`.
    -pc_nnpc_device <cpu|cuda|cuda:N>
        Device of the network on rank 0 (default cpu).
    -pc_nnpc_refine <bool>
        Rayleigh-Ritz correction with one block product (default false).
    -pc_nnpc_orthonormality_tolerance <float>
        Largest accepted deviation of ``UᵀU`` from ``I`` (default 1e-6).
    -pc_nnpc_precision <double|single>
        Storage of ``U`` in the applications (default double); ``single``
        halves the memory traffic of an application.

    Notes
    -----
    The operator is found through the Mat given to the PC. Its Python
    context's ``natural_indices`` and ``n`` build the natural layout, and
    without them the PETSc global ordering is taken as the natural ordering.
    """

    type_name = "nnpc"
    OPTIONS = LMPBase.OPTIONS[1:] + (
        Option("rank", "int", None, "number r of eigenpairs, at most the network's rank"),
        Option("model", "str", None, "path of the network checkpoint"),
        Option("device", "str", "cpu", "device of the network: cpu, cuda or cuda:N"),
        Option("refine", "bool", False, "Rayleigh-Ritz correction with one block product"),
    )

    def __init__(self):
        super().__init__()
        self.predictor = None
        self.predictor_source = None
        self.predictor_rank = None
        self.root = 0
        self.inference_time = 0.0
        self._layouts = {}
        self._loaded_from = None

    def set_predictor(self, predictor, source="given predictor"):
        """Use ``predictor`` (with ``predict(x_natural) -> (U, lam)``) instead of a model file.

        Every rank must call this with the same kind of object; only rank 0
        calls ``predict``.
        """
        self.predictor = predictor
        self.predictor_source = source
        self.predictor_rank = _metadata(predictor, "rank")
        self._loaded_from = None
        self.state_key = None

    # Loading.

    def _check_device(self):
        device = str(self.parameters["device"]).strip().lower()
        if not _DEVICE.match(device):
            raise ValueError(
                f"{self.class_name}: invalid -pc_nnpc_device {device!r}; use cpu, cuda or cuda:N"
            )
        if device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise RuntimeError(
                    f"{self.class_name}: -pc_nnpc_device {device} requested but torch "
                    f"sees no CUDA device; use -pc_nnpc_device cpu"
                )
        return device

    def _load_predictor(self, mpi):
        """Load (or take from the cache) the predictor named by -pc_nnpc_model on the root rank."""
        path = self.parameters["model"]
        if path is None:
            raise ValueError(
                f"{self.class_name}: no network given; set -pc_nnpc_model PATH to a "
                f"checkpoint written by 'nnpc train'"
            )
        device = self._check_device()
        path = os.path.abspath(os.path.expanduser(path))

        error = None
        predictor = None
        if mpi.rank == self.root:
            with logged(EVENT_LOAD):
                try:
                    predictor = _load_cached(path, device)
                except Exception as caught:  # noqa: BLE001
                    # Any failure on the root must reach every rank, or the others
                    # would wait forever in the broadcast below.
                    error = f"{type(caught).__name__}: {caught}"
        error = mpi.bcast(error, root=self.root)
        if error is not None:
            raise RuntimeError(
                f"{self.class_name}: cannot load the network from -pc_nnpc_model {path}: "
                f"{error}"
            )
        self.predictor = predictor
        self.predictor_source = f"network {path}"
        self._loaded_from = (self.parameters["model"], self.parameters["device"])
        self.predictor_rank = mpi.bcast(
            _metadata(predictor, "rank") if mpi.rank == self.root else None, root=self.root
        )

    # Eigenpairs.

    def _layout(self, A):
        context = operator_context(A)
        indices = getattr(context, "natural_indices", None)
        if callable(indices):
            indices = indices()
        n = getattr(context, "n", None)
        key = A.handle
        layout = self._layouts.get(key)
        if layout is None:
            if indices is None or n is None:
                start, end = A.getOwnershipRange()
                indices = np.arange(start, end, dtype=np.int64)
                n = A.getSize()[0]
                log.debug("%s: the operator gives no natural_indices; using PETSc's ordering",
                          self.class_name)
            self._layouts = {key: NaturalLayout(A.getComm(), indices, n)}
            layout = self._layouts[key]
        return layout, context

    def compute_eigenpairs(self, pc, A, products):
        state = A.query(STATE_NAME)
        if state is None:
            raise ValueError(
                f"{self.class_name}: the operator carries no linearization state; compose "
                f"it with A.compose('{STATE_NAME}', x) before the solve"
            )
        mpi = mpi_comm(A.getComm())
        model = self.parameters["model"]
        if model is not None and self._loaded_from != (model, self.parameters["device"]):
            self._load_predictor(mpi)
        elif self.predictor_source is None:
            self._load_predictor(mpi)

        layout, context = self._layout(A)
        self._check_metadata(mpi, layout, context)

        with logged(EVENT_GATHER):
            x_natural = layout.gather(state, root=self.root)  # (n,) on the root
        U_natural, lam, lam_next, error = None, None, None, None
        if mpi.rank == self.root:
            U_natural, lam, lam_next, error = self._predict(x_natural, layout.n)
        error = mpi.bcast(error, root=self.root)
        if error is not None:
            raise ValueError(f"{self.class_name}: {error}")
        lam = mpi.bcast(lam, root=self.root)
        lam_next = mpi.bcast(lam_next, root=self.root)
        with logged(EVENT_SCATTER):
            U = layout.scatter(U_natural, root=self.root)  # (local_size, r)

        if self.parameters["refine"]:
            U, lam, lam_next = self._refine(A, U, products)
        return Eigenpairs(U=np.ascontiguousarray(U), lam=lam, lam_next=lam_next)

    def _predict(self, x_natural, n):
        """Run the network on the root rank; return ``(U, lam, lam_next, error)``."""
        rank = self.parameters["rank"]
        start = time.perf_counter()
        try:
            with logged(EVENT_INFERENCE):
                U, lam = self.predictor.predict(np.asarray(x_natural, dtype=np.float64))
        except Exception as caught:  # noqa: BLE001
            # Reported on every rank by the caller instead of leaving the others waiting.
            return None, None, None, f"the network failed on this state: {caught}"
        self.inference_time = time.perf_counter() - start

        U = np.asarray(U, dtype=np.float64)  # (n, R)
        lam = np.asarray(lam, dtype=np.float64).reshape(-1)  # (R,)
        if U.ndim != 2 or U.shape[0] != n or U.shape[1] != lam.size:
            return None, None, None, (
                f"the network returned U of shape {U.shape} and {lam.size} eigenvalues; "
                f"expected U of shape ({n}, R) with R eigenvalues"
            )
        available = lam.size
        if rank is None:
            rank = available
        if rank == 0 or rank > available:
            return None, None, None, (
                f"invalid -pc_nnpc_rank {rank}: the network provides {available} "
                f"eigenpairs; use a rank between 1 and {available}"
            )
        try:
            check_eigenvalues("the network", lam[:rank])
        except ValueError as caught:
            return None, None, None, str(caught)
        order = np.argsort(lam, kind="stable")[::-1]
        if np.any(order != np.arange(available)):
            U, lam = U[:, order], lam[order]
        lam_next = float(lam[rank]) if rank < available else None
        return np.ascontiguousarray(U[:, :rank]), lam[:rank].copy(), lam_next, None

    def _refine(self, A, U, products):
        """Return Rayleigh-Ritz pairs of ``A`` on ``range(U)`` with one block product."""
        with logged(EVENT_REFINE):
            comm = A.getComm()
            with logged(EVENT_ORTHONORMALIZE):
                Q, _ = orthonormalize(comm, U)
            if Q.shape[1] < U.shape[1]:
                raise ValueError(
                    f"{self.class_name}: the predicted eigenvectors span only {Q.shape[1]} "
                    f"of {U.shape[1]} dimensions; lower -pc_nnpc_rank"
                )
            AQ = products(Q)  # (local_size, r)
            theta, Y, _, residuals = rayleigh_ritz(comm, Q, AQ)
        log.debug("%s: refined eigenvalues %.6g .. %.6g, largest residual %.3g",
                  self.class_name, theta[0], theta[-1], residuals.max())
        return Y, theta, None

    def _check_metadata(self, mpi, layout, context):
        """Reject a network made for another state size, grid or operator form."""
        expected = {
            "n": layout.n,
            "grid_shape": getattr(context, "grid_shape", None),
            "form": getattr(context, "form", None),
        }
        message = None
        if mpi.rank == self.root:
            for name, value in expected.items():
                found = _metadata(self.predictor, name)
                if value is None or found is None:
                    continue
                if name == "grid_shape":
                    value, found = tuple(value), tuple(found)
                if value != found:
                    message = (
                        f"the network was trained for {name} = {found} but the operator has "
                        f"{name} = {value}; use a checkpoint trained for this operator"
                    )
                    break
        message = mpi.bcast(message, root=self.root)
        if message is not None:
            raise ValueError(f"{self.class_name}: {message}")

    def describe_source(self):
        lines = [f"source: {self.predictor_source or 'no network loaded yet'}"]
        if self.predictor_rank is not None:
            lines.append(f"network rank: {self.predictor_rank}")
        lines.append(f"device: network on {self.parameters['device']} of rank {self.root}, "
                     f"applications with numpy on every rank")
        lines.append(f"last inference on rank {self.root}: {self.inference_time:.3g} s")
        lines.append(f"refinement: {'Rayleigh-Ritz with one block product' if self.parameters['refine'] else 'off'}")
        return lines


def _load_cached(path, device):
    if not os.path.exists(path):
        raise FileNotFoundError(f"model file not found: {path}")
    key = (path, os.path.getmtime(path), device)
    predictor = _predictor_cache.get(key)
    if predictor is None:
        from petsc_nnpc.network import load_checkpoint

        predictor = load_checkpoint(path, device=device)
        _predictor_cache.clear()
        _predictor_cache[key] = predictor
    return predictor


def _metadata(predictor, name):
    """Return a checkpoint field of ``predictor`` (attribute or ``metadata`` entry), or None."""
    if predictor is None:
        return None
    value = getattr(predictor, name, None)
    if value is None:
        metadata = getattr(predictor, "metadata", None)
        if isinstance(metadata, dict):
            value = metadata.get(name)
    return value

