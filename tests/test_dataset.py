"""Training-set generation on the tiny shallow-water preset, shards and their checks."""

import json
import os
import shutil

import numpy as np
import pytest
import torch

from petsc_nnpc.utils import atomic_save_npz, init_petsc

PETSc = init_petsc([])

from petsc_nnpc.dataset import (  # noqa: E402
    DatasetError,
    GenerationConfig,
    OnlineSamples,
    ShardDataset,
    generate_dataset,
    probe_vectors,
)
from petsc_nnpc.layout import NaturalLayout  # noqa: E402
from petsc_nnpc.operator import GaussNewtonOperator, da_config_for_preset  # noqa: E402
from shallow_water.config import get_config  # noqa: E402
from shallow_water.model import ShallowWaterModel  # noqa: E402

torch.set_num_threads(1)


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def problem():
    model = ShallowWaterModel(get_config("tiny"))
    operator = GaussNewtonOperator.from_config(model, da_config_for_preset("tiny"))
    layout = NaturalLayout(model.comm, model.natural_indices(), model.n)
    # A wind-driven state a few days after rest.
    x0 = layout.gather(model.advance(model.create_state(), 30))
    return model, operator, x0


def _config(**overrides):
    values = dict(preset="tiny", states=10, k=6, shard_size=4, lead_min=2, lead_max=6, seed=3)
    values.update(overrides)
    return GenerationConfig(**values)


def _generate(problem, folder, on_sample=None, **overrides):
    model, operator, x0 = problem
    return generate_dataset(model, operator, _config(**overrides), folder, x0,
                            on_sample=on_sample, progress=False)


def _shards(folder):
    return {name: dict(np.load(os.path.join(folder, name))) for name in sorted(os.listdir(folder))
            if name.endswith(".npz")}


@pytest.fixture(scope="module")
def reference(problem, tmp_path_factory):
    folder = tmp_path_factory.mktemp("reference")
    _generate(problem, folder)
    return folder


def test_shards_cover_every_sample_once(reference):
    shards = _shards(reference)
    assert sorted(shards) == ["shard-00000.npz", "shard-00001.npz", "shard-00002.npz"]
    indices = np.concatenate([shards[name]["index"] for name in sorted(shards)])
    assert indices.tolist() == list(range(10))
    assert shards["shard-00002.npz"]["AZ"].shape == (2, 280, 6)
    assert shards["shard-00000.npz"]["AZ"].dtype == np.float32
    seeds = np.concatenate([shards[name]["seeds"] for name in sorted(shards)])
    assert np.unique(seeds).size == 10


def test_states_differ_along_chain(reference):
    x = ShardDataset(reference).states(np.arange(10))
    steps = np.linalg.norm(np.diff(x, axis=0), axis=1) / np.linalg.norm(x[1:], axis=1)
    assert np.all(steps > 1e-3)


def test_stored_products_match_operator(problem, reference):
    model, operator, _ = problem
    data = ShardDataset(reference, preset="tiny")
    x, Z, AZ = data.batch([5])
    assert np.array_equal(Z[0], probe_vectors(data.load_shard(1)["seeds"][1], 280, 6))
    state = model.create_state()
    state.getArray()[:] = x[0][model.natural_indices()]
    operator.linearize(state)
    local = operator.mult_block(np.ascontiguousarray(Z[0][model.natural_indices()]))
    expected = np.empty_like(local)
    expected[model.natural_indices()] = local
    error = np.abs(AZ[0] - expected).max() / np.abs(expected).max()
    assert error < 1e-6  # float32 storage


def test_kill_mid_shard_resumes_identically(problem, reference, tmp_path):
    def kill_at_six(i):
        if i == 6:
            raise Killed(i)

    with pytest.raises(Killed):
        _generate(problem, tmp_path, on_sample=kill_at_six)
    assert sorted(_shards(tmp_path)) == ["shard-00000.npz"]
    computed = _generate(problem, tmp_path)
    assert computed == 6  # samples 4 to 9; the four of shard 0 are kept
    expected = _shards(reference)
    resumed = _shards(tmp_path)
    assert sorted(resumed) == sorted(expected)
    for name in expected:
        for key in ("x", "seeds", "AZ", "index"):
            assert np.array_equal(resumed[name][key], expected[name][key]), (name, key)


