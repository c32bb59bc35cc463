"""The main job: the whole study of a preset, stage by stage, resumable.

Stages, each skipped when a previous run of the same command finished it:

1. ``states``: the spun-up base state and the background (time mean of a
   long run) of the preset, from the files shipped with ``shallow_water``
   (or a fresh spin-up when a file is missing).
2. ``dataset-<form>``: the training set (Trappler & Vidard, algorithm 2.1).
3. ``static-<form>``: exact leading eigenpairs at the background state,
   computed once: the state-independent LMP that shows whether state
   dependence pays, and the starting point of the network.
4. ``train-<form>``: the eigenpair network.
5. ``evaluate``: the cycled twin experiment (Trappler & Vidard, algorithm
   3.1); every inner-loop system is solved from the same right-hand side by
   every preconditioner under test.
6. ``analysis``: spectra, predicted eigenvectors and the oracle's iterations
   against the rank, on the first system.
7. ``report``: ``results.json``, ``report.md`` and the figures.

``<form>`` is ``paper`` (CG on ``A_x``) and, with ``--forms paper,bhalf``,
``bhalf`` (the first-level change of variable ``v = B^{-1/2} δx``, where the
learned PC is a second-level preconditioner trained on that operator).
"""

import dataclasses
import json
import logging
import os
import platform
import time
from typing import Optional, Tuple

import numpy as np

from petsc_nnpc.utils import atomic_write_json, cpu_model, init_petsc

PETSc = init_petsc()

logger = logging.getLogger("petsc_nnpc.experiment")

MANIFEST = "experiment.json"
RESULTS = "results.json"


class ExperimentError(RuntimeError):
    """A stage of the experiment failed; finished stages stay usable."""


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """What one run of the study does, per preset.

    Attributes
    ----------
    preset : str
        Model preset (``tiny``, ``small`` or ``paper``).
    forms : tuple of str
        Forms in which every preconditioner is compared. The report always
        includes the unpreconditioned solve of the other form as a reference.
    cycles : int
        Twin-experiment cycles ``N``.
    states, k, shard_size, lead_min, lead_max, perturbation :
        Training set: number of states, probe vectors per state, samples
        per shard, lead-time range in model steps and relative perturbation.
    train_rank : int
        Number of eigenpairs the network predicts.
    epochs, batch_size, lr :
        Training.
    ranks : tuple of int
        Ranks ``r`` at which ``nnpc``, ``lmpexact``, ``lmpnystrom`` and the
        static LMP are compared.
    mus : tuple of str
        Values of ``-pc_nnpc_mu`` tried with the network (numbers, ``min``,
        ``max``, ``spectral``). A number is ``μ`` of the split preconditioner,
        so the leading eigenvalues of ``A P`` go to ``θ = μ²``; ``min`` and
        ``max`` set ``θ`` to the smallest or largest retained eigenvalue.
    baseline_mu : str
        The ``μ`` rule of ``lmpexact``, ``lmpnystrom``, ``lmpritz`` and the
        static LMP. On this model ``μ = 1`` maps the leading eigenvalues far
        below the head of the spectrum and makes inexact eigenpairs harmful,
        so the default is ``min``.
    refine : bool
        Also run ``nnpc`` with ``-pc_nnpc_refine`` at every rank (with the
        first of ``mus``).
    warm_start : bool
        Start the network from the exact leading eigenpairs at the background
        state (those of the static LMP), so that it learns how they change
        with the state instead of learning them from random weights.
    ritz_pairs : int
        Maximum number of Ritz pairs ``lmpritz`` recycles.
    limit_ranks : tuple of int
        Ranks of the oracle curve (iterations against ``r``).
    seed : int
        Seed of every random draw.
    device : str
        Torch device for training and inference: ``cpu``, ``cuda``,
        ``cuda:N``, or ``auto`` (the ``paper`` preset's default), which
        :func:`experiment_config` resolves to ``cuda`` when torch sees a GPU
        and to ``cpu`` otherwise.
    """

    preset: str
    forms: Tuple[str, ...] = ("paper",)
    cycles: int = 3
    states: int = 32
    k: int = 16
    shard_size: int = 8
    lead_min: int = 1
    lead_max: int = 8
    perturbation: float = 0.01
    train_rank: int = 16
    epochs: int = 20
    batch_size: int = 4
    lr: float = 2e-3
    ranks: Tuple[int, ...] = (8, 16)
    mus: Tuple[str, ...] = ("min", "max")
    baseline_mu: str = "min"
    refine: bool = True
    warm_start: bool = True
    ritz_pairs: int = 16
    limit_ranks: Tuple[int, ...] = (4, 8, 16)
    twin_max_steps: int = 8
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self):
        from shallow_water.config import preset_names

        if self.preset not in preset_names():
            raise ValueError(
                f"unknown preset {self.preset!r}: valid presets are {', '.join(preset_names())}"
            )
        if not self.forms or any(form not in ("paper", "bhalf") for form in self.forms):
            raise ValueError(f"forms = {self.forms!r} is invalid: use 'paper', 'bhalf' or both")
        for name in ("cycles", "states", "k", "shard_size", "train_rank", "epochs",
                     "batch_size", "ritz_pairs", "twin_max_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} = {value!r} is invalid: use a positive integer")
        for name in ("ranks", "limit_ranks"):
            values = getattr(self, name)
            if not values or any(int(r) < 1 for r in values):
                raise ValueError(f"{name} = {values!r} is invalid: use positive ranks")
        if max(self.ranks) > self.train_rank:
            raise ValueError(
                f"ranks = {self.ranks} include a rank above train_rank = {self.train_rank}: "
                "the network predicts only train_rank eigenpairs"
            )
        for mu in self.mus + (self.baseline_mu,):
            if mu not in ("min", "max", "spectral"):
                try:
                    value = float(mu)
                except ValueError:
                    value = -1.0
                if not value > 0:
                    raise ValueError(f"mu = {mu!r} is invalid: use a positive number, 'min', 'max' or 'spectral'")

    def to_dict(self):
        """Return the configuration as JSON-ready values."""
        values = dataclasses.asdict(self)
        for key, value in values.items():
            if isinstance(value, tuple):
                values[key] = list(value)
        return values

    @classmethod
    def from_dict(cls, values):
        """Build a configuration from :meth:`to_dict`'s output."""
        values = dict(values)
        for field in dataclasses.fields(cls):
            if field.name in values and isinstance(values[field.name], list):
                values[field.name] = tuple(values[field.name])
        return cls(**values)


