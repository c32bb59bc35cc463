"""Run the cycled 4D-Var twin experiment on a shallow-water preset.

Algorithm 3.1 of Trappler & Vidard, "State-dependent preconditioning for the
inner-loop in Variational Data Assimilation using Machine Learning": a
perturbed truth is advanced by a random number of time steps per cycle and
observed with noise at the end of the window; each cycle runs incremental
4D-Var from the previous analysis, with the inner loop solved by a PETSc KSP
configured from the options (CG, ``rtol 1e-7`` on the unpreconditioned
residual, at most 2000 iterations by default)::

    mpiexec -n 2 .venv/bin/python examples/twin_experiment.py -preset tiny -cycles 3
    mpiexec -n 2 .venv/bin/python examples/twin_experiment.py \\
        -options_file examples/twin_experiment.opts -out runs/twin-tiny

Options of this example:

``-preset tiny|small|paper``      model preset (default ``tiny``)
``-form paper|bhalf``             inner-loop form (default ``paper``)
``-obs_stride S``, ``-obs_indices I,J,...``, ``-obs_sigma S``,
``-bkg_sigma_eta S``, ``-bkg_sigma_u S``, ``-bkg_sigma_v S``
                                  observation network and error standard deviations,
                                  as in examples/solve_inner_loop.py
``-cycles N``                     assimilation cycles (default 3)
``-outer_loops N``                outer loops per cycle (default 1)
``-min_steps N``, ``-max_steps N`` range of the truth's random advance per cycle
                                  (default 1 to the window length in steps)
``-perturbation S``               initial perturbations, as a fraction of σ_b (default 0.2)
``-first_guess analysis|forecast`` next linearization state (default ``analysis``)
``-no_observation_noise``         observe the truth without noise
``-seed N``                       seed of every random draw (default 0)
``-out DIR``                      write ``twin.json`` and a state checkpoint after
                                  every cycle, and resume from them
"""

import sys

from petsc_nnpc.utils import init_petsc, setup_logging

PETSc = init_petsc()

import petsc_nnpc  # noqa: E402,F401  (registers the LMP preconditioner types)
from petsc_nnpc.fourdvar import (  # noqa: E402
    TwinConfig,
    TwinExperiment,
    create_preset_model,
    load_preset_states,
)
from petsc_nnpc.operator import da_config_from_options  # noqa: E402


def main():
    setup_logging()
    options = PETSc.Options()
    preset = options.getString("preset", "tiny")
    da_config = da_config_from_options(preset, options)
    form = da_config.form
    out = options.getString("out", "") or None

    model = create_preset_model(preset)
    twin_config = TwinConfig(
        cycles=options.getInt("cycles", 3),
        outer_loops=options.getInt("outer_loops", 1),
        min_steps=options.getInt("min_steps", 1),
        max_steps=options.getInt("max_steps", model.config.window_steps),
        perturbation=options.getReal("perturbation", 0.2),
        observation_noise=not options.getBool("no_observation_noise", False),
        first_guess=options.getString("first_guess", "analysis"),
        seed=options.getInt("seed", 0),
    )
    base, background = load_preset_states(model)
    experiment = TwinExperiment(model, da_config, twin_config, base, background, out=out)
    records = experiment.run()

    PETSc.Sys.Print(f"twin experiment on preset {preset}, form {form}, n = {model.n}")
    PETSc.Sys.Print(
        f"{'cycle':>5} {'outer':>5} {'steps':>5} {'J':>12} {'J analysis':>12} "
        f"{'iterations':>10} {'rmse eta fg':>11} {'rmse eta an':>11}  reason"
    )
    for record in records:
        eta_first = record["rmse_first_guess"].get("eta", float("nan"))
        eta_analysis = record["rmse_analysis"].get("eta", float("nan"))
        PETSc.Sys.Print(
            f"{record['cycle']:5d} {record['outer']:5d} {record['steps']:5d} "
            f"{record['J']:12.5e} {record['J_analysis']:12.5e} {record['iterations']:10d} "
            f"{eta_first:11.4e} {eta_analysis:11.4e}  {record['converged_reason']}"
        )
    return 0


if __name__ == "__main__":
    try:
        status = main()
    except (ValueError, RuntimeError, FileNotFoundError) as error:
        PETSc.Sys.Print(f"error: {error}", comm=PETSc.COMM_WORLD)
        status = 2
    sys.exit(status)
