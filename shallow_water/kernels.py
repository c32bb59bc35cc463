"""Vectorised C-grid kernels: the tendency, its tangent linear and its adjoint.

Every field lives on one rank's patch, padded by one halo cell on each
side. It is stored flat as a float64 array of shape ``(Y·X, k)``, with
``Y = ym + 2`` rows (y, slow) times ``X = xm + 2`` columns (x). The trailing
batch axis of ``k`` columns shares every operation. Index ``[a, b]`` of a field (flat
row ``a·X + b``) names a position relative to cell ``(a, b)`` of the padded
patch:

* η, h, B, D: the centre of cell ``(a, b)``;
* u, U: the east face of cell ``(a, b)``;
* v, V: the north face of cell ``(a, b)``;
* ζ, q: the north-east corner of cell ``(a, b)``.

The discretisation is built from eight elementary staggered operators:
averages and differences in x and y, towards the next index (``xp``, ``yp``)
or the previous one (``xm``, ``ym``). Each returns a full-size array. Entries near
the edges of the padded patch are invalid, but the model only reads results
in the owned interior, where the stencils of all terms stay inside the halo
of width one. Each operator has its transpose (suffix ``_T``), which adds
into an accumulator. The tangent linear of the tendency is the product rule
over these operators, and its adjoint is the reverse composition of the
transposes.
"""

import numpy as np


class StaggeredOps:
    """Averages and differences between the staggered positions of a C-grid.

    Fields are stored flat, ``(Y·X, k)`` with x fastest, so that a shift by
    one cell in x is a shift by ``sx = 1`` rows and one cell in y by
    ``sy = X`` rows, and every operation runs over contiguous memory.
    ``avg_xp(f)[a, b] = (f[a, b] + f[a, b+1]) / 2`` and
    ``diff_xp(f)[a, b] = (f[a, b+1] − f[a, b]) / dx`` move a field half a cell
    east (centre → u point, v point → corner). ``avg_xm`` and ``diff_xm``
    store the same combinations at ``[a, b+1]``, which moves a field half a
    cell west (u point → centre, corner → v point). The y operators do the same along
    y. Entries whose stencil leaves the flat array are zero. In the last
    halo column the x operators wrap onto the next row. Both cases only
    touch halo entries that the owned interior never reads. Each call costs two
    passes over the array.
    """

    def __init__(self, dx, dy, X):
        self.rdx = 1.0 / dx
        self.rdy = 1.0 / dy
        self.sx = 1
        self.sy = X

    @staticmethod
    def _shift_p(f, s, scale, subtract):
        out = np.empty_like(f)
        body = out[:-s]
        if subtract:
            np.subtract(f[s:], f[:-s], out=body)
        else:
            np.add(f[s:], f[:-s], out=body)
        body *= scale
        out[-s:] = 0.0
        return out

    @staticmethod
    def _shift_m(f, s, scale, subtract):
        out = np.empty_like(f)
        body = out[s:]
        if subtract:
            np.subtract(f[s:], f[:-s], out=body)
        else:
            np.add(f[s:], f[:-s], out=body)
        body *= scale
        out[:s] = 0.0
        return out

    @staticmethod
    def _shift_p_T(g, acc, s, scale, subtract):
        part = scale * g[:-s]
        acc[s:] += part
        if subtract:
            acc[:-s] -= part
        else:
            acc[:-s] += part

    @staticmethod
    def _shift_m_T(g, acc, s, scale, subtract):
        part = scale * g[s:]
        acc[s:] += part
        if subtract:
            acc[:-s] -= part
        else:
            acc[:-s] += part

    def avg_xp(self, f):
        return self._shift_p(f, self.sx, 0.5, False)

    def avg_xm(self, f):
        return self._shift_m(f, self.sx, 0.5, False)

    def avg_yp(self, f):
        return self._shift_p(f, self.sy, 0.5, False)

    def avg_ym(self, f):
        return self._shift_m(f, self.sy, 0.5, False)

    def diff_xp(self, f):
        return self._shift_p(f, self.sx, self.rdx, True)

    def diff_xm(self, f):
        return self._shift_m(f, self.sx, self.rdx, True)

    def diff_yp(self, f):
        return self._shift_p(f, self.sy, self.rdy, True)

    def diff_ym(self, f):
        return self._shift_m(f, self.sy, self.rdy, True)

    # Transposes: add (operator)ᵀ g into acc.
    def avg_xp_T(self, g, acc):
        self._shift_p_T(g, acc, self.sx, 0.5, False)

    def avg_xm_T(self, g, acc):
        self._shift_m_T(g, acc, self.sx, 0.5, False)

    def avg_yp_T(self, g, acc):
        self._shift_p_T(g, acc, self.sy, 0.5, False)

    def avg_ym_T(self, g, acc):
        self._shift_m_T(g, acc, self.sy, 0.5, False)

    def diff_xp_T(self, g, acc):
        self._shift_p_T(g, acc, self.sx, self.rdx, True)

    def diff_xm_T(self, g, acc):
        self._shift_m_T(g, acc, self.sx, self.rdx, True)

    def diff_yp_T(self, g, acc):
        self._shift_p_T(g, acc, self.sy, self.rdy, True)

    def diff_ym_T(self, g, acc):
        self._shift_m_T(g, acc, self.sy, self.rdy, True)


