"""A small nonlinear model on a distributed PETSc Vec, for operator tests.

Two fields on a periodic ring of ``m`` cells: ``a`` follows Lorenz-96 and
drives ``b``, which relaxes towards it and damps it::

    da_j/dt = (a_{j+1} − a_{j−2}) a_{j−1} − a_j + F − c b_j
    db_j/dt = c (a_j − b_j)

time-stepped with classical RK4. The tangent-linear and adjoint runs are
hand-written, exact derivatives of the discrete RK4 steps, for a batch of
``k`` directions at once. It implements ``petsc_nnpc.operator.DAModel`` and
shows that a model other than the shallow-water one plugs into the
Gauss-Newton operator.

Each rank owns a contiguous block of cells and stores its ``a`` values then
its ``b`` values, so the local order differs from the natural order
(all ``a``, then all ``b``) as soon as there are two ranks.
"""

import types

import numpy as np

from petsc_nnpc.operator import BackgroundErrorConfig, DAConfig, ObservationConfig
from petsc_nnpc.utils import init_petsc

PETSc = init_petsc()

#: Observations of every second ``a`` and diagonal B used by the operator tests.
TOY_CONFIG = DAConfig(
    observations=ObservationConfig(variable="a", stride=2, sigma_o=0.5),
    background_error=BackgroundErrorConfig({"a": 1.0, "b": 0.5}),
)


class ToyTrajectory:
    """Stored RK4 stage states of a run: what the TL and adjoint runs need."""

    def __init__(self, stages, final):
        self.stages = stages  # per step: 4 tuples (a with halo (m_local+3,), b (m_local,))
        self.final = final


