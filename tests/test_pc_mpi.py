"""LMP PC types give the same CG iteration counts on 1 and 2 ranks."""

import json
import os

import pytest

from conftest import run_mpi

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mpi", "pc_iterations.py")


def counts(nprocs):
    completed = run_mpi(SCRIPT, nprocs, timeout=180)
    line = [text for text in completed.stdout.splitlines() if text.startswith("{")][-1]
    return json.loads(line)


@pytest.mark.mpi
def test_iterations_same_on_one_and_two_ranks():
    one = counts(1)
    two = counts(2)
    assert one["iterations"] == two["iterations"]
    for name, residual in two["residuals"].items():
        assert residual < 1e-6, f"{name}: true relative residual {residual:.3g}"
    for message in two["errors"]:
        assert "provides 30 eigenpairs" in message
    none = one["iterations"]["none"]
    for name in ("lmpexact", "lmpnystrom", "nnpc", "nnpc_refine", "lmpritz"):
        assert one["iterations"][name] < none, f"{name} does not beat no preconditioner"
