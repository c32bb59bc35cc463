"""The ``nnpc spinup`` and ``nnpc check-model`` commands on the tiny preset."""

import json
import subprocess
import sys

import numpy as np
import pytest

from petsc_nnpc.cli import main
from shallow_water import get_config
from shallow_water.spinup import gyre_diagnostics
from shallow_water.state import load_state


def test_check_model_json(capsys):
    assert main(["check-model", "--preset", "tiny", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["adjoint_relative_error"] <= 1e-12
    assert result["taylor_rate"] >= 1.9
    assert result["passed"] is True
    assert result["n"] == get_config("tiny").n
    assert result["backend"] == "numba"


def test_check_model_numpy_backend():
    # A subprocess, because PETSc reads command-line options once per process.
    completed = subprocess.run(
        [sys.executable, "-m", "petsc_nnpc.cli", "check-model", "--preset", "tiny", "--json",
         "-sw_backend", "numpy"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert completed.returncode == 0, completed.stderr
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert result["backend"] == "numpy"
    assert result["adjoint_relative_error"] <= 1e-12
    assert result["taylor_rate"] >= 1.9


def test_check_model_table(capsys):
    assert main(["check-model", "--preset", "tiny", "--directions", "2"]) == 0
    output = capsys.readouterr().out
    assert "Taylor rate" in output
    assert "PASSED" in output


def test_check_model_rejects_other_grid(tmp_path):
    state = tmp_path / "small.npz"
    from shallow_water.state import save_state

    save_state(state, get_config("small"), np.zeros(get_config("small").n))
    with pytest.raises(SystemExit, match="nnpc check-model: error: .*nx=32, ny=32.*nx=10, ny=10"):
        main(["check-model", "--preset", "tiny", "--state", str(state)])


def test_spinup_writes_state_figure_and_background(tmp_path):
    out = tmp_path / "tiny.npz"
    background = tmp_path / "tiny_background.npz"
    code = main([
        "spinup", "--preset", "tiny", "--days", "60", "--out", str(out),
        "--background", str(background), "--background-days", "10", "--no-progress",
    ])
    assert code == 0
    config = get_config("tiny")
    state = load_state(out, config)
    assert gyre_diagnostics(config, state)["jet_u"] > 0.0
    assert (tmp_path / "tiny.png").stat().st_size > 1000
    assert load_state(background, config).shape == (config.n,)
    assert not (tmp_path / "tiny.partial.npz").exists()


@pytest.mark.parametrize("command", [["spinup", "--out", "x.npz"], ["check-model"]])
def test_unknown_preset_lists_valid(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(command + ["--preset", "medium"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "invalid choice: 'medium'" in error
    assert "'tiny', 'small', 'paper'" in error
