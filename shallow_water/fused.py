"""Fused kernels of the C-grid model, compiled with Numba.

The same discretisation as :mod:`shallow_water.kernels`, written as loops
that visit each grid point once per intermediate field instead of a hundred
NumPy passes over whole arrays. Each kernel also carries out its share of
the RK4 step, so that one stage of a forward, tangent-linear or adjoint
step costs one compiled call and one halo exchange.

Array layouts (all float64, C order):

* ``L``, shape ``(Y, X, 3, k)``: the padded local array of the halo
  exchange (DMDA local Vec), with ``Y = ym + 2`` rows and ``X = xm + 2``
  columns, and (η, u, v) for each of ``k`` columns;
* owned arrays ``(ym, xm, 3, k)``: the DMDA global ordering of one rank's
  cells; point ``(j, i)`` of an owned array is point ``(j + 1, i + 1)`` of
  the padded patch;
* ``geo``, shape ``(5, Y, X)``: ``mask_u, mask_v, mask_c, f_c, wind_u`` of
  :class:`shallow_water.kernels.Patch`;
* ``lin``, shape ``(8, Y, X)``: the base state of one stage,
  ``u, v, hx, hy, q, hq, Uc, Vc`` (names of :func:`kernels.tendency`);
* ``prm``: ``rdx, rdy, g', ν, c_b, H``.

Positions follow :mod:`shallow_water.kernels`: index ``[a, b]`` is the
centre, the east face, the north face or the north-east corner of cell
``(a, b)`` of the padded patch. Intermediate fields are computed only where
the owned interior reads them. They live in scratch fields of shape
``(Y, k, X)``, so that the innermost loop of every kernel runs along x over
contiguous memory and the compiler vectorizes it, for one column as for
many. Each loop stores one field, because Numba cannot tell the compiler
that two arrays do not overlap, and with many stored arrays the compiler
gives up vectorizing. A batch of ``k`` columns shares the call, the halo
exchange and the cached row of base-state values.

RK4 epilogue of the forward and tangent-linear kernels. With ``T`` the
tendency of the stage at the owned points::

    acc ← β acc + w T
    last stage:   xout ← x + acc,  G ← xout
    other stages: G ← x + c T

where ``G`` is the owned global array of the next halo exchange.
"""

import numpy as np
from numba import njit

# Rows of ``geo`` and ``lin``.
MASK_U, MASK_V, MASK_C, F_C, WIND_U = range(5)
LIN_U, LIN_V, LIN_HX, LIN_HY, LIN_Q, LIN_HQ, LIN_UC, LIN_VC = range(8)

# Scratch fields of the forward and tangent-linear stages, and of the adjoint stage.
WORK_FIELDS = 10
ADJOINT_FIELDS = 10


def workspace(Y, X, k):
    """Return zeroed scratch space ``(forward and TL, adjoint)`` for a patch and k columns."""
    return np.zeros((WORK_FIELDS, Y, k, X)), np.zeros((ADJOINT_FIELDS, Y + 2, k, X + 2))


def geometry(patch):
    """Return ``geo`` (5, Y, X) of a :class:`shallow_water.kernels.Patch`."""
    shape = patch.shape
    rows = [patch.mask_u, patch.mask_v, patch.mask_c, patch.f_c, patch.wind_u]
    return np.ascontiguousarray(np.stack([np.reshape(row, shape) for row in rows]))


def parameters(config):
    """Return ``prm``: ``rdx, rdy, g', ν, c_b, H`` of a :class:`ModelConfig`."""
    return np.array(
        [1.0 / config.dx, 1.0 / config.dy, config.g_prime, config.nu, config.c_b, config.H]
    )