#: Study settings per preset. ``tiny`` runs in seconds for the tests,
#: ``small`` in minutes on 2 CPU cores, ``paper`` has the sizes of the paper
#: (N = 1000 states, k = 100, r = 2000) and is meant for a GPU host.
EXPERIMENT_PRESETS = {
    "tiny": dict(
        cycles=2, states=12, k=8, shard_size=4, lead_min=1, lead_max=4, train_rank=8,
        epochs=4, batch_size=4, ranks=(8,), mus=("min",), ritz_pairs=8,
        limit_ranks=(4, 8), twin_max_steps=4,
    ),
    "small": dict(
        cycles=3, states=96, k=32, shard_size=16, lead_min=6, lead_max=24, train_rank=64,
        epochs=30, batch_size=8, ranks=(32, 64), mus=("min", "max"), ritz_pairs=32,
        limit_ranks=(8, 16, 32, 48, 64, 80), twin_max_steps=24,
    ),
    "paper": dict(
        cycles=10, states=1000, k=100, shard_size=25, lead_min=12, lead_max=96,
        train_rank=2000, epochs=100, batch_size=8, ranks=(1000, 1900, 2000),
        mus=("min", "1"), ritz_pairs=200, limit_ranks=(50, 200, 500, 1000, 2000),
        twin_max_steps=48, device="auto",
    ),
}


def experiment_config(preset, **overrides):
    """Return the :class:`ExperimentConfig` of ``preset`` with ``overrides``."""
    from shallow_water.config import preset_names

    if preset not in EXPERIMENT_PRESETS:
        raise ValueError(
            f"unknown preset {preset!r}: valid presets are {', '.join(preset_names())}"
        )
    values = dict(EXPERIMENT_PRESETS[preset])
    values.update({key: value for key, value in overrides.items() if value is not None})
    if values.get("device") == "auto":
        import torch

        values["device"] = "cuda" if torch.cuda.is_available() else "cpu"
        if values["device"] == "cpu":
            logger.warning("no CUDA device found: the %s study trains its network on the CPU, "
                           "which takes far longer than on a GPU", preset)
    return ExperimentConfig(preset=preset, **values)


