"""The main job ``nnpc experiment`` and its stage runner."""

import json
import os
import subprocess
import sys

import pytest

from petsc_nnpc.experiment import (
    ExperimentConfig,
    ExperimentError,
    StageRunner,
    experiment_config,
    preconditioner_specs,
)

NNPC = [sys.executable, "-m", "petsc_nnpc.cli"]
REQUIRED_KEYS = {
    "preconditioner", "form", "cycle", "iterations", "products", "wall_time",
    "converged_reason", "residual_norms",
}


def run_nnpc(*args, timeout=900):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(NNPC + [str(a) for a in args], capture_output=True, text=True,
                          timeout=timeout, env=env, check=False)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("experiment") / "tiny"
    completed = run_nnpc("experiment", "--preset", "tiny", "--out", out, "--no-progress")
    assert completed.returncode == 0, completed.stderr[-4000:]
    return out, completed


def test_experiment_tiny_results(tiny_run):
    out, _ = tiny_run
    records = json.loads((out / "results.json").read_text())
    assert records, "results.json is empty"
    for record in records:
        assert REQUIRED_KEYS <= set(record), sorted(REQUIRED_KEYS - set(record))
        assert isinstance(record["iterations"], int)
        assert record["products"] >= record["iterations"]
        assert len(record["residual_norms"]) == record["iterations"] + 1
    config = experiment_config("tiny")
    labels = {(r["form"], r["preconditioner"]) for r in records}
    expected = {("paper", label) for label, _ in preconditioner_specs(config, "paper", "m", "s")}
    assert expected <= labels
    assert ("bhalf", "none") in labels
    cycles = {r["cycle"] for r in records}
    assert cycles == set(range(config.cycles))


def test_experiment_tiny_baseline_converges(tiny_run):
    out, _ = tiny_run
    records = json.loads((out / "results.json").read_text())
    for record in records:
        if record["preconditioner"] == "none":
            assert record["converged_reason"] == "CONVERGED_RTOL"
            assert record["true_relative_residual"] <= 1.01e-7


def test_experiment_tiny_report_and_figures(tiny_run):
    out, _ = tiny_run
    report = (out / "report.md").read_text()
    assert "| paper | none |" in report
    assert "| bhalf | none |" in report
    for name in ("iterations.png", "residuals.png", "eigenvectors.png", "eigenvalues.png",
                 "limit.png"):
        assert (out / name).stat().st_size > 1000, name
    analysis = json.loads((out / "analysis.json").read_text())
    assert set(analysis["limit"]) == {"paper", "bhalf"}
    assert analysis["limit"]["paper"]["rank"] == list(experiment_config("tiny").limit_ranks)


def test_experiment_rerun_skips_finished_stages(tiny_run):
    out, _ = tiny_run
    before = (out / "results.json").read_bytes()
    completed = run_nnpc("experiment", "--preset", "tiny", "--out", out, "--no-progress",
                         timeout=300)
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert completed.stderr.count("already done, skipped") == 7
    assert (out / "results.json").read_bytes() == before


def test_experiment_rejects_other_preset_folder(tiny_run):
    out, _ = tiny_run
    completed = run_nnpc("experiment", "--preset", "small", "--out", out, "--no-progress",
                         timeout=300)
    assert completed.returncode == 1
    assert "contains a run of preset 'tiny', not 'small'" in completed.stderr


def test_experiment_unknown_preset(tmp_path):
    completed = run_nnpc("experiment", "--preset", "huge", "--out", tmp_path / "x", timeout=120)
    assert completed.returncode != 0
    assert "unknown preset 'huge'" in completed.stderr
    assert "tiny, small, paper" in completed.stderr


def test_experiment_cuda_without_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    completed = run_nnpc("experiment", "--preset", "tiny", "--out", tmp_path / "x",
                         "--device", "cuda", timeout=120)
    assert completed.returncode != 0
    assert "--device cuda requested but torch sees no CUDA device" in completed.stderr
    assert not (tmp_path / "x").exists()