def test_extend_keeps_written_samples(problem, reference, tmp_path):
    for name in os.listdir(reference):
        shutil.copy(os.path.join(reference, name), tmp_path)
    computed = _generate(problem, tmp_path, states=13)
    assert computed == 5  # shard 2 redone in full (8..11) and shard 3 (12)
    data = ShardDataset(tmp_path)
    assert len(data) == 13
    assert np.array_equal(data.states(np.arange(10)), ShardDataset(reference).states(np.arange(10)))


def test_corrupt_shard_kept_and_regenerated(problem, reference, tmp_path):
    for name in os.listdir(reference):
        shutil.copy(os.path.join(reference, name), tmp_path)
    path = tmp_path / "shard-00001.npz"
    path.write_bytes(path.read_bytes()[:500])
    assert _generate(problem, tmp_path) == 4
    assert (tmp_path / "shard-00001.npz.corrupt").exists()
    assert np.array_equal(np.load(path)["AZ"], np.load(reference / "shard-00001.npz")["AZ"])


def test_resume_with_other_options_rejected(problem, reference, tmp_path):
    for name in os.listdir(reference):
        shutil.copy(os.path.join(reference, name), tmp_path)
    with pytest.raises(DatasetError, match="dataset.json describes a set with k = 6 but this run has k = 7"):
        _generate(problem, tmp_path, k=7)
    assert len(ShardDataset(tmp_path)) == 10  # nothing written was lost


def test_folder_of_other_preset_rejected(reference):
    with pytest.raises(DatasetError, match="generated for preset 'tiny' but preset 'small'"):
        ShardDataset(reference, preset="small")


def _copy(reference, tmp_path):
    for name in os.listdir(reference):
        shutil.copy(os.path.join(reference, name), tmp_path)
    return tmp_path


def test_truncated_shard_named(reference, tmp_path):
    folder = _copy(reference, tmp_path)
    path = folder / "shard-00001.npz"
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(DatasetError, match="shard-00001.npz is truncated or corrupt"):
        ShardDataset(folder)


def test_nan_sample_named(reference, tmp_path):
    folder = _copy(reference, tmp_path)
    path = folder / "shard-00001.npz"
    arrays = dict(np.load(path))
    arrays["AZ"][2, 10, 0] = np.nan
    atomic_save_npz(path, **arrays)
    data = ShardDataset(folder)
    with pytest.raises(DatasetError, match="shard-00001.npz: sample 6 has NaN or Inf in 'AZ'"):
        data.batch([6])


def test_mismatched_shard_shape_named(reference, tmp_path):
    folder = _copy(reference, tmp_path)
    path = folder / "shard-00002.npz"
    arrays = dict(np.load(path))
    arrays["AZ"] = arrays["AZ"][:, :, :5]
    atomic_save_npz(path, **arrays)
    with pytest.raises(DatasetError, match=r"shard-00002.npz: array 'AZ' has shape \(2, 280, 5\)"):
        ShardDataset(folder)


def test_missing_shard_named(reference, tmp_path):
    folder = _copy(reference, tmp_path)
    os.unlink(folder / "shard-00001.npz")
    with pytest.raises(DatasetError, match="shard 2 follows a missing shard"):
        ShardDataset(folder)


def test_not_a_data_folder(tmp_path):
    with pytest.raises(DatasetError, match="is not a data folder"):
        ShardDataset(tmp_path)


def test_generation_config_rejects_invalid_values():
    with pytest.raises(ValueError, match="lead_max = 1 is smaller than lead_min = 2"):
        GenerationConfig(preset="tiny", lead_min=2, lead_max=1)
    with pytest.raises(ValueError, match="form = 'full' is invalid"):
        GenerationConfig(preset="tiny", form="full")


