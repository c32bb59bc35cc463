"""Gauss-Newton operator on the toy model: maths, Mat contract and bad input.

The toy model (tests/toy_model.py) is small (n = 80), so a dense reference
of ``A_x`` is affordable here and built from TL runs.
"""

import numpy as np
import pytest

from petsc_nnpc.operator import (
    STATE_KEY,
    BackgroundErrorConfig,
    DAConfig,
    DAModel,
    GaussNewtonOperator,
    ObservationConfig,
    Observations,
    da_config_for_preset,
)
from petsc_nnpc.utils import init_petsc
from toy_model import TOY_CONFIG, ToyModel

PETSc = init_petsc()

@pytest.fixture(scope="module")
def model():
    return ToyModel(m=40)


@pytest.fixture(scope="module")
def state(model):
    return model.initial_state(seed=3)


def make_operator(model, state, form="paper", config=TOY_CONFIG):
    operator = GaussNewtonOperator(
        model, config.observations, config.background_error, form=form
    )
    operator.linearize(state)
    return operator


def random_vec(model, rng):
    vec = model.create_state()
    vec.getArray()[:] = rng.standard_normal(model.local_size)
    return vec


def dense_jacobian_G(model, operator):
    """Return ``G_x`` as a dense ``(p, n)`` array from n TL runs (one batch)."""
    identity = np.eye(model.n)[operator.natural_indices]  # (local_size, n) columns in natural order
    tl = model.tl(operator.trajectory, identity)  # (local_size, n)
    rows = operator.observations.observe_local(tl)  # (p_local, n)
    G = np.empty((operator.observations.p, model.n))
    G[operator.observations.local_obs_index] = rows
    return G


def dense_operator(model, operator):
    """Return the dense reference of the operator in natural ordering, from TL runs only."""
    G = dense_jacobian_G(model, operator)
    natural_sigma = np.empty(model.n)
    natural_sigma[operator.natural_indices] = operator.background_error.sigma
    R_inv = 1.0 / operator.observations.sigma_o**2
    if operator.form == "bhalf":
        GS = G * natural_sigma[None, :]
        return np.eye(model.n) + R_inv * GS.T @ GS
    return R_inv * G.T @ G + np.diag(1.0 / natural_sigma**2)


def probe_columns(model, mat):
    """Return the Mat probed column by column with unit vectors, in natural ordering."""
    n = model.n
    columns = np.empty((n, n))
    e, column = mat.createVecs()
    natural = mat.getPythonContext().natural_indices
    for j in range(n):
        e.getArray()[:] = (natural == j).astype(float)
        mat.mult(e, column)
        columns[natural, j] = column.getArray()
    return columns


# Toy model: its own TL and adjoint checks, so that the operator tests rest on a
# verified model.


def test_toy_model_is_a_damodel(model):
    assert isinstance(model, DAModel)


def test_toy_adjoint_dot_product(model, state):
    rng = np.random.default_rng(11)
    traj = model.linearize(state)
    dx = rng.standard_normal((model.local_size, 4))
    dy = rng.standard_normal((model.local_size, 4))
    lhs = np.sum(model.tl(traj, dx) * dy)
    rhs = np.sum(dx * model.adjoint(traj, dy))
    assert abs(lhs - rhs) <= 1e-12 * abs(lhs)


def test_toy_taylor_second_order(model, state):
    rng = np.random.default_rng(12)
    traj = model.linearize(state)
    d = rng.standard_normal(model.local_size)
    tl = model.tl(traj, d[:, None])[:, 0]
    final = traj.final.getArray().copy()
    epsilons = np.logspace(-1, -4, 4)
    remainders = []
    for eps in epsilons:
        moved = state.copy()
        moved.getArray()[:] += eps * d
        remainders.append(np.linalg.norm(model.forward(moved).getArray() - final - eps * tl))
    rate = np.polyfit(np.log(epsilons), np.log(remainders), 1)[0]
    assert rate > 1.95


def test_toy_batch_equals_single_runs(model, state):
    rng = np.random.default_rng(13)
    traj = model.linearize(state)
    Z = rng.standard_normal((model.local_size, 5))
    batch = model.tl(traj, Z)
    for j in range(5):
        np.testing.assert_allclose(batch[:, j], model.tl(traj, Z[:, j:j + 1])[:, 0], rtol=0,
                                   atol=1e-13 * np.abs(batch).max())


