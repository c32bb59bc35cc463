"""Incremental 4D-Var: inner-loop KSP, outer loop and the cycled twin experiment.

Notation of Trappler & Vidard, "State-dependent preconditioning for the
inner-loop in Variational Data Assimilation using Machine Learning"
(see :mod:`petsc_nnpc.operator`). One outer loop at ``x_i`` linearizes the
model, solves ``A_{x_i} δx = b_{x_i}`` with a PETSc KSP (the inner loop) and
sets ``x_{i+1} = x_i + δx``.

The inner KSP is configured from the options database. Its defaults
(:data:`KSP_DEFAULTS`) are conjugate gradients without preconditioner,
stopping when the unpreconditioned residual satisfies
``‖b − A δx‖ ≤ 10⁻⁷ ‖b‖`` or after 2000 iterations; options given by the
caller and on the command line (``-ksp_*``, ``-pc_*``) come on top.
"""

import contextlib
import dataclasses
import json
import logging
import math
import os
import time
from typing import List, Optional

import numpy as np

from petsc_nnpc.layout import NaturalLayout
from petsc_nnpc.operator import DAConfig, GaussNewtonOperator, da_config_for_preset
from petsc_nnpc.utils import atomic_save_npz, atomic_write_json, init_petsc

PETSc = init_petsc()

logger = logging.getLogger("petsc_nnpc.fourdvar")

#: Defaults of the inner solve, applied before the options database.
KSP_DEFAULTS = {
    "ksp_type": "cg",
    "ksp_rtol": 1e-7,
    "ksp_atol": 0.0,
    "ksp_max_it": 2000,
    "ksp_norm_type": "unpreconditioned",
    "pc_type": "none",
}

#: Krylov methods that need a symmetric positive definite preconditioner
#: applied on the left.
SYMMETRIC_KSP_TYPES = frozenset({
    "cg", "pipecg", "pipecgrr", "groppcg", "cr", "pipecr", "minres", "symmlq",
    "nash", "stcg", "gltr",
})

#: Preconditioners that are not symmetric in their PETSc default settings.
NONSYMMETRIC_PC_TYPES = frozenset({"sor", "ilu", "kaczmarz", "eisenstat"})

#: Preconditioners that read matrix entries, which a shell matrix does not have.
ENTRY_PC_TYPES = frozenset({
    "jacobi", "pbjacobi", "vpbjacobi", "bjacobi", "asm", "gasm", "icc", "ilu", "lu",
    "cholesky", "sor", "eisenstat", "gamg", "hypre", "ml", "spai", "kaczmarz", "svd",
})

_REASON_TEXT = {
    "CONVERGED_RTOL": "the residual norm fell below rtol times the norm of the right-hand side",
    "CONVERGED_RTOL_NORMAL": "the normal-equation residual fell below rtol",
    "CONVERGED_ATOL": "the residual norm fell below atol",
    "CONVERGED_ATOL_NORMAL": "the normal-equation residual fell below atol",
    "CONVERGED_ITS": "the requested fixed number of iterations was run",
    "CONVERGED_HAPPY_BREAKDOWN": "the Krylov space contains the exact solution",
    "CONVERGED_CG_NEG_CURVE": "CG met negative curvature (trust-region variant)",
    "CONVERGED_CG_CONSTRAINED": "CG reached the trust-region boundary",
    "CONVERGED_STEP_LENGTH": "the step length fell below its tolerance",
    "CONVERGED_ITERATING": "the solve has not finished",
    "DIVERGED_NULL": "the solve stopped on a null-space condition",
    "DIVERGED_MAX_IT": "the maximum number of iterations was reached before the tolerance",
    "DIVERGED_DTOL": "the residual norm grew past dtol times its initial value",
    "DIVERGED_BREAKDOWN": "the Krylov method broke down on a zero denominator",
    "DIVERGED_BREAKDOWN_BICG": "BiCG broke down",
    "DIVERGED_NONSYMMETRIC": "the operator or the preconditioner is not symmetric",
    "DIVERGED_INDEFINITE_PC": "the preconditioner is not positive definite",
    "DIVERGED_NANORINF": "a NaN or Inf appeared in the residual norm",
    "DIVERGED_INDEFINITE_MAT": "the operator is not positive definite",
    "DIVERGED_PCSETUP_FAILED": "the preconditioner set-up failed",
}