def preconditioner_specs(config, form, model_path, static_path):
    """Return ``[(label, options)]``: every preconditioner compared in ``form``.

    ``options`` maps PETSc option names, without dash or prefix, to values.
    """
    base_mu = config.baseline_mu
    specs = [("none", {"pc_type": "none"})]
    for r in config.ranks:
        for mu in config.mus:
            specs.append((f"nnpc r={r} mu={mu}", {
                "pc_type": "nnpc", "pc_nnpc_model": model_path, "pc_nnpc_rank": r,
                "pc_nnpc_mu": mu, "pc_nnpc_device": config.device,
            }))
        if config.refine:
            mu = config.mus[0]
            specs.append((f"nnpc r={r} mu={mu} refine", {
                "pc_type": "nnpc", "pc_nnpc_model": model_path, "pc_nnpc_rank": r,
                "pc_nnpc_mu": mu, "pc_nnpc_refine": "true", "pc_nnpc_device": config.device,
            }))
        specs.append((f"lmpexact r={r} mu={base_mu}", {
            "pc_type": "lmpexact", "pc_lmpexact_rank": r, "pc_lmpexact_mu": base_mu,
        }))
        specs.append((f"lmpnystrom r={r} mu={base_mu}", {
            "pc_type": "lmpnystrom", "pc_lmpnystrom_rank": r, "pc_lmpnystrom_mu": base_mu,
            "pc_lmpnystrom_seed": config.seed,
        }))
        specs.append((f"static r={r} mu={base_mu}", {
            "pc_type": "lmpfile", "pc_lmpfile_path": static_path, "pc_lmpfile_rank": r,
            "pc_lmpfile_mu": base_mu,
        }))
    specs.append((f"lmpritz max={config.ritz_pairs} mu={base_mu}", {
        "pc_type": "lmpritz", "pc_lmpritz_rank": config.ritz_pairs, "pc_lmpritz_mu": base_mu,
    }))
    return specs


class StageRunner:
    """Runs named stages once, recording each finished one in ``experiment.json``.

    The manifest also records the preset and configuration: an output folder
    holding another preset's run is rejected, and a changed configuration
    redoes the stages that depend on it only with ``--force``.
    """

    def __init__(self, out_dir, config, force=False):
        self.out_dir = os.path.abspath(out_dir)
        self.config = config
        self.force = force
        self.mpi = PETSc.COMM_WORLD.tompi4py()
        self.path = os.path.join(self.out_dir, MANIFEST)
        self.manifest = self._load()

    def _load(self):
        manifest = None
        if os.path.exists(self.path):
            with open(self.path, encoding="utf-8") as handle:
                try:
                    manifest = json.load(handle)
                except json.JSONDecodeError as error:
                    raise ExperimentError(
                        f"{self.path} is not valid JSON ({error}): delete it or use --force"
                    ) from error
            saved = manifest.get("config", {}).get("preset")
            if saved != self.config.preset:
                raise ExperimentError(
                    f"{self.out_dir} contains a run of preset {saved!r}, not {self.config.preset!r}: "
                    "choose another --out folder"
                )
            if manifest.get("config") != self.config.to_dict() and not self.force:
                raise ExperimentError(
                    f"{self.out_dir} contains a run of preset {saved!r} with another configuration: "
                    "rerun with --force to redo it with the new settings, or choose another --out"
                )
        if manifest is None or self.force:
            manifest = {"config": self.config.to_dict(), "stages": {}}
        manifest["config"] = self.config.to_dict()
        return manifest

    def _save(self):
        if self.mpi.rank == 0:
            atomic_write_json(self.path, self.manifest)
        self.mpi.Barrier()

    def done(self, name):
        """Return whether stage ``name`` finished in this or an earlier run."""
        return name in self.manifest["stages"]

    def run(self, name, function):
        """Run ``function()`` as stage ``name`` unless it already finished."""
        if self.done(name) and not self.force:
            logger.info("stage %s: already done, skipped", name)
            return
        logger.info("stage %s: started", name)
        start = time.perf_counter()
        try:
            function()
        except ExperimentError:
            raise
        except Exception as error:
            raise ExperimentError(
                f"stage {name!r} failed: {type(error).__name__}: {error}. "
                f"Finished stages are kept in {self.out_dir}; fix the cause and rerun the "
                "same command to continue from this stage"
            ) from error
        seconds = time.perf_counter() - start
        self.manifest["stages"][name] = {"seconds": round(seconds, 3), "finished": time.time()}
        self._save()
        logger.info("stage %s: done in %.1f s", name, seconds)

    def seconds(self):
        """Return ``{stage: seconds}`` of the finished stages, in the order they finished."""
        stages = sorted(self.manifest["stages"].items(), key=lambda item: item[1]["finished"])
        return {name: info["seconds"] for name, info in stages}