# Operator maths.


@pytest.mark.parametrize("form", ["paper", "bhalf"])
def test_operator_symmetric(model, state, form):
    rng = np.random.default_rng(21)
    operator = make_operator(model, state, form)
    mat = operator.create_mat()
    for _ in range(3):
        u, v = random_vec(model, rng), random_vec(model, rng)
        Au, Av = u.duplicate(), v.duplicate()
        mat.mult(u, Au)
        mat.mult(v, Av)
        assert abs(Au.dot(v) - u.dot(Av)) <= 1e-12 * abs(Au.dot(v))


@pytest.mark.parametrize("form", ["paper", "bhalf"])
def test_operator_positive_definite(model, state, form):
    rng = np.random.default_rng(22)
    operator = make_operator(model, state, form)
    mat = operator.create_mat()
    sigma = operator.background_error.sigma
    for _ in range(10):
        u = random_vec(model, rng)
        Au = u.duplicate()
        mat.mult(u, Au)
        array = u.getArray()
        # G^T R^-1 G is positive semi-definite, so <Au, u> is at least the prior term.
        prior = np.sum(array**2 / sigma**2) if form == "paper" else np.sum(array**2)
        assert Au.dot(u) >= prior * (1 - 1e-12)
        assert Au.dot(u) > 0


@pytest.mark.parametrize("form", ["paper", "bhalf"])
def test_operator_probe_equals_dense(model, state, form):
    operator = make_operator(model, state, form)
    probed = probe_columns(model, operator.create_mat())
    dense = dense_operator(model, operator)
    assert np.abs(probed - dense).max() <= 1e-12 * np.abs(dense).max()


def test_block_product_equals_single_products(model, state):
    rng = np.random.default_rng(23)
    operator = make_operator(model, state)
    mat = operator.create_mat()
    Z = rng.standard_normal((model.local_size, 6))  # (local_size, k)
    operator.reset_counters()
    block = operator.mult_block(Z)
    assert block.shape == Z.shape
    assert operator.products == 6
    single, out = mat.createVecs()
    for j in range(6):
        single.getArray()[:] = Z[:, j]
        mat.mult(single, out)
        np.testing.assert_allclose(block[:, j], out.getArray(), rtol=0,
                                   atol=1e-13 * np.abs(block).max())
    assert operator.products == 12
    assert operator.wall_time > 0
    operator.reset_counters()
    assert operator.products == 0
    assert operator.wall_time == 0.0


def test_rhs_is_minus_gradient_of_cost(model, state):
    rng = np.random.default_rng(24)
    operator = make_operator(model, state)
    y = operator.observations.observe(model.forward(state)) \
        + rng.standard_normal(operator.observations.p)
    xb = random_vec(model, rng)
    xb.aypx(0.3, state)
    b = operator.rhs(y, xb)
    d = random_vec(model, rng)
    eps = 1e-5
    plus, minus = state.copy(), state.copy()
    plus.axpy(eps, d)
    minus.axpy(-eps, d)
    slope = (operator.cost(y, xb, x=plus)[0] - operator.cost(y, xb, x=minus)[0]) / (2 * eps)
    assert abs(slope + b.dot(d)) <= 1e-6 * abs(slope)


def test_cost_terms(model, state):
    operator = make_operator(model, state)
    y = operator.observations.observe(model.forward(state)) + 0.1
    xb = state.copy()
    xb.shift(0.3)
    J, Jo, Jb = operator.cost(y, xb)
    p = operator.observations.p
    assert Jo == pytest.approx(0.5 * p * 0.1**2 / 0.5**2, rel=1e-12)
    assert Jb == pytest.approx(0.5 * 40 * 0.3**2 * (1 / 1.0**2 + 1 / 0.5**2), rel=1e-12)
    assert J == pytest.approx(Jo + Jb, rel=1e-15)