def converged_reason_name(reason):
    """Return PETSc's name of a KSP converged reason code, e.g. ``"CONVERGED_RTOL"``."""
    names = {
        value: name
        for name, value in vars(PETSc.KSP.ConvergedReason).items()
        if name.isupper() and name != "ITERATING"
    }
    return names.get(int(reason), f"UNKNOWN_REASON_{int(reason)}")


def converged_reason_text(reason):
    """Return a KSP converged reason code in plain words."""
    name = converged_reason_name(reason)
    return _REASON_TEXT.get(name, f"PETSc reason {name}")


class InnerSolveError(RuntimeError):
    """An inner solve failed in a way that leaves no usable increment.

    Attributes
    ----------
    record : SolveRecord
        What the failed solve did.
    """

    def __init__(self, message, record):
        super().__init__(message)
        self.record = record


@dataclasses.dataclass
class SolveRecord:
    """What one inner solve cost and how it ended.

    Attributes
    ----------
    iterations : int
        Krylov iterations.
    residual_norms : list of float
        Residual norm at every iteration, from iteration 0, in the KSP's norm
        type (the unpreconditioned ``‖b − A δx‖`` by default).
    converged : bool
        Whether PETSc reports convergence.
    converged_reason : str
        PETSc's name of the reason, e.g. ``"CONVERGED_RTOL"``.
    reason_text : str
        The reason in plain words.
    products : int
        Operator products during set-up and solve, including those the
        preconditioner spent in its set-up.
    setup_products : int
        The part of ``products`` spent in the KSP and PC set-up.
    wall_time : float
        Seconds for set-up and solve.
    setup_time : float
        The part of ``wall_time`` spent in set-up.
    norm_type : str
        Norm of ``residual_norms``.
    rhs_norm : float
        ``‖b‖``.
    true_relative_residual : float
        ``‖b − A δx‖ / ‖b‖`` recomputed after the solve with one extra
        product, not counted in ``products``.
    ksp_type, pc_type : str
        Solver and preconditioner types.
    """

    iterations: int
    residual_norms: List[float]
    converged: bool
    converged_reason: str
    reason_text: str
    products: int
    setup_products: int
    wall_time: float
    setup_time: float
    norm_type: str
    rhs_norm: float
    true_relative_residual: float
    ksp_type: str
    pc_type: str

    def to_dict(self):
        """Return the record as plain JSON-ready values."""
        return dataclasses.asdict(self)


@contextlib.contextmanager
def inserted_options(prefix, options):
    """Put ``options`` under ``prefix`` in the options database, then restore it.

    ``options`` maps names without dash or prefix (``"ksp_rtol"``) to values;
    ``None`` or ``True`` gives a flag without value. Earlier values are put
    back on exit.
    """
    database = PETSc.Options(prefix or None)
    saved = {}
    for name, value in (options or {}).items():
        name = name.lstrip("-")
        saved[name] = database.getString(name) if database.hasName(name) else None
        database.setValue(name, "" if value is None or value is True else str(value))
    try:
        yield
    finally:
        for name, old in saved.items():
            database.delValue(name)
            if old is not None:
                database.setValue(name, old)


def _apply_defaults(ksp):
    ksp.setType(KSP_DEFAULTS["ksp_type"])
    ksp.setTolerances(
        rtol=KSP_DEFAULTS["ksp_rtol"],
        atol=KSP_DEFAULTS["ksp_atol"],
        max_it=KSP_DEFAULTS["ksp_max_it"],
    )
    ksp.setNormType(PETSc.KSP.NormType.UNPRECONDITIONED)
    ksp.getPC().setType(KSP_DEFAULTS["pc_type"])


def check_shell_preconditioner(ksp):
    """Raise ``ValueError`` when the PC needs matrix entries that a shell Mat lacks.

    The Gauss-Newton matrix only applies products, so PC types such as
    Jacobi, ILU or GAMG fail inside PETSc; this check names the fix first.
    """
    A, P = ksp.getOperators()
    pc_type = ksp.getPC().getType()
    if P.getType() == "python" and pc_type in ENTRY_PC_TYPES:
        prefix = ksp.getOptionsPrefix() or ""
        raise ValueError(
            f"-{prefix}pc_type {pc_type} needs matrix entries, but the Gauss-Newton matrix is "
            f"a shell matrix that only applies products: use -{prefix}pc_type none or an LMP "
            "type (nnpc, lmpexact, lmpnystrom, lmpritz)"
        )