@njit(cache=True)
def _rk4_update(T, x, acc, G, xout, w, beta, cn, last):
    """Apply the RK4 epilogue (module docstring) to flat views of the owned arrays."""
    t = T.reshape(-1)
    xf = x.reshape(-1)
    af = acc.reshape(-1)
    gf = G.reshape(-1)
    of = xout.reshape(-1)
    for m in range(t.size):
        af[m] = beta * af[m] + w * t[m]
    if last:
        for m in range(t.size):
            of[m] = xf[m] + af[m]
        for m in range(t.size):
            gf[m] = of[m]
    else:
        for m in range(t.size):
            gf[m] = xf[m] + cn * t[m]


@njit(cache=True)
def _split(L, E, Uu, Vv):
    """Copy η, u, v of the padded local array into ``(Y, k, X)`` arrays, x fastest."""
    Y, X, _, k = L.shape
    for a in range(Y):
        for b in range(X):
            for c in range(k):
                E[a, c, b] = L[a, b, 0, c]
                Uu[a, c, b] = L[a, b, 1, c]
                Vv[a, c, b] = L[a, b, 2, c]


@njit(cache=True)
def forward_stage(L, geo, prm, x, acc, G, xout, w, beta, cn, last, lin, work):
    """Run one forward RK4 stage from the padded local array ``L``.

    When ``lin`` has shape (8, Y, X), the stage stores its base state in it,
    which requires ``k = 1``. Pass an array of shape (0, 0, 0) otherwise.
    ``work`` is scratch space of shape (WORK_FIELDS, Y, k, X).
    """
    Y, X, _, k = L.shape
    rdx, rdy, gp, nu, cb, H = prm[0], prm[1], prm[2], prm[3], prm[4], prm[5]
    keep = lin.shape[0] == 8
    E, Uu, Vv = work[0], work[1], work[2]
    _split(L, E, Uu, Vv)
    U, V, zeta, qV, qU, P = work[3], work[4], work[5], work[6], work[7], work[8]
    for a in range(Y):
        for c in range(k):
            for b in range(X - 1):
                hx = 0.5 * (E[a, c, b] + E[a, c, b + 1]) + H
                U[a, c, b] = hx * Uu[a, c, b]
                if keep:
                    lin[LIN_HX, a, b] = hx
    for a in range(Y - 1):
        for c in range(k):
            for b in range(X):
                hy = 0.5 * (E[a, c, b] + E[a + 1, c, b]) + H
                V[a, c, b] = hy * Vv[a, c, b]
                if keep:
                    lin[LIN_HY, a, b] = hy
    for a in range(Y - 1):
        for c in range(k):
            for b in range(X - 1):
                mc = geo[MASK_C, a, b]
                fc = geo[F_C, a, b]
                z = mc * ((Vv[a, c, b + 1] - Vv[a, c, b]) * rdx
                          - (Uu[a + 1, c, b] - Uu[a, c, b]) * rdy)
                hq = 0.25 * (E[a, c, b] + E[a, c, b + 1]
                             + E[a + 1, c, b] + E[a + 1, c, b + 1]) + H
                q = mc * (z + fc) / hq
                Vc = 0.5 * (V[a, c, b] + V[a, c, b + 1])
                Uc = 0.5 * (U[a, c, b] + U[a + 1, c, b])
                zeta[a, c, b] = z
                qV[a, c, b] = q * Vc
                qU[a, c, b] = q * Uc
                if keep:
                    lin[LIN_Q, a, b] = q
                    lin[LIN_HQ, a, b] = hq
                    lin[LIN_UC, a, b] = Uc
                    lin[LIN_VC, a, b] = Vc
    for a in range(1, Y):
        for c in range(k):
            for b in range(1, X):
                uw = Uu[a, c, b - 1]
                ue = Uu[a, c, b]
                vs = Vv[a - 1, c, b]
                vn = Vv[a, c, b]
                P[a, c, b] = (
                    0.25 * (uw * uw + ue * ue + vs * vs + vn * vn)
                    + gp * E[a, c, b]
                    - nu * ((ue - uw) * rdx + (vn - vs) * rdy)
                )
    if keep:
        for a in range(Y):
            for b in range(X):
                lin[LIN_U, a, b] = Uu[a, 0, b]
                lin[LIN_V, a, b] = Vv[a, 0, b]
    T = np.empty(x.shape)
    for a in range(1, Y - 1):
        j = a - 1
        for c in range(k):
            for b in range(1, X - 1):
                i = b - 1
                mu = geo[MASK_U, a, b]
                mv = geo[MASK_V, a, b]
                t_eta = -((U[a, c, b] - U[a, c, b - 1]) * rdx + (V[a, c, b] - V[a - 1, c, b]) * rdy)
                t_u = mu * (
                    0.5 * (qV[a - 1, c, b] + qV[a, c, b])
                    - (P[a, c, b + 1] - P[a, c, b]) * rdx
                    - nu * (zeta[a, c, b] - zeta[a - 1, c, b]) * rdy
                    - cb * Uu[a, c, b]
                    + geo[WIND_U, a, b]
                )
                t_v = mv * (
                    -0.5 * (qU[a, c, b - 1] + qU[a, c, b])
                    - (P[a + 1, c, b] - P[a, c, b]) * rdy
                    + nu * (zeta[a, c, b] - zeta[a, c, b - 1]) * rdx
                    - cb * Vv[a, c, b]
                )
                T[j, i, 0, c] = t_eta
                T[j, i, 1, c] = t_u
                T[j, i, 2, c] = t_v
    _rk4_update(T, x, acc, G, xout, w, beta, cn, last)