def test_bhalf_form_gives_same_increment(model, state):
    rng = np.random.default_rng(25)
    y = make_operator(model, state).observations.observe(model.forward(state)) + 0.2
    xb = random_vec(model, rng)
    xb.aypx(0.2, state)
    increments = {}
    for form in ("paper", "bhalf"):
        operator = make_operator(model, state, form)
        dense = dense_operator(model, operator)
        b = operator.rhs(y, xb)
        b_natural = np.empty(model.n)
        b_natural[operator.natural_indices] = b.getArray()
        solution = model.create_state()
        solution.getArray()[:] = np.linalg.solve(dense, b_natural)[operator.natural_indices]
        increments[form] = operator.increment(solution).getArray().copy()
    scale = np.abs(increments["paper"]).max()
    assert np.abs(increments["paper"] - increments["bhalf"]).max() <= 1e-9 * scale


# The Mat contract that preconditioners rely on.


def test_mat_carries_state_and_context(model, state):
    operator = make_operator(model, state)
    mat = operator.create_mat()
    assert mat.getPythonContext() is operator
    composed = mat.query(STATE_KEY)
    assert composed is not None
    assert np.array_equal(composed.getArray(), state.getArray())
    assert mat.isSymmetricKnown() == (True, True)
    assert operator.n == model.n
    assert operator.grid_shape == model.grid_shape
    assert operator.form == "paper"
    assert operator.model is model
    assert np.array_equal(operator.natural_indices, model.natural_indices())


def test_linearize_recomposes_state(model, state):
    operator = make_operator(model, state)
    mat = operator.create_mat()
    first = mat.query(STATE_KEY)
    state_before = mat.stateGet()
    moved = state.copy()
    moved.shift(0.01)
    operator.linearize(moved)
    second = mat.query(STATE_KEY)
    assert mat.stateGet() > state_before
    assert second.getArray()[0] == pytest.approx(state.getArray()[0] + 0.01)
    assert first.getArray()[0] == state.getArray()[0]


class CountingPC:
    """Python PC that applies the identity and counts its set-ups."""

    def __init__(self):
        self.setups = 0
        self.states = []

    def setUp(self, pc):
        self.setups += 1
        A, _ = pc.getOperators()
        self.states.append(A.query(STATE_KEY).getArray()[0])

    def apply(self, pc, x, y):
        x.copy(y)


def test_pc_sets_up_again_after_linearize(model, state):
    operator = make_operator(model, state)
    mat = operator.create_mat()
    b = operator.rhs(operator.observations.observe(model.forward(state)) + 0.1, state)
    ksp = PETSc.KSP().create()
    ksp.setOperators(mat)
    ksp.setType("cg")
    context = CountingPC()
    pc = ksp.getPC()
    pc.setType("python")
    pc.setPythonContext(context)
    x = b.duplicate()
    ksp.solve(b, x)
    ksp.solve(b, x)
    assert context.setups == 1
    moved = state.copy()
    moved.shift(0.5)
    operator.linearize(moved)
    ksp.solve(b, x)
    assert context.setups == 2
    assert context.states[1] == pytest.approx(state.getArray()[0] + 0.5)
    ksp.destroy()


# Observations.


def test_observation_stride_and_indices(model):
    strided = Observations(model, ObservationConfig(variable="a", stride=4))
    assert strided.p == 10
    assert np.array_equal(strided.indices, np.arange(0, 40, 4))
    listed = Observations(model, ObservationConfig(indices=(45, 3, 3, 0)))
    assert np.array_equal(listed.indices, [0, 3, 45])
    every = Observations(model, ObservationConfig(variable="b"))
    assert np.array_equal(every.indices, np.arange(40, 80))


def test_observe_picks_natural_entries(model, state):
    observations = Observations(model, ObservationConfig(indices=(1, 7, 50)))
    natural = np.empty(model.n)
    natural[model.natural_indices()] = state.getArray()
    np.testing.assert_array_equal(observations.observe(state), natural[[1, 7, 50]])


def test_da_config_round_trip_and_presets():
    config = DAConfig(ObservationConfig(indices=(1, 2)), BackgroundErrorConfig({"a": 2.0}), "bhalf")
    assert DAConfig.from_dict(config.to_dict()) == config
    paper = da_config_for_preset("paper")
    assert paper.form == "paper"
    assert paper.observations.sigma_o == 1.0
    assert paper.background_error.sigmas == {"eta": 5.0, "u": 0.1, "v": 0.1}
    assert da_config_for_preset("small", form="bhalf").form == "bhalf"