def check_symmetric_solver(ksp):
    """Raise ``ValueError`` when a CG-type KSP would use a non-symmetric preconditioner.

    CG and its relatives need a symmetric positive definite preconditioner
    applied on the left. Right or symmetric side, and PC types that are not
    symmetric in PETSc's default settings (SOR without a symmetric sweep,
    ILU, Kaczmarz, Eisenstat), are rejected before any solve.
    """
    ksp_type = ksp.getType()
    if ksp_type not in SYMMETRIC_KSP_TYPES:
        return
    prefix = ksp.getOptionsPrefix() or ""
    database = PETSc.Options(prefix or None)
    # KSPGetPCSide itself fails on a side that CG does not support, so the
    # side is read from the options database first.
    side_name = "left"
    if database.hasName("ksp_pc_side"):
        side_name = (database.getString("ksp_pc_side") or "").lower()
    else:
        try:
            side = ksp.getPCSide()
        except PETSc.Error:
            side_name = "unsupported"
        else:
            if side == PETSc.PC.Side.RIGHT:
                side_name = "right"
            elif side == PETSc.PC.Side.SYMMETRIC:
                side_name = "symmetric"
    if side_name != "left":
        raise ValueError(
            f"KSP {ksp_type} applies its preconditioner on the left only, but the "
            f"preconditioner side is {side_name}: remove -{prefix}ksp_pc_side"
        )
    pc = ksp.getPC()
    pc_type = pc.getType()
    if pc_type not in NONSYMMETRIC_PC_TYPES:
        return
    if pc_type == "sor" and (
        database.hasName("pc_sor_symmetric") or database.hasName("pc_sor_local_symmetric")
    ):
        return
    raise ValueError(
        f"KSP {ksp_type} needs a symmetric positive definite preconditioner, but "
        f"-{prefix}pc_type {pc_type} is not symmetric: use -{prefix}pc_type none, "
        f"an LMP type (nnpc, lmpexact, lmpnystrom, lmpritz), or -{prefix}ksp_type gmres"
    )