@njit(cache=True)
def tl_stage(L, lin, geo, prm, x, acc, G, xout, w, beta, cn, last, work):
    """Run one tangent-linear RK4 stage at the base state ``lin`` (product rule of :func:`forward_stage`).

    Each loop stores one field and runs along x innermost, so that the
    compiler vectorizes it. ``work`` is scratch space of shape
    (WORK_FIELDS, Y, k, X). Every field is read only where it was written,
    so the scratch space need not be zero.
    """
    Y, X, _, k = L.shape
    rdx, rdy, gp, nu, cb = prm[0], prm[1], prm[2], prm[3], prm[4]
    E, Uu, Vv = work[0], work[1], work[2]
    _split(L, E, Uu, Vv)
    dU, dV, dzeta, dq, dqV, dqU, dP = work[3], work[4], work[5], work[6], work[7], work[8], work[9]
    # dU = avg_xp(dη) u + hx du and dV = avg_yp(dη) v + hy dv.
    for a in range(Y):
        for c in range(k):
            for b in range(X - 1):
                u = 0.5 * lin[LIN_U, a, b]
                hx = lin[LIN_HX, a, b]
                dU[a, c, b] = (E[a, c, b] + E[a, c, b + 1]) * u + hx * Uu[a, c, b]
    for a in range(Y - 1):
        for c in range(k):
            for b in range(X):
                v = 0.5 * lin[LIN_V, a, b]
                hy = lin[LIN_HY, a, b]
                dV[a, c, b] = (E[a, c, b] + E[a + 1, c, b]) * v + hy * Vv[a, c, b]
    # Corners: dζ, dq = (dζ − q avg_xp(avg_yp(dη))) / hq, d(q Vc) and d(q Uc).
    for a in range(Y - 1):
        for c in range(k):
            for b in range(X - 1):
                mc = geo[MASK_C, a, b]
                dzeta[a, c, b] = mc * ((Vv[a, c, b + 1] - Vv[a, c, b]) * rdx
                                       - (Uu[a + 1, c, b] - Uu[a, c, b]) * rdy)
    for a in range(Y - 1):
        for c in range(k):
            for b in range(X - 1):
                rhq = 1.0 / lin[LIN_HQ, a, b]
                qq = 0.25 * lin[LIN_Q, a, b]
                dq[a, c, b] = (dzeta[a, c, b] - qq * (E[a, c, b] + E[a, c, b + 1]
                                                      + E[a + 1, c, b] + E[a + 1, c, b + 1])) * rhq
    for a in range(Y - 1):
        for c in range(k):
            for b in range(X - 1):
                q = 0.5 * lin[LIN_Q, a, b]
                Vc = lin[LIN_VC, a, b]
                dqV[a, c, b] = dq[a, c, b] * Vc + q * (dV[a, c, b] + dV[a, c, b + 1])
    for a in range(Y - 1):
        for c in range(k):
            for b in range(X - 1):
                q = 0.5 * lin[LIN_Q, a, b]
                Uc = lin[LIN_UC, a, b]
                dqU[a, c, b] = dq[a, c, b] * Uc + q * (dU[a, c, b] + dU[a + 1, c, b])
    # dP = g' dη + avg_xm(u du) + avg_ym(v dv) − ν (diff_xm(du) + diff_ym(dv)).
    for a in range(1, Y):
        for c in range(k):
            for b in range(1, X):
                cw = 0.5 * lin[LIN_U, a, b - 1] + nu * rdx
                ce = 0.5 * lin[LIN_U, a, b] - nu * rdx
                cs = 0.5 * lin[LIN_V, a - 1, b] + nu * rdy
                cn_ = 0.5 * lin[LIN_V, a, b] - nu * rdy
                dP[a, c, b] = (cw * Uu[a, c, b - 1] + ce * Uu[a, c, b]
                               + cs * Vv[a - 1, c, b] + cn_ * Vv[a, c, b] + gp * E[a, c, b])
    # Tendencies at the owned points.
    T = np.empty(x.shape)
    for a in range(1, Y - 1):
        for c in range(k):
            for b in range(1, X - 1):
                T[a - 1, b - 1, 0, c] = -((dU[a, c, b] - dU[a, c, b - 1]) * rdx
                                          + (dV[a, c, b] - dV[a - 1, c, b]) * rdy)
    for a in range(1, Y - 1):
        for c in range(k):
            for b in range(1, X - 1):
                mu = geo[MASK_U, a, b]
                T[a - 1, b - 1, 1, c] = mu * (
                    0.5 * (dqV[a - 1, c, b] + dqV[a, c, b])
                    - (dP[a, c, b + 1] - dP[a, c, b]) * rdx
                    - nu * (dzeta[a, c, b] - dzeta[a - 1, c, b]) * rdy
                    - cb * Uu[a, c, b]
                )
    for a in range(1, Y - 1):
        for c in range(k):
            for b in range(1, X - 1):
                mv = geo[MASK_V, a, b]
                T[a - 1, b - 1, 2, c] = mv * (
                    -0.5 * (dqU[a, c, b - 1] + dqU[a, c, b])
                    - (dP[a + 1, c, b] - dP[a, c, b]) * rdy
                    + nu * (dzeta[a, c, b] - dzeta[a, c, b - 1]) * rdx
                    - cb * Vv[a, c, b]
                )
    _rk4_update(T, x, acc, G, xout, w, beta, cn, last)


