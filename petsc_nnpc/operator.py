"""Gauss-Newton matrix of incremental 4D-Var as a PETSc shell matrix.

Notation of Trappler & Vidard, "State-dependent preconditioning for the
inner-loop in Variational Data Assimilation using Machine Learning":

* ``x`` state at the start of the window, ``M`` window model, ``H``
  observation operator applied at the end of the window, ``G = H ∘ M``,
  ``G_x`` its Jacobian at ``x`` (one tangent-linear run then a selection).
* ``R = σ_o² I`` observation-error covariance, ``B`` diagonal
  background-error covariance with one standard deviation per variable.
* Cost ``J(x) = ½‖G(x) − y‖²_{R⁻¹} + ½‖x − x_b‖²_{B⁻¹}``.
* Gauss-Newton matrix ``A_x = G_xᵀ R⁻¹ G_x + B⁻¹`` and right-hand side
  ``b_x = −G_xᵀ R⁻¹ (G(x) − y) − B⁻¹ (x − x_b)``; the increment solves
  ``A_x δx = b_x``.

With ``form="bhalf"`` the unknown is ``v = B^{-1/2} δx`` (the usual
first-level change of variable): the operator is
``I + B^{1/2} G_xᵀ R⁻¹ G_x B^{1/2}``, the right-hand side ``B^{1/2} b_x`` and
the increment ``δx = B^{1/2} v``.

The model is reached only through the :class:`DAModel` protocol, so any model
with forward, tangent-linear (TL) and adjoint runs on a PETSc Vec plugs in.
"""

import dataclasses
import logging
import math
import time
from typing import Mapping, Optional, Protocol, Tuple, runtime_checkable

import numpy as np

from petsc_nnpc.utils import init_petsc

PETSc = init_petsc()

logger = logging.getLogger("petsc_nnpc.operator")

#: Accepted values of ``form``.
FORMS = ("paper", "bhalf")

#: Name under which the linearization state Vec is composed on the Mat.
STATE_KEY = "nnpc_state"

_EVENT_MULT = PETSc.Log.Event("GNOpMult")
_EVENT_MULT_BLOCK = PETSc.Log.Event("GNOpMultBlock")
_EVENT_LINEARIZE = PETSc.Log.Event("GNOpLinearize")
_EVENT_RHS = PETSc.Log.Event("GNOpRHS")


@runtime_checkable
class DAModel(Protocol):
    """Interface a model implements to plug into :class:`GaussNewtonOperator`.

    Vecs are in the model's compact distributed layout; batches of ``k``
    directions are local float64 arrays of shape ``(local_size, k)``.
    """

    comm: "PETSc.Comm"
    n: int
    variable_slices: Mapping[str, slice]
    grid_shape: Tuple[int, int]

    def create_state(self) -> "PETSc.Vec":
        """Return a zeroed state Vec."""

    def natural_indices(self) -> np.ndarray:
        """Return the natural-ordering index of each owned entry, shape ``(local_size,)``."""

    def forward(self, x: "PETSc.Vec") -> "PETSc.Vec":
        """Return ``M(x)``, the state at the end of the window."""

    def advance(self, x: "PETSc.Vec", steps: int) -> "PETSc.Vec":
        """Return the state after ``steps`` time steps."""

    def linearize(self, x: "PETSc.Vec"):
        """Return the trajectory from ``x``; its ``final`` attribute is ``M(x)``."""

    def tl(self, traj, dx: np.ndarray) -> np.ndarray:
        """Return ``M'_x dx`` at the end of the window for ``(local_size, k)`` directions."""

    def adjoint(self, traj, dy: np.ndarray) -> np.ndarray:
        """Return ``M'_xᵀ dy`` for ``(local_size, k)`` end-of-window directions."""


def _check_positive(name, value):
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} = {value!r} is invalid: it must be a finite number > 0")