class InnerSolver:
    """A PETSc KSP for the inner-loop system, configured from options.

    The defaults of :data:`KSP_DEFAULTS` are set first, then ``options``
    (names without dash, under ``prefix``) go into the options database on
    top of the command line, and ``KSPSetFromOptions`` reads them. The same
    solver can be reused for successive systems on the same Mat, which is
    what preconditioners that recycle information between solves need.

    Parameters
    ----------
    mat : PETSc.Mat
        The Gauss-Newton Mat from :meth:`GaussNewtonOperator.create_mat`.
    prefix : str
        Options prefix of the KSP, e.g. ``"inner_"``.
    options : dict, optional
        Options on top of the defaults, e.g. ``{"pc_type": "nnpc"}``.
    """

    def __init__(self, mat, prefix="", options=None):
        self.mat = mat
        self.operator = mat.getPythonContext()
        self.prefix = prefix or ""
        self.options = dict(options or {})
        ksp = PETSc.KSP().create(comm=mat.getComm())
        ksp.setOptionsPrefix(self.prefix)
        ksp.setOperators(mat)
        _apply_defaults(ksp)
        with inserted_options(self.prefix, self.options):
            ksp.setFromOptions()
            check_symmetric_solver(ksp)
            check_shell_preconditioner(ksp)
        self.ksp = ksp
        self._norms = []
        ksp.setMonitor(self._monitor)

    def _monitor(self, ksp, its, rnorm):
        self._norms.append(float(rnorm))

    def solve(self, b, x=None):
        """Solve ``A x = b`` from a zero initial guess; return ``(x, record)``.

        The KSP and its preconditioner are set up inside the timed and
        counted region, so ``record.products`` and ``record.wall_time``
        include set-up. A solve that stops without convergence is logged
        with its iteration count and reason; it does not raise (the caller
        decides, see :func:`incremental_4dvar`).
        """
        ksp = self.ksp
        operator = self.operator
        if x is None:
            x = b.duplicate()
        x.set(0.0)
        self._norms = []
        products_before = operator.products
        with inserted_options(self.prefix, self.options):
            start = time.perf_counter()
            ksp.setUp()
            setup_time = time.perf_counter() - start
            setup_products = operator.products - products_before
            try:
                ksp.solve(b, x)
            except PETSc.Error as error:
                raise RuntimeError(
                    f"the inner solve failed inside PETSc (error code {error.ierr}) with KSP "
                    f"{ksp.getType()} and PC {ksp.getPC().getType()}: see PETSc's traceback "
                    "above and check the -ksp_ and -pc_ options"
                ) from error
            wall_time = time.perf_counter() - start
        products = operator.products - products_before
        reason = ksp.getConvergedReason()
        rhs_norm = b.norm()
        # The check of the true residual is left out of the operator's counters.
        counters = (operator.products, operator.wall_time)
        residual = b.duplicate()
        self.mat.mult(x, residual)
        residual.aypx(-1.0, b)
        operator.products, operator.wall_time = counters
        true_relative = residual.norm() / rhs_norm if rhs_norm > 0 else residual.norm()
        norm_type = {
            PETSc.KSP.NormType.UNPRECONDITIONED: "unpreconditioned",
            PETSc.KSP.NormType.PRECONDITIONED: "preconditioned",
            PETSc.KSP.NormType.NATURAL: "natural",
            PETSc.KSP.NormType.NONE: "none",
        }.get(ksp.getNormType(), str(ksp.getNormType()))
        record = SolveRecord(
            iterations=int(ksp.getIterationNumber()),
            residual_norms=list(self._norms),
            converged=reason > 0,
            converged_reason=converged_reason_name(reason),
            reason_text=converged_reason_text(reason),
            products=int(products),
            setup_products=int(setup_products),
            wall_time=wall_time,
            setup_time=setup_time,
            norm_type=norm_type,
            rhs_norm=float(rhs_norm),
            true_relative_residual=float(true_relative),
            ksp_type=ksp.getType(),
            pc_type=ksp.getPC().getType(),
        )
        if not record.converged:
            logger.warning(
                "inner solve did not converge: %s (%s) after %d iterations",
                record.reason_text, record.converged_reason, record.iterations,
            )
        return x, record

    def destroy(self):
        """Destroy the KSP."""
        self.ksp.destroy()


@dataclasses.dataclass
class InnerLoopSystem:
    """One inner-loop system ``A_x δx = b_x`` ready to be solved.

    Attributes
    ----------
    model : DAModel
    operator : GaussNewtonOperator
        Linearized at ``state``.
    mat : PETSc.Mat
        The MATPYTHON Mat of ``operator``, with ``state`` composed on it.
    rhs : PETSc.Vec
        ``b_x`` (``B^{1/2} b_x`` in the ``bhalf`` form).
    state : PETSc.Vec
        Linearization state ``x``.
    background : PETSc.Vec
        Background state ``x_b``.
    observations : ndarray, shape (p,)
        ``y``, ordered by natural index.
    truth : PETSc.Vec or None
        True state at the start of the window, in a twin experiment.
    config : DAConfig
    """

    model: object
    operator: GaussNewtonOperator
    mat: object
    rhs: object
    state: object
    background: object
    observations: np.ndarray
    truth: object
    config: DAConfig


def make_inner_loop_system(model, config, state, observations, background, truth=None):
    """Linearize at ``state`` and return the :class:`InnerLoopSystem`.

    Cost: one forward run with the trajectory stored and one adjoint run.
    """
    operator = GaussNewtonOperator.from_config(model, config)
    y = operator.observations.check(observations)
    operator.linearize(state)
    mat = operator.create_mat()
    rhs = operator.rhs(y, background)
    return InnerLoopSystem(model, operator, mat, rhs, state, background, y, truth, config)


def solve_inner_loop(system, prefix="", options=None):
    """Solve an :class:`InnerLoopSystem` with a fresh KSP; return ``(solution, record)``.

    ``options`` (names without dash, e.g. ``{"pc_type": "lmpexact"}``) and
    the command line under ``prefix`` configure the KSP on top of
    :data:`KSP_DEFAULTS`. The solution is in the system's form (``v`` for
    ``bhalf``); :meth:`GaussNewtonOperator.increment` gives ``δx``.
    """
    solver = InnerSolver(system.mat, prefix=prefix, options=options)
    try:
        return solver.solve(system.rhs)
    finally:
        solver.destroy()