def test_oversized_shard_reported(problem, tmp_path):
    with pytest.raises(MemoryError, match="reduce --shard-size or --k"):
        _generate(problem, tmp_path, shard_size=10**6, k=10**4)
    assert not any(name.endswith(".npz") for name in os.listdir(tmp_path))


def test_online_samples_bounded_buffer(problem):
    model, operator, x0 = problem
    online = OnlineSamples(model, operator, _config(), x0, validation_states=2,
                           states_per_epoch=3, capacity=5, progress=False)
    online.initialize()
    assert len(online.validation) == 2
    assert len(online.train) == 3
    first = online.train.x.copy()
    online.refresh()
    assert len(online.train) == 5
    online.refresh()
    assert len(online.train) == 5
    assert not np.any(np.all(online.train.x[:, None, :] == first[None, :2, :], axis=2))


@pytest.mark.mpi
def test_two_ranks_match_one_rank(reference, tmp_path):
    from conftest import run_mpi

    script = os.path.join(os.path.dirname(__file__), "mpi", "dataset_generate.py")
    completed = run_mpi(script, 2, tmp_path / "two", timeout=240)
    assert "computed 7 6" in completed.stdout
    one = _shards(reference)
    two = _shards(tmp_path / "two")
    assert sorted(two) == sorted(one)
    for name in one:
        assert np.array_equal(two[name]["index"], one[name]["index"])
        assert np.array_equal(two[name]["seeds"], one[name]["seeds"])
        scale = np.abs(one[name]["x"]).max()
        assert np.abs(two[name]["x"] - one[name]["x"]).max() <= 1e-12 * scale
        scale = np.abs(one[name]["AZ"]).max()
        assert np.abs(two[name]["AZ"] - one[name]["AZ"]).max() <= 1e-6 * scale
    assert json.loads((tmp_path / "two" / "dataset.json").read_text())["n"] == 280


def test_generate_killed_by_signal_resumes(tmp_path):
    import subprocess
    import sys
    import time

    def command(out):
        return [sys.executable, "-m", "petsc_nnpc.cli", "generate", "--preset", "tiny",
                "--states", "16", "--k", "8", "--shard-size", "2", "--no-progress", "--out", str(out)]

    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(command(tmp_path / "straight"), env=env, check=True, capture_output=True, timeout=240)
    process = subprocess.Popen(command(tmp_path / "killed"), env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (tmp_path / "killed" / "shard-00001.npz").exists() and process.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.01)
    process.kill()
    process.wait(timeout=60)
    written = [name for name in os.listdir(tmp_path / "killed") if name.startswith("shard-")]
    assert 2 <= len(written) < 8
    subprocess.run(command(tmp_path / "killed"), env=env, check=True, capture_output=True, timeout=240)
    straight = _shards(tmp_path / "straight")
    resumed = _shards(tmp_path / "killed")
    assert sorted(resumed) == sorted(straight)
    for name in straight:
        for key in ("x", "seeds", "AZ", "index"):
            assert np.array_equal(resumed[name][key], straight[name][key]), (name, key)
    assert not [name for name in os.listdir(tmp_path / "killed") if name.startswith(".tmp-")]


def test_epoch_order_loads_each_shard_once(reference):
    from collections import OrderedDict

    data = ShardDataset(reference, cache_shards=2)
    order = data.epoch_order(np.arange(10), np.random.default_rng(0))
    assert sorted(order.tolist()) == list(range(10))
    # Replay the order through an LRU cache of two shards and count loads.
    cache, loads = OrderedDict(), 0
    for shard in (order // 4).tolist():
        if shard in cache:
            cache.move_to_end(shard)
            continue
        loads += 1
        cache[shard] = True
        if len(cache) > 2:
            cache.popitem(last=False)
    assert loads == 3
