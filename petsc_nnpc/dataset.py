"""Training set of ``(x_i, Z_i, A_{x_i} Z_i)`` triples: generation, shards, online mode.

The set follows Trappler & Vidard, "State-dependent preconditioning for the
inner-loop in Variational Data Assimilation using Machine Learning" (their
eq. 2.12 and algorithm 2.1). States form a chain: each is the previous one
plus a small random perturbation, advanced by a random lead time. For each
state ``x_i``, ``Z_i`` has ``k`` i.i.d. N(0, 1) columns regenerated from a
stored seed, and ``A_{x_i} Z_i`` costs one batched TL and one batched
adjoint run.

A data folder contains ``dataset.json`` and shards ``shard-NNNNN.npz``. Shard
``j`` contains samples ``j·S … (j+1)·S − 1`` (``S`` the shard size) as ``x``
``(m, n)`` float64, ``seeds`` ``(m,)`` int64, ``AZ`` ``(m, n, k)`` float32
and ``index`` ``(m,)`` int64 (the sample numbers), all in natural ordering.
Every random number of sample ``i`` (its ``Z`` seed, lead time and
perturbation) comes from ``SeedSequence([seed, i])``. The chain continues
from the last state of the previous shard, so a generation killed at any
point resumes with the same samples, none lost and none repeated.
"""

import dataclasses
import json
import logging
import os
import re
import zipfile
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from petsc_nnpc.utils import atomic_save_npz, atomic_write_json

log = logging.getLogger("petsc_nnpc.dataset")

DATASET_FILE = "dataset.json"
DATASET_FORMAT = "petsc_nnpc-training-set"
DATASET_VERSION = 1
SHARD_PATTERN = re.compile(r"^shard-(\d{5})\.npz$")
SHARD_KEYS = ("x", "seeds", "AZ", "index")


class DatasetError(ValueError):
    """A data folder or shard is invalid, corrupt or made for another problem."""


def shard_name(j):
    return f"shard-{j:05d}.npz"


def probe_vectors(seed, n, k):
    """Return ``Z`` ``(n, k)``: i.i.d. N(0, 1) in natural ordering from ``seed``.

    The same on every rank and for any number of ranks.
    """
    return np.random.default_rng(int(seed)).standard_normal((n, k))


@dataclass
class GenerationConfig:
    """Parameters of the chain of training states, validated at construction.

    Parameters
    ----------
    preset : str
        Model preset the set is made for.
    form : {"paper", "bhalf"}
        Operator form ``A_x`` or ``I + B^{1/2} Gᵀ R⁻¹ G B^{1/2}``.
    states : int
        Number of samples ``N``.
    k : int
        Probe vectors per state.
    seed : int
        Root seed of every random number.
    shard_size : int
        Samples per shard ``S``.
    lead_min, lead_max : int
        Lead time between consecutive states, in model steps, drawn
        uniformly from ``[lead_min, lead_max]``.
    perturbation : float
        Standard deviation of the Gaussian perturbation added before each
        advance, relative to each variable's spatial standard deviation in
        the current state.
    """

    preset: str
    form: str = "paper"
    states: int = 32
    k: int = 16
    seed: int = 0
    shard_size: int = 8
    lead_min: int = 1
    lead_max: int = 4
    perturbation: float = 0.01

    def __post_init__(self):
        if self.form not in ("paper", "bhalf"):
            raise ValueError(f"form = {self.form!r} is invalid: use 'paper' or 'bhalf'")
        for name in ("states", "k", "shard_size", "lead_min"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} = {getattr(self, name)} is invalid: expected >= 1")
        if self.lead_max < self.lead_min:
            raise ValueError(
                f"lead_max = {self.lead_max} is smaller than lead_min = {self.lead_min}"
            )
        if not self.seed >= 0:
            raise ValueError(f"seed = {self.seed} is invalid: expected a non-negative integer")
        if not (np.isfinite(self.perturbation) and self.perturbation >= 0):
            raise ValueError(f"perturbation = {self.perturbation} is invalid: expected >= 0")

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values):
        names = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in names})

    @classmethod
    def for_preset(cls, preset, window_steps, **overrides):
        """Return the defaults of ``preset`` with ``overrides`` (``None`` values ignored).

        Lead times run from one to three windows of ``window_steps`` steps.
        The paper preset uses ``N = 1000`` states and ``k = 100``, as Trappler &
        Vidard did for their 64×64 shallow-water case.
        """
        if preset not in GENERATION_PRESETS:
            raise ValueError(
                f"unknown preset {preset!r}: expected one of {sorted(GENERATION_PRESETS)}"
            )
        values = dict(GENERATION_PRESETS[preset], preset=preset,
                      lead_min=window_steps, lead_max=3 * window_steps)
        values.update({key: value for key, value in overrides.items() if value is not None})
        return cls(**values)


