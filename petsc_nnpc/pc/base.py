"""Base class of the spectral LMP preconditioners.

Each PC type is a petsc4py Python PC context: a subclass of :class:`LMPBase`
that implements :meth:`LMPBase.compute_eigenpairs`. The base class reads the
options under the PC's own prefix, checks the eigenpairs, picks ``μ``, builds
the :class:`~petsc_nnpc.lmp.SplitLMP`, applies it, and reports what it built
in ``-ksp_view``.
"""

import dataclasses
import difflib
import logging
import time
from typing import Optional

import numpy as np
from petsc4py import PETSc

from petsc_nnpc.lmp import (
    MU_RULES,
    BlockProduct,
    SplitLMP,
    check_eigenvalues,
    check_orthonormal,
    choose_mu,
    logged,
)
from petsc_nnpc.pc.registry import track_python_pc, untrack_python_pc

log = logging.getLogger("petsc_nnpc.pc")

EVENT_SETUP = PETSc.Log.Event("LMPSetUp")

STATE_NAME = "nnpc_state"

_PRECISIONS = {"double": np.float64, "single": np.float32}

_TRUE = ("", "1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


@dataclasses.dataclass(frozen=True)
class Option:
    """One option read under the PC's prefix (``-pc_<type>_<name>``)."""

    name: str
    kind: str  # "int", "float", "str", "bool" or "mu"
    default: object
    help: str


@dataclasses.dataclass
class Eigenpairs:
    """Eigenpairs returned by a source.

    ``U`` holds this rank's rows, shape (local_size, r), orthonormal columns;
    ``lam`` the eigenvalues, shape (r,), descending, replicated;
    ``lam_next`` the eigenvalue ``λ_{r+1}`` when the source computes it.
    """

    U: np.ndarray
    lam: np.ndarray
    lam_next: Optional[float] = None


class LMPBase:
    """Python PC context for ``P = L Lᵀ``, ``L = I + U (μ Λ^{-1/2} − I) Uᵀ``.

    Subclasses set :attr:`type_name` and :attr:`OPTIONS`, and implement
    :meth:`compute_eigenpairs`. ``apply`` applies ``P`` (left
    preconditioning, as in KSPCG) and ``applySymmetricLeft/Right`` apply
    ``L``, which is symmetric.

    The eigenpairs are computed in ``setUp`` and again before a solve whose
    operator state has changed: a different Mat, a change of its object
    state, or a different or modified linearization-state Vec composed on
    it as ``"nnpc_state"``.

    PETSc Options
    -------------
    -pc_<type>_rank <int>
        Number ``r`` of eigenpairs.
    -pc_<type>_mu <number|min|max|spectral>
        Scaling ``μ``; see :func:`petsc_nnpc.lmp.choose_mu`.
    -pc_<type>_orthonormality_tolerance <float>
        Largest accepted deviation of ``UᵀU`` from ``I`` (default 1e-6).
    -pc_<type>_precision <double|single>
        Storage of ``U`` in the applications (default double). ``single``
        halves the memory traffic of an application, which reads ``U``
        twice, at the price of a relative rounding error near 1e-7 in the
        correction ``U (…) Uᵀ x``.
    """

    type_name = None
    OPTIONS = (
        Option("rank", "int", 10, "number r of eigenpairs"),
        Option("mu", "mu", "1", "scaling mu: a positive number, min, max or spectral"),
        Option("orthonormality_tolerance", "float", 1e-6,
               "largest accepted deviation of U^T U from the identity"),
        Option("precision", "str", "double",
               "storage of U in the applications: double or single"),
    )

    def __init__(self):
        self.parameters = {option.name: option.default for option in self.OPTIONS}
        self.lmp = None
        self.mu_rule = None
        self.state_key = None
        self.setup_count = 0
        self.setup_time = 0.0
        self.setup_products = 0
        self.total_setup_products = 0
        self._options_read = False
        self._norm_warning_given = False

    # Options.

    def create(self, pc):
        """Track the PC so that its Python context is released before exit."""
        track_python_pc(pc.handle)

    def destroy(self, pc):
        """Forget the PC; PETSc is destroying it."""
        untrack_python_pc(pc.handle)

    @property
    def class_name(self):
        """Name of the context class, used in every error message."""
        return type(self).__name__

    def options_prefix(self, pc):
        """Return the prefix of this PC's options, e.g. ``"pc_nnpc_"``."""
        return f"{pc.getOptionsPrefix() or ''}pc_{self.type_name}_"

    def set_parameters(self, **parameters):
        """Set parameters by name, as the matching options would.

        Values given here are kept unless the options database overrides
        them in a later ``setFromOptions``.
        """
        for name, value in parameters.items():
            option = self._option(name)
            self.parameters[name] = self._parse(option, value, name)
        self.state_key = None

    def setFromOptions(self, pc):
        """Read this PC's options and reject unknown names under its prefix."""
        self.read_options(pc)

    def read_options(self, pc):
        """Read the options under :meth:`options_prefix`."""
        prefix = self.options_prefix(pc)
        database = PETSc.Options()
        everything = database.getAll()
        known = {option.name for option in self.OPTIONS}
        unknown = sorted(
            name[len(prefix):] for name in everything
            if name.startswith(prefix) and name[len(prefix):] not in known
        )
        if unknown:
            raise ValueError(self._unknown_message(prefix, unknown, known))
        for option in self.OPTIONS:
            full = prefix + option.name
            if full in everything:
                value = everything[full]
                self.parameters[option.name] = self._parse(option, value, "-" + full)
        self._options_read = True
        self.state_key = None

    def _unknown_message(self, prefix, unknown, known):
        parts = []
        for name in unknown:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f" (did you mean -{prefix}{close[0]}?)" if close else ""
            parts.append(f"-{prefix}{name}{hint}")
        valid = ", ".join(f"-{prefix}{name}" for name in sorted(known))
        return (
            f"{self.class_name}: unknown option {', '.join(parts)}; "
            f"valid options are {valid}"
        )

    def _option(self, name):
        for option in self.OPTIONS:
            if option.name == name:
                return option
        valid = ", ".join(option.name for option in self.OPTIONS)
        raise ValueError(f"{self.class_name}: unknown parameter {name!r}; valid parameters: {valid}")

    def _parse(self, option, value, label):
        if value is None:
            # A flag given without a value, such as -pc_nnpc_refine, turns a bool option on.
            return True if option.kind == "bool" else None
        text = str(value).strip()
        if option.kind == "bool":
            if isinstance(value, bool):
                return value
            if text.lower() in _TRUE:
                return True
            if text.lower() in _FALSE:
                return False
            raise ValueError(f"{self.class_name}: invalid {label} = {text!r}; expected true or false")
        if option.kind == "int":
            try:
                number = int(text)
            except ValueError:
                raise ValueError(
                    f"{self.class_name}: invalid {label} = {text!r}; expected an integer"
                ) from None
            return number
        if option.kind == "float":
            try:
                return float(text)
            except ValueError:
                raise ValueError(
                    f"{self.class_name}: invalid {label} = {text!r}; expected a number"
                ) from None
        if option.kind == "mu":
            if text.lower() in MU_RULES:
                return text.lower()
            try:
                mu = float(text)
            except ValueError:
                raise ValueError(
                    f"{self.class_name}: invalid {label} = {text!r}; "
                    f"give a positive number or one of {', '.join(MU_RULES)}"
                ) from None
            if not (mu > 0 and np.isfinite(mu)):
                raise ValueError(
                    f"{self.class_name}: invalid {label} = {text!r}; mu must be a positive "
                    f"finite number (or one of {', '.join(MU_RULES)})"
                )
            return mu
        return text

    # Life cycle.

    def setUp(self, pc):
        """Compute the eigenpairs for the current operator state unless already done."""
        if not self._options_read:
            self.read_options(pc)
        A, _ = pc.getOperators()
        key = self.operator_state_key(A)
        if self.state_key is not None and key == self.state_key:
            return
        self._build(pc, A, key)

    def preSolve(self, pc, ksp, b, x):
        """Redo the setup when the operator state changed since the last one."""
        A, _ = pc.getOperators()
        key = self.operator_state_key(A)
        if key != self.state_key:
            self._build(pc, A, key)
        if ksp.getNormType() == PETSc.KSP.NormType.PRECONDITIONED:
            self._warn_preconditioned_norm()

    def _warn_preconditioned_norm(self):
        """Warn once when ``‖P r‖`` decides convergence and ``P`` is far from ``I``.

        The relative test on ``‖P r‖`` can stop while ``‖r‖ / ‖b‖`` is up to
        ``cond(P)`` times larger than the tolerance.
        """
        if self._norm_warning_given or self.lmp is None:
            return
        eigenvalues = np.append(self.lmp.mu ** 2 / self.lmp.lam, 1.0)
        condition = eigenvalues.max() / eigenvalues.min()
        if condition > 10.0:
            self._norm_warning_given = True
            log.warning(
                "%s: the KSP tests convergence on the preconditioned residual ||P r|| and "
                "cond(P) = %.3g, so ||b - A x|| / ||b|| may end up to %.3g times above the "
                "tolerance; use -ksp_norm_type unpreconditioned to test ||b - A x||",
                self.class_name, condition, condition,
            )

    def reset(self, pc):
        """Drop the eigenpairs; the next setUp computes them again."""
        self.lmp = None
        self.state_key = None

    def operator_state_key(self, A):
        """Return a value that changes whenever the operator or its state changes."""
        state = A.query(STATE_NAME)
        state_key = None if state is None else (state.handle, state.stateGet())
        return (A.handle, A.stateGet(), state_key)

    def _build(self, pc, A, key):
        start = time.perf_counter()
        products = BlockProduct(A)
        with logged(EVENT_SETUP):
            rank = self.parameters["rank"]
            if rank is not None and rank < 0:
                raise ValueError(
                    f"{self.class_name}: invalid rank {rank}; the rank must be a positive integer"
                )
            pairs = self.compute_eigenpairs(pc, A, products)
            self.lmp = self._make_lmp(A, pairs)
        self.state_key = key
        self.setup_count += 1
        self.setup_time = time.perf_counter() - start
        self.setup_products = products.products
        self.total_setup_products += products.products
        log.info(
            "%s: set up rank %d, %s, in %.3g s and %d operator products",
            self.class_name, 0 if self.lmp is None else self.lmp.rank,
            self.mu_rule or "identity", self.setup_time, self.setup_products,
        )

    def _make_lmp(self, A, pairs):
        if pairs is None or pairs.lam.size == 0:
            self.mu_rule = None
            return None
        lam = np.asarray(pairs.lam, dtype=np.float64)
        check_eigenvalues(self.class_name, lam)
        if np.any(np.diff(lam) > 0):
            raise ValueError(f"{self.class_name}: the eigenvalues are not in descending order")
        local_rows = A.getLocalSize()[0]
        if pairs.U.shape != (local_rows, lam.size):
            raise ValueError(
                f"{self.class_name}: the eigenvectors have local shape {pairs.U.shape}, "
                f"expected ({local_rows}, {lam.size})"
            )
        check_orthonormal(
            self.class_name, A.getComm(), pairs.U,
            tolerance=self.parameters["orthonormality_tolerance"],
        )
        try:
            mu, self.mu_rule = choose_mu(lam, self.parameters["mu"], pairs.lam_next)
        except ValueError as error:
            raise ValueError(f"{self.class_name}: {error}") from None
        precision = str(self.parameters["precision"]).lower()
        if precision not in _PRECISIONS:
            raise ValueError(
                f"{self.class_name}: invalid -pc_{self.type_name}_precision {precision!r}; "
                f"use double or single"
            )
        return SplitLMP(A.getComm(), pairs.U, lam, mu, dtype=_PRECISIONS[precision])

    def compute_eigenpairs(self, pc, A, products):
        """Return the :class:`Eigenpairs` for operator ``A``; ``products(Z)`` gives ``A Z``."""
        raise NotImplementedError(f"{self.class_name} does not implement compute_eigenpairs")

    # Application.

    def apply(self, pc, x, y):
        """Set ``y = P x``, ``P = I + U (μ² Λ⁻¹ − I) Uᵀ``."""
        if self.lmp is None:
            x.copy(y)
        else:
            self.lmp.apply(x, y)

    def applySymmetricLeft(self, pc, x, y):
        """Set ``y = L x``, ``L = I + U (μ Λ^{-1/2} − I) Uᵀ``."""
        if self.lmp is None:
            x.copy(y)
        else:
            self.lmp.apply_split(x, y)

    def applySymmetricRight(self, pc, x, y):
        """Set ``y = Lᵀ x``; ``L`` is symmetric, so this equals ``L x``."""
        self.applySymmetricLeft(pc, x, y)

    # Reporting.

    def describe_source(self):
        """Return lines that describe where the eigenpairs come from."""
        return []

    def view(self, pc, viewer):
        """Print the type, source, rank, μ, device, setup time and products."""
        if viewer.getType() != PETSc.Viewer.Type.ASCII:
            return
        lines = [
            f"{self.class_name}: spectral LMP P = L L^T, L = I + U (mu Lambda^(-1/2) - I) U^T",
        ]
        source_lines = self.describe_source()
        if not any(line.startswith("device:") for line in source_lines):
            source_lines.append("device: host CPU (numpy) on every rank")
        lines += ["  " + line for line in source_lines]
        if self.lmp is None:
            lines.append("  rank: 0 (identity: no eigenpairs yet)")
        else:
            lam = self.lmp.lam
            lines.append(f"  rank: {self.lmp.rank} (U stored in {self.parameters['precision']} precision)")
            lines.append(f"  mu = {self.lmp.mu:.6g} ({self.mu_rule})")
            lines.append(f"  eigenvalues: lambda_1 = {lam[0]:.6g}, lambda_r = {lam[-1]:.6g}")
        lines.append(
            f"  setup: {self.setup_count} setups, last {self.setup_time:.3g} s "
            f"and {self.setup_products} operator products "
            f"({self.total_setup_products} in all)"
        )
        for line in lines:
            viewer.printfASCII(line + "\n")