def machine_description():
    """Return a one-line description of this machine for reports."""
    cpu = cpu_model(default=platform.processor() or "unknown CPU")
    return f"{os.cpu_count()} cores, {cpu}, {PETSc.COMM_WORLD.getSize()} MPI rank(s)"


def run_experiment(config, out_dir, force=False, progress=True, ksp_prefix="inner_"):
    """Run every stage of the study; return the path of ``report.md``."""
    from petsc_nnpc.study import Study

    runner = StageRunner(out_dir, config, force=force)
    study = Study(config, runner.out_dir, progress=progress, ksp_prefix=ksp_prefix)
    runner.run("states", study.prepare_states)
    for form in config.forms:
        runner.run(f"dataset-{form}", lambda form=form: study.generate(form))
        runner.run(f"static-{form}", lambda form=form: study.static_eigenpairs(form))
        runner.run(f"train-{form}", lambda form=form: study.train(form))
    runner.run("evaluate", study.evaluate)
    runner.run("analysis", study.analyse)
    runner.run("report", lambda: study.report(runner.seconds(), machine_description()))
    return os.path.join(runner.out_dir, "report.md")


def run_evaluation(config, out_dir, models, force=False, progress=True, ksp_prefix="inner_"):
    """Run the twin experiment, analysis and report with trained networks; return ``report.md``.

    ``models`` maps each form of ``config.forms`` to a checkpoint folder
    written by ``nnpc train``; no training set is generated.
    """
    from petsc_nnpc.network import read_checkpoint_metadata
    from petsc_nnpc.study import Study

    missing = [form for form in config.forms if form not in models]
    if missing:
        raise ExperimentError(
            f"no network given for the form(s) {', '.join(missing)}: pass --model PATH "
            "(and --model-bhalf PATH when --forms includes bhalf)"
        )
    for form, path in models.items():
        try:
            metadata = read_checkpoint_metadata(path)
        except ValueError as error:
            raise ExperimentError(f"cannot use the network given for the {form} form: {error}") from None
        from shallow_water.config import get_config

        expected_n = get_config(config.preset).n
        if metadata.get("n") not in (None, expected_n):
            raise ExperimentError(
                f"the network {path} was trained for n = {metadata['n']} (preset "
                f"{metadata.get('preset')!r}), but preset {config.preset!r} has n = {expected_n}: "
                f"give a checkpoint trained on the {config.preset} preset"
            )
        saved_form = metadata.get("form")
        if saved_form not in (None, form):
            raise ExperimentError(
                f"the network {path} was trained for the {saved_form} form, not {form}: "
                "give a checkpoint trained on that operator"
            )
        trained_rank = metadata.get("rank", metadata.get("network", {}).get("rank"))
        if trained_rank is not None and max(config.ranks) > int(trained_rank):
            raise ExperimentError(
                f"--ranks {max(config.ranks)} exceeds the {int(trained_rank)} eigenpairs that "
                f"{path} predicts: use ranks up to {int(trained_rank)}"
            )
    runner = StageRunner(out_dir, config, force=force)
    study = Study(config, runner.out_dir, progress=progress, ksp_prefix=ksp_prefix,
                  models=models)
    runner.run("states", study.prepare_states)
    for form in config.forms:
        runner.run(f"static-{form}", lambda form=form: study.static_eigenpairs(form))
    runner.run("evaluate", study.evaluate)
    runner.run("analysis", study.analyse)
    runner.run("report", lambda: study.report(runner.seconds(), machine_description()))
    return os.path.join(runner.out_dir, "report.md")
