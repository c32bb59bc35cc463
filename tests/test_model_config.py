"""ModelConfig presets, validation and the time-step guard."""

import dataclasses

import numpy as np
import pytest

from shallow_water import ShallowWaterModel, get_config, preset_names


def test_presets_listed():
    assert preset_names() == ("tiny", "small", "paper")


def test_paper_preset_sizes():
    config = get_config("paper")
    assert (config.nx, config.ny) == (64, 64)
    assert config.n == 12160
    assert config.window_steps * config.dt == 2 * 86400


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(ValueError, match="unknown preset 'huge'.*tiny, small, paper"):
        get_config("huge")


def test_time_step_beyond_limit_rejected():
    limit = get_config("paper").stable_dt()
    with pytest.raises(ValueError, match=r"dt = 9000 s exceeds .* use dt <= 4652 s"):
        get_config("paper", dt=9000.0)
    assert 3600.0 < limit < 9000.0


def test_viscous_limit_rejected():
    with pytest.raises(ValueError, match="stability limit"):
        get_config("tiny", nu=5.0e6)


@pytest.mark.parametrize(
    "field, value",
    [("nx", 2), ("ny", 4.5), ("H", 0.0), ("g_prime", -1.0), ("nu", -1.0),
     ("window_steps", 0), ("dt", float("nan")), ("tau0", float("inf"))],
)
def test_invalid_field_named(field, value):
    with pytest.raises(ValueError, match=field):
        get_config("tiny", **{field: value})


def test_config_round_trip():
    config = get_config("small")
    assert type(config).from_dict(config.to_dict()) == config


def test_config_rejects_unknown_field():
    with pytest.raises(ValueError, match="unknown ModelConfig fields"):
        type(get_config("tiny")).from_dict({**get_config("tiny").to_dict(), "gamma": 1.0})


def test_model_layout_sizes():
    model = ShallowWaterModel(get_config("tiny"))
    assert model.n == 10 * 10 + 9 * 10 + 10 * 9
    assert model.grid_shape == (10, 10)
    assert [s.stop - s.start for s in model.variable_slices.values()] == [100, 90, 90]
    assert sorted(model.natural_indices()) == list(range(model.n))


def test_natural_round_trip(rng):
    model = ShallowWaterModel(dataclasses.replace(get_config("tiny"), nx=6, ny=4))
    state = rng.standard_normal(model.n)
    np.testing.assert_array_equal(model.to_natural(model.from_natural(state)), state)


def test_natural_wrong_size_rejected():
    model = ShallowWaterModel(get_config("tiny"))
    with pytest.raises(ValueError, match=r"expected \(280,\)"):
        model.from_natural(np.zeros(279))


def test_forward_rejects_nan_naming_variable():
    model = ShallowWaterModel(get_config("tiny"))
    state = np.zeros(model.n)
    state[model.variable_slices["u"].start + 3] = np.nan
    x = model.from_natural(state)
    with pytest.raises(ValueError, match=r"NaN or Inf in u \(1 values\)"):
        model.forward(x)
    with pytest.raises(ValueError, match="NaN or Inf in u"):
        model.linearize(x)


def test_advance_rejects_negative_steps():
    model = ShallowWaterModel(get_config("tiny"))
    with pytest.raises(ValueError, match="steps = -1"):
        model.advance(model.create_state(), -1)