def test_stage_failure_names_stage_and_keeps_finished(tmp_path):
    config = experiment_config("tiny")
    runner = StageRunner(str(tmp_path), config)
    runner.run("first", lambda: None)

    def fail():
        raise OSError("disk full")

    with pytest.raises(ExperimentError, match="stage 'second' failed: OSError: disk full"):
        runner.run("second", fail)
    saved = json.loads((tmp_path / "experiment.json").read_text())
    assert list(saved["stages"]) == ["first"]
    again = StageRunner(str(tmp_path), config)
    assert again.done("first")
    assert not again.done("second")


def test_changed_configuration_needs_force(tmp_path):
    StageRunner(str(tmp_path), experiment_config("tiny")).run("first", lambda: None)
    changed = experiment_config("tiny", cycles=5)
    with pytest.raises(ExperimentError, match="--force"):
        StageRunner(str(tmp_path), changed)
    forced = StageRunner(str(tmp_path), changed, force=True)
    assert not forced.done("first")


@pytest.mark.parametrize("overrides, message", [
    ({"ranks": (64,)}, "above train_rank"),
    ({"mus": ("-1",)}, "mu = '-1' is invalid"),
    ({"forms": ("dual",)}, "forms"),
    ({"cycles": 0}, "cycles = 0 is invalid"),
])
def test_config_rejects_bad_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        experiment_config("tiny", **overrides)


def test_config_round_trip():
    config = experiment_config("small")
    assert ExperimentConfig.from_dict(config.to_dict()) == config


def test_evaluate_with_trained_network(tiny_run, tmp_path):
    out, _ = tiny_run
    completed = run_nnpc("evaluate", "--preset", "tiny", "--model", out / "model-paper" / "model",
                         "--out", tmp_path / "eval", "--cycles", "1", "--no-progress")
    assert completed.returncode == 0, completed.stderr[-4000:]
    records = json.loads((tmp_path / "eval" / "results.json").read_text())
    labels = {r["preconditioner"] for r in records}
    assert "nnpc r=8 mu=min" in labels
    assert "none" in labels
    assert {r["cycle"] for r in records} == {0}
    assert not (tmp_path / "eval" / "data-paper").exists()


def test_evaluate_missing_network(tmp_path):
    completed = run_nnpc("evaluate", "--preset", "tiny", "--model", tmp_path / "nowhere",
                         "--out", tmp_path / "eval", "--no-progress", timeout=120)
    assert completed.returncode != 0
    assert "checkpoint not found" in completed.stderr
    assert "the 'model' subfolder" in completed.stderr


@pytest.mark.mpi
def test_experiment_tiny_two_ranks(tiny_run, tmp_path):
    from conftest import run_mpi

    out, _ = tiny_run
    run_mpi("-m", 2, "petsc_nnpc.cli", "experiment", "--preset", "tiny", "--out",
            tmp_path / "mpi", "--no-progress", timeout=900)
    serial = json.loads((out / "results.json").read_text())
    parallel = json.loads((tmp_path / "mpi" / "results.json").read_text())
    keys = [(r["form"], r["preconditioner"], r["cycle"]) for r in serial]
    assert keys == [(r["form"], r["preconditioner"], r["cycle"]) for r in parallel]
    for one, two in zip(serial, parallel):
        if one["form"] == "bhalf":
            # A well-conditioned operator: round-off does not change the count.
            assert one["iterations"] == two["iterations"]
        assert two["converged_reason"] == "CONVERGED_RTOL"


def test_evaluate_rejects_network_of_other_preset(tiny_run, tmp_path):
    out, _ = tiny_run
    completed = run_nnpc("evaluate", "--preset", "small", "--model", out / "model-paper" / "model",
                         "--out", tmp_path / "eval", "--ranks", "8", "--no-progress", timeout=120)
    assert completed.returncode == 1
    assert "trained for n = 280 (preset 'tiny'), but preset 'small' has n = 3008" in completed.stderr
    assert not (tmp_path / "eval").exists()
