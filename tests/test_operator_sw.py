"""Gauss-Newton operator and 4D-Var on the shallow-water ``tiny`` preset.

The tiny grid (10 × 10 cells, n = 280) is small enough for a dense
reference of ``A_x``, built from TL runs only, to check the shell matrix.
"""

import json
import os

import numpy as np
import pytest

from conftest import REPO_ROOT, run_mpi
from petsc_nnpc.fourdvar import build_inner_loop_system, incremental_4dvar, solve_inner_loop
from petsc_nnpc.utils import init_petsc

PETSc = init_petsc()


@pytest.fixture(scope="module")
def system():
    return build_inner_loop_system("tiny", seed=1)


@pytest.fixture(scope="module")
def dense(system):
    """Dense ``G_xᵀ R⁻¹ G_x + B⁻¹`` in natural ordering from one batched TL run."""
    operator = system.operator
    model = system.model
    n = model.n
    identity = np.eye(n)[operator.natural_indices]  # (local_size, n)
    tl = model.tl(operator.trajectory, identity)  # (local_size, n)
    G = np.empty((operator.observations.p, n))
    G[operator.observations.local_obs_index] = operator.observations.observe_local(tl)
    sigma = np.empty(n)
    sigma[operator.natural_indices] = operator.background_error.sigma
    return G.T @ G / operator.observations.sigma_o**2 + np.diag(1.0 / sigma**2)


def natural_vec(system, natural):
    vec = system.model.create_state()
    vec.getArray()[:] = np.asarray(natural)[system.operator.natural_indices]
    return vec


def test_tiny_system_layout(system):
    operator = system.operator
    assert operator.n == 280
    assert operator.grid_shape == (10, 10)
    assert operator.observations.p == 100
    assert np.array_equal(operator.observations.indices, np.arange(100))
    assert system.mat.query("nnpc_state") is not None


def test_tiny_operator_symmetric(system):
    rng = np.random.default_rng(41)
    for _ in range(3):
        u = natural_vec(system, rng.standard_normal(280))
        v = natural_vec(system, rng.standard_normal(280))
        Au, Av = u.duplicate(), v.duplicate()
        system.mat.mult(u, Au)
        system.mat.mult(v, Av)
        assert abs(Au.dot(v) - u.dot(Av)) <= 1e-12 * abs(Au.dot(v))


def test_tiny_operator_positive(system):
    rng = np.random.default_rng(42)
    sigma = system.operator.background_error.sigma
    for _ in range(5):
        u = natural_vec(system, rng.standard_normal(280))
        Au = u.duplicate()
        system.mat.mult(u, Au)
        assert Au.dot(u) >= np.sum(u.getArray() ** 2 / sigma**2) * (1 - 1e-12)


def test_tiny_probe_equals_dense(system, dense):
    e, column = system.mat.createVecs()
    natural = system.operator.natural_indices
    probed = np.empty((280, 280))
    for j in range(280):
        e.getArray()[:] = (natural == j).astype(float)
        system.mat.mult(e, column)
        probed[natural, j] = column.getArray()
    assert np.abs(probed - dense).max() <= 1e-12 * np.abs(dense).max()


def test_tiny_block_equals_single_products(system):
    rng = np.random.default_rng(43)
    operator = system.operator
    Z = rng.standard_normal((operator.local_size, 4))  # (local_size, k)
    before = operator.products
    block = operator.mult_block(Z)
    assert operator.products - before == 4
    v, w = system.mat.createVecs()
    for j in range(4):
        v.getArray()[:] = Z[:, j]
        system.mat.mult(v, w)
        assert np.abs(block[:, j] - w.getArray()).max() <= 1e-12 * np.abs(block).max()