# Perturbations and observations drawn in natural ordering, so that a run
# gives the same numbers on any number of ranks.


def _natural_rng(seed, *keys):
    return np.random.default_rng([int(seed), *[int(k) for k in keys]])


def perturb(operator, x, scale, seed, *keys):
    """Return ``x + scale · σ_b ⊙ ε`` with ε ~ N(0, I) drawn in natural ordering.

    ``σ_b`` is the background-error standard deviation of each entry, so
    ``scale = 1`` draws from ``N(x, B)``.
    """
    noise = _natural_rng(seed, *keys).standard_normal(operator.n)  # (n,)
    out = x.copy()
    out.getArray()[:] += scale * operator.background_error.sigma * noise[operator.natural_indices]
    return out


def observe_with_noise(operator, truth, seed, *keys, noise=True):
    """Return ``y = G(truth) + ε`` with ε ~ N(0, R), shape ``(p,)``.

    Cost: one forward run.
    """
    final = operator.model.forward(truth)
    y = operator.observations.observe(final)  # (p,)
    if noise:
        y = y + operator.observations.sigma_o * _natural_rng(seed, *keys).standard_normal(y.size)
    return y


# Outer loop.


def incremental_4dvar(operator, x0, y, xb, outer_loops=1, solver=None, prefix="",
                      options=None, on_system=None):
    """Run ``outer_loops`` Gauss-Newton outer loops from ``x0``; return the analysis.

    Each outer loop linearizes at ``x_i`` (one forward run), forms ``b_x``
    (one adjoint run), solves the inner system and sets
    ``x_{i+1} = x_i + δx``. ``J`` and its two terms are recorded at every
    ``x_i`` and at the analysis (one more forward run).

    Parameters
    ----------
    operator : GaussNewtonOperator
    x0 : PETSc.Vec
        First linearization state; not modified.
    y : ndarray, shape (p,)
        Observations.
    xb : PETSc.Vec
        Background state.
    outer_loops : int
        Number of outer loops, ≥ 1.
    solver : InnerSolver, optional
        Reused across outer loops; made from ``prefix`` and ``options`` on
        the operator's first Mat when omitted.
    on_system : callable, optional
        Called as ``on_system(outer, operator, mat, b)`` after each system is
        formed and before it is solved, e.g. to solve the same system with
        other preconditioners.

    Returns
    -------
    analysis : PETSc.Vec
    records : list of dict
        One per outer loop: ``outer``, ``J``, ``J_o``, ``J_b`` at ``x_i``,
        and the :class:`SolveRecord` fields of its inner solve.
    final_cost : tuple of float
        ``(J, J_o, J_b)`` at the analysis.

    Raises
    ------
    InnerSolveError
        When an inner solve ends with a reason other than convergence or the
        iteration cap, e.g. an indefinite preconditioner; the analysis is
        not updated with that solve.
    """
    if not isinstance(outer_loops, int) or outer_loops < 1:
        raise ValueError(f"outer_loops = {outer_loops!r} is invalid: use an integer >= 1")
    y = operator.observations.check(y)
    own_solver = solver is None
    mat = solver.mat if solver is not None else None
    x = x0.copy()
    records = []
    b = None
    try:
        for outer in range(outer_loops):
            operator.linearize(x)
            if mat is None:
                mat = operator.get_mat()
            if solver is None:
                solver = InnerSolver(mat, prefix=prefix, options=options)
            J, Jo, Jb = operator.cost(y, xb)
            b = operator.rhs(y, xb, b)
            if on_system is not None:
                on_system(outer, operator, mat, b)
            solution, record = solver.solve(b)
            logger.info(
                "outer loop %d: J = %.6e (J_o = %.6e, J_b = %.6e), %d inner iterations, %s",
                outer, J, Jo, Jb, record.iterations, record.converged_reason,
            )
            if not record.converged and record.converged_reason != "DIVERGED_MAX_IT":
                raise InnerSolveError(
                    f"inner solve of outer loop {outer} failed: {record.reason_text} "
                    f"({record.converged_reason}) after {record.iterations} iterations; "
                    "check the preconditioner options",
                    record,
                )
            x.axpy(1.0, operator.increment(solution))
            records.append(dict(outer=outer, J=J, J_o=Jo, J_b=Jb, **record.to_dict()))
        final_cost = operator.cost(y, xb, x=x)
    finally:
        if own_solver and solver is not None:
            solver.destroy()
    logger.info("analysis: J = %.6e (J_o = %.6e, J_b = %.6e)", *final_cost)
    return x, records, final_cost


