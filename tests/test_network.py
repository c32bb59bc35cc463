"""Eigenpair network: shapes, post-processing, size, checkpoints."""

import json
import os

import numpy as np
import pytest
import torch

from petsc_nnpc.network import (
    CheckpointError,
    EigenpairNetwork,
    NetworkConfig,
    StateImage,
    load_checkpoint,
    read_checkpoint_metadata,
    save_checkpoint,
    state_size,
)

torch.set_num_threads(1)


def _network(grid_shape=(5, 7), rank=4, M=50.0, seed=0, **overrides):
    torch.manual_seed(seed)
    config = NetworkConfig.for_preset("tiny", grid_shape, rank, M, **overrides)
    return EigenpairNetwork(config)


def test_state_size_of_paper_grid():
    assert state_size((64, 64)) == 12160


def test_state_image_places_every_entry_once():
    image = StateImage((5, 7))
    pixels = image.pixel_of_natural
    assert pixels.size == state_size((5, 7))
    assert np.unique(pixels).size == pixels.size
    x = torch.arange(1, pixels.size + 1, dtype=torch.float64).unsqueeze(0)
    img = image.to_image(x)[0]  # (3, 5, 7)
    assert torch.all(img[1, :, 6] == 0)  # east wall of u
    assert torch.all(img[2, 4, :] == 0)  # north wall of v
    assert img[0, 0, 0] == 1  # η row-major, y slow
    assert img[0, 4, 6] == 35
    assert img[1, 0, 0] == 36  # u: 6 faces per row
    assert img[1, 0, 5] == 41
    assert img[2, 0, 0] == 36 + 30  # v after u's 5·6 entries


@pytest.mark.parametrize("grid_shape", [(5, 7), (8, 8), (6, 11)])
def test_output_orthonormal_and_sorted(grid_shape):
    net = _network(grid_shape, rank=4, M=50.0)
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((2, state_size(grid_shape))))
    U, lam = net(x, qr_dtype=torch.float64)
    assert U.shape == (2, state_size(grid_shape), 4)
    assert lam.shape == (2, 4)
    gram = U.transpose(1, 2) @ U
    assert torch.allclose(gram, torch.eye(4, dtype=torch.float64).expand(2, 4, 4), atol=1e-12)
    assert torch.all(lam[:, :-1] >= lam[:, 1:])
    assert torch.all((lam > 0) & (lam < 50.0))


def test_parameters_independent_of_grid_size():
    # Without the base vectors no layer is tied to n: a 16× larger grid
    # has exactly as many weights.
    small = _network((8, 8), rank=6, base_vectors=False).parameter_count()
    large = _network((32, 32), rank=6, base_vectors=False).parameter_count()
    assert small == large


def test_base_vectors_one_weight_per_output():
    # The state-independent Ũ₀ has one weight per pixel of each output
    # channel: 3 r ny nx, about n r, and nothing of order n r times more.
    with_base = _network((8, 8), rank=6).parameter_count()
    without = _network((8, 8), rank=6, base_vectors=False).parameter_count()
    assert with_base - without == 3 * 6 * 8 * 8


def test_parameters_grow_linearly_with_rank():
    # Per eigenpair: 3 output channels of the vector head (head_channels + 1
    # weights each) and one output of the eigenvalue head (eigen_hidden + 1).
    config = NetworkConfig.for_preset("tiny", (8, 8), 2, 1.0, head_channels=16)
    one = _network((8, 8), rank=2, head_channels=16, base_vectors=False).parameter_count()
    two = _network((8, 8), rank=3, head_channels=16, base_vectors=False).parameter_count()
    assert two - one == 3 * (config.head_channels + 1) + config.eigen_hidden + 1


def test_paper_network_size_below_dense_layer():
    config = NetworkConfig.for_preset("paper", (64, 64), 2000, 2e4, base_vectors=False)
    params = EigenpairNetwork(config).parameter_count()
    # One dense layer from any feature vector to U would alone hold n·r
    # weights times that vector's length.
    assert params < config.n * config.rank


