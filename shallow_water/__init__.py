"""Reduced-gravity shallow-water double gyre with tangent-linear and adjoint models.

``get_config(preset)`` gives a :class:`ModelConfig`; :class:`ShallowWaterModel`
runs it on a PETSc DMDA. ``load_spunup_state(preset)`` and
``load_background_state(preset)`` return the shipped states in natural
ordering (η, then u, then v).
"""

from shallow_water.config import ModelConfig, get_config, preset_names
from shallow_water.model import ShallowWaterModel, Trajectory
from shallow_water.state import (
    load_background_state,
    load_spunup_state,
    load_state,
    save_state,
)

__all__ = [
    "ModelConfig",
    "ShallowWaterModel",
    "Trajectory",
    "get_config",
    "load_background_state",
    "load_spunup_state",
    "load_state",
    "preset_names",
    "save_state",
]
