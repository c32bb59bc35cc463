"""``nnpc train``: train the eigenpair network on a data folder, or online."""

import logging

NAME = "train"
HELP = (
    "train the eigenpair network on a data folder (nnpc generate) or online while the "
    "samples are generated; resumes an interrupted run in the same --out folder"
)

log = logging.getLogger("petsc_nnpc.commands.train")


def add_arguments(parser):
    parser.add_argument("--preset", default="small", help="model preset: tiny, small or paper (default: small)")
    parser.add_argument("--data", default=None, help="data folder written by `nnpc generate` (not with --online)")
    parser.add_argument("--out", required=True,
                        help="output folder: model/ (the checkpoint), metrics.csv, state/ for resuming")
    parser.add_argument("--online", action="store_true",
                        help="generate samples while training, keeping at most --buffer of them in memory")
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda or cuda:N (default: cpu)")
    parser.add_argument("--epochs", type=int, default=20, help="training epochs (default: 20)")
    parser.add_argument("--rank", type=int, default=None,
                        help="eigenpairs r the network predicts (default: 64 tiny, 256 small, 2000 paper)")
    parser.add_argument("--batch-size", type=int, default=4, help="states per optimizer step (default: 4)")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate (default: 2e-3)")
    parser.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay (default: 1e-4)")
    parser.add_argument("--loss", choices=("relative", "absolute"), default="relative",
                        help="training loss: Frobenius error relative to ||A_x||_F^2, or absolute")
    parser.add_argument("--val-fraction", type=float, default=0.2,
                        help="fraction of the states (the chain's last) held out for validation (default: 0.2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of initialisation and batch order (default: 0)")
    parser.add_argument("--sigmoid-scale", type=float, default=None,
                        help="M of the scaled sigmoid, an upper bound of the eigenvalues "
                             "(default: twice the largest Nystrom eigenvalue of the training states)")
    parser.add_argument("--width", type=int, default=None, help="network channels at full resolution")
    parser.add_argument("--depth", type=int, default=None, help="network downsampling levels")
    parser.add_argument("--head-channels", type=int, default=None,
                        help="hidden channels of the vector head (default: min(max(2 width, r), 1024))")
    parser.add_argument("--init-eigenpairs", default=None, metavar="FILE",
                        help="start from the eigenpairs in FILE (.npz with U (n, r) in natural "
                             "ordering and lam (r,)), e.g. the exact leading eigenpairs at the "
                             "background state; the network then learns their state dependence")
    online = parser.add_argument_group("online mode")
    online.add_argument("--form", choices=("paper", "bhalf"), default="paper",
                        help="operator form of the generated samples (default: paper)")
    online.add_argument("--k", type=int, default=None, help="probe vectors per state")
    online.add_argument("--states-per-epoch", type=int, default=8, help="new states per epoch (default: 8)")
    online.add_argument("--buffer", type=int, default=64, help="training samples kept in memory (default: 64)")
    online.add_argument("--val-states", type=int, default=8, help="validation states drawn first (default: 8)")
    online.add_argument("--initial", default=None, metavar="FILE",
                        help="state file that starts the chain (default: the shipped spun-up state)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def run(args, petsc_args):
    from petsc_nnpc.dataset import DatasetError
    from petsc_nnpc.network import CheckpointError, DeviceError
    from petsc_nnpc.train import TrainConfig, train_from_folder

    overrides = {"width": args.width, "depth": args.depth, "head_channels": args.head_channels}
    try:
        config = TrainConfig(
            epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
            weight_decay=args.weight_decay, val_fraction=args.val_fraction, loss=args.loss,
            seed=args.seed, device=args.device, sigmoid_scale=args.sigmoid_scale,
            init_eigenpairs=args.init_eigenpairs,
        )
        if args.online:
            if args.data is not None:
                raise SystemExit("nnpc train: --data and --online exclude each other; give one")
            summary = _run_online(args, config, overrides)
        else:
            if args.data is None:
                raise SystemExit("nnpc train: --data DIR is missing (or use --online)")
            summary = train_from_folder(args.data, args.out, args.preset, config, rank=args.rank,
                                        network_overrides=overrides, progress=not args.no_progress)
    except (DatasetError, CheckpointError, DeviceError, MemoryError, FloatingPointError,
            ValueError) as error:
        raise SystemExit(f"nnpc train: {error}") from None
    if summary is not None:
        log.info(
            "validation unexplained variance %.4g -> %.4g (best %.4g) after %d epochs; model in %s",
            summary["initial_val_loss"], summary["final_val_loss"], summary["best_val_loss"],
            summary["epochs"], summary["model"],
        )
        log.info("use it with: -pc_type nnpc -pc_nnpc_model %s", summary["model"])
    return 0


def _run_online(args, config, overrides):
    from petsc4py import PETSc

    from petsc_nnpc.dataset import GenerationConfig, initial_state
    from petsc_nnpc.train import train_online
    from shallow_water.config import get_config

    comm = PETSc.COMM_WORLD
    generation = GenerationConfig.for_preset(
        args.preset, get_config(args.preset).window_steps, form=args.form, k=args.k, seed=args.seed,
    )
    x0 = error = None
    if comm.getRank() == 0:
        try:
            x0 = initial_state(args.preset, args.initial)
        except (OSError, ValueError) as caught:
            error = str(caught)
    error = comm.tompi4py().bcast(error, root=0)
    if error is not None:
        raise SystemExit(f"nnpc train: {error}")
    return train_online(
        args.out, args.preset, config, generation, x0, rank=args.rank,
        states_per_epoch=args.states_per_epoch, capacity=args.buffer,
        validation_states=args.val_states, network_overrides=overrides, comm=comm,
        progress=not args.no_progress,
    )
