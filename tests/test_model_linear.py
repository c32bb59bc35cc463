"""Tangent-linear and adjoint test suite of the shallow-water model.

The checks of :mod:`shallow_water.checks` apply to any DAModel; each model
case below runs all of them. The window cases use the shipped spun-up state
of the ``tiny`` preset, so the trajectory is a real double-gyre flow.
"""

import dataclasses

import numpy as np
import pytest

from shallow_water import ShallowWaterModel, checks, get_config
from shallow_water.state import load_spunup_state

# Relative error of the dot-product test: float64 round-off over a window.
ADJOINT_TOLERANCE = 1e-12


def _tiny_model(window_steps=None):
    config = get_config("tiny")
    if window_steps is not None:
        config = dataclasses.replace(config, window_steps=window_steps)
    return ShallowWaterModel(config)


MODEL_CASES = {
    "tiny-window": lambda: _tiny_model(),
    "tiny-one-step": lambda: _tiny_model(window_steps=1),
    "odd-grid-window": lambda: ShallowWaterModel(
        dataclasses.replace(get_config("tiny"), nx=7, ny=5, window_steps=3)
    ),
}


@pytest.fixture(scope="module", params=sorted(MODEL_CASES))
def case(request):
    model = MODEL_CASES[request.param]()
    if model.config.grid == get_config("tiny").grid:
        x = model.from_natural(load_spunup_state("tiny"))
    else:
        rng = np.random.default_rng(11)
        x = model.from_natural(rng.standard_normal(model.n) * checks.natural_scales(model) * 10)
    traj = model.linearize(x)
    return model, x, traj


def test_adjoint_dot_product(case):
    model, _, traj = case
    assert checks.adjoint_test(model, traj, seed=3, k=4) <= ADJOINT_TOLERANCE


def test_taylor_remainder_second_order(case):
    model, x, traj = case
    epsilons, remainders, rate = checks.taylor_test(
        model, x, traj, seed=5, epsilons=np.logspace(0, -4, 5)
    )
    assert np.log10(epsilons[0] / epsilons[-1]) >= 4
    assert rate >= 1.9
    assert np.all(np.diff(remainders) < 0)


def test_tl_of_zero_is_zero(case):
    model, _, traj = case
    assert checks.tl_zero_norm(model, traj) == 0.0


def test_tl_linearity(case):
    model, _, traj = case
    assert checks.linearity_error(model, traj, seed=7) <= 1e-13


def test_batch_equals_single_runs(case):
    model, _, traj = case
    tl_error, adjoint_error = checks.batch_error(model, traj, seed=9, k=3)
    assert tl_error <= 1e-14
    assert adjoint_error <= 1e-14


def test_trajectory_final_is_forward(case):
    model, x, traj = case
    final = traj.final.getArray(readonly=True)
    forward = model.forward(x).getArray(readonly=True)
    np.testing.assert_array_equal(final, forward)


def test_mass_conserved_over_window():
    model = _tiny_model()
    state = load_spunup_state("tiny")
    eta = model.variable_slices["eta"]
    final = model.to_natural(model.forward(model.from_natural(state)))
    scale = np.abs(state[eta]).sum()
    assert abs(final[eta].sum() - state[eta].sum()) <= 1e-13 * scale


def test_walls_stay_closed():
    model = _tiny_model()
    x = model.from_natural(load_spunup_state("tiny"))
    owned = model._vec_to_owned(model.forward(x))
    walls = 1.0 - model._wall_mask
    assert np.all(owned * walls == 0.0)


def test_tl_rejects_wrong_shape():
    model = _tiny_model(window_steps=1)
    traj = model.linearize(model.create_state())
    with pytest.raises(ValueError, match="local_size"):
        model.tl(traj, np.zeros(model.local_size))
    with pytest.raises(ValueError, match="local_size"):
        model.adjoint(traj, np.zeros((model.local_size + 1, 2)))


def test_tl_after_adjoint_unchanged(case):
    model, _, traj = case
    directions = checks.random_directions(model, seed=13, k=2)
    before = model.tl(traj, directions)
    model.adjoint(traj, directions)
    after = model.tl(traj, directions)
    np.testing.assert_array_equal(before, after)
