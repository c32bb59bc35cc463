"""Argument and input errors of the ``nnpc`` console script."""

import subprocess
import sys

import pytest

from petsc_nnpc import cli


def _error(capsys, *argv):
    with pytest.raises(SystemExit) as stop:
        cli.main(list(argv))
    assert stop.value.code == 2
    return capsys.readouterr().err


def test_wrong_option_shows_the_subcommand_usage(capsys):
    message = _error(capsys, "generate", "--out", "unused", "--shard-sise", "4")
    assert "usage: nnpc generate" in message
    assert "unrecognized argument: --shard-sise (did you mean --shard-size?)" in message


def test_unrelated_option_gets_no_suggestion(capsys):
    message = _error(capsys, "inspect", "some.npz", "--bogus")
    assert "usage: nnpc inspect" in message
    assert message.rstrip().endswith("unrecognized argument: --bogus")


def test_wrong_top_level_option(capsys):
    message = _error(capsys, "--quiet")
    assert "usage: nnpc [-h]" in message


def test_petsc_options_pass_through():
    parser = cli.build_parser(cli._load_commands())
    args, petsc = cli.split_petsc_arguments(
        ["inspect", "x.npz", "-ksp_rtol", "1e-7", "-ksp_monitor", "-pc_nnpc_mu", "-1"], parser
    )
    assert args.path == "x.npz"
    assert petsc == ["-ksp_rtol", "1e-7", "-ksp_monitor", "-pc_nnpc_mu", "-1"]


def test_bad_backend_is_one_line():
    completed = subprocess.run(
        [sys.executable, "-m", "petsc_nnpc.cli", "check-model", "--preset", "tiny",
         "-sw_backend", "fortran"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert completed.returncode == 1
    assert "nnpc check-model: error: invalid shallow-water backend 'fortran'" in completed.stderr
    assert "Traceback" not in completed.stderr
