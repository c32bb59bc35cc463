"""Solve one inner-loop system of incremental 4D-Var with any PETSc solver options.

The system is the first cycle of the twin experiment on a shallow-water
preset: the Gauss-Newton matrix ``A_x = G_xᵀ R⁻¹ G_x + B⁻¹`` as a shell
matrix and ``b_x`` from noisy observations of a perturbed truth (Trappler &
Vidard, "State-dependent preconditioning for the inner-loop in Variational
Data Assimilation using Machine Learning"). The solver defaults to CG with
``rtol 1e-7`` on the unpreconditioned residual and at most 2000 iterations;
every ``-ksp_*`` and ``-pc_*`` option given on the command line or in an
``-options_file`` comes on top::

    mpiexec -n 2 .venv/bin/python examples/solve_inner_loop.py -preset tiny -ksp_monitor
    mpiexec -n 2 .venv/bin/python examples/solve_inner_loop.py \\
        -options_file examples/solve_inner_loop.opts -pc_type lmpexact

Options of this example:

``-preset tiny|small|paper``  model preset (default ``tiny``)
``-form paper|bhalf``         solve for ``δx`` or for ``v = B^{-1/2} δx`` (default ``paper``)
``-obs_stride S``             observe η at every S-th cell in each direction (preset's default)
``-obs_indices I,J,...``      observe these natural-ordering state entries instead
``-obs_sigma S``              observation-error standard deviation σ_o, in m
``-bkg_sigma_eta S``, ``-bkg_sigma_u S``, ``-bkg_sigma_v S``
                              background-error standard deviations (m, m/s)
``-seed N``                   seed of the perturbations and the noise (default 0)
``-record FILE``              write the solve record as JSON (only if the solve converged)
"""

import json
import sys

from petsc_nnpc.utils import atomic_write_json, init_petsc, setup_logging

PETSc = init_petsc()

import petsc_nnpc  # noqa: E402,F401  (registers the LMP preconditioner types)
from petsc_nnpc.fourdvar import build_inner_loop_system, solve_inner_loop  # noqa: E402
from petsc_nnpc.operator import da_config_from_options  # noqa: E402


def main():
    setup_logging()
    options = PETSc.Options()
    preset = options.getString("preset", "tiny")
    seed = options.getInt("seed", 0)
    record_path = options.getString("record", "")
    da_config = da_config_from_options(preset, options)
    form = da_config.form

    system = build_inner_loop_system(preset, seed=seed, da_config=da_config)
    extra = {} if options.hasName("ksp_converged_reason") else {"ksp_converged_reason": None}
    solution, record = solve_inner_loop(system, options=extra)

    increment = system.operator.increment(solution)
    PETSc.Sys.Print(
        f"preset {preset}, form {form}, n = {system.operator.n}, "
        f"{system.operator.observations.p} observations"
    )
    PETSc.Sys.Print(
        f"{record.iterations} iterations, {record.products} products "
        f"({record.setup_products} in set-up), {record.wall_time:.3f} s; "
        f"|b - A x| / |b| = {record.true_relative_residual:.3e}; |dx| = {increment.norm():.6e}"
    )
    if not record.converged:
        PETSc.Sys.Print(f"not converged: {record.reason_text}")
    if record_path:
        if record.converged:
            if system.model.comm.tompi4py().rank == 0:
                atomic_write_json(record_path, dict(
                    preset=preset, form=form, seed=seed, **record.to_dict()))
        else:
            PETSc.Sys.Print(f"{record_path} not written because the solve did not converge")
    return 0 if record.converged or record.converged_reason == "DIVERGED_MAX_IT" else 1


if __name__ == "__main__":
    try:
        status = main()
    except (ValueError, RuntimeError, FileNotFoundError) as error:
        PETSc.Sys.Print(f"error: {error}", comm=PETSc.COMM_WORLD)
        status = 2
    sys.exit(status)
