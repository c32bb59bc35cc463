"""State files (``.npz``) and state validation.

A state file stores one model state in natural ordering as three arrays,
``eta`` ``(ny, nx)``, ``u`` ``(ny, nx−1)`` and ``v`` ``(ny−1, nx)``, beside the
grid ``(nx, ny, Lx, Ly)``, the preset name, the model configuration (JSON) and
the model time in seconds. Files are written atomically.
"""

import json
import os

import numpy as np

from petsc_nnpc.utils import atomic_save_npz, read_npz
from shallow_water.config import ModelConfig

VARIABLES = ("eta", "u", "v")


def field_shapes(config):
    """Return the array shape of each variable: ``{"eta": (ny, nx), ...}``."""
    nx, ny = config.nx, config.ny
    return {"eta": (ny, nx), "u": (ny, nx - 1), "v": (ny - 1, nx)}


def split_fields(config, natural):
    """Return ``{"eta", "u", "v"}`` 2-D views of a natural-ordering state ``(n,)``."""
    natural = np.asarray(natural)
    if natural.shape != (config.n,):
        raise ValueError(
            f"state has shape {natural.shape}, expected ({config.n},) for the "
            f"{config.nx} x {config.ny} grid"
        )
    fields = {}
    start = 0
    for name, shape in field_shapes(config).items():
        size = shape[0] * shape[1]
        fields[name] = natural[start:start + size].reshape(shape)
        start += size
    return fields


def join_fields(config, fields):
    """Return the natural-ordering state ``(n,)`` from ``{"eta", "u", "v"}`` arrays."""
    parts = []
    for name, shape in field_shapes(config).items():
        array = np.asarray(fields[name], dtype=np.float64)
        if array.shape != shape:
            raise ValueError(
                f"{name} has shape {array.shape}, expected {shape} for the "
                f"{config.nx} x {config.ny} grid"
            )
        parts.append(array.reshape(-1))
    return np.concatenate(parts)


def check_finite(config, natural, source="state"):
    """Raise ``ValueError`` naming the variable if a natural-ordering state has NaN or Inf."""
    for name, array in split_fields(config, natural).items():
        bad = ~np.isfinite(array)
        if bad.any():
            row, col = np.argwhere(bad)[0]
            raise ValueError(
                f"{source} has {int(bad.sum())} non-finite values in {name} "
                f"(first at row {row}, column {col}): regenerate the state, "
                "e.g. with `nnpc spinup`, or reduce dt if the run blew up"
            )


def save_state(path, config, natural, time=0.0):
    """Write a natural-ordering state ``(n,)`` to the ``.npz`` file ``path`` atomically."""
    check_finite(config, natural)
    fields = split_fields(config, natural)
    atomic_save_npz(
        path,
        grid=np.array(config.grid, dtype=np.float64),
        preset=np.array(config.preset),
        config=np.array(json.dumps(config.to_dict())),
        time=np.array(float(time)),
        **{name: np.ascontiguousarray(array) for name, array in fields.items()},
    )


def read_state_file(path):
    """Return ``(natural, config, time)`` from a state file, with the config it records."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"state file {path} not found: create it with `nnpc spinup --out {path}`")
    data = read_npz(path)
    missing = [key for key in ("grid", "config", *VARIABLES) if key not in data]
    if missing:
        raise ValueError(f"{path} is not a state file: arrays {missing} are missing")
    config = ModelConfig.from_dict(json.loads(str(data["config"])))
    fields = {name: data[name] for name in VARIABLES}
    time = float(data["time"]) if "time" in data else 0.0
    natural = join_fields(config, fields)
    check_finite(config, natural, source=f"state file {path}")
    return natural, config, time


def load_state(path, config):
    """Return the natural-ordering state ``(n,)`` stored in ``path`` for the grid of ``config``.

    Raises
    ------
    ValueError
        If the file was made for another grid (both grids are named), or a
        variable contains NaN or Inf.
    """
    natural, file_config, _ = read_state_file(path)
    if tuple(file_config.grid) != tuple(config.grid):
        raise ValueError(
            f"state file {path} is for the grid nx={file_config.nx}, ny={file_config.ny}, "
            f"Lx={file_config.Lx:g}, Ly={file_config.Ly:g} (preset {file_config.preset!r}), "
            f"but the model grid is nx={config.nx}, ny={config.ny}, Lx={config.Lx:g}, "
            f"Ly={config.Ly:g} (preset {config.preset!r}): use a state made for this grid"
        )
    return natural


def data_path(preset, kind):
    """Return the path of a shipped state: ``kind`` is ``"spunup"`` or ``"background"``."""
    if kind not in ("spunup", "background"):
        raise ValueError(f"kind {kind!r} is invalid: use 'spunup' or 'background'")
    return os.path.join(os.path.dirname(__file__), "data", f"{preset}_{kind}.npz")


def _load_shipped(preset, kind):
    from shallow_water.config import get_config

    config = get_config(preset)
    path = data_path(preset, kind)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"no shipped {kind} state for preset {preset!r} ({path}): "
            f"create it with `nnpc spinup --preset {preset} --out {path}`"
        )
    return load_state(path, config)


def load_spunup_state(preset):
    """Return the shipped spun-up state of ``preset`` in natural ordering, shape (n,).

    The flow after the spin-up of :func:`shallow_water.spinup.spin_up` from
    rest; ``model.from_natural(state)`` makes it a Vec.
    """
    return _load_shipped(preset, "spunup")


def load_background_state(preset):
    """Return the shipped background state of ``preset`` in natural ordering, shape (n,).

    The time mean of daily states over a run that follows the spin-up (see
    :func:`shallow_water.spinup.time_mean`).
    """
    return _load_shipped(preset, "background")