@njit(cache=True)
def adjoint_stage(lin, geo, prm, outside, y, G, xbar, alpha, beta, L, work):
    """Run one adjoint RK4 stage: the transpose of :func:`tl_stage`'s tendency.

    The adjoint tendency input at the owned points is
    ``g = α y + β G·mask``, where ``G`` contains the result of the previous
    adjoint stage (after its halo sum) and ``mask`` zeroes the wall faces.
    When ``β ≠ 0`` that result is also added to ``xbar``. ``G`` is then
    zeroed, ready for the next local-to-global sum. The adjoint state is
    written to every point of ``L``, halo included. The halo sides flagged
    in ``outside`` (west, east, south, north: 1 when outside the basin) are
    set to zero. Each adjoint field is gathered from the tangent-linear
    terms that read it, one stored field per loop as in :func:`tl_stage`.

    ``work``, shape (ADJOINT_FIELDS, Y + 2, k, X + 2), must be zero when
    first used and be kept for later calls with the same shape: each of its
    fields is written on a fixed range, and the zeros around that range
    stand for positions outside it.
    """
    Y, X, _, k = L.shape
    ym, xm = Y - 2, X - 2
    rdx, rdy, gp, nu, cb = prm[0], prm[1], prm[2], prm[3], prm[4]
    # Fields are offset by one: position (a, b) is stored at [a + 1, c, b + 1].
    gE, GU, GV, bP, Z = work[0], work[1], work[2], work[3], work[4]
    W, qbV, qbU, bU, bV = work[5], work[6], work[7], work[8], work[9]
    # Inputs at the owned points: g = α y + β a_prev (a_prev already masked in xbar's update).
    for j in range(ym):
        for c in range(k):
            for i in range(xm):
                gE[j + 2, c, i + 2] = alpha * y[j, i, 0, c] + beta * G[j, i, 0, c]
    for j in range(ym):
        for c in range(k):
            for i in range(xm):
                mu = geo[MASK_U, j + 1, i + 1]
                GU[j + 2, c, i + 2] = mu * (alpha * y[j, i, 1, c] + beta * G[j, i, 1, c])
    for j in range(ym):
        for c in range(k):
            for i in range(xm):
                mv = geo[MASK_V, j + 1, i + 1]
                GV[j + 2, c, i + 2] = mv * (alpha * y[j, i, 2, c] + beta * G[j, i, 2, c])
    if beta != 0.0:
        add_masked(xbar, G, geo)
    else:
        gf = G.reshape(-1)
        for m in range(gf.size):
            gf[m] = 0.0
    # Corners: adjoints of d(q Vc), d(q Uc), dq and dζ.
    for a in range(Y - 1):
        for c in range(k):
            for b in range(X - 1):
                A, B = a + 1, b + 1
                mc = geo[MASK_C, a, b]
                rhq = 1.0 / lin[LIN_HQ, a, b]
                cV = 0.5 * lin[LIN_VC, a, b] * rhq
                cU = 0.5 * lin[LIN_UC, a, b] * rhq
                Z[A, c, B] = mc * (
                    nu * ((GU[A + 1, c, B] - GU[A, c, B]) * rdy + (GV[A, c, B] - GV[A, c, B + 1]) * rdx)
                    + cV * (GU[A, c, B] + GU[A + 1, c, B]) - cU * (GV[A, c, B] + GV[A, c, B + 1])
                )
    for a in range(Y - 1):
        for c in range(k):
            for b in range(X - 1):
                A, B = a + 1, b + 1
                rhq = 1.0 / lin[LIN_HQ, a, b]
                cq = -0.25 * lin[LIN_Q, a, b] * rhq
                cV = cq * 0.5 * lin[LIN_VC, a, b]
                cU = cq * 0.5 * lin[LIN_UC, a, b]
                W[A, c, B] = cV * (GU[A, c, B] + GU[A + 1, c, B]) - cU * (GV[A, c, B] + GV[A, c, B + 1])
    for a in range(Y - 1):
        for c in range(k):
            for b in range(X - 1):
                A, B = a + 1, b + 1
                q = 0.5 * lin[LIN_Q, a, b]
                qbV[A, c, B] = q * (GU[A, c, B] + GU[A + 1, c, B])
    for a in range(Y - 1):
        for c in range(k):
            for b in range(X - 1):
                A, B = a + 1, b + 1
                q = -0.5 * lin[LIN_Q, a, b]
                qbU[A, c, B] = q * (GV[A, c, B] + GV[A, c, B + 1])
    # Centres: the adjoint of P = B − ν D.
    for a in range(1, Y):
        for c in range(k):
            for b in range(1, X):
                A, B = a + 1, b + 1
                bP[A, c, B] = (GU[A, c, B] - GU[A, c, B - 1]) * rdx + (GV[A, c, B] - GV[A - 1, c, B]) * rdy
    # Adjoints of dU and dV (continuity and the q terms).
    for a in range(Y):
        for c in range(k):
            for b in range(X - 1):
                A, B = a + 1, b + 1
                bU[A, c, B] = (gE[A, c, B + 1] - gE[A, c, B]) * rdx + 0.5 * (qbU[A, c, B] + qbU[A - 1, c, B])
    for a in range(Y - 1):
        for c in range(k):
            for b in range(X):
                A, B = a + 1, b + 1
                bV[A, c, B] = (gE[A + 1, c, B] - gE[A, c, B]) * rdy + 0.5 * (qbV[A, c, B] + qbV[A, c, B - 1])
    # The adjoint state at every point of the padded patch. At b = 0 and a = 0
    # the west and south base values wrap around but meet zero adjoints.
    for a in range(Y):
        for c in range(k):
            for b in range(X):
                A, B = a + 1, b + 1
                ue = 0.5 * lin[LIN_U, a, b]
                uw = 0.5 * lin[LIN_U, a, b - 1]
                vn = 0.5 * lin[LIN_V, a, b]
                vs = 0.5 * lin[LIN_V, a - 1, b]
                L[a, b, 0, c] = (
                    gp * bP[A, c, B]
                    + W[A, c, B] + W[A, c, B - 1] + W[A - 1, c, B] + W[A - 1, c, B - 1]
                    + ue * bU[A, c, B] + uw * bU[A, c, B - 1]
                    + vn * bV[A, c, B] + vs * bV[A - 1, c, B]
                )
    for a in range(Y):
        for c in range(k):
            for b in range(X):
                A, B = a + 1, b + 1
                u = 0.5 * lin[LIN_U, a, b]
                hx = lin[LIN_HX, a, b]
                cp = u - nu * rdx
                ce = u + nu * rdx
                L[a, b, 1, c] = (
                    -cb * GU[A, c, B]
                    + (Z[A, c, B] - Z[A - 1, c, B]) * rdy
                    + cp * bP[A, c, B] + ce * bP[A, c, B + 1]
                    + hx * bU[A, c, B]
                )
    for a in range(Y):
        for c in range(k):
            for b in range(X):
                A, B = a + 1, b + 1
                v = 0.5 * lin[LIN_V, a, b]
                hy = lin[LIN_HY, a, b]
                cp = v - nu * rdy
                cn_ = v + nu * rdy
                L[a, b, 2, c] = (
                    -cb * GV[A, c, B]
                    + (Z[A, c, B - 1] - Z[A, c, B]) * rdx
                    + cp * bP[A, c, B] + cn_ * bP[A + 1, c, B]
                    + hy * bV[A, c, B]
                )
    # Halo cells outside the basin belong to no rank.
    if outside[0] != 0:
        L[:, 0] = 0.0
    if outside[1] != 0:
        L[:, X - 1] = 0.0
    if outside[2] != 0:
        L[0] = 0.0
    if outside[3] != 0:
        L[Y - 1] = 0.0


@njit(cache=True)
def add_masked(xbar, G, geo):
    """``xbar += G·mask`` at the owned points (wall faces masked), then ``G ← 0``."""
    ym, xm, _, k = G.shape
    for j in range(ym):
        for i in range(xm):
            mu = geo[MASK_U, j + 1, i + 1]
            mv = geo[MASK_V, j + 1, i + 1]
            for c in range(k):
                xbar[j, i, 0, c] += G[j, i, 0, c]
                xbar[j, i, 1, c] += mu * G[j, i, 1, c]
                xbar[j, i, 2, c] += mv * G[j, i, 2, c]
                G[j, i, 0, c] = 0.0
                G[j, i, 1, c] = 0.0
                G[j, i, 2, c] = 0.0