def test_config_rejects_invalid_values():
    with pytest.raises(ValueError, match="rank = 500 is invalid"):
        NetworkConfig((5, 5), 500, 1.0)
    with pytest.raises(ValueError, match="heads = 3 does not divide width = 8"):
        NetworkConfig((5, 5), 2, 1.0, width=8, heads=3)
    with pytest.raises(ValueError, match="sigmoid_scale M = -1"):
        NetworkConfig((5, 5), 2, -1.0)
    with pytest.raises(ValueError, match="limits the vectors to rank 6 < r = 20"):
        NetworkConfig((8, 8), 20, 1.0, head_channels=2)
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        NetworkConfig.for_preset("huge", (5, 5), 2, 1.0)


def _saved(tmp_path, grid_shape=(5, 7), rank=4):
    net = _network(grid_shape, rank=rank)
    net.set_normalisation([0.5, -0.1, 0.2], [2.0, 0.3, 0.4])
    save_checkpoint(tmp_path / "model", net, {"preset": "tiny", "form": "paper"})
    return net, tmp_path / "model"


def test_checkpoint_round_trip_identical_outputs(tmp_path):
    net, path = _saved(tmp_path)
    x = np.random.default_rng(1).standard_normal(state_size((5, 7)))
    predictor = load_checkpoint(path)
    U, lam = predictor.predict(x)
    with torch.no_grad():
        U_ref, lam_ref = net.eval()(torch.from_numpy(x).unsqueeze(0), qr_dtype=torch.float64)
    assert U.dtype == np.float64
    assert U.shape == (state_size((5, 7)), 4)
    assert np.array_equal(U, U_ref[0].numpy())
    assert np.array_equal(lam, lam_ref[0].numpy())
    assert np.allclose(U.T @ U, np.eye(4), atol=1e-13)
    assert predictor.metadata["preset"] == "tiny"
    assert predictor.metadata["normalisation"]["std"] == [2.0, 0.3, 0.4]


def test_predict_leading_pairs_of_smaller_rank(tmp_path):
    _, path = _saved(tmp_path)
    x = np.random.default_rng(2).standard_normal(state_size((5, 7)))
    predictor = load_checkpoint(path)
    U, lam = predictor.predict(x)
    U2, lam2 = predictor.predict(x, rank=2)
    assert np.array_equal(U2, U[:, :2])
    assert np.array_equal(lam2, lam[:2])


def test_checkpoint_for_other_grid_rejected(tmp_path):
    _, path = _saved(tmp_path)
    with pytest.raises(CheckpointError, match="trained on a 5x7 grid but the problem has a 10x10 grid"):
        load_checkpoint(path, grid_shape=(10, 10))
    with pytest.raises(CheckpointError, match="n = 93 but the problem has n = 280"):
        load_checkpoint(path, n=280)


def test_checkpoint_for_smaller_rank_rejected(tmp_path):
    _, path = _saved(tmp_path)
    with pytest.raises(CheckpointError, match="predicts r = 4 eigenpairs but rank 10 was requested"):
        load_checkpoint(path, rank=10)
    with pytest.raises(CheckpointError, match="'bhalf' form"):
        load_checkpoint(path, form="bhalf")


def test_checkpoint_with_changed_weights_rejected(tmp_path):
    _, path = _saved(tmp_path)
    weights = path / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256 differs"):
        load_checkpoint(path)


def test_missing_checkpoint_reported(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nowhere")


def test_checkpoint_metadata_is_plain_json(tmp_path):
    _, path = _saved(tmp_path)
    record = read_checkpoint_metadata(path / "checkpoint.json")
    for key in ("grid_shape", "n", "rank", "sigmoid_scale", "normalisation", "network", "versions"):
        assert key in record
    with open(os.path.join(path, "checkpoint.json")) as handle:
        assert json.load(handle)["rank"] == 4


def test_predict_rejects_bad_state(tmp_path):
    _, path = _saved(tmp_path)
    predictor = load_checkpoint(path)
    with pytest.raises(ValueError, match=r"expected \(93,\)"):
        predictor.predict(np.zeros(92))
    bad = np.zeros(93)
    bad[3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        predictor.predict(bad)


def test_cuda_device_unavailable_reported(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    _, path = _saved(tmp_path)
    with pytest.raises(RuntimeError, match="use --device cpu"):
        load_checkpoint(path, device="cuda")