class Patch:
    """Geometry and forcing of one rank's padded patch.

    Parameters
    ----------
    config : ModelConfig
        Grid and physics.
    xs, ys : int
        Global index of the first owned cell in x and y.
    xm, ym : int
        Number of owned cells in x and y.

    Attributes
    ----------
    mask_u, mask_v, mask_c : ndarray, shape (Y·X, 1)
        1 at interior u points, v points and corners of the basin, 0 at the
        walls and outside the basin. Free slip sets ζ = 0 on the walls.
    hq_pad : ndarray, shape (Y·X, 1)
        1 in the last padded row and column, where the corner thickness
        average has no valid stencil, else 0. It is added to that average so
        that the division defining q stays finite there.
    f_c : ndarray, shape (Y·X, 1)
        Coriolis parameter ``f0 + β y`` at the corners [s⁻¹].
    wind_u : ndarray, shape (Y·X, 1)
        Wind acceleration ``τ_x / (ρ0 H)`` at the u points [m s⁻²].
    """

    def __init__(self, config, xs, ys, xm, ym):
        self.config = config
        self.xs, self.ys, self.xm, self.ym = xs, ys, xm, ym
        self.shape = (ym + 2, xm + 2)
        nx, ny = config.nx, config.ny
        # Global cell indices of the padded rows and columns.
        i = np.arange(xs - 1, xs + xm + 1)
        j = np.arange(ys - 1, ys + ym + 1)
        inside_i = (i >= 0) & (i < nx)
        inside_j = (j >= 0) & (j < ny)
        face_i = (i >= 0) & (i < nx - 1)
        face_j = (j >= 0) & (j < ny - 1)
        self.mask_u = _outer(inside_j, face_i)
        self.mask_v = _outer(face_j, inside_i)
        self.mask_c = _outer(face_j, face_i)
        hq_pad = np.zeros(self.shape)
        hq_pad[-1] = 1.0
        hq_pad[:, -1] = 1.0
        self.hq_pad = hq_pad.reshape(-1, 1)
        y_centre = -config.Ly / 2 + (j + 0.5) * config.dy
        y_corner = -config.Ly / 2 + (j + 1.0) * config.dy
        f_c = np.broadcast_to((config.f0 + config.beta * y_corner)[:, None], self.shape)
        self.f_c = f_c.reshape(-1, 1).copy()
        wind = config.tau0 * np.cos(2 * np.pi * y_centre / config.Ly) / (config.rho0 * config.H)
        wind_u = np.broadcast_to(wind[:, None], self.shape).reshape(-1, 1)
        self.wind_u = wind_u * self.mask_u
        self.ops = StaggeredOps(config.dx, config.dy, xm + 2)


def _outer(rows, cols):
    return (rows[:, None] & cols[None, :]).astype(np.float64).reshape(-1, 1)


class Linearization:
    """Base-state fields of one tendency evaluation, kept for its TL and adjoint.

    All arrays have shape ``(Y·X, 1)`` and broadcast against a batch.
    """

    __slots__ = ("u", "v", "hx", "hy", "q", "hq", "Uc", "Vc")

    def __init__(self, u, v, hx, hy, q, hq, Uc, Vc):
        self.u, self.v, self.hx, self.hy = u, v, hx, hy
        self.q, self.hq, self.Uc, self.Vc = q, hq, Uc, Vc


