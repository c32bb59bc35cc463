"""LMP PC types with a real checkpoint and the real Gauss-Newton operator on ``tiny``."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from petsc4py import PETSc

import petsc_nnpc  # noqa: F401  (registers the PC types)
from lmp_helpers import clear_options, make_ksp, solve, true_relative_residual
from petsc_nnpc import fourdvar, network

RANK = 8


@pytest.fixture(autouse=True)
def clean_options():
    clear_options("pc_")
    yield
    clear_options("pc_")


@pytest.fixture(scope="module")
def system():
    return fourdvar.build_inner_loop_system("tiny", seed=0)


@pytest.fixture(scope="module")
def checkpoint(system, tmp_path_factory):
    torch.manual_seed(0)
    grid_shape = tuple(system.operator.grid_shape)
    config = network.NetworkConfig(grid_shape=grid_shape, rank=RANK, sigmoid_scale=2.0e4)
    model = network.EigenpairNetwork(config)
    folder = tmp_path_factory.mktemp("nnpc") / "model"
    network.save_checkpoint(folder, model, {"preset": "tiny", "form": system.operator.form})
    return str(folder)


def test_checkpoint_loads_and_solves(system, checkpoint):
    options = PETSc.Options()
    options["pc_nnpc_model"] = checkpoint
    options["pc_nnpc_mu"] = "max"
    ksp = make_ksp(system.mat, "nnpc")
    ksp.setFromOptions()
    x, its, reason = solve(ksp, system.rhs)
    context = ksp.getPC().getPythonContext()
    assert reason > 0
    assert true_relative_residual(system.mat, system.rhs, x) < 1e-6
    assert context.lmp.rank == RANK
    assert context.predictor_rank == RANK
    assert context.setup_count == 1


def test_checkpoint_rank_too_large(system, checkpoint):
    options = PETSc.Options()
    options["pc_nnpc_model"] = checkpoint
    options["pc_nnpc_rank"] = RANK + 1
    ksp = make_ksp(system.mat, "nnpc")
    ksp.setFromOptions()
    with pytest.raises(ValueError, match=f"provides {RANK} eigenpairs"):
        solve(ksp, system.rhs)


def test_checkpoint_refined_pairs(system, checkpoint):
    options = PETSc.Options()
    options["pc_nnpc_model"] = checkpoint
    options["pc_nnpc_refine"] = None
    ksp = make_ksp(system.mat, "nnpc")
    ksp.setFromOptions()
    ksp.setUp()
    context = ksp.getPC().getPythonContext()
    assert context.parameters["refine"] is True
    assert context.setup_products == RANK
    assert np.all(np.diff(context.lmp.lam) <= 0)


def test_pc_type_from_command_line():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    command = [
        sys.executable, os.path.join(root, "examples", "solve_inner_loop.py"),
        "-preset", "tiny", "-pc_type", "lmpexact", "-pc_lmpexact_rank", "30",
        "-pc_lmpexact_mu", "spectral", "-ksp_view",
    ]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=120,
                               env=dict(os.environ, OMP_NUM_THREADS="1"), check=False)
    assert completed.returncode == 0, completed.stderr
    assert "type: lmpexact" in completed.stdout
    assert "LMPExact: spectral LMP" in completed.stdout
    assert "rank: 30" in completed.stdout
    assert "spectral: theta = mu^2 = lambda_(r+1)" in completed.stdout
    assert "CONVERGED_RTOL" in completed.stdout
