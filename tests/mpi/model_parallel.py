"""Run the shallow-water model on the current ranks and write comparable results.

Usage: ``mpiexec -n P python model_parallel.py OUT.npz``. Two cases run:
the ``tiny`` preset from its spun-up state, and an odd 7 × 5 grid, each with
both kernel backends. For each, rank 0 writes the forward, tangent-linear
and adjoint results in natural ordering, under keys ``CASE_BACKEND_RUN``.
It also writes the worst dot-product error of the adjoint over one step and
over the window.
"""

import dataclasses
import sys

import numpy as np
from petsc4py import PETSc

from shallow_water import ShallowWaterModel, checks, get_config
from shallow_water.model import BACKENDS
from shallow_water.state import load_spunup_state


def cases():
    tiny = get_config("tiny")
    yield "tiny", tiny, load_spunup_state("tiny")
    odd = dataclasses.replace(tiny, nx=7, ny=5, window_steps=3)
    rng = np.random.default_rng(21)
    yield "odd", odd, rng.standard_normal(odd.n) * np.where(np.arange(odd.n) < 35, 50.0, 1.0)


def main(out):
    results = {}
    for case, config, state in cases():
        for backend in BACKENDS:
            name = f"{case}_{backend}"
            model = ShallowWaterModel(config, comm=PETSc.COMM_WORLD, backend=backend)
            x = model.from_natural(state)
            traj = model.linearize(x)
            directions = checks.random_directions(model, seed=4, k=2)
            results[f"{name}_forward"] = model.to_natural(traj.final)
            results[f"{name}_tl"] = model.layout.gather(model.tl(traj, directions), to_all=True)
            results[f"{name}_adjoint"] = model.layout.gather(model.adjoint(traj, directions), to_all=True)
            results[f"{name}_adjoint_error_window"] = checks.adjoint_test(model, traj, seed=6, k=3)
            one_step = ShallowWaterModel(
                dataclasses.replace(config, window_steps=1), comm=PETSc.COMM_WORLD, backend=backend
            )
            results[f"{name}_adjoint_error_step"] = checks.adjoint_test(
                one_step, one_step.linearize(x), seed=8, k=3
            )
    if PETSc.COMM_WORLD.getRank() == 0:
        np.savez(out, ranks=PETSc.COMM_WORLD.getSize(), **results)
        print(f"wrote {out} from {PETSc.COMM_WORLD.getSize()} ranks")


if __name__ == "__main__":
    main(sys.argv[1])