def tendency(patch, eta, u, v, keep=False):
    """Return the tendencies ``(∂η/∂t, ∂u/∂t, ∂v/∂t)`` on the padded patch.

    Sadourny's energy-conserving form of the vector-invariant equations::

        h = H + η,  U = avg_xp(h) u,  V = avg_yp(h) v
        ∂η/∂t = −diff_xm(U) − diff_ym(V)
        ζ = diff_xp(v) − diff_yp(u)  (0 on the walls),  q = (f + ζ) / avg_xp(avg_yp(h))
        B = g' η + (avg_xm(u²) + avg_ym(v²)) / 2,  D = diff_xm(u) + diff_ym(v)
        ∂u/∂t = avg_ym(q avg_xp(V)) − diff_xp(B − ν D) − ν diff_ym(ζ) − c_b u + τ_x / (ρ0 H)
        ∂v/∂t = −avg_xm(q avg_yp(U)) − diff_yp(B − ν D) + ν diff_xm(ζ) − c_b v

    ``ν (grad D − curl ζ)`` is the Laplacian ``ν Δu``; with ζ = 0 on the walls
    it is free slip. The tendencies are exact only in the owned interior of
    the patch. With ``keep`` true the base-state fields of the tangent linear
    are returned as a :class:`Linearization` as well.
    """
    cfg, ops = patch.config, patch.ops
    h = eta + cfg.H
    hx = ops.avg_xp(h)
    hy = ops.avg_yp(h)
    U = hx * u
    V = hy * v
    d_eta = ops.diff_xm(U)
    d_eta += ops.diff_ym(V)
    np.negative(d_eta, out=d_eta)

    zeta = ops.diff_xp(v)
    zeta -= ops.diff_yp(u)
    zeta *= patch.mask_c
    hq = ops.avg_xp(ops.avg_yp(h))
    hq += patch.hq_pad
    q = zeta + patch.f_c
    q *= patch.mask_c
    q /= hq
    Vc = ops.avg_xp(V)
    Uc = ops.avg_yp(U)

    # P = B − ν D: Bernoulli potential minus the viscous divergence term.
    P = ops.avg_xm(u * u)
    P += ops.avg_ym(v * v)
    P *= 0.5
    P += cfg.g_prime * eta
    D = ops.diff_xm(u)
    D += ops.diff_ym(v)
    P -= cfg.nu * D

    d_u = ops.avg_ym(q * Vc)
    d_u -= ops.diff_xp(P)
    d_u -= cfg.nu * ops.diff_ym(zeta)
    d_u -= cfg.c_b * u
    d_u += patch.wind_u
    d_u *= patch.mask_u

    d_v = ops.avg_xm(q * Uc)
    np.negative(d_v, out=d_v)
    d_v -= ops.diff_yp(P)
    d_v += cfg.nu * ops.diff_xm(zeta)
    d_v -= cfg.c_b * v
    d_v *= patch.mask_v

    if keep:
        return (d_eta, d_u, d_v), Linearization(u, v, hx, hy, q, hq, Uc, Vc)
    return d_eta, d_u, d_v


def tendency_tl(patch, lin, deta, du, dv):
    """Return the tangent-linear tendencies at the base state ``lin``.

    The product rule over the operators of :func:`tendency`::

        dU = avg_xp(dη) u + hx du,  dV = avg_yp(dη) v + hy dv
        dq = (dζ − q avg_xp(avg_yp(dη))) / hq
        d(qVc) = dq Vc + q avg_xp(dV),  d(qUc) = dq Uc + q avg_yp(dU)
        dP = g' dη + avg_xm(u du) + avg_ym(v dv) − ν dD

    Inputs and outputs have shape ``(Y·X, k)``; the cost is about twice
    that of :func:`tendency` per column.
    """
    cfg, ops = patch.config, patch.ops
    dU = ops.avg_xp(deta)
    dU *= lin.u
    dU += lin.hx * du
    dV = ops.avg_yp(deta)
    dV *= lin.v
    dV += lin.hy * dv
    d_eta = ops.diff_xm(dU)
    d_eta += ops.diff_ym(dV)
    np.negative(d_eta, out=d_eta)

    dzeta = ops.diff_xp(dv)
    dzeta -= ops.diff_yp(du)
    dzeta *= patch.mask_c
    dq = ops.avg_xp(ops.avg_yp(deta))
    dq *= lin.q
    np.subtract(dzeta, dq, out=dq)
    dq /= lin.hq

    dqV = dq * lin.Vc
    dqV += lin.q * ops.avg_xp(dV)
    dqU = dq * lin.Uc
    dqU += lin.q * ops.avg_yp(dU)

    dP = ops.avg_xm(lin.u * du)
    dP += ops.avg_ym(lin.v * dv)
    dP += cfg.g_prime * deta
    dD = ops.diff_xm(du)
    dD += ops.diff_ym(dv)
    dP -= cfg.nu * dD

    d_u = ops.avg_ym(dqV)
    d_u -= ops.diff_xp(dP)
    d_u -= cfg.nu * ops.diff_ym(dzeta)
    d_u -= cfg.c_b * du
    d_u *= patch.mask_u

    d_v = ops.avg_xm(dqU)
    np.negative(d_v, out=d_v)
    d_v -= ops.diff_yp(dP)
    d_v += cfg.nu * ops.diff_xm(dzeta)
    d_v -= cfg.c_b * dv
    d_v *= patch.mask_v
    return d_eta, d_u, d_v