def test_tiny_cg_equals_dense_solve(system, dense):
    natural = system.operator.natural_indices
    b = np.empty(280)
    b[natural] = system.rhs.getArray()
    reference = np.linalg.solve(dense, b)
    x = np.empty(280)

    # Default tolerance: the residual meets it, and the error is bounded by
    # cond(A) · 1e-7, about 4e-2 here; it comes out near 1e-4.
    solution, record = solve_inner_loop(system)
    assert record.converged_reason == "CONVERGED_RTOL"
    x[natural] = solution.getArray()
    assert np.linalg.norm(b - dense @ x) <= 1.01e-7 * np.linalg.norm(b)
    assert np.linalg.norm(x - reference) <= 1e-3 * np.linalg.norm(reference)

    # A tight tolerance reaches the dense solution.
    solution, record = solve_inner_loop(system, options={"ksp_rtol": 1e-13})
    assert record.converged
    x[natural] = solution.getArray()
    assert np.linalg.norm(x - reference) <= 1e-7 * np.linalg.norm(reference)


def test_tiny_bhalf_form(system, dense):
    bhalf = build_inner_loop_system("tiny", form="bhalf", seed=1)
    paper_solution, _ = solve_inner_loop(system, options={"ksp_rtol": 1e-10})
    bhalf_solution, record = solve_inner_loop(bhalf, options={"ksp_rtol": 1e-10})
    increment = bhalf.operator.increment(bhalf_solution)
    scale = np.abs(paper_solution.getArray()).max()
    assert np.abs(increment.getArray() - paper_solution.getArray()).max() <= 1e-6 * scale
    # The B^1/2 form is far better conditioned than A_x itself.
    _, paper_record = solve_inner_loop(system)
    _, bhalf_record = solve_inner_loop(bhalf)
    assert bhalf_record.iterations < paper_record.iterations


def test_tiny_cost_decreases_over_outer_loops(system):
    _, records, final_cost = incremental_4dvar(
        system.operator, system.state, system.observations, system.background, outer_loops=2,
        options={"ksp_rtol": 1e-5})
    costs = [record["J"] for record in records] + [final_cost[0]]
    assert costs[1] < costs[0]
    assert costs[2] < costs[1]
    # restore the linearization at the system's state for the other tests
    system.operator.linearize(system.state)


def run_ranks(nprocs, form):
    script = os.path.join(REPO_ROOT, "tests", "mpi", "operator_ranks.py")
    completed = run_mpi(script, nprocs, "tiny", form, timeout=180)
    return json.loads(completed.stdout.strip().splitlines()[-1])


@pytest.mark.mpi
def test_tiny_bhalf_same_on_1_and_2_ranks():
    one, two = run_ranks(1, "bhalf"), run_ranks(2, "bhalf")
    assert two["ranks"] == 2
    assert two["symmetry"] <= 1e-12
    np.testing.assert_allclose(two["Au"], one["Au"], rtol=0, atol=1e-12 * np.abs(one["Au"]).max())
    assert two["iterations"] == one["iterations"]
    assert two["outer_iterations"] == one["outer_iterations"]
    np.testing.assert_allclose(two["residual_norms"], one["residual_norms"], rtol=1e-10)
    np.testing.assert_allclose(two["J"], one["J"], rtol=1e-10)


@pytest.mark.mpi
def test_tiny_paper_form_on_1_and_2_ranks():
    one, two = run_ranks(1, "paper"), run_ranks(2, "paper")
    assert two["symmetry"] <= 1e-12
    np.testing.assert_allclose(two["Au"], one["Au"], rtol=0, atol=1e-12 * np.abs(one["Au"]).max())
    # A_x is ill-conditioned here, and the rank count changes the summation
    # order of dot products. CG amplifies that round-off by orders of
    # magnitude within a few iterations once the residual has fallen by
    # about 1e-3. The two runs agree to round-off until then, and their
    # iteration counts end within 15% of each other.
    first = np.array(one["residual_norms"])
    second = np.array(two["residual_norms"])
    agree = int(np.argmax(first <= 1e-3 * first[0]))
    assert agree > 10
    np.testing.assert_allclose(second[:agree], first[:agree], rtol=1e-8)
    assert abs(two["iterations"] - one["iterations"]) <= 0.15 * one["iterations"]
    np.testing.assert_allclose(two["J"], one["J"], rtol=1e-6)