@dataclasses.dataclass(frozen=True)
class ObservationConfig:
    """Observation network at the end of the window and its error ``R = σ_o² I``.

    By default every entry of ``variable`` is observed. ``stride = s`` keeps
    every s-th cell in each direction of that variable's ``(ny, nx)`` grid.
    ``indices`` instead lists observed entries by their index in the natural
    ordering of the whole state, and then ``variable`` and ``stride`` are
    not used.

    Attributes
    ----------
    variable : str
        Observed variable, a key of the model's ``variable_slices``.
    stride : int
        Spacing between observed cells in each direction, ≥ 1.
    indices : tuple of int or None
        Observed natural-ordering indices (sorted and deduplicated on use).
    sigma_o : float
        Observation-error standard deviation, in the observed variable's unit.
    """

    variable: str = "eta"
    stride: int = 1
    indices: Optional[Tuple[int, ...]] = None
    sigma_o: float = 1.0

    def __post_init__(self):
        _check_positive("sigma_o", self.sigma_o)
        if not isinstance(self.stride, int) or self.stride < 1:
            raise ValueError(f"stride = {self.stride!r} is invalid: use an integer >= 1")
        if self.indices is not None:
            if self.stride != 1:
                raise ValueError(
                    f"stride = {self.stride} and an index list were both given: use one of them"
                )
            indices = tuple(int(i) for i in self.indices)
            if not indices:
                raise ValueError("the observation index list is empty: give at least one index")
            object.__setattr__(self, "indices", indices)


def _default_sigmas():
    return {"eta": 5.0, "u": 0.1, "v": 0.1}


@dataclasses.dataclass(frozen=True)
class BackgroundErrorConfig:
    """Diagonal background-error covariance ``B = diag(σ²)``, one σ per variable.

    Attributes
    ----------
    sigmas : mapping of str to float
        Standard deviation of each variable, in its unit. The defaults are
        those of the paper preset: σ_η = 5 m, σ_u = σ_v = 0.1 m/s.
    """

    sigmas: Mapping[str, float] = dataclasses.field(default_factory=_default_sigmas)

    def __post_init__(self):
        if not self.sigmas:
            raise ValueError("no background-error standard deviation given: set one per variable")
        for name, value in self.sigmas.items():
            _check_positive(f"background-error sigma of {name!r}", value)
        object.__setattr__(self, "sigmas", {str(k): float(v) for k, v in self.sigmas.items()})


@dataclasses.dataclass(frozen=True)
class DAConfig:
    """Observations, covariances and the form of the inner-loop system."""

    observations: ObservationConfig = dataclasses.field(default_factory=ObservationConfig)
    background_error: BackgroundErrorConfig = dataclasses.field(
        default_factory=BackgroundErrorConfig
    )
    form: str = "paper"

    def __post_init__(self):
        if self.form not in FORMS:
            raise ValueError(f"form = {self.form!r} is invalid: use one of {', '.join(FORMS)}")

    def to_dict(self):
        """Return the configuration as plain JSON-ready values."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data):
        """Build a configuration from :meth:`to_dict`'s output."""
        observations = dict(data.get("observations", {}))
        if observations.get("indices") is not None:
            observations["indices"] = tuple(observations["indices"])
        return cls(
            observations=ObservationConfig(**observations),
            background_error=BackgroundErrorConfig(**data.get("background_error", {})),
            form=data.get("form", "paper"),
        )


def da_config_for_preset(preset, form=None):
    """Return the observation and covariance set-up of a model preset.

    ``paper`` and ``tiny`` observe η at every cell with ``R = I`` and
    ``B = diag(5², 0.1², 0.1²)`` (η in m, u and v in m/s), as in the paper.
    ``small`` observes η at every fourth cell in each direction (64
    observations on its 32 × 32 grid), so that the informative part of the
    spectrum (rank at most the number of observations) is within the ranks
    a 2-core demonstration can afford: unpreconditioned CG needs about 46
    iterations there and the exact 64 leading eigenpairs bring it to 9.
    ``form`` overrides the default ``"paper"``.
    """
    presets = {
        "tiny": ObservationConfig(),
        "small": ObservationConfig(stride=4),
        "paper": ObservationConfig(),
    }
    if preset not in presets:
        raise ValueError(f"unknown preset {preset!r}: use one of {', '.join(presets)}")
    return DAConfig(observations=presets[preset], form=form or "paper")


