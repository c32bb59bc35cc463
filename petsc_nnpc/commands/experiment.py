"""``nnpc experiment``: the whole study of a preset, resumable stage by stage."""

import logging

NAME = "experiment"
HELP = (
    "run the whole study on a preset: spin-up, background, training set, training, "
    "cycled twin experiment with every preconditioner, report"
)

logger = logging.getLogger("petsc_nnpc.experiment")


def add_common_arguments(parser):
    """Add the options shared by ``experiment`` and ``evaluate``."""
    parser.add_argument("--preset", default="small",
                        help="model and study preset: tiny, small (default) or paper")
    parser.add_argument("--out", required=True, help="output folder (created if missing)")
    parser.add_argument("--forms", default=None,
                        help="comma-separated forms compared with every preconditioner: "
                             "paper (CG on A_x, default) and/or bhalf (after the change of "
                             "variable v = B^-1/2 dx)")
    parser.add_argument("--cycles", type=int, default=None, help="twin-experiment cycles")
    parser.add_argument("--ranks", default=None,
                        help="comma-separated ranks r of the compared LMPs")
    parser.add_argument("--mus", default=None,
                        help="comma-separated values of -pc_nnpc_mu (numbers, min, max, spectral)")
    parser.add_argument("--seed", type=int, default=None, help="seed of every random draw")
    parser.add_argument("--device", default=None,
                        help="torch device for training and inference: cpu, cuda or cuda:N")
    parser.add_argument("--force", action="store_true",
                        help="redo every stage, even those a previous run finished")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def add_arguments(parser):
    add_common_arguments(parser)
    parser.add_argument("--states", type=int, default=None, help="training states N")
    parser.add_argument("--k", type=int, default=None, help="probe vectors per training state")
    parser.add_argument("--rank", type=int, default=None, dest="train_rank",
                        help="eigenpairs predicted by the network")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs")


def _split(text, convert=str):
    if text is None:
        return None
    return tuple(convert(item.strip()) for item in text.split(",") if item.strip())


def config_from_args(args):
    """Return the :class:`~petsc_nnpc.experiment.ExperimentConfig` that ``args`` ask for."""
    from petsc_nnpc.experiment import experiment_config

    overrides = {
        "forms": _split(args.forms),
        "cycles": args.cycles,
        "ranks": _split(args.ranks, int),
        "mus": _split(args.mus),
        "seed": args.seed,
        "device": args.device,
    }
    for name in ("states", "k", "train_rank", "epochs"):
        if hasattr(args, name):
            overrides[name] = getattr(args, name)
    return experiment_config(args.preset, **overrides)


def check_device(device, command="experiment"):
    """Raise when ``device`` names a CUDA device that torch cannot see."""
    if device is None or not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        raise SystemExit(
            f"nnpc {command}: error: --device {device} requested but torch sees no CUDA device "
            "on this machine; use --device cpu"
        )


def run_study(args, function):
    """Build the configuration from ``args``, run ``function(config)`` and log the report path.

    Returns the exit status: 0, or 1 when a stage failed (its error is logged).
    """
    from petsc_nnpc.experiment import ExperimentError

    try:
        config = config_from_args(args)
    except ValueError as error:
        raise SystemExit(f"nnpc {args.command}: error: {error}") from None
    check_device(config.device, args.command)
    try:
        report = function(config)
    except ExperimentError as error:
        logger.error("%s", error)
        return 1
    logger.info("report written to %s", report)
    return 0


def run(args, petsc_args):
    from petsc_nnpc.experiment import run_experiment

    return run_study(args, lambda config: run_experiment(
        config, args.out, force=args.force, progress=not args.no_progress))
