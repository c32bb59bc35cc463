"""``nnpc inspect``: describe a checkpoint, a training run, a data folder or a state file."""

import json
import logging
import os

NAME = "inspect"
HELP = (
    "print what a file or folder contains: a network checkpoint (sizes, parameters, "
    "memory), a training run (metrics), a data folder (shards, samples), a state file, "
    "an eigenpair file (U, lam) or any other .npz archive"
)

log = logging.getLogger("petsc_nnpc.commands.inspect")


def add_arguments(parser):
    parser.add_argument(
        "path",
        help="checkpoint folder, training output folder, data folder, shard, state file, "
        "eigenpair file or other .npz archive",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def describe(path):
    """Return ``(kind, record)`` for ``path``: what it is and its metadata."""
    from petsc_nnpc.dataset import DATASET_FILE, SHARD_PATTERN
    from petsc_nnpc.network import METADATA_FILE
    from petsc_nnpc.train import CONFIG_FILE, MODEL_DIR

    path = os.fspath(path)
    if not os.path.exists(path):
        raise SystemExit(f"nnpc inspect: {path} not found")
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, METADATA_FILE)):
            return "checkpoint", _checkpoint(path)
        if os.path.exists(os.path.join(path, CONFIG_FILE)):
            return "training run", _training_run(path, os.path.join(path, MODEL_DIR))
        if os.path.exists(os.path.join(path, DATASET_FILE)):
            return "data folder", _data_folder(path)
        raise SystemExit(
            f"nnpc inspect: {path} is not a checkpoint, training run or data folder "
            f"(no {METADATA_FILE}, {CONFIG_FILE} or {DATASET_FILE} in it)"
        )
    if os.path.basename(path) == METADATA_FILE:
        return "checkpoint", _checkpoint(os.path.dirname(path))
    if SHARD_PATTERN.match(os.path.basename(path)):
        return "shard", _shard(path)
    if path.endswith(".npz"):
        return _npz_file(path)
    raise SystemExit(f"nnpc inspect: {path} is not a known file type (.npz archive, checkpoint.json)")


def _checkpoint(path):
    from petsc_nnpc.network import load_network
    from petsc_nnpc.train import estimate_training_memory

    network, record = load_network(path)
    record = dict(record)
    record["summary"] = network.summary()
    memory = estimate_training_memory(network, 1, int(record.get("k", 16)))
    record["estimated_training_memory_batch1_mib"] = round(memory["total"] / 2**20, 1)
    return record


def _training_run(path, model_dir):
    from petsc_nnpc.train import CONFIG_FILE, METRICS_FILE

    with open(os.path.join(path, CONFIG_FILE), encoding="utf-8") as handle:
        record = {"config": json.load(handle)}
    metrics = os.path.join(path, METRICS_FILE)
    if os.path.exists(metrics):
        import csv

        with open(metrics, encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        record["epochs_done"] = len(rows)
        if rows:
            record["last_epoch"] = rows[-1]
            record["best_val_loss"] = min(float(row["val_loss"]) for row in rows)
    if os.path.exists(model_dir):
        record["checkpoint"] = _checkpoint(model_dir)
    return record


def _data_folder(path):
    from petsc_nnpc.dataset import ShardDataset

    data = ShardDataset(path)
    record = dict(data.metadata)
    record["samples_written"] = len(data)
    record["shards"] = len(data.shards)
    record["bytes"] = sum(os.path.getsize(shard_path) for shard_path, _, _ in data.shards)
    return record


def _shard(path):
    from petsc_nnpc.utils import read_npz

    data = read_npz(path)
    record = {key: {"shape": list(value.shape), "dtype": str(value.dtype)} for key, value in data.items()}
    if "index" in data:
        record["samples"] = data["index"].tolist()
    return record


def _npz_file(path):
    """Describe a state file, an eigenpair file, or the arrays of any other archive."""
    import numpy as np

    from petsc_nnpc.utils import read_npz

    arrays = read_npz(path)
    if {"grid", "config", "eta", "u", "v"} <= set(arrays):
        return "state file", _state_file(path)
    record = {key: _array_summary(value) for key, value in arrays.items()}
    if "U" in arrays and "lam" in arrays and arrays["U"].ndim == 2:
        U, lam = arrays["U"], arrays["lam"].reshape(-1)
        record = {key: value for key, value in record.items() if key not in ("U", "lam")}
        record.update(n=int(U.shape[0]), rank=int(U.shape[1]), dtype=str(U.dtype))
        if lam.size:
            record.update(lam_max=float(lam.max()), lam_min=float(lam.min()))
        preset = _preset_of_size(U.shape[0])
        if preset:
            record["preset"] = preset
        return "eigenpair file", record
    for key, value in arrays.items():
        preset = _preset_of_size(value.size) if value.ndim == 1 else None
        if preset and np.issubdtype(value.dtype, np.floating):
            record[key] = {"preset": preset, **_field_ranges(preset, value)}
    return "npz archive", record


def _array_summary(value):
    if value.ndim == 0:
        return value.item() if value.dtype.kind in "biufU" else str(value)
    return {"shape": list(value.shape), "dtype": str(value.dtype)}


def _preset_of_size(n):
    """Return the preset whose state size is ``n``, or None."""
    from shallow_water.config import get_config, preset_names

    for name in preset_names():
        if get_config(name).n == n:
            return name
    return None


def _field_ranges(preset, natural):
    import numpy as np

    from shallow_water.config import get_config
    from shallow_water.state import split_fields

    fields = split_fields(get_config(preset), natural)
    return {name: {"min": float(np.min(values)), "max": float(np.max(values))}
            for name, values in fields.items()}


def _state_file(path):
    import numpy as np

    from shallow_water.state import read_state_file, split_fields

    natural, config, time = read_state_file(path)
    fields = split_fields(config, natural)
    record = {"preset": config.preset, "grid": [config.ny, config.nx], "n": config.n,
              "time_days": time / 86400.0}
    for name, values in fields.items():
        record[name] = {"min": float(np.min(values)), "max": float(np.max(values)),
                        "std": float(np.std(values))}
    return record


def _print_text(kind, record, indent=""):
    for key in sorted(record):
        value = record[key]
        if isinstance(value, dict):
            print(f"{indent}{key}:")
            _print_text(kind, value, indent + "  ")
        else:
            print(f"{indent}{key}: {value}")


def run(args, petsc_args):
    from petsc_nnpc.dataset import DatasetError
    from petsc_nnpc.network import CheckpointError

    try:
        kind, record = describe(args.path)
    except (DatasetError, CheckpointError, ValueError) as error:
        raise SystemExit(f"nnpc inspect: {error}") from None
    if args.json:
        print(json.dumps({"kind": kind, **record}, indent=2, sort_keys=True, default=str))
    else:
        print(f"{args.path}: {kind}")
        summary = record.get("summary") or record.get("checkpoint", {}).get("summary")
        if summary:
            print(f"  {summary}")
        _print_text(kind, record, "  ")
    return 0
