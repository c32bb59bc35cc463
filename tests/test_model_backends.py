"""The compiled (Numba) and the NumPy kernels compute the same discrete model."""

import dataclasses

import numpy as np
import pytest
from petsc4py import PETSc

from shallow_water import ShallowWaterModel, checks, get_config, load_spunup_state
from shallow_water import model as sw_model


def _models(config):
    return {backend: ShallowWaterModel(config, backend=backend) for backend in sw_model.BACKENDS}


def _relative(a, b):
    return np.max(np.abs(a - b)) / np.max(np.abs(b))


@pytest.mark.parametrize("grid", ["tiny", "odd"])
def test_backends_agree(grid):
    config = get_config("tiny")
    if grid == "odd":
        config = dataclasses.replace(config, nx=7, ny=5, window_steps=3)
        state = np.random.default_rng(3).standard_normal(config.n) * 0.5
    else:
        state = load_spunup_state("tiny")
    results = {}
    for backend, model in _models(config).items():
        x = model.from_natural(state)
        traj = model.linearize(x)
        directions = checks.random_directions(model, seed=5, k=3)
        results[backend] = {
            "forward": model.forward(x).getArray().copy(),
            "final": traj.final.getArray().copy(),
            "tl": model.tl(traj, directions),
            "adjoint": model.adjoint(traj, directions),
        }
    for run in ("forward", "final", "tl", "adjoint"):
        assert _relative(results["numba"][run], results["numpy"][run]) <= 1e-12, run


@pytest.mark.parametrize("backend", sw_model.BACKENDS)
def test_adjoint_and_taylor_for_each_backend(backend):
    config = get_config("tiny")
    model = ShallowWaterModel(config, backend=backend)
    x = model.from_natural(load_spunup_state("tiny"))
    traj = model.linearize(x)
    assert checks.adjoint_test(model, traj, seed=2, k=4) <= 1e-12
    _, _, rate = checks.taylor_test(model, x, traj=traj, seed=3)
    assert rate >= 1.9


def test_unknown_backend_names_the_choices():
    with pytest.raises(ValueError, match=r"'fortran'.*numba, numpy.*-sw_backend"):
        ShallowWaterModel(get_config("tiny"), backend="fortran")


def test_backend_option():
    options = PETSc.Options()
    options["sw_backend"] = "numpy"
    try:
        assert ShallowWaterModel(get_config("tiny")).backend == "numpy"
    finally:
        options.delValue("sw_backend")
    assert ShallowWaterModel(get_config("tiny")).backend == sw_model.default_backend()


def test_default_backend_is_compiled():
    # Numba is a dependency of the project, so the compiled kernels are the default.
    assert sw_model.default_backend() == "numba"


def test_missing_numba_falls_back_with_warning(monkeypatch, caplog):
    monkeypatch.setattr(sw_model, "fused", None)
    monkeypatch.setattr(sw_model, "_FUSED_ERROR", ImportError("No module named 'numba'"), raising=False)
    monkeypatch.setattr(sw_model, "_FALLBACK_WARNED", [])
    with caplog.at_level("WARNING", logger="shallow_water.model"):
        model = ShallowWaterModel(get_config("tiny"))
        ShallowWaterModel(get_config("tiny"))
    assert model.backend == "numpy"
    warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert len(warnings) == 1
    assert "NumPy kernels" in warnings[0]
    assert "pip install numba" in warnings[0]
    with pytest.raises(ImportError, match="numba backend needs Numba.*-sw_backend numpy"):
        ShallowWaterModel(get_config("tiny"), backend="numba")
