"""State files, shipped states and the spin-up of the double gyre."""

import dataclasses
import os

import numpy as np
import pytest

from shallow_water import ShallowWaterModel, get_config
from shallow_water.spinup import check_bounded, gyre_diagnostics, spin_up
from shallow_water.state import (
    data_path,
    load_background_state,
    load_spunup_state,
    load_state,
    read_state_file,
    save_state,
)


def test_state_file_round_trip(tmp_path, rng):
    config = get_config("tiny")
    state = rng.standard_normal(config.n)
    path = tmp_path / "state.npz"
    save_state(path, config, state, time=86400.0)
    np.testing.assert_array_equal(load_state(path, config), state)
    _, file_config, time = read_state_file(path)
    assert file_config == config
    assert time == 86400.0


def test_state_file_other_grid_names_both(tmp_path):
    config = get_config("tiny")
    path = tmp_path / "tiny.npz"
    save_state(path, config, np.zeros(config.n))
    with pytest.raises(ValueError, match=r"nx=10, ny=10.*'tiny'.*nx=32, ny=32.*'small'"):
        load_state(path, get_config("small"))


def test_save_rejects_nan_naming_variable():
    config = get_config("tiny")
    state = np.zeros(config.n)
    state[-1] = np.inf
    with pytest.raises(ValueError, match="non-finite values in v"):
        save_state(os.devnull, config, state)


def test_load_rejects_nan_naming_variable(tmp_path):
    config = get_config("tiny")
    path = tmp_path / "bad.npz"
    save_state(path, config, np.zeros(config.n))
    with np.load(path) as data:
        arrays = dict(data)
    arrays["eta"][2, 3] = np.nan
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=r"1 non-finite values in eta \(first at row 2, column 3\)"):
        load_state(path, config)


def test_missing_state_file_names_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="nnpc spinup"):
        load_state(tmp_path / "none.npz", get_config("tiny"))


@pytest.mark.parametrize("preset", ["tiny", "small", "paper"])
def test_shipped_states_are_double_gyres(preset):
    config = get_config(preset)
    for state in (load_spunup_state(preset), load_background_state(preset)):
        figures = gyre_diagnostics(config, state)
        assert figures["jet_u"] > 0.02
        assert figures["eta_south_minus_north"] > 10.0
        assert -config.H / 2 < figures["eta_min"] < figures["eta_max"] < config.H / 2


def test_shipped_state_file_names():
    assert data_path("small", "spunup").endswith(os.path.join("data", "small_spunup.npz"))
    with pytest.raises(ValueError, match="kind 'mean' is invalid"):
        data_path("small", "mean")


def test_small_spinup_stays_bounded_double_gyre():
    config = get_config("small")
    model = ShallowWaterModel(config)
    start = load_spunup_state("small")
    state = spin_up(model, 10.0, x0=start, progress=False)
    check_bounded(config, state, 10 * 86400.0)
    figures = gyre_diagnostics(config, state)
    assert figures["jet_u"] > 0.02
    assert figures["eta_south_minus_north"] > 10.0
    assert figures["speed_max"] < 2.0
    eta = model.variable_slices["eta"]
    assert abs(state[eta].sum() - start[eta].sum()) <= 1e-12 * np.abs(start[eta]).sum()


def test_spinup_from_rest_forms_jet():
    config = dataclasses.replace(get_config("tiny"), preset="custom")
    model = ShallowWaterModel(config)
    state = spin_up(model, 120.0, progress=False)
    figures = gyre_diagnostics(config, state)
    assert figures["jet_u"] > 0.0
    assert figures["eta_south_minus_north"] > 0.0


def test_spinup_resumes_from_checkpoint(tmp_path):
    config = get_config("tiny")
    model = ShallowWaterModel(config)
    checkpoint = tmp_path / "partial.npz"
    half = spin_up(model, 20.0, checkpoint=checkpoint, checkpoint_days=10.0, progress=False)
    assert os.path.exists(checkpoint)
    resumed = spin_up(model, 40.0, checkpoint=checkpoint, progress=False)
    straight = spin_up(model, 40.0, progress=False)
    assert not np.array_equal(half, straight)
    np.testing.assert_allclose(resumed, straight, rtol=0, atol=1e-12 * np.abs(straight).max())


def test_blow_up_detected():
    config = get_config("tiny")
    state = np.zeros(config.n)
    state[0] = -config.H
    with pytest.raises(RuntimeError, match="layer thickness vanished"):
        check_bounded(config, state, 0.0)
    state[0] = np.nan
    with pytest.raises(RuntimeError, match="non-finite values in eta"):
        check_bounded(config, state, 0.0)
