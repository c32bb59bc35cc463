"""Console script ``nnpc``: one subcommand per module of :mod:`petsc_nnpc.commands`.

Each command module defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and
``run(args, petsc_args) -> int``. Arguments that argparse does not know and
that start with a single dash are handed to PETSc's options database, so
``nnpc evaluate ... -ksp_monitor -log_view`` works as with any PETSc program.
"""

import argparse
import difflib
import importlib
import logging
import sys

# Order in which the subcommands are listed by ``nnpc --help``.
COMMAND_MODULES = (
    "spinup",
    "check_model",
    "generate",
    "train",
    "evaluate",
    "experiment",
    "inspect",
)


def _load_commands():
    commands = []
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"petsc_nnpc.commands.{name}")
        except ModuleNotFoundError as error:
            if error.name == f"petsc_nnpc.commands.{name}":
                continue  # command not built in this version
            raise
        commands.append(module)
    return commands


def split_petsc_arguments(argv, parser):
    """Split ``argv`` into the arguments of ``parser`` and PETSc options.

    PETSc options start with one dash followed by a letter and may take one
    value that does not itself start with a dash (``-ksp_rtol 1e-7``).
    """
    known, unknown = parser.parse_known_args(argv)
    # Report a wrong argument with the usage of the subcommand it was given to.
    owner = getattr(parser, "subcommand_parsers", {}).get(getattr(known, "command", None), parser)
    petsc_args = []
    index = 0
    while index < len(unknown):
        item = unknown[index]
        if not (item.startswith("-") and not item.startswith("--") and len(item) > 1):
            owner.error(f"unrecognized argument: {item}{_suggestion(owner, item)}")
        petsc_args.append(item)
        if index + 1 < len(unknown) and not _is_option(unknown[index + 1]):
            petsc_args.append(unknown[index + 1])
            index += 1
        index += 1
    return known, petsc_args


def _suggestion(parser, item):
    """Return " (did you mean --x?)" for the option of ``parser`` closest to ``item``, or ""."""
    name = item.split("=", 1)[0]
    choices = [option for action in parser._actions for option in action.option_strings
               if option.startswith("--")]
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.75)
    return f" (did you mean {close[0]}?)" if close else ""


def _is_option(token):
    if not token.startswith("-") or len(token) < 2:
        return False
    try:
        float(token)
    except ValueError:
        return True
    return False


def build_parser(commands):
    parser = argparse.ArgumentParser(
        prog="nnpc",
        description=(
            "Learned limited-memory preconditioners for the 4D-Var inner loop. "
            "Options starting with a single dash are passed to PETSc."
        ),
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    parser.subcommand_parsers = {}
    for module in commands:
        sub = subparsers.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.add_arguments(sub)
        sub.set_defaults(_module=module)
        parser.subcommand_parsers[module.NAME] = sub
    return parser


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = _load_commands()
    parser = build_parser(commands)
    args, petsc_args = split_petsc_arguments(argv, parser)
    if args.command is None:
        parser.print_help()
        return 2

    from petsc_nnpc.utils import init_petsc, setup_logging

    setup_logging(verbose=args.verbose)
    init_petsc(petsc_args)
    try:
        return int(args._module.run(args, petsc_args) or 0)
    except (ValueError, FileNotFoundError, ImportError) as error:
        # Bad input or a missing file or package: one line instead of a
        # traceback, which -v shows. Under mpiexec every failing rank prints it.
        if args.verbose:
            raise
        raise SystemExit(f"nnpc {args.command}: error: {error}") from None
    except KeyboardInterrupt:
        logging.getLogger("petsc_nnpc").error(
            "interrupted; what was written before is kept, and the same command resumes from it")
        return 130


if __name__ == "__main__":
    sys.exit(main())
