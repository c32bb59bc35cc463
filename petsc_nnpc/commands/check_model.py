"""``nnpc check-model``: adjoint dot-product and Taylor tests of the shallow-water model."""

import dataclasses
import json
import logging

NAME = "check-model"
HELP = "run the adjoint dot-product and Taylor tests of the model on the current ranks"

log = logging.getLogger("petsc_nnpc.commands.check_model")

# Pass thresholds: float64 round-off for the adjoint, second order for Taylor.
ADJOINT_TOLERANCE = 1e-12
TAYLOR_MIN_RATE = 1.9


def add_arguments(parser):
    from shallow_water.config import preset_names

    parser.add_argument("--preset", default="small", choices=preset_names(),
                        help="model preset: tiny, small or paper (default: small)")
    parser.add_argument(
        "--state", default=None,
        help="state file to linearize at (default: the preset's shipped spun-up state)",
    )
    parser.add_argument("--directions", type=int, default=3, help="random pairs in the dot-product test (default: 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random directions (default: 0)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def run(args, petsc_args):
    from petsc4py import PETSc

    from shallow_water import ShallowWaterModel, checks, get_config
    from shallow_water.state import load_spunup_state, load_state

    if args.directions < 1:
        raise SystemExit(f"--directions {args.directions} is invalid: use at least 1")
    config = get_config(args.preset)
    if args.state is not None:
        state = load_state(args.state, config)
    else:
        state = load_spunup_state(args.preset)

    comm = PETSc.COMM_WORLD
    model = ShallowWaterModel(config, comm=comm)
    x = model.from_natural(state)
    one_step = ShallowWaterModel(dataclasses.replace(config, window_steps=1), comm=comm)

    traj = model.linearize(x)
    window_error = checks.adjoint_test(model, traj, seed=args.seed, k=args.directions)
    step_error = checks.adjoint_test(one_step, one_step.linearize(x), seed=args.seed, k=args.directions)
    epsilons, remainders, rate = checks.taylor_test(model, x, traj, seed=args.seed + 100)
    worst = max(window_error, step_error)
    passed = worst <= ADJOINT_TOLERANCE and rate >= TAYLOR_MIN_RATE

    result = {
        "preset": args.preset,
        "ranks": comm.getSize(),
        "backend": model.backend,
        "n": model.n,
        "window_steps": config.window_steps,
        "adjoint_relative_error": worst,
        "adjoint_relative_error_window": window_error,
        "adjoint_relative_error_step": step_error,
        "taylor_rate": rate,
        "taylor_epsilons": [float(eps) for eps in epsilons],
        "taylor_remainders": [float(r) for r in remainders],
        "passed": bool(passed),
    }
    if comm.getRank() == 0:
        if args.json:
            print(json.dumps(result))
        else:
            print(f"model {args.preset}: n = {model.n}, {config.window_steps} steps, {comm.getSize()} ranks, "
                  f"{model.backend} kernels")
            print(f"adjoint dot product, one step   relative error {step_error:.2e}")
            print(f"adjoint dot product, window     relative error {window_error:.2e}")
            print("Taylor test        eps   remainder")
            for eps, remainder in zip(epsilons, remainders):
                print(f"             {eps:9.1e}   {remainder:.3e}")
            print(f"Taylor rate {rate:.3f} (expected 2)")
            print("PASSED" if passed else
                  f"FAILED: adjoint error above {ADJOINT_TOLERANCE:g} or Taylor rate below {TAYLOR_MIN_RATE}")
    if not passed:
        log.error(
            "model check failed: adjoint relative error %.2e (tolerance %g), Taylor rate %.3f (minimum %g)",
            worst, ADJOINT_TOLERANCE, rate, TAYLOR_MIN_RATE,
        )
    return 0 if passed else 1
