"""``nnpc generate``: write the training set ``(x_i, Z_i, A_{x_i} Z_i)`` of a preset."""

import logging

NAME = "generate"
HELP = (
    "generate the training set: a chain of model states and, for each, A_x Z for k "
    "Gaussian vectors; resumes an interrupted run in the same --out folder"
)

log = logging.getLogger("petsc_nnpc.commands.generate")


def add_arguments(parser):
    parser.add_argument("--preset", default="small", help="model preset: tiny, small or paper (default: small)")
    parser.add_argument("--out", required=True, help="data folder (created; an existing one is resumed)")
    parser.add_argument("--states", type=int, default=None,
                        help="number of states N (default: 32 tiny, 96 small, 1000 paper)")
    parser.add_argument("--k", type=int, default=None,
                        help="Gaussian probe vectors per state (default: 32 tiny and small, 100 paper)")
    parser.add_argument("--seed", type=int, default=0, help="root seed of every random number (default: 0)")
    parser.add_argument("--form", choices=("paper", "bhalf"), default="paper",
                        help="operator: A_x itself (paper) or I + B^1/2 G^T R^-1 G B^1/2 (bhalf)")
    parser.add_argument("--shard-size", type=int, default=None, help="samples per shard file")
    parser.add_argument("--lead-min", type=int, default=None,
                        help="minimum lead time between states, in model steps (default: one window)")
    parser.add_argument("--lead-max", type=int, default=None,
                        help="maximum lead time between states, in model steps (default: three windows)")
    parser.add_argument("--perturbation", type=float, default=None,
                        help="perturbation added before each advance, relative to each variable's "
                             "spatial standard deviation (default: 0.01)")
    parser.add_argument("--initial", default=None, metavar="FILE",
                        help="state file (.npz) that starts the chain (default: the preset's shipped spun-up state)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args, petsc_args):
    from petsc4py import PETSc

    from petsc_nnpc.dataset import (
        DatasetError,
        GenerationConfig,
        build_problem,
        generate_dataset,
        initial_state,
    )

    try:
        model, operator, da_config = build_problem(args.preset, form=args.form, comm=PETSc.COMM_WORLD)
        config = GenerationConfig.for_preset(
            args.preset, model.config.window_steps,
            form=args.form, states=args.states, k=args.k, seed=args.seed,
            shard_size=args.shard_size, lead_min=args.lead_min, lead_max=args.lead_max,
            perturbation=args.perturbation,
        )
    except ValueError as error:
        raise SystemExit(f"nnpc generate: {error}") from None
    # Rank 0 reads the first state; a missing or invalid file stops every rank.
    x0 = error = None
    if model.comm.getRank() == 0:
        try:
            x0 = initial_state(args.preset, args.initial)
        except (OSError, ValueError) as caught:
            error = str(caught)
    error = model.comm.tompi4py().bcast(error, root=0)
    if error is not None:
        raise SystemExit(f"nnpc generate: {error}")
    extra = {"model": model.config.to_dict(), "da": da_config.to_dict(),
             "initial_state": args.initial or "shipped spun-up state"}
    log.info(
        "training set for preset %s (%s form): %d states, k = %d, on %d ranks",
        args.preset, args.form, config.states, config.k, model.comm.getSize(),
    )
    try:
        computed = generate_dataset(model, operator, config, args.out, x0, extra=extra,
                                    progress=not args.no_progress)
    except (DatasetError, MemoryError) as caught:
        raise SystemExit(f"nnpc generate: {caught}") from None
    log.info("%s: %d samples computed, %d in the set", args.out, computed, config.states)
    return 0
