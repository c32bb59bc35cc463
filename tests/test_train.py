"""Trainer on a synthetic family of matrices whose eigenvectors follow the state."""

import csv
import json

import numpy as np
import pytest
import torch

from petsc_nnpc.dataset import SampleSet, probe_vectors
from petsc_nnpc.network import load_checkpoint, state_size
from petsc_nnpc.train import (
    METRIC_COLUMNS,
    TrainConfig,
    Trainer,
    check_batch_memory,
    estimate_sigmoid_scale,
    learning_rate,
    prepare_network_config,
)

torch.set_num_threads(1)

GRID = (6, 7)
RANK = 3


def synthetic_samples(m=40, k=8, seed=0):
    """Return samples of ``A(x) = U(x) diag(100, 50, 25) U(x)ᵀ + 0.1 I``.

    The state contains three phase angles θ; the leading eigenvectors are
    Fourier modes shifted by θ, so they move smoothly with the state.
    """
    ny, nx = GRID
    n = state_size(GRID)
    rng = np.random.default_rng(seed)
    Y, X = np.meshgrid(np.linspace(0, 1, ny), np.linspace(0, 1, nx), indexing="ij")
    lam = 100.0 * 0.5 ** np.arange(RANK)
    xs, seeds, AZs = [], [], []
    for _ in range(m):
        theta = rng.uniform(0, 2 * np.pi, size=RANK)
        modes = [np.cos(2 * np.pi * (j + 1) * X + theta[j]) * np.cos(np.pi * (j + 1) * Y)
                 for j in range(RANK)]
        x = np.concatenate([sum(modes).ravel(), np.sin(theta[0]) * X[:, :-1].ravel(),
                            np.cos(theta[1]) * Y[:-1, :].ravel()])
        V = np.stack([np.concatenate([f.ravel(), np.zeros(n - ny * nx)]) for f in modes], axis=1)
        U, _ = np.linalg.qr(V)  # (n, r)
        seed_i = int(rng.integers(0, 2**62))
        Z = probe_vectors(seed_i, n, k)  # (n, k)
        AZ = U @ (lam[:, None] * (U.T @ Z)) + 0.1 * Z
        xs.append(x)
        seeds.append(seed_i)
        AZs.append(AZ.astype(np.float32))
    metadata = {"n": n, "k": k, "grid_shape": list(GRID), "preset": "tiny", "form": "paper"}
    return SampleSet(np.stack(xs), np.array(seeds), np.stack(AZs), metadata)


class Killed(Exception):
    pass


def _train(out, samples, epochs, seed=1, kill_after=None):
    config = TrainConfig(epochs=epochs, batch_size=4, lr=3e-3, seed=seed)
    network_config = prepare_network_config("tiny", GRID, RANK, samples, config)

    def on_epoch_end(epoch, row):
        if epoch == kill_after:
            raise Killed(epoch)

    trainer = Trainer(out, config, network_config, {"preset": "tiny", "form": "paper"},
                      progress=False, on_epoch_end=on_epoch_end)
    return trainer.fit(samples)


def _metrics(path):
    with open(path) as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def samples():
    return synthetic_samples()


def test_validation_loss_falls(tmp_path, samples):
    summary = _train(tmp_path, samples, epochs=8)
    assert summary["final_val_loss"] < 0.7 * summary["initial_val_loss"]
    rows = _metrics(tmp_path / "metrics.csv")
    assert tuple(rows[0]) == METRIC_COLUMNS
    assert [int(row["epoch"]) for row in rows] == list(range(1, 9))
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])


def test_best_checkpoint_predicts(tmp_path, samples):
    summary = _train(tmp_path, samples, epochs=3)
    predictor = load_checkpoint(tmp_path / "model", n=samples.n, grid_shape=GRID, rank=RANK)
    U, lam = predictor.predict(samples.x[0])
    assert U.shape == (samples.n, RANK)
    assert np.allclose(U.T @ U, np.eye(RANK), atol=1e-12)
    assert predictor.metadata["val_loss"] == pytest.approx(summary["best_val_loss"])
    assert predictor.metadata["train"]["seed"] == 1


def test_training_is_deterministic(tmp_path, samples):
    _train(tmp_path / "a", samples, epochs=2)
    _train(tmp_path / "b", samples, epochs=2)
    a = _metrics(tmp_path / "a" / "metrics.csv")
    b = _metrics(tmp_path / "b" / "metrics.csv")
    assert [r["val_loss"] for r in a] == [r["val_loss"] for r in b]
    assert [r["train_loss"] for r in a] == [r["train_loss"] for r in b]


def test_resume_continues_as_one_run(tmp_path, samples):
    _train(tmp_path / "straight", samples, epochs=4)
    with pytest.raises(Killed):
        _train(tmp_path / "resumed", samples, epochs=4, kill_after=2)
    assert len(_metrics(tmp_path / "resumed" / "metrics.csv")) == 2
    _train(tmp_path / "resumed", samples, epochs=4)
    straight = _metrics(tmp_path / "straight" / "metrics.csv")
    resumed = _metrics(tmp_path / "resumed" / "metrics.csv")
    assert len(resumed) == 4
    assert [r["val_loss"] for r in resumed] == [r["val_loss"] for r in straight]
    state = json.loads((tmp_path / "resumed" / "state" / "state.json").read_text())
    assert state["epoch"] == 4
    assert sorted(p.name for p in (tmp_path / "resumed" / "state").iterdir()) == [
        "epoch-00004.safetensors", "state.json"]


def test_resume_with_other_options_rejected(tmp_path, samples):
    _train(tmp_path, samples, epochs=1, seed=1)
    with pytest.raises(ValueError, match="seed = 1 but this run has 2"):
        _train(tmp_path, samples, epochs=2, seed=2)


def test_sigmoid_scale_bounds_largest_eigenvalue(samples):
    # The Nyström eigenvalues never exceed λ_max = 100.1, so M / 2 does not
    # either, and with k = 8 probes of a rank-3 head it comes within 5%.
    M = estimate_sigmoid_scale(samples)
    assert 0.95 * 100.1 < M / 2 <= 100.1 + 1e-9


def test_learning_rate_schedule():
    config = TrainConfig(lr=1.0, warmup_fraction=0.1, min_lr_ratio=0.1)
    rates = [learning_rate(config, step, 100) for step in range(100)]
    assert rates[0] == pytest.approx(0.1)
    assert max(rates) == pytest.approx(1.0)
    assert rates[-1] == pytest.approx(0.1, abs=0.01)
    assert all(a >= b for a, b in zip(rates[10:], rates[11:]))


def test_oversized_batch_reported(samples):
    config = TrainConfig()
    network_config = prepare_network_config("tiny", GRID, RANK, samples, config)
    from petsc_nnpc.network import EigenpairNetwork

    network = EigenpairNetwork(network_config)
    with pytest.raises(MemoryError, match="batch size 100000000 needs about .* use --batch-size"):
        check_batch_memory(network, 10**8, samples.k, torch.device("cpu"))


@pytest.mark.parametrize("field, value, message", [
    ("epochs", 0, "epochs = 0 is invalid"),
    ("val_fraction", 1.0, "val_fraction = 1.0 is invalid"),
    ("loss", "l2", "loss = 'l2' is invalid"),
    ("lr", -1.0, "lr = -1.0 is invalid"),
])
def test_config_rejects_invalid_values(field, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{field: value})