class ToyModel:
    """Coupled Lorenz-96 ring with exact batched TL and adjoint runs.

    Parameters
    ----------
    m : int
        Number of cells on the ring; the state size is ``n = 2 m``.
    dt : float
        RK4 time step (model time units).
    window_steps : int
        Time steps in one assimilation window.
    forcing : float
        Lorenz-96 forcing ``F``.
    coupling : float
        Coupling rate ``c`` between ``a`` and ``b``.
    comm : PETSc.Comm, optional
        Communicator; ``PETSc.COMM_WORLD`` by default.
    """

    def __init__(self, m=40, dt=0.05, window_steps=8, forcing=8.0, coupling=0.5, comm=None):
        self.comm = comm or PETSc.COMM_WORLD
        self.mpi = self.comm.tompi4py()
        size, rank = self.mpi.size, self.mpi.rank
        counts = [m // size + (1 if r < m % size else 0) for r in range(size)]
        if min(counts) < 2:
            raise ValueError(f"m = {m} cells cannot give each of {size} ranks two cells")
        self.m = m
        self.m_local = counts[rank]
        self.start = sum(counts[:rank])
        self.left = (rank - 1) % size
        self.right = (rank + 1) % size
        self.n = 2 * m
        self.local_size = 2 * self.m_local
        self.variable_slices = {"a": slice(0, m), "b": slice(m, 2 * m)}
        self.grid_shape = (1, m)
        self.dt = dt
        self.window_steps = window_steps
        self.forcing = forcing
        self.coupling = coupling
        self.config = types.SimpleNamespace(preset="toy", dt=dt, window_steps=window_steps)

    # Layout.

    def create_state(self):
        vec = PETSc.Vec().createMPI((self.local_size, self.n), comm=self.comm)
        vec.set(0.0)
        return vec

    def natural_indices(self):
        cells = np.arange(self.start, self.start + self.m_local, dtype=np.int64)
        return np.concatenate([cells, self.m + cells])

    def initial_state(self, seed=0):
        """Return a state on the attractor: a spun-up run from a seeded perturbation of ``F``."""
        rng = np.random.default_rng(seed)
        natural = self.forcing + rng.standard_normal(self.n)  # (n,)
        natural[self.m:] = self.forcing * 0.5
        x = self.create_state()
        x.getArray()[:] = natural[self.natural_indices()]
        return self.advance(x, 200)

    def _split(self, array):
        return array[:self.m_local], array[self.m_local:]

    # Halo exchange of a and its adjoint.

    def _halo(self, a):
        """Return ``a`` with two ghost cells on the left and one on the right."""
        a = np.ascontiguousarray(a)
        shape = a.shape[1:]
        from_left = np.empty((2,) + shape)
        from_right = np.empty((1,) + shape)
        self.mpi.Sendrecv(np.ascontiguousarray(a[-2:]), dest=self.right, sendtag=1,
                          recvbuf=from_left, source=self.left, recvtag=1)
        self.mpi.Sendrecv(np.ascontiguousarray(a[:1]), dest=self.left, sendtag=2,
                          recvbuf=from_right, source=self.right, recvtag=2)
        return np.concatenate([from_left, a, from_right])

    def _halo_adjoint(self, extended):
        """Adjoint of :meth:`_halo`: add ghost contributions back to their owners."""
        shape = extended.shape[1:]
        out = np.array(extended[2:-1])
        from_right = np.empty((2,) + shape)
        from_left = np.empty((1,) + shape)
        self.mpi.Sendrecv(np.ascontiguousarray(extended[:2]), dest=self.left, sendtag=3,
                          recvbuf=from_right, source=self.right, recvtag=3)
        self.mpi.Sendrecv(np.ascontiguousarray(extended[-1:]), dest=self.right, sendtag=4,
                          recvbuf=from_left, source=self.left, recvtag=4)
        out[-2:] += from_right
        out[:1] += from_left
        return out

    # Tendencies.

    def _tendency(self, ext, b):
        am2, am1, a0, ap1 = ext[:-3], ext[1:-2], ext[2:-1], ext[3:]
        c = self.coupling
        return (ap1 - am2) * am1 - a0 + self.forcing - c * b, c * (a0 - b)

    def _tendency_tl(self, stage, dext, db):
        ext, _ = stage
        am2, am1, ap1 = ext[:-3, None], ext[1:-2, None], ext[3:, None]
        c = self.coupling
        d_am2, d_am1, d_a0, d_ap1 = dext[:-3], dext[1:-2], dext[2:-1], dext[3:]
        dda = (d_ap1 - d_am2) * am1 + (ap1 - am2) * d_am1 - d_a0 - c * db
        return dda, c * (d_a0 - db)

    def _tendency_adjoint(self, stage, lam_a, lam_b):
        ext, _ = stage
        am2, am1, ap1 = ext[:-3, None], ext[1:-2, None], ext[3:, None]
        c = self.coupling
        mu_ext = np.zeros((self.m_local + 3,) + lam_a.shape[1:])
        mu_ext[3:] += am1 * lam_a
        mu_ext[:-3] -= am1 * lam_a
        mu_ext[1:-2] += (ap1 - am2) * lam_a
        mu_ext[2:-1] += -lam_a + c * lam_b
        mu_b = -c * lam_a - c * lam_b
        return self._halo_adjoint(mu_ext), mu_b

    # Forward runs.

    def _step(self, a, b, stages=None):
        dt = self.dt
        k = []
        sa, sb = a, b
        for weight in (0.5, 0.5, 1.0, None):
            ext = self._halo(sa)
            if stages is not None:
                stages.append((ext, sb))
            ka, kb = self._tendency(ext, sb)
            k.append((ka, kb))
            if weight is not None:
                sa, sb = a + weight * dt * ka, b + weight * dt * kb
        a = a + dt / 6 * (k[0][0] + 2 * k[1][0] + 2 * k[2][0] + k[3][0])
        b = b + dt / 6 * (k[0][1] + 2 * k[1][1] + 2 * k[2][1] + k[3][1])
        return a, b

    def _run(self, x, steps, stages=None):
        a, b = self._split(np.array(x.getArray(readonly=True)))
        for _ in range(steps):
            step_stages = [] if stages is not None else None
            a, b = self._step(a, b, step_stages)
            if stages is not None:
                stages.append(step_stages)
        out = self.create_state()
        out.getArray()[:] = np.concatenate([a, b])
        return out

    def advance(self, x, steps):
        return self._run(x, int(steps))

    def forward(self, x):
        return self._run(x, self.window_steps)

    def linearize(self, x):
        stages = []
        final = self._run(x, self.window_steps, stages)
        return ToyTrajectory(stages, final)

    # Tangent-linear and adjoint runs.

    def tl(self, traj, dx):
        """Return ``M'_x dx`` for ``dx`` of shape ``(local_size, k)``."""
        dt = self.dt
        da, db = self._split(np.asarray(dx, dtype=np.float64))
        for step in traj.stages:
            dk = []
            sa, sb = da, db
            for index, weight in enumerate((0.5, 0.5, 1.0, None)):
                dka, dkb = self._tendency_tl(step[index], self._halo(sa), sb)
                dk.append((dka, dkb))
                if weight is not None:
                    sa, sb = da + weight * dt * dka, db + weight * dt * dkb
            da = da + dt / 6 * (dk[0][0] + 2 * dk[1][0] + 2 * dk[2][0] + dk[3][0])
            db = db + dt / 6 * (dk[0][1] + 2 * dk[1][1] + 2 * dk[2][1] + dk[3][1])
        return np.ascontiguousarray(np.concatenate([da, db]))

    def adjoint(self, traj, dy):
        """Return ``M'_xᵀ dy`` for ``dy`` of shape ``(local_size, k)``."""
        dt = self.dt
        lam_a, lam_b = self._split(np.asarray(dy, dtype=np.float64))
        for step in reversed(traj.stages):
            # Adjoints of the stage increments k1..k4 from the update.
            weights = (dt / 6, dt / 3, dt / 3, dt / 6)
            lk = [(w * lam_a, w * lam_b) for w in weights]
            out_a, out_b = lam_a.copy(), lam_b.copy()
            for index in (3, 2, 1, 0):
                mu_a, mu_b = self._tendency_adjoint(step[index], *lk[index])
                out_a += mu_a
                out_b += mu_b
                if index > 0:
                    # Stage input index = x + w dt k_{index}, with w = 1 for k4's input.
                    w = 1.0 if index == 3 else 0.5
                    lk[index - 1] = (lk[index - 1][0] + w * dt * mu_a,
                                     lk[index - 1][1] + w * dt * mu_b)
            lam_a, lam_b = out_a, out_b
        return np.ascontiguousarray(np.concatenate([lam_a, lam_b]))