# Bad input.


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf")])
def test_nonpositive_variance_rejected(value):
    with pytest.raises(ValueError, match="sigma of 'u'"):
        BackgroundErrorConfig({"eta": 5.0, "u": value, "v": 0.1})
    with pytest.raises(ValueError, match="sigma_o"):
        ObservationConfig(sigma_o=value)


def test_missing_variance_rejected(model):
    with pytest.raises(ValueError, match="no background-error sigma for variable"):
        GaussNewtonOperator(model, TOY_CONFIG.observations, BackgroundErrorConfig({"a": 1.0}))


def test_bad_observation_configs_rejected(model):
    with pytest.raises(ValueError, match="stride = 0"):
        ObservationConfig(stride=0)
    with pytest.raises(ValueError, match="use one of them"):
        ObservationConfig(stride=2, indices=(1,))
    with pytest.raises(ValueError, match="not a model variable"):
        Observations(model, ObservationConfig(variable="eta"))
    with pytest.raises(ValueError, match="outside the state"):
        Observations(model, ObservationConfig(indices=(0, 80)))


def test_wrong_observation_size_rejected(model, state):
    operator = make_operator(model, state)
    p = operator.observations.p
    with pytest.raises(ValueError, match=rf"shape \({p + 1},\), expected \({p},\)"):
        operator.rhs(np.zeros(p + 1), state)
    y = np.zeros(p)
    y[3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        operator.rhs(y, state)


def test_nan_state_rejected(model, state):
    operator = GaussNewtonOperator.from_config(model, TOY_CONFIG)
    bad = state.copy()
    bad.getArray()[2] = np.nan
    with pytest.raises(ValueError, match="linearization state contains NaN"):
        operator.linearize(bad)
    operator.linearize(state)
    with pytest.raises(ValueError, match="background state contains NaN"):
        operator.rhs(np.zeros(operator.observations.p), bad)


def test_product_before_linearize_rejected(model):
    operator = GaussNewtonOperator.from_config(model, TOY_CONFIG)
    with pytest.raises(RuntimeError, match="call linearize"):
        operator.mult_block(np.zeros((model.local_size, 2)))


def test_bad_block_shape_rejected(model, state):
    operator = make_operator(model, state)
    with pytest.raises(ValueError, match=r"expected \(local_size, k\)"):
        operator.mult_block(np.zeros(model.local_size))


def test_bad_form_and_model_rejected(model):
    with pytest.raises(ValueError, match="form = 'bhalfx'"):
        GaussNewtonOperator(model, TOY_CONFIG.observations, TOY_CONFIG.background_error, "bhalfx")
    with pytest.raises(TypeError, match="does not implement the DAModel interface"):
        GaussNewtonOperator(object(), TOY_CONFIG.observations, TOY_CONFIG.background_error)


def test_da_config_from_options():
    from petsc_nnpc.operator import da_config_from_options

    options = PETSc.Options("dacfg_")
    for name, value in [("obs_stride", "2"), ("obs_sigma", "0.5"), ("bkg_sigma_u", "0.05"),
                        ("form", "bhalf")]:
        options.setValue(name, value)
    try:
        config = da_config_from_options("paper", options)
    finally:
        for name in ("obs_stride", "obs_sigma", "bkg_sigma_u", "form"):
            options.delValue(name)
    assert config.observations.stride == 2
    assert config.observations.sigma_o == 0.5
    assert config.background_error.sigmas == {"eta": 5.0, "u": 0.05, "v": 0.1}
    assert config.form == "bhalf"
    assert da_config_from_options("paper", options) == da_config_for_preset("paper")


def test_da_config_observation_indices_option():
    from petsc_nnpc.operator import da_config_from_options

    options = PETSc.Options("dacfgidx_")
    options.setValue("obs_indices", "7,3,42")
    try:
        config = da_config_from_options("small", options)
    finally:
        options.delValue("obs_indices")
    assert config.observations.indices == (7, 3, 42)
    assert config.observations.stride == 1
    options.setValue("obs_indices", "7,x")
    try:
        with pytest.raises(ValueError, match="-obs_indices '7,x' is invalid"):
            da_config_from_options("small", options)
    finally:
        options.delValue("obs_indices")