def da_config_from_options(preset, options, form=None):
    """Return the preset's :class:`DAConfig` with overrides from a PETSc options database.

    Reads ``-form paper|bhalf``, ``-obs_stride s``, ``-obs_indices i,j,...``
    (natural-ordering indices of the whole state, in place of a stride),
    ``-obs_sigma σ_o`` and ``-bkg_sigma_NAME σ`` for each variable NAME
    (e.g. ``-bkg_sigma_eta 5``), each falling back on the preset's value.
    """
    base = da_config_for_preset(preset, form=form)
    observations = base.observations
    indices = observations.indices
    if options.hasName("obs_indices"):
        text = options.getString("obs_indices", "")
        try:
            indices = tuple(int(item) for item in text.replace(" ", "").split(",") if item)
        except ValueError:
            raise ValueError(
                f"-obs_indices {text!r} is invalid: give comma-separated integers, e.g. 0,7,42"
            ) from None
    stride = options.getInt("obs_stride", 1 if indices is not None else observations.stride)
    sigma_o = options.getReal("obs_sigma", observations.sigma_o)
    sigmas = {
        name: options.getReal(f"bkg_sigma_{name}", value)
        for name, value in base.background_error.sigmas.items()
    }
    return DAConfig(
        observations=ObservationConfig(variable=observations.variable, stride=stride,
                                       indices=indices, sigma_o=sigma_o),
        background_error=BackgroundErrorConfig(sigmas),
        form=options.getString("form", base.form),
    )


def _check_finite_vec(vec, what):
    local_bad = int(not np.all(np.isfinite(vec.getArray(readonly=True))))
    if vec.getComm().tompi4py().allreduce(local_bad) > 0:
        raise ValueError(f"{what} contains NaN or Inf: check how it was built or loaded")


def _check_block(Z, local_size, what="Z"):
    Z = np.asarray(Z)
    if Z.ndim != 2 or Z.shape[0] != local_size:
        raise ValueError(
            f"{what} has shape {Z.shape}, expected (local_size, k) = ({local_size}, k)"
        )
    return np.ascontiguousarray(Z, dtype=np.float64)


