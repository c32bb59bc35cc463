"""Shared test fixtures: seeded generators and an mpiexec runner."""

import os
import subprocess
import sys

import numpy as np
import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def mpiexec_command(nprocs):
    """Return the mpiexec prefix for ``nprocs`` ranks of this Python.

    Open MPI refuses to run as root without ``--allow-run-as-root`` and more
    ranks than cores without ``--oversubscribe``; both are added as needed.
    """
    command = ["mpiexec", "-n", str(nprocs)]
    implementation = subprocess.run(
        ["mpiexec", "--version"], capture_output=True, text=True, check=False
    ).stdout
    if "Open MPI" in implementation or "OpenRTE" in implementation:
        if os.geteuid() == 0:
            command.append("--allow-run-as-root")
        command.append("--oversubscribe")
    return command + [sys.executable]


def run_mpi(script, nprocs, *args, timeout=300):
    """Run ``script`` (a path) under mpiexec and return the completed process.

    Raises ``AssertionError`` with the script's output when it fails, so that
    a failing rank shows its traceback in the test report.
    """
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    completed = subprocess.run(
        mpiexec_command(nprocs) + [script, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=REPO_ROOT,
        check=False,
    )
    if completed.returncode != 0:
        raise AssertionError(
            f"{script} on {nprocs} ranks exited with {completed.returncode}\n"
            f"stdout:\n{completed.stdout}\nstderr:\n{completed.stderr}"
        )
    return completed


@pytest.fixture
def rng():
    """A seeded numpy generator, the same for every test."""
    return np.random.default_rng(20241204)