# Cycled twin experiment.


@dataclasses.dataclass(frozen=True)
class TwinConfig:
    """Cycled twin experiment (algorithm 3.1 of Trappler & Vidard).

    Attributes
    ----------
    cycles : int
        Number of assimilation cycles ``N``.
    outer_loops : int
        Outer loops per cycle (1 in the paper).
    min_steps, max_steps : int
        Range of the random number of time steps the truth is advanced by
        at the start of each cycle, inclusive.
    perturbation : float
        Standard deviation of the initial perturbations of the truth and of
        the first linearization state, as a fraction of the background-error
        standard deviation of each entry.
    observation_noise : bool
        Whether ``y = G(x_true) + ε`` with ``ε ~ N(0, R)``, or noise-free.
    first_guess : {"analysis", "forecast"}
        ``"analysis"`` (the paper): the next linearization state is the
        previous analysis. ``"forecast"``: it is the previous analysis
        advanced by the same number of steps as the truth.
    seed : int
        Seed of every random draw; draws do not depend on the rank count.
    """

    cycles: int = 3
    outer_loops: int = 1
    min_steps: int = 1
    max_steps: int = 48
    perturbation: float = 0.2
    observation_noise: bool = True
    first_guess: str = "analysis"
    seed: int = 0

    def __post_init__(self):
        for name in ("cycles", "outer_loops", "min_steps", "max_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} = {value!r} is invalid: use an integer >= 1")
        if self.max_steps < self.min_steps:
            raise ValueError(
                f"max_steps = {self.max_steps} is below min_steps = {self.min_steps}: "
                "use min_steps <= max_steps"
            )
        if not (math.isfinite(self.perturbation) and self.perturbation >= 0):
            raise ValueError(
                f"perturbation = {self.perturbation!r} is invalid: use a finite number >= 0"
            )
        if self.first_guess not in ("analysis", "forecast"):
            raise ValueError(
                f"first_guess = {self.first_guess!r} is invalid: use 'analysis' or 'forecast'"
            )

    def to_dict(self):
        """Return the configuration as plain JSON-ready values."""
        return dataclasses.asdict(self)


def cycle_steps(twin_config, cycle):
    """Return the seeded random number of steps the truth advances by in ``cycle``."""
    rng = _natural_rng(twin_config.seed, 2, cycle)
    return int(rng.integers(twin_config.min_steps, twin_config.max_steps + 1))


def _rmse_by_variable(operator, layout, x, reference):
    difference = layout.gather(
        x.getArray(readonly=True) - reference.getArray(readonly=True), to_all=True
    )  # (n,)
    return {
        name: float(np.sqrt(np.mean(difference[span] ** 2)))
        for name, span in operator.model.variable_slices.items()
    }


