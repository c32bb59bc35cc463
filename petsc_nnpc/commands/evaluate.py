"""``nnpc evaluate``: the cycled twin experiment over a set of preconditioners."""

from petsc_nnpc.commands.experiment import add_common_arguments, run_study

NAME = "evaluate"
HELP = (
    "solve every inner loop of a cycled twin experiment with each preconditioner "
    "(none, nnpc, lmpexact, lmpnystrom, lmpritz, static LMP) and write the report"
)


def add_arguments(parser):
    add_common_arguments(parser)
    parser.add_argument("--model", required=True,
                        help="checkpoint folder of the network for the first form, "
                             "as written by 'nnpc train' (its 'model' subfolder)")
    parser.add_argument("--model-bhalf", default=None,
                        help="checkpoint of the network trained on the bhalf form, "
                             "when --forms lists bhalf after paper")


def run(args, petsc_args):
    from petsc_nnpc.experiment import run_evaluation

    def evaluate(config):
        models = {config.forms[0]: args.model}
        if args.model_bhalf is not None:
            models["bhalf"] = args.model_bhalf
        return run_evaluation(config, args.out, models, force=args.force,
                              progress=not args.no_progress)

    return run_study(args, evaluate)