class Observations:
    """Linear observation operator ``H`` at the end of the window, with ``R = σ_o² I``.

    Observations are ordered by increasing natural index, so an observation
    vector ``y`` of size ``p`` does not depend on the number of ranks. Each
    rank applies ``H`` to its own entries; no communication is needed except
    to assemble a full ``(p,)`` vector.

    Parameters
    ----------
    model : DAModel
        The model whose end-of-window state is observed.
    config : ObservationConfig
        Which entries are observed and with which error.
    """

    def __init__(self, model, config):
        self.config = config
        self.sigma_o = config.sigma_o
        self.mpi = model.comm.tompi4py()
        self.indices = self._observed_indices(model, config)  # (p,) natural indices
        self.p = int(self.indices.size)
        natural = np.asarray(model.natural_indices(), dtype=np.int64)  # (local_size,)
        self.local_size = natural.size
        observed = np.isin(natural, self.indices)
        self.local_positions = np.flatnonzero(observed)  # (p_local,) rows of the local array
        self.local_obs_index = np.searchsorted(
            self.indices, natural[self.local_positions]
        )  # (p_local,) positions in y
        self._counts = self.mpi.allgather(self.local_obs_index.size)
        self._all_obs_index = np.concatenate(self.mpi.allgather(self.local_obs_index))

    @staticmethod
    def _observed_indices(model, config):
        n = int(model.n)
        if config.indices is not None:
            indices = np.unique(np.asarray(config.indices, dtype=np.int64))
            bad = indices[(indices < 0) | (indices >= n)]
            if bad.size:
                raise ValueError(
                    f"observation index {int(bad[0])} is outside the state: "
                    f"use natural-ordering indices in [0, {n})"
                )
            return indices
        if config.variable not in model.variable_slices:
            raise ValueError(
                f"observed variable {config.variable!r} is not a model variable: "
                f"use one of {', '.join(model.variable_slices)}"
            )
        span = model.variable_slices[config.variable]
        size = span.stop - span.start
        ny, nx = model.grid_shape
        if config.stride == 1:
            return np.arange(span.start, span.stop, dtype=np.int64)
        if size != ny * nx:
            raise ValueError(
                f"a stride needs a variable at cell centres ({ny}×{nx} entries), "
                f"but {config.variable!r} has {size}: give an index list instead"
            )
        rows = np.arange(0, ny, config.stride)
        cols = np.arange(0, nx, config.stride)
        return (span.start + rows[:, None] * nx + cols[None, :]).ravel().astype(np.int64)

    def check(self, y):
        """Return ``y`` as a float64 ``(p,)`` array, or raise if its size or values are invalid."""
        y = np.asarray(y, dtype=np.float64)
        if y.ndim != 1 or y.size != self.p:
            raise ValueError(
                f"observation vector has shape {y.shape}, expected ({self.p},): "
                f"one value per observed entry, ordered by natural index"
            )
        if not np.all(np.isfinite(y)):
            raise ValueError("observation vector contains NaN or Inf")
        return y

    def observe_local(self, final):
        """Return ``H`` applied to this rank's end-of-window entries.

        ``final`` is a Vec or an array of shape ``(local_size,)`` or
        ``(local_size, k)``; the result has ``p_local`` rows.
        """
        if hasattr(final, "getArray"):
            final = final.getArray(readonly=True)
        return np.asarray(final)[self.local_positions]

    def local_part(self, y):
        """Return this rank's entries ``(p_local,)`` of a full observation vector."""
        return self.check(y)[self.local_obs_index]

    def observe(self, final):
        """Return ``H(final)`` as the full ``(p,)`` vector on every rank."""
        local = np.ascontiguousarray(self.observe_local(final), dtype=np.float64)
        pieces = self.mpi.allgather(local)
        y = np.empty(self.p)
        y[self._all_obs_index] = np.concatenate(pieces)
        return y

    def adjoint_local(self, d_local, k=None):
        """Return ``Hᵀ d`` on this rank: zeros except at the observed rows.

        ``d_local`` has ``p_local`` rows (one column or ``k`` columns).
        """
        d_local = np.asarray(d_local)
        out = np.zeros((self.local_size,) + d_local.shape[1:])
        out[self.local_positions] = d_local
        return out


class BackgroundError:
    """Diagonal ``B = diag(σ²)`` with one standard deviation per model variable.

    Parameters
    ----------
    model : DAModel
        Provides ``variable_slices`` and ``natural_indices``.
    config : BackgroundErrorConfig
        Standard deviation of each variable.
    """

    def __init__(self, model, config):
        missing = [name for name in model.variable_slices if name not in config.sigmas]
        if missing:
            raise ValueError(
                f"no background-error sigma for variable(s) {', '.join(missing)}: "
                f"give one for each of {', '.join(model.variable_slices)}"
            )
        natural = np.asarray(model.natural_indices(), dtype=np.int64)
        sigma = np.full(natural.size, np.nan)
        for name, span in model.variable_slices.items():
            inside = (natural >= span.start) & (natural < span.stop)
            sigma[inside] = config.sigmas[name]
        if np.any(np.isnan(sigma)):
            raise ValueError("the model's variable slices do not cover every state entry")
        self.config = config
        self.sigma = sigma  # (local_size,)
        self.variance = sigma**2  # (local_size,)

    def _scale(self, array, factor):
        array = np.asarray(array)
        return factor[:, None] * array if array.ndim == 2 else factor * array

    def apply_inverse(self, array):
        """Return ``B⁻¹ array`` for a local ``(local_size,)`` or ``(local_size, k)`` array."""
        return self._scale(array, 1.0 / self.variance)

    def apply_sqrt(self, array):
        """Return ``B^{1/2} array`` for a local array."""
        return self._scale(array, self.sigma)


