"""``nnpc spinup``: spin the shallow-water model up from rest and write the state."""

import logging
import os

NAME = "spinup"
HELP = "spin the shallow-water model up from rest; write the state (.npz) and a PNG of eta, u, v"

log = logging.getLogger("petsc_nnpc.commands.spinup")


def add_arguments(parser):
    from shallow_water.config import preset_names

    parser.add_argument("--preset", default="small", choices=preset_names(),
                        help="model preset: tiny, small or paper (default: small)")
    parser.add_argument("--out", required=True, help="output state file (.npz)")
    parser.add_argument(
        "--days", type=float, default=None,
        help="spin-up length in model days (default: the preset's, e.g. 7 years for paper)",
    )
    parser.add_argument(
        "--start", default=None,
        help="state file to start from instead of rest (e.g. to extend a spin-up)",
    )
    parser.add_argument(
        "--background", default=None, metavar="FILE",
        help="also write the background state: the mean of daily states over --background-days after the spin-up",
    )
    parser.add_argument(
        "--background-days", type=float, default=None,
        help="averaging period of the background state in days (default: the preset's, e.g. 365)",
    )
    parser.add_argument("--png", default=None, help="figure of the state (default: OUT with .png)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args, petsc_args):
    from petsc4py import PETSc

    from shallow_water import ShallowWaterModel, get_config
    from shallow_water.spinup import gyre_diagnostics, plot_state, spin_up, spinup_days, time_mean
    from shallow_water.state import load_state, save_state

    config = get_config(args.preset)
    default_days, default_background_days = spinup_days(args.preset)
    days = default_days if args.days is None else args.days
    background_days = default_background_days if args.background_days is None else args.background_days
    if not args.out.endswith(".npz"):
        raise SystemExit(f"--out {args.out} is invalid: state files end in .npz")

    model = ShallowWaterModel(config, comm=PETSc.COMM_WORLD)
    rank0 = model.comm.getRank() == 0
    x0 = None if args.start is None else load_state(args.start, config)
    checkpoint = args.out[: -len(".npz")] + ".partial.npz"
    log.info(
        "spin-up of preset %s (%d x %d, dt = %g s) for %g days on %d ranks",
        args.preset, config.nx, config.ny, config.dt, days, model.comm.getSize(),
    )
    state = spin_up(model, days, x0=x0, checkpoint=checkpoint, progress=not args.no_progress)
    time = days * 86400.0
    if rank0:
        save_state(args.out, config, state, time=time)
        png = args.png or args.out[: -len(".npz")] + ".png"
        plot_state(png, config, state, title=f"{args.preset}: day {days:g}")
        if os.path.exists(checkpoint):
            os.unlink(checkpoint)
        figures = gyre_diagnostics(config, state)
        log.info(
            "wrote %s and %s: eta in [%.1f, %.1f] m, max speed %.2f m/s, jet u %.3f m/s",
            args.out, png, figures["eta_min"], figures["eta_max"], figures["speed_max"], figures["jet_u"],
        )

    if args.background is not None:
        background = time_mean(model, state, background_days, progress=not args.no_progress)
        if rank0:
            save_state(args.background, config, background, time=time)
            log.info("wrote the background state (mean over %g days) to %s", background_days, args.background)
    return 0
