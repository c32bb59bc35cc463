"""The distributed shallow-water model with its tangent-linear and adjoint."""

import logging

import numpy as np
from petsc4py import PETSc

from petsc_nnpc.layout import NaturalLayout
from shallow_water import kernels
from shallow_water.config import ModelConfig

try:
    from shallow_water import fused
except ImportError as error:  # Numba missing or too old for this Python or NumPy.
    fused = None
    _FUSED_ERROR = error

log = logging.getLogger("shallow_water.model")

_EVENTS = {}

BACKENDS = ("numba", "numpy")

# Largest number of directions a batched TL or adjoint run processes at once.
# TL + adjoint of 100 directions on the paper grid (2-core AMD EPYC,
# `benchmarks/model.py --chunks 2,4,8,16,32`) cost 0.77, 0.70, 0.68, 0.69
# and 0.93 x one direction per direction with the compiled kernels: larger
# chunks overflow the cache. The NumPy kernels cost 1.13 x in one batch of
# 96 and 0.85 x in chunks of 16.
BATCH_CHUNK = 16


_FALLBACK_WARNED = []


def _warn_fallback():
    """Log once per process that the model runs the slower NumPy kernels because Numba is missing."""
    if not _FALLBACK_WARNED:
        _FALLBACK_WARNED.append(True)
        log.warning(
            "Numba failed to import (%s), so the shallow-water model runs its NumPy kernels, "
            "3 to 6 times slower: install it (.venv/bin/pip install numba), or pass "
            "-sw_backend numpy to choose these kernels and silence this warning", _FUSED_ERROR,
        )


def default_backend():
    """Return the kernel backend used when none is chosen: ``numba`` when it imports, else ``numpy``."""
    return "numpy" if fused is None else "numba"


def _resolve_backend(backend):
    if backend is None:
        options = PETSc.Options()
        if options.hasName("sw_backend"):
            backend = options.getString("sw_backend")
        else:
            backend = default_backend()
            if backend == "numpy":
                _warn_fallback()
    if backend not in BACKENDS:
        raise ValueError(
            f"invalid shallow-water backend {backend!r}: use one of {', '.join(BACKENDS)} "
            "(the backend argument or the option -sw_backend)"
        )
    if backend == "numba" and fused is None:
        raise ImportError(
            f"the numba backend needs Numba, which failed to import ({_FUSED_ERROR}): "
            "install it (.venv/bin/pip install numba) or run with -sw_backend numpy"
        )
    return backend


def _event(name):
    if name not in _EVENTS:
        _EVENTS[name] = PETSc.Log.Event(name)
    return _EVENTS[name]


class Trajectory:
    """Base states of one window, stored by :meth:`ShallowWaterModel.linearize`.

    Attributes
    ----------
    initial : PETSc.Vec
        The linearization state x (compact layout).
    final : PETSc.Vec
        ``M(x)``, the state at the end of the window (compact layout).
    stages : list of list of kernels.Linearization
        For each time step, the base-state fields of its four RK4 stages.
    """

    def __init__(self, initial, final, stages):
        self.initial = initial
        self.final = final
        self.stages = stages

    @property
    def steps(self):
        """Number of time steps stored."""
        return len(self.stages)


