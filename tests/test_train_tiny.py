"""Generation and training on the tiny shallow-water preset, through the commands too."""

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from petsc_nnpc.utils import init_petsc

PETSc = init_petsc([])

from petsc_nnpc.dataset import GenerationConfig, initial_state  # noqa: E402
from petsc_nnpc.network import load_checkpoint  # noqa: E402
from petsc_nnpc.train import TrainConfig, train_online  # noqa: E402

torch.set_num_threads(1)


def nnpc(*args, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    completed = subprocess.run(
        [sys.executable, "-m", "petsc_nnpc.cli", *map(str, args)],
        capture_output=True, text=True, timeout=timeout, env=env, check=False,
    )
    return completed


def nnpc_in_process(*args):
    """Run ``nnpc`` in this process; return the ``SystemExit`` message or exit code."""
    from petsc_nnpc import cli

    try:
        return cli.main([str(arg) for arg in args])
    except SystemExit as stop:
        return stop.code


def _rows(path):
    with open(path) as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-data")
    completed = nnpc("generate", "--preset", "tiny", "--out", folder, "--states", 24, "--k", 32,
                     "--no-progress")
    assert completed.returncode == 0, completed.stderr
    return folder


def test_generate_command_writes_set(tiny_data):
    record = json.loads((tiny_data / "dataset.json").read_text())
    assert record["preset"] == "tiny"
    assert record["k"] == 32
    assert record["generation"]["states"] == 24
    assert len([name for name in os.listdir(tiny_data) if name.endswith(".npz")]) == 3


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-train")
    completed = nnpc("train", "--preset", "tiny", "--data", tiny_data, "--out", out,
                     "--epochs", 15, "--lr", 5e-3, "--no-progress")
    assert completed.returncode == 0, completed.stderr
    return out


def test_train_command_lowers_validation_loss(trained):
    state = json.loads((trained / "state" / "state.json").read_text())
    rows = _rows(trained / "metrics.csv")
    assert len(rows) == 15
    assert float(rows[-1]["val_loss"]) < 0.7 * state["initial_val"]
    predictor = load_checkpoint(trained / "model", n=280, grid_shape=(10, 10), rank=64, form="paper")
    assert predictor.metadata["preset"] == "tiny"


def test_inspect_command_reports_parameters(tiny_data, trained, capsys):
    assert nnpc_in_process("inspect", trained / "model") == 0
    text = capsys.readouterr().out
    assert "parameters" in text
    assert "r = 64" in text
    assert nnpc_in_process("inspect", "--json", tiny_data) == 0
    assert json.loads(capsys.readouterr().out)["samples_written"] == 24


def test_train_command_rejects_other_preset(tiny_data, tmp_path):
    message = nnpc_in_process("train", "--preset", "small", "--data", tiny_data, "--out", tmp_path)
    assert "generated for preset 'tiny' but preset 'small' was requested" in message
    assert not (tmp_path / "model").exists()


def test_train_command_without_data_rejected(tmp_path):
    message = nnpc_in_process("train", "--preset", "tiny", "--out", tmp_path)
    assert "--data DIR is missing" in message


def _online(out, epochs=3):
    generation = GenerationConfig(preset="tiny", k=8, shard_size=4, lead_min=2, lead_max=6, seed=5)
    config = TrainConfig(epochs=epochs, batch_size=2, seed=5)
    return train_online(out, "tiny", config, generation, initial_state("tiny"), rank=16,
                        states_per_epoch=3, capacity=5, validation_states=2, progress=False)


def test_online_training_writes_checkpoint(tmp_path):
    summary = _online(tmp_path)
    assert summary["epochs"] == 3
    assert len(_rows(tmp_path / "metrics.csv")) == 3
    assert load_checkpoint(tmp_path / "model").metadata["data"] == "online"


@pytest.mark.mpi
def test_online_two_ranks_resume_matches_one_rank(tmp_path):
    from conftest import run_mpi

    straight = _online(tmp_path / "one")
    script = os.path.join(os.path.dirname(__file__), "mpi", "dataset_online.py")
    completed = run_mpi(script, 2, tmp_path / "two", timeout=240)
    line = [text for text in completed.stdout.splitlines() if text.startswith("killed")][0]
    _, killed, _, epochs, _, best = line.split()
    assert killed == "2"  # both ranks stopped after epoch 2
    assert epochs == "3"
    # Samples agree to round-off across rank counts, so the training does too.
    assert float(best) == pytest.approx(straight["best_val_loss"], rel=1e-4)


def test_train_command_unavailable_device(tiny_data, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    message = nnpc_in_process("train", "--preset", "tiny", "--data", tiny_data, "--out", tmp_path,
                              "--device", "cuda")
    assert "CUDA is not available on this machine; use --device cpu" in message


def test_inspect_command_reads_state_file(capsys):
    from shallow_water.state import data_path

    assert nnpc_in_process("inspect", "--json", data_path("tiny", "spunup")) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["kind"] == "state file"
    assert record["n"] == 280
    assert record["eta"]["std"] > 0


def test_inspect_command_unknown_path(tmp_path):
    message = nnpc_in_process("inspect", tmp_path / "missing")
    assert "missing not found" in message


def test_inspect_command_reads_eigenpair_and_other_archives(tmp_path, capsys):
    import numpy as np

    from petsc_nnpc.pc.static import save_eigenpairs
    from petsc_nnpc.utils import atomic_save_npz
    from shallow_water.state import load_background_state

    rng = np.random.default_rng(11)
    U, _ = np.linalg.qr(rng.standard_normal((280, 5)))
    save_eigenpairs(tmp_path / "static.npz", U, np.array([50.0, 40.0, 30.0, 20.0, 10.0]),
                    lam_next=5.0, form="paper")
    assert nnpc_in_process("inspect", "--json", tmp_path / "static.npz") == 0
    record = json.loads(capsys.readouterr().out)
    assert record["kind"] == "eigenpair file"
    assert (record["n"], record["rank"], record["preset"]) == (280, 5, "tiny")
    assert (record["lam_max"], record["lam_min"], record["lam_next"]) == (50.0, 10.0, 5.0)
    assert record["form"] == "paper"

    background = load_background_state("tiny")
    atomic_save_npz(tmp_path / "states.npz", background=background, steps=np.arange(3))
    assert nnpc_in_process("inspect", "--json", tmp_path / "states.npz") == 0
    record = json.loads(capsys.readouterr().out)
    assert record["kind"] == "npz archive"
    assert record["background"]["preset"] == "tiny"
    assert record["background"]["eta"]["max"] == pytest.approx(float(background[:100].max()))
    assert record["steps"] == {"shape": [3], "dtype": "int64"}


def test_inspect_command_unreadable_archives(tmp_path):
    import numpy as np

    from shallow_water.state import data_path

    whole = open(data_path("tiny", "spunup"), "rb").read()
    cases = {
        "text.npz": b"not a zip file",
        "empty.npz": b"",
        "truncated.npz": whole[: len(whole) // 2],
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        message = nnpc_in_process("inspect", tmp_path / name)
        assert f"{name} is not a readable .npz archive" in message, message
        assert "write it again" in message

    np.savez(tmp_path / "objects.npz", ragged=np.array([[1], [1, 2]], dtype=object))
    message = nnpc_in_process("inspect", tmp_path / "objects.npz")
    assert "objects.npz contains object arrays" in message


def test_check_model_truncated_state_is_one_line(tmp_path):
    from shallow_water.state import data_path

    whole = open(data_path("tiny", "spunup"), "rb").read()
    (tmp_path / "cut.npz").write_bytes(whole[:1000])
    message = nnpc_in_process("check-model", "--preset", "tiny", "--state", tmp_path / "cut.npz")
    assert message.startswith("nnpc check-model: error: ")
    assert "cut.npz is not a readable .npz archive" in message