GENERATION_PRESETS = {
    "tiny": dict(states=32, k=32, shard_size=8),
    "small": dict(states=96, k=32, shard_size=16),
    "paper": dict(states=1000, k=100, shard_size=50),
}


def build_problem(preset, form="paper", comm=None):
    """Return the ``(model, operator, da_config)`` of ``preset``.

    The shallow-water model, its Gauss-Newton operator in ``form``, and the
    preset's observations and covariances
    (:func:`petsc_nnpc.operator.da_config_for_preset`).
    """
    from petsc_nnpc.operator import GaussNewtonOperator, da_config_for_preset
    from shallow_water.config import get_config
    from shallow_water.model import ShallowWaterModel

    model = ShallowWaterModel(get_config(preset), comm=comm)
    da_config = da_config_for_preset(preset, form=form)
    return model, GaussNewtonOperator.from_config(model, da_config), da_config


def initial_state(preset, path=None):
    """Return the first state of the chain in natural ordering: ``path`` or the shipped spun-up state."""
    from shallow_water.config import get_config
    from shallow_water.state import load_spunup_state, load_state

    if path is None:
        return load_spunup_state(preset)
    return load_state(path, get_config(preset))


def sample_randomness(config, i, n):
    """Return ``(z_seed, lead_steps, perturbation)`` of sample ``i``.

    ``perturbation`` is a ``(n,)`` standard normal draw in natural ordering;
    all three come from ``SeedSequence([seed, i])``.
    """
    rng = np.random.default_rng(np.random.SeedSequence([int(config.seed), int(i)]))
    z_seed = int(rng.integers(0, 2**63 - 1))
    lead = int(rng.integers(config.lead_min, config.lead_max + 1))
    perturbation = rng.standard_normal(n)
    return z_seed, lead, perturbation


# In-memory samples and the reader of a data folder.


class SampleSet:
    """Samples held in memory: states, probe seeds and ``A_x Z``.

    Parameters
    ----------
    x : ndarray, shape (m, n)
    seeds : ndarray of int64, shape (m,)
    AZ : ndarray, shape (m, n, k)
    metadata : dict
        At least ``n``, ``k`` and ``grid_shape``; ``preset`` and ``form``
        when known.
    """

    def __init__(self, x, seeds, AZ, metadata):
        self.x = np.asarray(x, dtype=np.float64)
        self.seeds = np.asarray(seeds, dtype=np.int64)
        self.AZ = np.asarray(AZ)
        self.metadata = dict(metadata)
        self.n = int(metadata["n"])
        self.k = int(metadata["k"])
        self.grid_shape = tuple(metadata["grid_shape"])
        m = self.x.shape[0]
        if self.x.shape != (m, self.n) or self.seeds.shape != (m,) \
                or self.AZ.shape != (m, self.n, self.k):
            raise DatasetError(
                f"inconsistent samples: x {self.x.shape}, seeds {self.seeds.shape}, "
                f"AZ {self.AZ.shape}; expected ({m}, {self.n}), ({m},), ({m}, {self.n}, {self.k})"
            )

    def __len__(self):
        return self.x.shape[0]

    def states(self, indices):
        return self.x[np.asarray(indices)]

    def batch(self, indices):
        """Return ``(x (b, n), Z (b, n, k), AZ (b, n, k))`` for sample ``indices``."""
        indices = np.asarray(indices)
        Z = np.stack([probe_vectors(s, self.n, self.k) for s in self.seeds[indices]])
        return self.x[indices], Z, self.AZ[indices]


def _read_npy_header(archive, name):
    with archive.open(name + ".npy") as handle:
        version = np.lib.format.read_magic(handle)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(handle)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(handle)
    return shape, dtype