class _Exchange:
    """Halo exchange of k fields-triples on a DMDA with ``dof = 3k``.

    The padded local array ``(Y, X, 3, k)`` has one halo cell on each side
    (boundary type GHOSTED); halo cells outside the basin are kept at zero.
    """

    def __init__(self, model, k):
        base = model.da
        self.k = k
        if k == 1:
            self.dm = base
        else:
            self.dm = PETSc.DMDA().create(
                dim=2,
                dof=3 * k,
                sizes=(model.config.nx, model.config.ny),
                proc_sizes=base.getProcSizes(),
                boundary_type=(PETSc.DM.BoundaryType.GHOSTED,) * 2,
                stencil_type=PETSc.DMDA.StencilType.BOX,
                stencil_width=1,
                ownership_ranges=base.getOwnershipRanges(),
                comm=model.comm,
            )
        self.gvec = self.dm.createGlobalVec()
        self.lvec = self.dm.createLocalVec()
        self.lvec.set(0.0)
        self.owned_shape = (model.patch.ym, model.patch.xm, 3, k)
        self.padded_shape = model.patch.shape + (3, k)
        self.outside = model._outside_slices
        self._work = None

    def work(self):
        """Scratch space of the fused kernels for this k, ``(forward and TL, adjoint)``, made once."""
        if self._work is None:
            Y, X = self.padded_shape[:2]
            self._work = fused.workspace(Y, X, self.k)
        return self._work

    def owned_array(self):
        """Return the global Vec's array as owned values ``(ym, xm, 3, k)`` (a view)."""
        return self.gvec.getArray().reshape(self.owned_shape)

    def local_array(self):
        """Return the local Vec's array as the padded patch ``(Y, X, 3, k)`` (a view)."""
        return self.lvec.getArray().reshape(self.padded_shape)

    def exchange(self):
        """Fill the halo of the local Vec from the global Vec."""
        self.dm.globalToLocal(self.gvec, self.lvec, addv=PETSc.InsertMode.INSERT_VALUES)

    def sum_halo(self):
        """Add the local Vec, halo included, into the global Vec (the adjoint of :meth:`exchange`)."""
        self.dm.localToGlobal(self.lvec, self.gvec, addv=PETSc.InsertMode.ADD_VALUES)

    def fill(self, owned):
        """Copy owned values ``(ym, xm, 3, k)`` into the padded local array and fill its halo."""
        self.owned_array()[...] = owned
        self.exchange()
        # The scatter leaves halo cells outside the basin as they were, and
        # an adjoint run writes into them, so they are reset here.
        larr = self.local_array()
        for index in self.outside:
            larr[index] = 0.0

    def read(self, start, stop):
        """Return η, u, v of columns ``start:stop`` on the padded patch, each ``(Y·X, stop − start)``."""
        larr = self.lvec.getArray(readonly=True).reshape(self.padded_shape)
        width = stop - start
        return [np.array(larr[:, :, var, start:stop]).reshape(-1, width) for var in range(3)]

    def write(self, fields, start, stop):
        """Store padded adjoint fields ``(Y·X, stop − start)`` as columns ``start:stop`` of the local array."""
        larr = self.local_array()
        for var, field in enumerate(fields):
            larr[:, :, var, start:stop] = field.reshape(self.padded_shape[:2] + (stop - start,))

    def sum_adjoint(self):
        """Return owned values ``(ym, xm, 3, k)``: the local array summed onto its owners.

        The adjoint of :meth:`fill`: a local-to-global scatter with
        ADD_VALUES into a zeroed global Vec. Halo cells outside the basin
        are zeroed first, since they belong to no rank.
        """
        larr = self.local_array()
        for index in self.outside:
            larr[index] = 0.0
        self.gvec.set(0.0)
        self.sum_halo()
        return np.array(self.gvec.getArray(readonly=True).reshape(self.owned_shape))


