"""Generic checks of a tangent-linear and adjoint model, for any DAModel.

The checks follow the linear-model test suite of JEDI OOPS:

* the tangent linear of a zero perturbation is zero;
* the tangent linear is linear;
* a batch of directions equals the same directions one at a time;
* the Taylor remainder ``‖M(x + εd) − M(x) − ε M'd‖`` falls as ε²;
* the adjoint passes the dot-product test ``<M' dx, dy> = <dx, M'ᵀ dy>``.

A model needs the members of the DAModel interface: ``comm``, ``n``,
``variable_slices``, ``natural_indices()``, ``create_state()``,
``forward(x)``, ``linearize(x)``, ``tl(traj, dx)`` and ``adjoint(traj, dy)``.
Random directions are drawn in natural ordering from a seeded generator, so
that they do not depend on the number of ranks.
"""

import numpy as np

# Perturbation scales per variable: 5 m for η and 0.1 m/s for the velocity,
# the background-error standard deviations σ_η, σ_u, σ_v of the 4D-Var set-up.
DEFAULT_SCALES = {"eta": 5.0, "u": 0.1, "v": 0.1}


def natural_scales(model, scales=None):
    """Return the per-entry perturbation scale ``(n,)`` in natural ordering."""
    scales = DEFAULT_SCALES if scales is None else scales
    result = np.ones(model.n)
    for name, part in model.variable_slices.items():
        result[part] = scales.get(name, 1.0)
    return result


def random_directions(model, seed, k, scales=None):
    """Return k random directions with physical scales, local compact rows ``(local_size, k)``."""
    rng = np.random.default_rng(seed)
    natural = rng.standard_normal((model.n, k)) * natural_scales(model, scales)[:, None]
    return np.ascontiguousarray(natural[model.natural_indices()])


def global_dot(model, a, b):
    """Return the global inner products of the columns of local arrays a and b, shape (k,)."""
    a = a.reshape(a.shape[0], -1)
    b = b.reshape(b.shape[0], -1)
    local = np.einsum("ij,ij->j", a, b)
    return model.comm.tompi4py().allreduce(local)


def global_norm(model, a):
    """Return the global 2-norms of the columns of a local array, shape (k,)."""
    return np.sqrt(global_dot(model, a, a))


def _vec_array(vec):
    return np.array(vec.getArray(readonly=True), copy=True)


def _vec_from(model, local):
    vec = model.create_state()
    vec.getArray()[:] = local
    return vec


def adjoint_test(model, traj, seed=0, k=3, scales=None):
    """Return the worst relative error of the dot-product test over k random pairs.

    The error of a pair is ``|<M'dx, dy> − <dx, M'ᵀdy>| / (‖M'dx‖ ‖dy‖)``,
    which is of the order of the machine epsilon for an exact adjoint.
    Cost: one batched TL and one batched adjoint run of k directions.
    """
    dx = random_directions(model, seed, k, scales)
    dy = random_directions(model, seed + 1, k, scales)
    tl_dx = model.tl(traj, dx)
    adj_dy = model.adjoint(traj, dy)
    left = global_dot(model, tl_dx, dy)
    right = global_dot(model, dx, adj_dy)
    scale = global_norm(model, tl_dx) * global_norm(model, dy)
    return float(np.max(np.abs(left - right) / scale))


def taylor_test(model, x, traj=None, seed=0, epsilons=None, scales=None):
    """Return ``(epsilons, remainders, rate)`` of the Taylor test at x.

    ``remainder(ε) = ‖M(x + ε d) − M(x) − ε M'd‖`` for one random direction d
    with physical scales. ``rate`` is the least-squares slope of
    ``log remainder`` against ``log ε``, which is 2 for a correct tangent
    linear.
    Cost: one TL run and one forward run per ε.
    """
    if epsilons is None:
        epsilons = np.logspace(0, -4, 5)
    epsilons = np.asarray(epsilons, dtype=np.float64)
    if traj is None:
        traj = model.linearize(x)
    d = random_directions(model, seed, 1, scales)
    tl_d = model.tl(traj, d)[:, 0]
    base = _vec_array(traj.final)
    x_local = _vec_array(x)
    remainders = []
    for eps in epsilons:
        moved = model.forward(_vec_from(model, x_local + eps * d[:, 0]))
        residual = _vec_array(moved) - base - eps * tl_d
        remainders.append(float(global_norm(model, residual[:, None])[0]))
    remainders = np.asarray(remainders)
    rate = float(np.polyfit(np.log(epsilons), np.log(remainders), 1)[0])
    return epsilons, remainders, rate


def tl_zero_norm(model, traj):
    """Return ``‖M' 0‖``, which is zero for a tangent-linear model."""
    zero = np.zeros((len(model.natural_indices()), 1))
    return float(global_norm(model, model.tl(traj, zero))[0])


def linearity_error(model, traj, seed=0, a=2.5, b=-0.75, scales=None):
    """Return ``‖M'(a d1 + b d2) − a M'd1 − b M'd2‖ / ‖M'(a d1 + b d2)‖`` for random d1, d2."""
    d = random_directions(model, seed, 2, scales)
    combined = model.tl(traj, (a * d[:, 0] + b * d[:, 1])[:, None])[:, 0]
    separate = model.tl(traj, d)
    residual = combined - a * separate[:, 0] - b * separate[:, 1]
    return float(global_norm(model, residual[:, None])[0] / global_norm(model, combined[:, None])[0])


def batch_error(model, traj, seed=0, k=3, scales=None):
    """Return the worst relative difference between a batch of k directions and k single runs.

    Both the tangent linear and the adjoint are compared; returns
    ``(tl_error, adjoint_error)``.
    """
    d = random_directions(model, seed, k, scales)
    errors = []
    for run in (model.tl, model.adjoint):
        batch = run(traj, d)
        single = np.column_stack([run(traj, d[:, [j]])[:, 0] for j in range(k)])
        diff = global_norm(model, batch - single) / global_norm(model, single)
        errors.append(float(np.max(diff)))
    return tuple(errors)