def _fix_hint(folder):
    return (
        f"delete it and rerun `nnpc generate` with the same options and --out {folder} "
        "to regenerate it"
    )


class ShardDataset:
    """Reader of a data folder, validating every shard it opens.

    Opening checks ``dataset.json`` and the header of every shard: keys,
    shapes, dtypes and a readable zip. Loading a shard checks its values
    (no NaN or Inf, sample numbers in order). Shards are kept in an LRU
    cache, and :meth:`batch` serves samples in natural ordering.

    Parameters
    ----------
    folder : str
        Data folder written by :func:`generate_dataset`.
    preset : str, optional
        Expected preset; a folder made for another one is rejected.
    form : str, optional
        Expected operator form.
    cache_shards : int, optional
        Shards kept in memory; by default as many as fit in a quarter of the
        available memory (at least 2).
    """

    def __init__(self, folder, preset=None, form=None, cache_shards=None):
        self.folder = os.fspath(folder)
        self.metadata = read_dataset_metadata(self.folder)
        meta = self.metadata
        path = os.path.join(self.folder, DATASET_FILE)
        if preset is not None and meta["preset"] != preset:
            raise DatasetError(
                f"{path} was generated for preset {meta['preset']!r} but preset {preset!r} "
                f"was requested; use --preset {meta['preset']} or a data folder for {preset}"
            )
        if form is not None and meta["form"] != form:
            raise DatasetError(
                f"{path} was generated for the {meta['form']!r} form but {form!r} was "
                "requested; generate a data folder with --form " + form
            )
        self.n = int(meta["n"])
        self.k = int(meta["k"])
        self.grid_shape = tuple(meta["grid_shape"])
        self.shard_size = int(meta["generation"]["shard_size"])
        self._cache = OrderedDict()
        self.shards = []  # (path, first sample, count)
        names = sorted(name for name in os.listdir(self.folder) if SHARD_PATTERN.match(name))
        expected_first = 0
        for name in names:
            j = int(SHARD_PATTERN.match(name).group(1))
            shard_path = os.path.join(self.folder, name)
            if j * self.shard_size != expected_first:
                raise DatasetError(
                    f"{shard_path}: shard {j} follows a missing shard (samples from "
                    f"{expected_first} are absent); rerun `nnpc generate` with the same "
                    f"options and --out {self.folder} to fill the gap"
                )
            count = self._check_header(shard_path)
            self.shards.append((shard_path, expected_first, count))
            expected_first += count
            if count < self.shard_size and name != names[-1]:
                raise DatasetError(
                    f"{shard_path} contains {count} samples, fewer than the shard size "
                    f"{self.shard_size}, but is not the last shard; {_fix_hint(self.folder)}"
                )
        self.size = expected_first
        if self.size == 0:
            raise DatasetError(
                f"{self.folder} contains no shard; run `nnpc generate --out {self.folder}` first"
            )
        self._starts = np.array([first for _, first, _ in self.shards])
        if cache_shards is None:
            shard_bytes = self.shard_size * self.n * (4 * self.k + 8 + 16)
            available = _available_memory() or 4 * 2**30
            cache_shards = max(2, int(0.25 * available // shard_bytes))
        self.cache_shards = cache_shards

    def _check_header(self, path):
        try:
            with zipfile.ZipFile(path) as archive:
                members = {name[:-4] for name in archive.namelist() if name.endswith(".npy")}
                missing = set(SHARD_KEYS) - members
                if missing:
                    raise DatasetError(
                        f"{path} lacks the arrays {sorted(missing)}; {_fix_hint(self.folder)}"
                    )
                headers = {key: _read_npy_header(archive, key) for key in SHARD_KEYS}
        except (zipfile.BadZipFile, EOFError, OSError, ValueError) as error:
            if isinstance(error, DatasetError):
                raise
            raise DatasetError(
                f"{path} is truncated or corrupt ({error}); {_fix_hint(self.folder)}"
            ) from None
        m = headers["x"][0][0] if headers["x"][0] else -1
        expected = {
            "x": ((m, self.n), np.float64),
            "seeds": ((m,), np.int64),
            "AZ": ((m, self.n, self.k), np.float32),
            "index": ((m,), np.int64),
        }
        for key, (shape, dtype) in expected.items():
            got_shape, got_dtype = headers[key]
            if tuple(got_shape) != shape or np.dtype(got_dtype) != np.dtype(dtype):
                raise DatasetError(
                    f"{path}: array {key!r} has shape {tuple(got_shape)} and dtype "
                    f"{np.dtype(got_dtype)}, expected {shape} and {np.dtype(dtype)} "
                    f"(n = {self.n}, k = {self.k} from {DATASET_FILE}); the shard comes "
                    f"from another data set; {_fix_hint(self.folder)}"
                )
        if m < 1:
            raise DatasetError(f"{path} contains no sample; {_fix_hint(self.folder)}")
        return m

    def __len__(self):
        return self.size

    def load_shard(self, s):
        """Return the validated arrays of shard ``s`` (an index into ``self.shards``)."""
        if s in self._cache:
            self._cache.move_to_end(s)
            return self._cache[s]
        path, first, count = self.shards[s]
        arrays = load_shard_file(path, self.n, self.k, first=first, fix=_fix_hint(self.folder))
        self._cache[s] = arrays
        while len(self._cache) > self.cache_shards:
            self._cache.popitem(last=False)
        return arrays

    def _locate(self, indices):
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= self.size):
            raise IndexError(f"sample indices must lie in [0, {self.size})")
        shard = np.searchsorted(self._starts, indices, side="right") - 1
        return indices, shard

    def epoch_order(self, indices, rng):
        """Return ``indices`` shuffled so that a pass loads each shard once.

        Shards are visited in random order, in groups that fit the cache,
        and the samples of each group are shuffled together. When every
        shard fits in the cache this is a plain permutation.
        """
        indices = np.asarray(indices, dtype=np.int64)
        _, shard = self._locate(indices)
        shard_order = rng.permutation(np.unique(shard))
        order = []
        for start in range(0, shard_order.size, self.cache_shards):
            group = np.isin(shard, shard_order[start:start + self.cache_shards])
            order.append(rng.permutation(indices[group]))
        return np.concatenate(order) if order else indices

    def states(self, indices):
        indices, shard = self._locate(indices)
        out = np.empty((indices.size, self.n))
        for row, (i, s) in enumerate(zip(indices, shard)):
            out[row] = self.load_shard(s)["x"][i - self.shards[s][1]]
        return out

    def batch(self, indices):
        """Return ``(x (b, n), Z (b, n, k), AZ (b, n, k))`` for sample ``indices``."""
        indices, shard = self._locate(indices)
        x = np.empty((indices.size, self.n))
        Z = np.empty((indices.size, self.n, self.k))
        AZ = np.empty((indices.size, self.n, self.k), dtype=np.float32)
        for row, (i, s) in enumerate(zip(indices, shard)):
            arrays = self.load_shard(s)
            local = i - self.shards[s][1]
            x[row] = arrays["x"][local]
            AZ[row] = arrays["AZ"][local]
            Z[row] = probe_vectors(arrays["seeds"][local], self.n, self.k)
        return x, Z, AZ


def load_shard_file(path, n, k, first=None, fix=""):
    """Return the arrays of one shard after checking shapes and values."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in SHARD_KEYS}
    except KeyError as error:
        raise DatasetError(f"{path} lacks the array {error}; {fix}") from None
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as error:
        raise DatasetError(f"{path} is truncated or corrupt ({error}); {fix}") from None
    m = arrays["x"].shape[0]
    if arrays["x"].shape != (m, n) or arrays["AZ"].shape != (m, n, k) \
            or arrays["seeds"].shape != (m,) or arrays["index"].shape != (m,):
        raise DatasetError(
            f"{path} has mismatched shapes: x {arrays['x'].shape}, AZ {arrays['AZ'].shape}, "
            f"seeds {arrays['seeds'].shape}, index {arrays['index'].shape}; expected "
            f"({m}, {n}), ({m}, {n}, {k}), ({m},), ({m},); {fix}"
        )
    for key in ("x", "AZ"):
        finite = np.isfinite(arrays[key]).reshape(m, -1).all(axis=1)
        if not finite.all():
            bad = int(arrays["index"][np.argmin(finite)])
            raise DatasetError(f"{path}: sample {bad} has NaN or Inf in {key!r}; {fix}")
    if first is not None and not np.array_equal(arrays["index"], np.arange(first, first + m)):
        raise DatasetError(
            f"{path} contains samples {arrays['index'][:3].tolist()}..., expected "
            f"{first}..{first + m - 1}; {fix}"
        )
    return arrays


def read_dataset_metadata(folder):
    """Return the validated content of ``folder/dataset.json``."""
    path = os.path.join(os.fspath(folder), DATASET_FILE)
    try:
        with open(path, encoding="utf-8") as handle:
            meta = json.load(handle)
    except FileNotFoundError:
        raise DatasetError(
            f"{path} not found: {folder} is not a data folder; create one with "
            "`nnpc generate --preset P --out DIR`"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DatasetError(f"{path} is corrupt ({error}); delete the folder and regenerate") from None
    if not isinstance(meta, dict) or meta.get("format") != DATASET_FORMAT:
        raise DatasetError(f"{path} is not a petsc_nnpc training-set description")
    for key in ("preset", "form", "n", "k", "grid_shape", "generation"):
        if key not in meta:
            raise DatasetError(f"{path} lacks the key {key!r}; delete the folder and regenerate")
    return meta


# Generation.


class SampleChain:
    """The chain of training states and their block products (algorithm 2.1).

    Collective over the model's communicator: every rank runs the model and
    the block product ``A_x Z``, and rank 0 receives the samples in natural
    ordering.

    Parameters
    ----------
    model : DAModel
        Provides ``advance`` and the layout.
    operator : GaussNewtonOperator
        Provides ``linearize`` and ``mult_block``.
    config : GenerationConfig
    """

    def __init__(self, model, operator, config):
        from petsc_nnpc.layout import NaturalLayout

        self.model = model
        self.operator = operator
        self.config = config
        self.n = int(model.n)
        self.layout = NaturalLayout(model.comm, model.natural_indices(), self.n)
        self.mpi = self.layout.mpi
        self.variable_slices = dict(model.variable_slices)
        self.index = None
        self.state = None  # compact Vec of sample `index`

    def start(self, index, x_natural):
        """Place the chain at sample ``index`` with state ``x_natural`` (read on rank 0)."""
        x_natural = self.mpi.bcast(
            None if self.mpi.rank else np.asarray(x_natural, dtype=np.float64), root=0
        )
        self.state = self.model.create_state()
        self.state.getArray()[:] = self.layout.from_replicated(x_natural)
        self.index = int(index)

    def continue_after(self, index, x_natural):
        """Place the chain at sample ``index + 1``, given sample ``index``'s state."""
        self.start(index, x_natural)
        self._step()

    def _step(self):
        """Advance the chain from sample ``index`` to ``index + 1``."""
        _, lead, noise = sample_randomness(self.config, self.index, self.n)
        x_natural = self.layout.gather(self.state, to_all=True)  # (n,)
        scaled = np.empty(self.n)
        for part in self.variable_slices.values():
            spread = x_natural[part].std()
            scaled[part] = self.config.perturbation * (spread if spread > 0 else 1.0) * noise[part]
        perturbed = self.model.create_state()
        perturbed.getArray()[:] = self.state.getArray(readonly=True) + self.layout.from_replicated(scaled)
        self.state = self.model.advance(perturbed, lead)
        self.index += 1

    def next_sample(self):
        """Return sample ``index`` as ``(i, x (n,), seed, AZ (n, k) float32)`` and step.

        The arrays are returned on rank 0 only (``None`` elsewhere).
        """
        i = self.index
        z_seed, _, _ = sample_randomness(self.config, i, self.n)
        Z = self.layout.from_replicated(probe_vectors(z_seed, self.n, self.config.k))  # (local, k)
        self.operator.linearize(self.state)
        AZ = self.operator.mult_block(np.ascontiguousarray(Z))  # (local, k)
        x_natural = self.layout.gather(self.state)
        AZ_natural = self.layout.gather(AZ)
        finite = self.mpi.bcast(
            bool(np.all(np.isfinite(AZ_natural)) and np.all(np.isfinite(x_natural)))
            if self.mpi.rank == 0 else None,
            root=0,
        )
        if not finite:
            raise RuntimeError(
                f"sample {i}: the state or A_x Z contains NaN or Inf (the model run diverged); "
                "reduce the perturbation or the lead time"
            )
        self._step()
        if self.mpi.rank:
            return i, None, z_seed, None
        return i, x_natural, z_seed, AZ_natural.astype(np.float32)


def _available_memory():
    """Return the memory available to new allocations in bytes, or ``None``."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_generation_memory(config, n):
    """Raise ``MemoryError`` with the fix when one shard does not fit in memory.

    Rank 0 keeps one shard (``S·n·k`` float32 plus states) and ``Z`` and
    ``A_x Z`` of one state in float64 (``2·n·k`` values).
    """
    need = config.shard_size * n * (4 * config.k + 8) + 2 * 8 * n * config.k
    available = _available_memory()
    if available is not None and need > 0.8 * available:
        raise MemoryError(
            f"a shard of {config.shard_size} samples with n = {n} and k = {config.k} needs "
            f"{need / 2**30:.2f} GiB but {available / 2**30:.2f} GiB is available; "
            "reduce --shard-size or --k"
        )
    return need


def dataset_record(config, model, extra=None):
    """Return the ``dataset.json`` content for a generation."""
    record = {
        "format": DATASET_FORMAT,
        "format_version": DATASET_VERSION,
        "preset": config.preset,
        "form": config.form,
        "n": int(model.n),
        "k": int(config.k),
        "grid_shape": [int(v) for v in model.grid_shape],
        "variable_slices": {
            name: [part.start, part.stop] for name, part in model.variable_slices.items()
        },
        "generation": config.to_dict(),
        "probe_vectors": "np.random.default_rng(seed).standard_normal((n, k)), natural ordering",
    }
    record.update(extra or {})
    # Through JSON once, so that tuples compare equal to the lists read back.
    return json.loads(json.dumps(record))


# Keys of dataset.json that must not change when a generation resumes;
# `generation.states` may grow to extend a set.
_FIXED_GENERATION_KEYS = ("form", "k", "seed", "shard_size", "lead_min", "lead_max", "perturbation")


def _check_resumable(path, old, new):
    for key in ("preset", "form", "n", "k", "grid_shape"):
        if old.get(key) != new.get(key):
            raise DatasetError(
                f"{path} describes a set with {key} = {old.get(key)!r} but this run has "
                f"{key} = {new.get(key)!r}; use another --out folder, or the same options "
                "to resume"
            )
    for key in _FIXED_GENERATION_KEYS:
        if old["generation"].get(key) != new["generation"].get(key):
            raise DatasetError(
                f"{path} was generated with {key} = {old['generation'].get(key)!r} but this "
                f"run has {key} = {new['generation'].get(key)!r}; use another --out folder, "
                "or the same options to resume"
            )
    for key in set(old) | set(new):
        if key in ("generation", "format_version") or key in ("preset", "form", "n", "k", "grid_shape"):
            continue
        if old.get(key) != new.get(key):
            raise DatasetError(
                f"{path} records {key} = {old.get(key)!r} but this run has {new.get(key)!r}; "
                "use another --out folder, or the same set-up to resume"
            )


def _remove_partial_writes(folder):
    """Delete temporary files left by a write that a kill interrupted.

    ``atomic_write_bytes`` writes ``.tmp-*`` files beside the target and
    renames them when complete, so any such file left here is partial.
    Only one generation may run on a folder at a time.
    """
    for name in os.listdir(folder):
        if name.startswith(".tmp-"):
            os.unlink(os.path.join(folder, name))
            log.info("removed %s, a partial write of an interrupted run", name)


def _scan_shard(folder, j, n, k, shard_size, total):
    """Return the arrays of shard ``j`` if it is complete and valid, else ``None``.

    An invalid shard is renamed ``*.corrupt`` so that nothing is lost.
    """
    path = os.path.join(folder, shard_name(j))
    if not os.path.exists(path):
        return None
    first = j * shard_size
    count = min(shard_size, total - first)
    try:
        arrays = load_shard_file(path, n, k, first=first)
    except DatasetError as error:
        kept = path + ".corrupt"
        os.replace(path, kept)
        log.warning("%s; kept it as %s and will regenerate the shard", error, kept)
        return None
    if arrays["x"].shape[0] != count:
        # A shorter last shard from a smaller earlier --states: redo it in full.
        return None
    return arrays


def generate_dataset(model, operator, config, folder, initial_state, extra=None,
                     on_sample=None, progress=True):
    """Write the training set of ``config`` to ``folder``, resuming what exists.

    Collective over ``model.comm``: all ranks run the model and the block
    products, and rank 0 writes. Each shard is written atomically once
    complete, so a kill loses at most the samples of the shard in progress,
    which the next run recomputes identically.

    Cost per sample: one ``advance`` by ``lead_min…lead_max`` steps, one
    linearization (a forward window) and one batched TL and adjoint run of
    ``k`` directions.

    Parameters
    ----------
    model, operator
        A :class:`~petsc_nnpc.operator.DAModel` and a Gauss-Newton operator
        over it.
    config : GenerationConfig
    folder : str
    initial_state : ndarray, shape (n,)
        First state of the chain in natural ordering (read on rank 0).
    extra : dict, optional
        More entries for ``dataset.json`` (model and DA configuration).
    on_sample : callable, optional
        Called as ``on_sample(i)`` on every rank after sample ``i`` is
        computed (before its shard is written).
    progress : bool
        Show a tqdm bar on rank 0.

    Returns
    -------
    int
        Number of samples computed by this call.
    """
    from tqdm.auto import tqdm

    chain = SampleChain(model, operator, config)
    mpi = chain.mpi
    n, k, S, N = chain.n, config.k, config.shard_size, config.states
    record = dataset_record(config, model, extra)
    path = os.path.join(os.fspath(folder), DATASET_FILE)

    # Rank 0 checks the folder and lists the shards to compute.
    plan = None
    error = None
    if mpi.rank == 0:
        try:
            check_generation_memory(config, n)
            os.makedirs(folder, exist_ok=True)
            if os.path.exists(path):
                _check_resumable(path, read_dataset_metadata(folder), record)
            atomic_write_json(path, record)
            _remove_partial_writes(folder)
            shard_count = -(-N // S)
            plan = [j for j in range(shard_count)
                    if _scan_shard(folder, j, n, k, S, N) is None]
        except (DatasetError, MemoryError, OSError) as caught:
            error = caught
    error = mpi.bcast(error, root=0)
    if error is not None:
        raise error
    plan = mpi.bcast(plan, root=0)
    todo = sum(min(S, N - j * S) for j in plan)
    if mpi.rank == 0:
        log.info("training set %s: %d samples of %d to compute in %d shard(s)",
                 folder, todo, N, len(plan))
    # disable=None lets tqdm turn the bar off when stderr is not a terminal.
    bar = tqdm(total=todo, desc="generate", unit="state",
               disable=None if progress and mpi.rank == 0 else True)

    computed = 0
    previous_last = None  # (index, x) of the last sample of shard j-1, on rank 0
    for j in plan:
        first = j * S
        count = min(S, N - first)
        # Every rank takes part in the broadcast, so it is outside any condition.
        previous_index = mpi.bcast(previous_last[0] if previous_last is not None else None, root=0)
        if first == 0:
            chain.start(0, initial_state if mpi.rank == 0 else None)
        elif previous_index == first - 1:
            chain.continue_after(first - 1, previous_last[1] if mpi.rank == 0 else None)
        else:
            x_last = None
            if mpi.rank == 0:
                before = load_shard_file(os.path.join(folder, shard_name(j - 1)), n, k)
                x_last = before["x"][-1]
            chain.continue_after(first - 1, x_last)
        xs, seeds, AZs, indices = [], [], [], []
        for _ in range(count):
            i, x, seed, AZ = chain.next_sample()
            if mpi.rank == 0:
                xs.append(x)
                seeds.append(seed)
                AZs.append(AZ)
                indices.append(i)
            computed += 1
            bar.update(1)
            if on_sample is not None:
                on_sample(i)
        if mpi.rank == 0:
            atomic_save_npz(
                os.path.join(folder, shard_name(j)),
                x=np.stack(xs),  # (m, n)
                seeds=np.asarray(seeds, dtype=np.int64),  # (m,)
                AZ=np.stack(AZs),  # (m, n, k)
                index=np.asarray(indices, dtype=np.int64),  # (m,)
            )
            previous_last = (indices[-1], xs[-1])
        mpi.Barrier()
    bar.close()
    return computed


# Online mode.


class OnlineSamples:
    """Samples produced while training runs (algorithm 2.1 used online).

    A fixed validation set is drawn first. Each :meth:`refresh` then adds
    ``states_per_epoch`` new samples to a first-in first-out buffer of
    ``capacity`` samples, so memory stays bounded and the full set is never
    stored. Collective: every rank calls :meth:`refresh`, and only rank 0
    keeps samples.

    The chain position and the buffer are saved by :meth:`state_arrays`, so
    a resumed training run continues the same chain.
    """

    def __init__(self, model, operator, config, initial_state, validation_states,
                 states_per_epoch, capacity, progress=True):
        if validation_states < 1 or states_per_epoch < 1:
            raise ValueError(
                f"online mode needs >= 1 validation state and >= 1 new state per epoch, got "
                f"{validation_states} and {states_per_epoch}"
            )
        if capacity < states_per_epoch:
            raise ValueError(
                f"online buffer capacity {capacity} is smaller than the {states_per_epoch} "
                "states added per epoch; raise --buffer"
            )
        self.chain = SampleChain(model, operator, config)
        self.config = config
        self.n = self.chain.n
        self.k = config.k
        self.grid_shape = tuple(model.grid_shape)
        self.states_per_epoch = states_per_epoch
        self.capacity = capacity
        self.validation_states = validation_states
        self.progress = progress
        self.metadata = dataset_record(config, model)
        self.chain.start(0, initial_state)
        self.validation = None
        self.train = None

    @property
    def is_root(self):
        return self.chain.mpi.rank == 0

    def _draw(self, count, desc):
        from tqdm.auto import tqdm

        xs, seeds, AZs = [], [], []
        for _ in tqdm(range(count), desc=desc, unit="state",
                      disable=None if self.progress and self.is_root else True):
            _, x, seed, AZ = self.chain.next_sample()
            if self.is_root:
                xs.append(x)
                seeds.append(seed)
                AZs.append(AZ)
        if not self.is_root:
            return None
        return SampleSet(np.stack(xs), np.asarray(seeds), np.stack(AZs), self.metadata)

    def initialize(self):
        """Draw the validation set and the first training samples."""
        self.validation = self._draw(self.validation_states, "online validation")
        self.train = self._draw(self.states_per_epoch, "online samples")

    def refresh(self):
        """Add ``states_per_epoch`` new samples, dropping the oldest beyond ``capacity``."""
        new = self._draw(self.states_per_epoch, "online samples")
        if not self.is_root:
            return
        keep = max(0, min(len(self.train), self.capacity - len(new)))
        old = slice(len(self.train) - keep, len(self.train))
        self.train = SampleSet(
            np.concatenate([self.train.x[old], new.x]),
            np.concatenate([self.train.seeds[old], new.seeds]),
            np.concatenate([self.train.AZ[old], new.AZ]),
            self.metadata,
        )

    def state_arrays(self):
        """Return arrays that restore the chain and buffers (rank 0 only)."""
        chain_state = self.chain.layout.gather(self.chain.state)
        if not self.is_root:
            return None
        return {
            "chain_index": np.asarray(self.chain.index, dtype=np.int64),
            "chain_state": chain_state,
            "val_x": self.validation.x, "val_seeds": self.validation.seeds,
            "val_AZ": self.validation.AZ,
            "train_x": self.train.x, "train_seeds": self.train.seeds, "train_AZ": self.train.AZ,
        }

    def restore(self, arrays):
        """Restore from :meth:`state_arrays` (read on rank 0; collective)."""
        index = self.chain.mpi.bcast(int(arrays["chain_index"]) if self.is_root else None, root=0)
        self.chain.start(index, arrays["chain_state"] if self.is_root else None)
        if self.is_root:
            self.validation = SampleSet(arrays["val_x"], arrays["val_seeds"], arrays["val_AZ"],
                                        self.metadata)
            self.train = SampleSet(arrays["train_x"], arrays["train_seeds"], arrays["train_AZ"],
                                   self.metadata)