class TwinExperiment:
    """The cycled twin experiment, resumable from an output folder.

    Algorithm (Trappler & Vidard, algorithm 3.1)::

        x_true ← x_base + small perturbation
        x_1    ← x_base + small perturbation
        for each cycle:
            advance x_true by a random number of steps
            y ← G(x_true) + ε                  # observe at the end of the window
            linearize at x_i, form b_{x_i}, solve the inner system
            x_i ← x_i + δx_i                   # the analysis is the next x_i

    Observations come from the truth at the start of the window run through
    the window model, so that ``y`` and ``G(x_i)`` refer to the same time.
    With ``out``, the truth, the linearization state and the records are
    written atomically after every cycle (``twin_state-NNNNN.npz`` and
    ``twin.json``). A new run with the same configuration resumes after the
    last finished cycle; a larger number of cycles extends a finished run.

    Parameters
    ----------
    model : DAModel
    da_config : DAConfig
    twin_config : TwinConfig
    base : PETSc.Vec
        Base state ``x_base``.
    background : PETSc.Vec
        Background state ``x_b`` (fixed over the cycles).
    out : str, optional
        Folder for the checkpoint and records.
    """

    def __init__(self, model, da_config, twin_config, base, background, out=None):
        self.model = model
        self.da_config = da_config
        self.twin_config = twin_config
        self.base = base
        self.background = background
        self.out = out
        self.operator = GaussNewtonOperator.from_config(model, da_config)
        self.mat = self.operator.create_mat()
        self.layout = NaturalLayout(model.comm, self.operator.natural_indices, model.n)
        self.mpi = model.comm.tompi4py()

    def _identity(self):
        # The number of cycles is left out, so that a finished run can be extended.
        twin = self.twin_config.to_dict()
        del twin["cycles"]
        return {
            "model": type(self.model).__name__,
            "preset": getattr(getattr(self.model, "config", None), "preset", None),
            "n": int(self.model.n),
            "da_config": self.da_config.to_dict(),
            "twin_config": twin,
        }

    def _json_path(self):
        return os.path.join(self.out, "twin.json")

    def _state_path(self, cycles_done):
        return os.path.join(self.out, f"twin_state-{cycles_done:05d}.npz")

    def _vec_from_natural(self, natural):
        vec = self.model.create_state()
        vec.getArray()[:] = self.layout.from_replicated(natural)
        return vec

    def _load_checkpoint(self):
        """Return ``(cycles_done, truth, x, records)`` from ``out``, or ``None``."""
        if self.out is None or not os.path.exists(self._json_path()):
            return None
        json_path = self._json_path()
        with open(json_path) as handle:
            saved = json.load(handle)
        identity = json.loads(json.dumps(self._identity()))
        if saved.get("identity") != identity:
            raise ValueError(
                f"{json_path} belongs to another twin experiment "
                f"(saved {saved.get('identity')}, requested {identity}): "
                "use another output folder or delete that one"
            )
        cycles_done = int(saved["cycles_done"])
        state_path = self._state_path(cycles_done)
        if not os.path.exists(state_path):
            raise FileNotFoundError(
                f"{json_path} refers to the missing state file {state_path}: "
                "delete the output folder and run again"
            )
        with np.load(state_path) as state:
            truth = self._vec_from_natural(state["truth"])
            x = self._vec_from_natural(state["x"])
        return cycles_done, truth, x, saved["records"]

    def _save_checkpoint(self, cycles_done, truth, x, records, complete):
        if self.out is None:
            return
        truth_natural = self.layout.gather(truth)
        x_natural = self.layout.gather(x)
        if self.mpi.rank == 0:
            # One state file per cycle, written before the JSON that names
            # it: after a kill, the JSON and the state it names always agree.
            atomic_save_npz(self._state_path(cycles_done), truth=truth_natural, x=x_natural)
            atomic_write_json(self._json_path(), {
                "identity": self._identity(),
                "cycles_done": cycles_done,
                "complete": complete,
                "records": records,
            })
            previous = self._state_path(cycles_done - 1)
            if os.path.exists(previous):
                os.unlink(previous)
        self.mpi.Barrier()

    def run(self, prefix="", options=None, on_system=None, progress=True):
        """Run the remaining cycles; return the list of per-outer-loop records.

        Each record contains ``cycle``, ``steps``, the :func:`incremental_4dvar`
        record fields (``J``, ``J_o``, ``J_b``, iterations, residual norms,
        reason, products, times), ``J_analysis`` and the root-mean-square
        error per variable of the first guess and of the analysis against
        the truth. ``on_system(cycle, outer, operator, mat, b)`` is called on
        every inner system before it is solved.
        """
        config = self.twin_config
        operator = self.operator
        checkpoint = self._load_checkpoint()
        if checkpoint is None:
            start_cycle, records = 0, []
            truth = perturb(operator, self.base, config.perturbation, config.seed, 0)
            x = perturb(operator, self.base, config.perturbation, config.seed, 1)
        else:
            start_cycle, truth, x, records = checkpoint
            logger.info("resuming the twin experiment after cycle %d", start_cycle)
        solver = InnerSolver(self.mat, prefix=prefix, options=options)
        cycles = range(start_cycle, config.cycles)
        if progress and self.mpi.rank == 0:
            from tqdm import tqdm

            cycles = tqdm(cycles, desc="twin cycles", initial=start_cycle, total=config.cycles,
                          disable=None)
        try:
            for cycle in cycles:
                # Generate observations.
                steps = cycle_steps(config, cycle)
                truth = self.model.advance(truth, steps)
                if config.first_guess == "forecast":
                    x = self.model.advance(x, steps)
                y = observe_with_noise(
                    operator, truth, config.seed, 3, cycle, noise=config.observation_noise)

                # Linearize, solve, update.
                hook = None
                if on_system is not None:
                    def hook(outer, op, mat, b, cycle=cycle):
                        on_system(cycle, outer, op, mat, b)
                error_before = _rmse_by_variable(operator, self.layout, x, truth)
                analysis, outer_records, final_cost = incremental_4dvar(
                    operator, x, y, self.background, config.outer_loops,
                    solver=solver, on_system=hook,
                )
                error_after = _rmse_by_variable(operator, self.layout, analysis, truth)
                for record in outer_records:
                    record.update(
                        cycle=cycle, steps=steps, J_analysis=final_cost[0],
                        J_o_analysis=final_cost[1], J_b_analysis=final_cost[2],
                        rmse_first_guess=error_before, rmse_analysis=error_after,
                    )
                records.extend(outer_records)
                x = analysis
                self._save_checkpoint(cycle + 1, truth, x, records,
                                      complete=cycle + 1 == config.cycles)
        finally:
            solver.destroy()
        self.truth, self.analysis = truth, x
        return records