class ShallowWaterModel:
    """Reduced-gravity, wind-driven double gyre on a distributed Arakawa C-grid.

    The equations (vector-invariant form, SI units) are::

        ∂η/∂t + ∂x((H + η) u) + ∂y((H + η) v) = 0
        ∂u/∂t − ξ v + ∂x B = ν Δu − c_b u + τ_x / (ρ0 H)
        ∂v/∂t + ξ u + ∂y B = ν Δv − c_b v

    with η the interface displacement [m], (u, v) the velocity [m s⁻¹],
    absolute vorticity ``ξ = f0 + β y + ζ``, ``ζ = ∂x v − ∂y u`` [s⁻¹],
    Bernoulli potential ``B = g' η + (u² + v²)/2`` [m² s⁻²] and wind stress
    ``τ_x = τ0 cos(2π y / Ly)`` [N m⁻²], y ∈ [−Ly/2, Ly/2], in a closed basin
    with no normal flow and free slip (ζ = 0) on the walls.

    Discretisation: Arakawa C-grid of ``nx × ny`` cells, with η at the
    centres, u on the interior x-faces and v on the interior y-faces. The
    vorticity flux is Sadourny's energy-conserving ``q V`` with potential
    vorticity ``q = ξ / h`` at the corners. Continuity is in flux form, so
    the total mass ``Σ η`` is conserved to round-off. Time stepping is
    classical RK4; :func:`shallow_water.kernels.tendency` lists the discrete
    operators. The tangent linear and the adjoint are the exact derivatives
    of this discrete model.

    Parallel layout: one DMDA over ``comm`` with ``dof = 3`` per cell, with
    η at the centre, u on the east face and v on the north face (stencil
    width 1, BOX, GHOSTED boundaries). A second DMDA with ``dof = 3k``,
    cached per batch size k, lets k directions share every halo exchange. The east faces of the
    last column and the north faces of the last row are walls: these padding
    entries are removed in the compact layout used by every public Vec and
    array (global size ``n``). Results do not depend on the number of ranks
    beyond round-off.

    Cost per RK4 step: four tendency evaluations and four halo exchanges.
    One tangent-linear or adjoint direction costs about as much as the
    forward run (benchmarks/model.md), and a batch of k directions shares
    the exchanges and the Python overhead. :meth:`linearize` stores eight
    padded fields per stage, 32 per step.

    Kernels: ``numba`` (the default when Numba imports) runs the fused
    compiled loops of :mod:`shallow_water.fused`, one call per RK4 stage;
    ``numpy`` runs the vectorised reference kernels of
    :mod:`shallow_water.kernels`. Both compute the same discrete model and
    agree to round-off.

    Parameters
    ----------
    config : ModelConfig
        Grid, physics and time step.
    comm : PETSc.Comm, optional
        Communicator of the DMDA and of every Vec (``PETSc.COMM_WORLD``).
    backend : {"numba", "numpy"}, optional
        Kernel backend; default the option ``-sw_backend``, else
        :func:`default_backend`.
    """

    def __init__(self, config, comm=None, backend=None):
        if not isinstance(config, ModelConfig):
            raise TypeError(
                f"config must be a ModelConfig, got {type(config).__name__}: "
                "use shallow_water.get_config(preset)"
            )
        self.config = config
        self.comm = PETSc.COMM_WORLD if comm is None else comm
        self.backend = _resolve_backend(backend)

        nx, ny = config.nx, config.ny
        self.n = config.n
        self.grid_shape = (ny, nx)
        n_eta, n_u = nx * ny, (nx - 1) * ny
        self.variable_slices = {
            "eta": slice(0, n_eta),
            "u": slice(n_eta, n_eta + n_u),
            "v": slice(n_eta + n_u, self.n),
        }

        self.da = PETSc.DMDA().create(
            dim=2,
            dof=3,
            sizes=(nx, ny),
            boundary_type=(PETSc.DM.BoundaryType.GHOSTED,) * 2,
            stencil_type=PETSc.DMDA.StencilType.BOX,
            stencil_width=1,
            comm=self.comm,
        )

        (xs, xe), (ys, ye) = self.da.getRanges()
        self.patch = kernels.Patch(config, xs, ys, xe - xs, ye - ys)
        self._outside_slices = self._outside(xs, xe, ys, ye)
        if self.backend == "numba":
            self._geo = fused.geometry(self.patch)
            self._prm = fused.parameters(config)
            self._outside_flags = np.array(
                [xs == 0, xe == config.nx, ys == 0, ye == config.ny], dtype=np.int64
            )
        self._build_compact_index()
        self.local_size = self._keep.size
        self.layout = NaturalLayout(self.comm, self._natural, self.n)
        self._exchanges = {}
        log.debug(
            "shallow-water model %s: %d x %d cells, n = %d, %d ranks as %s, dt = %g s, "
            "%d steps per window, %s kernels",
            config.preset, nx, ny, self.n, self.comm.getSize(), "x".join(map(str, self.da.getProcSizes())),
            config.dt, config.window_steps, self.backend,
        )

    # Layouts.
    def _outside(self, xs, xe, ys, ye):
        """Index expressions of the padded halo cells that lie outside the basin."""
        cfg = self.config
        slices = []
        if xs == 0:
            slices.append((slice(None), 0))
        if xe == cfg.nx:
            slices.append((slice(None), -1))
        if ys == 0:
            slices.append((0, slice(None)))
        if ye == cfg.ny:
            slices.append((-1, slice(None)))
        return slices

    def _build_compact_index(self):
        cfg, p = self.config, self.patch
        nx, ny = cfg.nx, cfg.ny
        j, i = np.meshgrid(
            np.arange(p.ys, p.ys + p.ym), np.arange(p.xs, p.xs + p.xm), indexing="ij"
        )
        natural = np.stack(
            [
                j * nx + i,
                nx * ny + j * (nx - 1) + i,
                nx * ny + ny * (nx - 1) + j * nx + i,
            ],
            axis=-1,
        )  # (ym, xm, 3), DMDA order
        keep = np.stack([np.ones_like(i, bool), i < nx - 1, j < ny - 1], axis=-1)
        flat_keep = keep.reshape(-1)
        self._keep = np.flatnonzero(flat_keep)  # (local_size,)
        self._natural = natural.reshape(-1)[flat_keep].astype(np.int64)
        self._wall_mask = keep.astype(np.float64)[..., None]  # (ym, xm, 3, 1)

    def natural_indices(self):
        """Return the natural index of each locally owned compact entry, shape (local_size,)."""
        return self._natural.copy()

    def create_state(self):
        """Return a zeroed compact Vec of global size ``n``."""
        vec = PETSc.Vec().createMPI((self.local_size, self.n), comm=self.comm)
        vec.set(0.0)
        return vec

    def to_natural(self, x):
        """Return the Vec ``x`` as a natural-ordering array (n,), on every rank."""
        return self.layout.gather(x, to_all=True)

    def from_natural(self, array):
        """Return a compact Vec from a natural-ordering array (n,) held on every rank."""
        array = np.asarray(array, dtype=np.float64)
        if array.shape != (self.n,):
            raise ValueError(
                f"natural-ordering state has shape {array.shape}, expected ({self.n},) "
                f"for the {self.config.nx} x {self.config.ny} grid"
            )
        vec = self.create_state()
        vec.getArray()[:] = self.layout.from_replicated(array)
        return vec

    def _to_owned(self, compact):
        """Compact ``(local_size, k)`` → owned fields ``(ym, xm, 3, k)`` (DMDA order), walls zero."""
        k = compact.shape[1]
        p = self.patch
        full = np.zeros((p.ym * p.xm * 3, k))
        full[self._keep] = compact
        return full.reshape(p.ym, p.xm, 3, k)

    def _to_compact(self, owned):
        """Owned fields ``(ym, xm, 3, k)`` → compact ``(local_size, k)``."""
        k = owned.shape[-1]
        return np.ascontiguousarray(owned.reshape(-1, k)[self._keep])

    def _vec_to_owned(self, x):
        local = x.getArray(readonly=True)
        if local.shape != (self.local_size,):
            raise ValueError(
                f"state Vec has local size {local.shape[0]}, expected {self.local_size}: "
                "create it with model.create_state()"
            )
        self._check_finite(local)
        return self._to_owned(local[:, None])

    def _check_finite(self, local):
        """Raise ``ValueError`` on every rank, naming the variables, if a state has NaN or Inf."""
        bad = ~np.isfinite(local)
        flags = np.zeros(3, dtype=np.int64)
        if bad.any():
            for index, part in enumerate(self.variable_slices.values()):
                natural = self._natural[bad]
                flags[index] = np.count_nonzero((natural >= part.start) & (natural < part.stop))
        flags = self.comm.tompi4py().allreduce(flags)
        if flags.any():
            names = [
                f"{name} ({count} values)"
                for name, count in zip(self.variable_slices, flags)
                if count
            ]
            raise ValueError(
                f"the state has NaN or Inf in {', '.join(names)}: start from a finite state, "
                "e.g. a spun-up one (shallow_water.load_spunup_state), or reduce dt if a run blew up"
            )

    def _owned_to_vec(self, owned):
        vec = self.create_state()
        vec.getArray()[:] = self._to_compact(owned)[:, 0]
        return vec

    def _exchange(self, k):
        if k not in self._exchanges:
            self._exchanges[k] = _Exchange(self, k)
        return self._exchanges[k]

    def _check_batch(self, array, name):
        array = np.asarray(array, dtype=np.float64)
        if array.ndim != 2 or array.shape[0] != self.local_size:
            raise ValueError(
                f"{name} has shape {array.shape}, expected (local_size, k) = ({self.local_size}, k): "
                "pass a 2-D array of compact-layout columns"
            )
        return array

    # Tendencies on owned fields.
    def _interior(self, fields):
        """Owned interior ``(ym, xm, 3, k)`` of three padded flat fields ``(Y·X, k)``."""
        shape = self.patch.shape + (fields[0].shape[-1],)
        return np.stack([field.reshape(shape)[1:-1, 1:-1] for field in fields], axis=2)

    def _rhs(self, owned, keep=False):
        exchange = self._exchange(owned.shape[-1])
        exchange.fill(owned)
        eta, u, v = exchange.read(0, exchange.k)
        if keep:
            tend, lin = kernels.tendency(self.patch, eta, u, v, keep=True)
            return self._interior(tend), lin
        return self._interior(kernels.tendency(self.patch, eta, u, v))

    def _rhs_tl(self, lin, owned):
        exchange = self._exchange(owned.shape[-1])
        exchange.fill(owned)
        fields = exchange.read(0, exchange.k)
        return self._interior(kernels.tendency_tl(self.patch, lin, *fields))

    def _rhs_adjoint(self, lin, owned_bar):
        k = owned_bar.shape[-1]
        exchange = self._exchange(k)
        shape = self.patch.shape + (k,)
        padded = []
        for var in range(3):
            field = np.zeros(shape)
            field[1:-1, 1:-1] = owned_bar[:, :, var]
            padded.append(field.reshape(-1, k))
        exchange.write(kernels.tendency_adjoint(self.patch, lin, *padded), 0, k)
        result = exchange.sum_adjoint()
        result *= self._wall_mask
        return result

    # Time stepping.
    def _step(self, x, stages=None):
        """Advance owned fields one RK4 step; append the stage linearizations to ``stages``."""
        dt = self.config.dt
        keep = stages is not None
        out = []
        k1 = self._rhs(x, keep)
        if keep:
            k1, lin = k1
            out.append(lin)
        k2 = self._rhs(x + 0.5 * dt * k1, keep)
        if keep:
            k2, lin = k2
            out.append(lin)
        k3 = self._rhs(x + 0.5 * dt * k2, keep)
        if keep:
            k3, lin = k3
            out.append(lin)
        k4 = self._rhs(x + dt * k3, keep)
        if keep:
            k4, lin = k4
            out.append(lin)
            stages.append(out)
        k2 += k3
        k2 *= 2.0
        k1 += k2
        k1 += k4
        k1 *= dt / 6.0
        return x + k1

    def _step_tl(self, lins, dx):
        dt = self.config.dt
        k1 = self._rhs_tl(lins[0], dx)
        k2 = self._rhs_tl(lins[1], dx + 0.5 * dt * k1)
        k3 = self._rhs_tl(lins[2], dx + 0.5 * dt * k2)
        k4 = self._rhs_tl(lins[3], dx + dt * k3)
        k2 += k3
        k2 *= 2.0
        k1 += k2
        k1 += k4
        k1 *= dt / 6.0
        return dx + k1

    def _step_adjoint(self, lins, y_bar):
        dt = self.config.dt
        x_bar = y_bar.copy()
        a4 = self._rhs_adjoint(lins[3], (dt / 6.0) * y_bar)
        x_bar += a4
        a3 = self._rhs_adjoint(lins[2], (dt / 3.0) * y_bar + dt * a4)
        x_bar += a3
        a2 = self._rhs_adjoint(lins[1], (dt / 3.0) * y_bar + (0.5 * dt) * a3)
        x_bar += a2
        a1 = self._rhs_adjoint(lins[0], (dt / 6.0) * y_bar + (0.5 * dt) * a2)
        x_bar += a1
        return x_bar

    # Public model interface.
    def advance(self, x, steps):
        """Return the state after ``steps`` RK4 steps from the compact Vec ``x``."""
        if int(steps) != steps or steps < 0:
            raise ValueError(f"steps = {steps!r} is invalid: use a non-negative integer")
        with _event("SWForward"):
            owned = self._vec_to_owned(x)
            if self.backend == "numba":
                owned = self._fused_forward(owned, int(steps))
            else:
                for _ in range(int(steps)):
                    owned = self._step(owned)
        return self._owned_to_vec(owned)

    def forward(self, x):
        """Return ``M(x)``, the state at the end of the window (``window_steps`` steps)."""
        return self.advance(x, self.config.window_steps)

    def linearize(self, x):
        """Run the window from ``x`` and store the trajectory for :meth:`tl` and :meth:`adjoint`.

        Returns a :class:`Trajectory` whose ``final`` attribute is ``M(x)``.
        Memory: 32 padded fields per time step.
        """
        stages = []
        with _event("SWLinearize"):
            owned = self._vec_to_owned(x)
            if self.backend == "numba":
                owned = self._fused_forward(owned, self.config.window_steps, stages)
            else:
                for _ in range(self.config.window_steps):
                    owned = self._step(owned, stages)
        initial = x.copy()
        return Trajectory(initial, self._owned_to_vec(owned), stages)

    def tl(self, traj, dx):
        """Return ``M'_x dx`` at the end of the window for k directions.

        Parameters
        ----------
        traj : Trajectory
            From :meth:`linearize`.
        dx : ndarray, shape (local_size, k)
            Perturbations of the initial state, compact layout.

        Returns
        -------
        ndarray, shape (local_size, k)
        """
        dx = self._check_batch(dx, "dx")
        with _event("SWTangentLinear"):
            return self._in_chunks(dx, lambda block: self._tl_block(traj, block))

    def _tl_block(self, traj, dx):
        owned = self._to_owned(dx)
        if self.backend == "numba":
            return self._to_compact(self._fused_tl(traj, owned))
        for lins in traj.stages:
            owned = self._step_tl(lins, owned)
        return self._to_compact(owned)

    def _in_chunks(self, columns, run):
        """Return ``run`` applied to ``columns`` in blocks of at most :data:`BATCH_CHUNK`.

        Every rank splits the same way, since ``k`` is the same on all of
        them, so the halo exchanges stay collective.
        """
        k = columns.shape[1]
        if k <= BATCH_CHUNK:
            return run(columns)
        out = np.empty_like(columns)
        for start in range(0, k, BATCH_CHUNK):
            stop = min(start + BATCH_CHUNK, k)
            out[:, start:stop] = run(np.ascontiguousarray(columns[:, start:stop]))
        return out

    def adjoint(self, traj, dy):
        """Return ``M'_xᵀ dy`` for k adjoint forcings at the end of the window.

        Parameters
        ----------
        traj : Trajectory
            From :meth:`linearize`.
        dy : ndarray, shape (local_size, k)
            Adjoint forcing at the end of the window, compact layout.

        Returns
        -------
        ndarray, shape (local_size, k)
        """
        dy = self._check_batch(dy, "dy")
        with _event("SWAdjoint"):
            return self._in_chunks(dy, lambda block: self._adjoint_block(traj, block))

    def _adjoint_block(self, traj, dy):
        owned = self._to_owned(dy)
        if self.backend == "numba":
            return self._to_compact(self._fused_adjoint(traj, owned))
        for lins in reversed(traj.stages):
            owned = self._step_adjoint(lins, owned)
        return self._to_compact(owned)

    # Fused kernels: one compiled call and one halo exchange per RK4 stage.
    def _rk4_stages(self):
        """``(w, β, c, last)`` of the four stages: ``acc ← β acc + w T``, next input ``x + c T``."""
        dt = self.config.dt
        return (
            (dt / 6.0, 0.0, 0.5 * dt, False),
            (dt / 3.0, 1.0, 0.5 * dt, False),
            (dt / 3.0, 1.0, dt, False),
            (dt / 6.0, 1.0, 0.0, True),
        )

    def _fused_start(self, owned):
        """Return ``(exchange, x, acc, xout)`` for forward or TL steps from owned fields.

        ``x`` is a copy of ``owned``, which also goes into the global Vec as
        the first stage's input. ``acc`` and ``xout`` are the RK4 sum and the
        next state.
        """
        exchange = self._exchange(owned.shape[-1])
        x = np.array(owned, order="C")
        exchange.owned_array()[...] = x
        return exchange, x, np.zeros_like(x), np.empty_like(x)

    def _fused_forward(self, owned, steps, stages=None):
        k = owned.shape[-1]
        if stages is not None and k != 1:
            raise ValueError(f"a linearization stores one trajectory, got k = {k} states")
        exchange, x, acc, xout = self._fused_start(owned)
        work = exchange.work()[0]
        no_lin = np.empty((0, 0, 0))
        coefficients = self._rk4_stages()
        for _ in range(steps):
            lins = [np.zeros((8,) + self.patch.shape) if stages is not None else no_lin
                    for _ in coefficients]
            for lin, (w, beta, cn, last) in zip(lins, coefficients):
                exchange.exchange()
                fused.forward_stage(
                    exchange.local_array(), self._geo, self._prm,
                    x, acc, exchange.owned_array(), xout, w, beta, cn, last, lin, work,
                )
            if stages is not None:
                stages.append(lins)
            x, xout = xout, x
        return x

    def _fused_tl(self, traj, owned):
        exchange, x, acc, xout = self._fused_start(owned)
        work = exchange.work()[0]
        coefficients = self._rk4_stages()
        for lins in traj.stages:
            for lin, (w, beta, cn, last) in zip(lins, coefficients):
                exchange.exchange()
                fused.tl_stage(
                    exchange.local_array(), lin, self._geo, self._prm,
                    x, acc, exchange.owned_array(), xout, w, beta, cn, last, work,
                )
            x, xout = xout, x
        return x

    def _fused_adjoint(self, traj, owned):
        """Reverse RK4 steps: ``x̄ = ȳ + a₄ + a₃ + a₂ + a₁`` with ``aᵢ`` the adjoint stage results."""
        dt = self.config.dt
        exchange = self._exchange(owned.shape[-1])
        y = np.ascontiguousarray(owned)
        xbar = y.copy()
        exchange.gvec.set(0.0)
        work = exchange.work()[1]
        # (stage, α, β): the input of stage i is α ȳ + β a_{i+1}.
        order = ((3, dt / 6.0, 0.0), (2, dt / 3.0, dt), (1, dt / 3.0, 0.5 * dt), (0, dt / 6.0, 0.5 * dt))
        for lins in reversed(traj.stages):
            for stage, alpha, beta in order:
                fused.adjoint_stage(
                    lins[stage], self._geo, self._prm, self._outside_flags,
                    y, exchange.owned_array(), xbar, alpha, beta, exchange.local_array(), work,
                )
                exchange.sum_halo()
            fused.add_masked(xbar, exchange.owned_array(), self._geo)
            y, xbar = xbar, y
            xbar[...] = y
        return y