class GaussNewtonOperator:
    """Gauss-Newton matrix ``A_x = G_xᵀ R⁻¹ G_x + B⁻¹`` over any :class:`DAModel`.

    One product ``A_x v`` costs one TL run over the window, one adjoint run
    back and ``O(n)`` diagonal work; the matrix is never formed. A block of
    ``k`` directions costs one batched TL run and one batched adjoint run.

    The operator is the Python context of the MATPYTHON Mat made by
    :meth:`create_mat`, so a preconditioner finds it with
    ``A.getPythonContext()`` and the linearization state with
    ``A.query("nnpc_state")``.

    Parameters
    ----------
    model : DAModel
        Forward, TL and adjoint runs.
    observations : Observations or ObservationConfig
        ``H`` and ``R``.
    background_error : BackgroundError or BackgroundErrorConfig
        ``B``.
    form : {"paper", "bhalf"}
        ``"paper"`` solves for ``δx`` with ``A_x``; ``"bhalf"`` solves for
        ``v = B^{-1/2} δx`` with ``I + B^{1/2} G_xᵀ R⁻¹ G_x B^{1/2}``.

    Attributes
    ----------
    products : int
        Operator products since the last :meth:`reset_counters`; a block of
        ``k`` directions counts ``k``.
    wall_time : float
        Seconds spent in products since the last :meth:`reset_counters`.
    """

    def __init__(self, model, observations, background_error, form="paper"):
        if not isinstance(model, DAModel):
            raise TypeError(
                f"{type(model).__name__} does not implement the DAModel interface "
                "(comm, n, variable_slices, grid_shape, create_state, natural_indices, "
                "forward, advance, linearize, tl, adjoint)"
            )
        if form not in FORMS:
            raise ValueError(f"form = {form!r} is invalid: use one of {', '.join(FORMS)}")
        if isinstance(observations, ObservationConfig):
            observations = Observations(model, observations)
        if isinstance(background_error, BackgroundErrorConfig):
            background_error = BackgroundError(model, background_error)
        self.model = model
        self.observations = observations
        self.background_error = background_error
        self.form = form
        self.comm = model.comm
        self.n = int(model.n)
        self.grid_shape = tuple(model.grid_shape)
        self.natural_indices = np.asarray(model.natural_indices(), dtype=np.int64)
        self.local_size = self.natural_indices.size
        self.trajectory = None
        self.state = None
        self.model_state = None  # M(x), the end-of-window state, as a Vec
        self.state_version = 0
        self._mats = []
        self.products = 0
        self.wall_time = 0.0

    @classmethod
    def from_config(cls, model, config):
        """Build the operator from a :class:`DAConfig`."""
        return cls(model, config.observations, config.background_error, form=config.form)

    # Linearization.

    def linearize(self, x):
        """Run the model from ``x`` and store the trajectory for TL and adjoint runs.

        Cost: one forward run with the trajectory stored. The state Vec is
        copied and composed again on every Mat from :meth:`create_mat` under
        ``"nnpc_state"``, and each Mat is re-assembled so that its PETSc
        object state changes and preconditioners set up again.
        """
        _check_finite_vec(x, "linearization state")
        _EVENT_LINEARIZE.begin()
        try:
            self.trajectory = self.model.linearize(x)
        finally:
            _EVENT_LINEARIZE.end()
        final = self.trajectory.final
        _check_finite_vec(final, "model state at the end of the window")
        self.state = x.copy()
        self.model_state = final
        self.state_version += 1
        for mat in self._mats:
            self._attach_state(mat)
        return self.trajectory

    def _require_state(self):
        if self.trajectory is None:
            raise RuntimeError(
                "the Gauss-Newton operator has no linearization state: call linearize(x) first"
            )

    def _attach_state(self, mat):
        mat.compose(STATE_KEY, self.state)
        mat.assemble()

    # Products.

    def _apply_block(self, Z):
        """Return ``A Z`` for a local ``(local_size, k)`` block without counting."""
        obs = self.observations
        bkg = self.background_error
        if self.form == "bhalf":
            dx = bkg.apply_sqrt(Z)  # (local_size, k)
        else:
            dx = Z
        dy = self.model.tl(self.trajectory, dx)  # (local_size, k) at window end
        d = obs.observe_local(dy) / obs.sigma_o**2  # (p_local, k): R⁻¹ G_x dx
        grad = self.model.adjoint(self.trajectory, obs.adjoint_local(d))  # (local_size, k)
        if self.form == "bhalf":
            return Z + bkg.apply_sqrt(grad)
        return grad + bkg.apply_inverse(Z)

    def mult_block(self, Z):
        """Return ``A Z`` for a local block ``Z`` of shape ``(local_size, k)``.

        Cost: one batched TL run and one batched adjoint run over the window;
        counts ``k`` products.
        """
        self._require_state()
        Z = _check_block(Z, self.local_size)
        _EVENT_MULT_BLOCK.begin()
        start = time.perf_counter()
        try:
            result = self._apply_block(Z)
        finally:
            self.wall_time += time.perf_counter() - start
            _EVENT_MULT_BLOCK.end()
        self.products += Z.shape[1]
        return np.ascontiguousarray(result)

    def mult(self, mat, v, w):
        """MATPYTHON callback: ``w = A v`` (one TL and one adjoint run)."""
        self._require_state()
        _EVENT_MULT.begin()
        start = time.perf_counter()
        try:
            z = v.getArray(readonly=True).reshape(-1, 1)  # (local_size, 1)
            w.getArray()[:] = self._apply_block(z)[:, 0]
        finally:
            self.wall_time += time.perf_counter() - start
            _EVENT_MULT.end()
        self.products += 1

    def multTranspose(self, mat, v, w):
        """MATPYTHON callback: ``w = Aᵀ v = A v``, because ``A`` is symmetric."""
        self.mult(mat, v, w)

    def reset_counters(self):
        """Set :attr:`products` and :attr:`wall_time` to zero."""
        self.products = 0
        self.wall_time = 0.0

    # Right-hand side, cost and increments.

    def departures(self, y):
        """Return this rank's departures ``G(x) − y``, shape ``(p_local,)``."""
        self._require_state()
        return self.observations.observe_local(self.model_state) - self.observations.local_part(y)

    def rhs(self, y, xb, b=None):
        """Return the right-hand side of the inner-loop system.

        ``b_x = −G_xᵀ R⁻¹ (G(x) − y) − B⁻¹ (x − x_b)`` in the paper form,
        ``B^{1/2} b_x`` in the ``bhalf`` form. Cost: one adjoint run, not
        counted in :attr:`products`.

        Parameters
        ----------
        y : ndarray, shape (p,)
            Observations, ordered by natural index.
        xb : PETSc.Vec
            Background state.
        b : PETSc.Vec, optional
            Output Vec; a new one is made when omitted.
        """
        self._require_state()
        _check_finite_vec(xb, "background state")
        obs = self.observations
        bkg = self.background_error
        d = self.departures(y) / obs.sigma_o**2  # (p_local,)
        _EVENT_RHS.begin()
        try:
            grad_o = self.model.adjoint(self.trajectory, obs.adjoint_local(d)[:, None])[:, 0]
        finally:
            _EVENT_RHS.end()
        x = self.state.getArray(readonly=True)
        background = xb.getArray(readonly=True)
        value = -grad_o - bkg.apply_inverse(x - background)  # (local_size,)
        if self.form == "bhalf":
            value = bkg.apply_sqrt(value)
        if b is None:
            b = self.state.duplicate()
        b.getArray()[:] = value
        return b

    def cost(self, y, xb, x=None):
        """Return ``(J, J_o, J_b)``.

        ``J_o = ½‖G(x) − y‖²_{R⁻¹}`` and ``J_b = ½‖x − x_b‖²_{B⁻¹}``. At the
        linearization state (``x`` omitted) no model run is needed because
        :meth:`linearize` stored ``G(x)``; another ``x`` costs one forward run.
        """
        _check_finite_vec(xb, "background state")
        if x is None:
            self._require_state()
            x, final = self.state, self.model_state
        else:
            _check_finite_vec(x, "state")
            final = self.model.forward(x)
        obs = self.observations
        d = obs.observe_local(final) - obs.local_part(y)  # (p_local,)
        dxb = x.getArray(readonly=True) - xb.getArray(readonly=True)  # (local_size,)
        local = np.array([
            0.5 * np.dot(d, d) / obs.sigma_o**2,
            0.5 * np.dot(dxb, self.background_error.apply_inverse(dxb)),
        ])
        jo, jb = self.comm.tompi4py().allreduce(local)
        return float(jo + jb), float(jo), float(jb)

    def increment(self, solution, out=None):
        """Return the state increment ``δx`` from a solution of the inner system.

        The paper form returns a copy of ``solution``; the ``bhalf`` form
        returns ``δx = B^{1/2} v``.
        """
        if out is None:
            out = solution.duplicate()
        value = solution.getArray(readonly=True)
        if self.form == "bhalf":
            value = self.background_error.apply_sqrt(value)
        out.getArray()[:] = value
        return out

    # PETSc Mat.

    def create_mat(self):
        """Return a MATPYTHON Mat whose Python context is this operator.

        The Mat is flagged symmetric (and SPD where PETSc has the flag) and
        carries the linearization state under ``"nnpc_state"`` once
        :meth:`linearize` has run.
        """
        sizes = ((self.local_size, self.n), (self.local_size, self.n))
        mat = PETSc.Mat().createPython(sizes, context=self, comm=self.comm)
        mat.setUp()
        mat.setOption(PETSc.Mat.Option.SYMMETRIC, True)
        if hasattr(PETSc.Mat.Option, "SYMMETRY_ETERNAL"):
            mat.setOption(PETSc.Mat.Option.SYMMETRY_ETERNAL, True)
        if hasattr(PETSc.Mat.Option, "SPD"):
            mat.setOption(PETSc.Mat.Option.SPD, True)
        self._mats.append(mat)
        if self.state is not None:
            self._attach_state(mat)
        else:
            mat.assemble()
        return mat

    def get_mat(self):
        """Return the first Mat made by :meth:`create_mat`, making it if needed."""
        if not self._mats:
            return self.create_mat()
        return self._mats[0]

    def view(self, mat, viewer=None):
        """MATPYTHON callback: describe the operator under ``-mat_view`` or ``-ksp_view``."""
        if viewer is None:
            return
        if viewer.getType() != PETSc.Viewer.Type.ASCII:
            return
        form = {
            "paper": "A = G^T R^-1 G + B^-1",
            "bhalf": "I + B^1/2 G^T R^-1 G B^1/2 (unknown v = B^-1/2 dx)",
        }[self.form]
        sigmas = ", ".join(f"{k} {v:g}" for k, v in self.background_error.config.sigmas.items())
        viewer.printfASCII(f"Gauss-Newton operator: {form}\n")
        viewer.printfASCII(
            f"  model {type(self.model).__name__}{_backend_note(self.model)}, n = {self.n}, "
            f"{self.observations.p} observations, sigma_o {self.observations.sigma_o:g}\n"
        )
        viewer.printfASCII(f"  background-error sigma: {sigmas}\n")
        viewer.printfASCII(
            f"  {self.products} products, {self.wall_time:.3f} s in products\n"
        )


def _backend_note(model):
    """Return " (numba kernels)" for a model with a kernel backend, else ""."""
    backend = getattr(model, "backend", None)
    return f" ({backend} kernels)" if backend else ""
