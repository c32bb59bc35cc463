"""Reduced-gravity shallow-water double gyre with tangent-linear and adjoint models."""

from shallow_water.config import ModelConfig, get_config, preset_names
from shallow_water.model import ShallowWaterModel, Trajectory

__all__ = [
    "ModelConfig",
    "ShallowWaterModel",
    "Trajectory",
    "get_config",
    "preset_names",
]