def load_preset_states(model):
    """Return ``(base, background)`` Vecs for the shallow-water model's preset.

    The base state is the shipped spun-up state and the background the
    shipped time mean of a long run (see :mod:`shallow_water.state`).
    """
    from shallow_water import state as sw_state

    preset = model.config.preset
    base = model.from_natural(sw_state.load_spunup_state(preset))
    background = model.from_natural(sw_state.load_background_state(preset))
    return base, background


def create_preset_model(preset, comm=None):
    """Return the :class:`shallow_water.ShallowWaterModel` of a named preset."""
    from shallow_water.config import get_config
    from shallow_water.model import ShallowWaterModel

    return ShallowWaterModel(get_config(preset), comm=comm or PETSc.COMM_WORLD)


def first_twin_system(model, da_config, twin_config, base, background):
    """Return the inner-loop system of the twin experiment's first cycle, unsolved.

    It is the system that :class:`TwinExperiment` solves in cycle 0 with the
    same configuration: the truth and the linearization state are ``base``
    with independent perturbations, the truth is advanced by the cycle's
    random number of steps and observed with noise.

    Cost: the advance of the truth, two forward runs (observations and the
    stored trajectory) and one adjoint run.
    """
    operator = GaussNewtonOperator.from_config(model, da_config)
    truth = perturb(operator, base, twin_config.perturbation, twin_config.seed, 0)
    state = perturb(operator, base, twin_config.perturbation, twin_config.seed, 1)
    steps = cycle_steps(twin_config, 0)
    truth = model.advance(truth, steps)
    if twin_config.first_guess == "forecast":
        state = model.advance(state, steps)
    y = observe_with_noise(operator, truth, twin_config.seed, 3, 0,
                           noise=twin_config.observation_noise)
    return make_inner_loop_system(model, da_config, state, y, background, truth=truth)


def build_inner_loop_system(preset, form=None, seed=0, perturbation=0.2, steps=None,
                            observation_noise=True, comm=None, da_config=None):
    """Build the first inner-loop system of the twin experiment on a model preset.

    The truth and the linearization state are the preset's spun-up state
    with independent perturbations (``perturbation`` × σ_b per entry). The
    truth is advanced by ``steps`` time steps, or by a seeded random number
    in ``[1, window_steps]`` when ``steps`` is omitted, and observed with
    noise. The same seed gives the same system on any number of ranks.
    ``da_config`` replaces the preset's observations and covariances
    (:func:`da_config_for_preset`), and then ``form`` is not used.
    See :func:`first_twin_system` for the cost.
    """
    model = create_preset_model(preset, comm)
    if da_config is None:
        da_config = da_config_for_preset(preset, form=form)
    twin_config = TwinConfig(
        min_steps=1 if steps is None else steps,
        max_steps=model.config.window_steps if steps is None else steps,
        perturbation=perturbation,
        observation_noise=observation_noise,
        seed=seed,
    )
    base, background = load_preset_states(model)
    return first_twin_system(model, da_config, twin_config, base, background)