def tendency_adjoint(patch, lin, g_eta, g_u, g_v):
    """Return the adjoint of :func:`tendency_tl` applied to ``(g_eta, g_u, g_v)``.

    The transposes of the operators of :func:`tendency_tl` in reverse order.
    The inputs are the adjoint tendencies on the padded patch, zero outside
    the owned interior. The outputs are the adjoint state on the padded
    patch, halo included. The adjoint of the halo exchange then sums the
    halo entries onto their owners. Same cost as :func:`tendency_tl`.
    """
    cfg, ops = patch.config, patch.ops
    shape = g_eta.shape
    b_eta = np.zeros(shape)
    b_u = -cfg.c_b * g_u
    b_v = -cfg.c_b * g_v
    b_u *= patch.mask_u
    b_v *= patch.mask_v
    gu = g_u * patch.mask_u
    gv = g_v * patch.mask_v

    # Momentum equations.
    b_qV = np.zeros(shape)
    ops.avg_ym_T(gu, b_qV)
    b_qU = np.zeros(shape)
    ops.avg_xm_T(gv, b_qU)
    np.negative(b_qU, out=b_qU)
    b_P = np.zeros(shape)
    ops.diff_xp_T(gu, b_P)
    ops.diff_yp_T(gv, b_P)
    np.negative(b_P, out=b_P)
    b_zeta = np.zeros(shape)
    ops.diff_xm_T(gv, b_zeta)
    ops.diff_ym_T(-gu, b_zeta)
    b_zeta *= cfg.nu

    # dP = g' dη + avg_xm(u du) + avg_ym(v dv) − ν (diff_xm(du) + diff_ym(dv)).
    b_eta += cfg.g_prime * b_P
    tmp = np.zeros(shape)
    ops.avg_xm_T(b_P, tmp)
    tmp *= lin.u
    b_u += tmp
    tmp = np.zeros(shape)
    ops.avg_ym_T(b_P, tmp)
    tmp *= lin.v
    b_v += tmp
    b_D = -cfg.nu * b_P
    ops.diff_xm_T(b_D, b_u)
    ops.diff_ym_T(b_D, b_v)

    # d(qVc) and d(qUc).
    b_q = b_qV * lin.Vc
    b_q += b_qU * lin.Uc
    b_dV = np.zeros(shape)
    ops.avg_xp_T(lin.q * b_qV, b_dV)
    b_dU = np.zeros(shape)
    ops.avg_yp_T(lin.q * b_qU, b_dU)

    # dq = (dζ − q avg_xp(avg_yp(dη))) / hq.
    b_q /= lin.hq
    b_zeta += b_q
    b_hq = np.zeros(shape)
    ops.avg_xp_T(-lin.q * b_q, b_hq)
    ops.avg_yp_T(b_hq, b_eta)

    # dζ = mask_c (diff_xp(dv) − diff_yp(du)).
    b_zeta *= patch.mask_c
    ops.diff_xp_T(b_zeta, b_v)
    ops.diff_yp_T(-b_zeta, b_u)

    # Continuity: dη/dt = −diff_xm(dU) − diff_ym(dV).
    ops.diff_xm_T(-g_eta, b_dU)
    ops.diff_ym_T(-g_eta, b_dV)

    # dU = avg_xp(dη) u + hx du, dV = avg_yp(dη) v + hy dv.
    b_u += lin.hx * b_dU
    b_v += lin.hy * b_dV
    ops.avg_xp_T(lin.u * b_dU, b_eta)
    ops.avg_yp_T(lin.v * b_dV, b_eta)
    return b_eta, b_u, b_v
