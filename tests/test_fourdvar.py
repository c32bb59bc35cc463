"""Inner KSP, outer loop and cycled twin experiment on the toy model."""

import json
import os

import numpy as np
import pytest

from petsc_nnpc.fourdvar import (
    InnerSolveError,
    InnerSolver,
    TwinConfig,
    TwinExperiment,
    check_symmetric_solver,
    incremental_4dvar,
    inserted_options,
    make_inner_loop_system,
    observe_with_noise,
    perturb,
    solve_inner_loop,
)
from petsc_nnpc.operator import GaussNewtonOperator
from petsc_nnpc.utils import init_petsc
from toy_model import TOY_CONFIG, ToyModel

PETSc = init_petsc()

@pytest.fixture(scope="module")
def model():
    return ToyModel(m=40)


@pytest.fixture(scope="module")
def base(model):
    return model.initial_state(seed=5)


@pytest.fixture
def system(model, base):
    operator = GaussNewtonOperator.from_config(model, TOY_CONFIG)
    truth = perturb(operator, base, 0.5, 7, 0)
    state = perturb(operator, base, 0.5, 7, 1)
    y = observe_with_noise(operator, truth, 7, 3)
    return make_inner_loop_system(model, TOY_CONFIG, state, y, base, truth=truth)


class IndefinitePC:
    """Python PC applying diag(+1, −1, +1, ...), an indefinite preconditioner."""

    def apply(self, pc, x, y):
        values = x.getArray(readonly=True).copy()
        values[1::2] *= -1.0
        y.getArray()[:] = values


# Inner solver.


def test_inner_solver_defaults(system):
    solver = InnerSolver(system.mat)
    ksp = solver.ksp
    rtol, atol, _, max_it = ksp.getTolerances()
    assert ksp.getType() == "cg"
    assert ksp.getPC().getType() == "none"
    assert rtol == 1e-7
    assert max_it == 2000
    assert ksp.getNormType() == PETSc.KSP.NormType.UNPRECONDITIONED
    solver.destroy()


def test_residual_history_recorded(system):
    _, record = solve_inner_loop(system)
    norms = record.residual_norms
    assert record.converged
    assert record.converged_reason == "CONVERGED_RTOL"
    assert len(norms) == record.iterations + 1
    assert norms[0] == pytest.approx(system.rhs.norm(), rel=1e-12)
    assert norms[-1] <= 1e-7 * norms[0]
    assert norms[-2] > 1e-7 * norms[0]
    assert record.true_relative_residual < 1e-6
    assert record.products == record.iterations
    assert record.setup_products == 0
    assert record.norm_type == "unpreconditioned"
    assert record.wall_time >= record.setup_time > 0


def test_cg_solution_equals_dense_solve(model, system):
    solution, record = solve_inner_loop(system, options={"ksp_rtol": 1e-13})
    assert record.converged
    operator = system.operator
    identity = np.eye(model.n)[operator.natural_indices]  # (local_size, n)
    columns = operator.mult_block(identity)  # rows of A in local order, columns in natural order
    dense = np.empty((model.n, model.n))
    dense[operator.natural_indices] = columns
    b = np.empty(model.n)
    b[operator.natural_indices] = system.rhs.getArray()
    reference = np.linalg.solve(dense, b)[operator.natural_indices]
    error = np.abs(solution.getArray() - reference).max()
    assert error <= 1e-9 * np.abs(reference).max()


def test_options_override_defaults(system):
    _, record = solve_inner_loop(system, options={"ksp_max_it": 5})
    assert record.iterations == 5
    assert not record.converged
    assert record.converged_reason == "DIVERGED_MAX_IT"
    assert "maximum number of iterations" in record.reason_text
    assert not PETSc.Options().hasName("ksp_max_it")


def test_prefixed_command_line_options(system):
    database = PETSc.Options()
    database.setValue("inner_ksp_rtol", "1e-3")
    try:
        _, loose = solve_inner_loop(system, prefix="inner_")
    finally:
        database.delValue("inner_ksp_rtol")
    _, tight = solve_inner_loop(system, prefix="inner_")
    assert loose.iterations < tight.iterations
    assert loose.residual_norms[-1] <= 1e-3 * loose.residual_norms[0]


def test_inserted_options_restores_database():
    database = PETSc.Options()
    database.setValue("probe_ksp_rtol", "0.5")
    with inserted_options("probe_", {"ksp_rtol": 1e-2, "ksp_monitor": None}):
        assert database.getReal("probe_ksp_rtol") == 1e-2
        assert database.hasName("probe_ksp_monitor")
    assert database.getReal("probe_ksp_rtol") == 0.5
    assert not database.hasName("probe_ksp_monitor")
    database.delValue("probe_ksp_rtol")


@pytest.mark.parametrize("options, message", [
    ({"pc_type": "sor"}, "-pc_type sor is not symmetric"),
    ({"pc_type": "ilu"}, "-pc_type ilu is not symmetric"),
    ({"ksp_pc_side": "right"}, "preconditioner side is right"),
    ({"ksp_type": "minres", "ksp_pc_side": "symmetric"}, "preconditioner side is symmetric"),
    ({"pc_type": "jacobi"}, "-pc_type jacobi needs matrix entries"),
    ({"ksp_type": "gmres", "pc_type": "sor"}, "-pc_type sor needs matrix entries"),
])
def test_nonsymmetric_preconditioner_rejected(system, options, message):
    with pytest.raises(ValueError, match=message):
        InnerSolver(system.mat, options=options)


def test_symmetric_sor_and_gmres_accepted(system):
    ksp = PETSc.KSP().create()
    ksp.setOperators(system.mat)
    ksp.setType("cg")
    ksp.getPC().setType("sor")
    with inserted_options("", {"pc_sor_symmetric": None}):
        check_symmetric_solver(ksp)
    ksp.setType("gmres")
    check_symmetric_solver(ksp)
    ksp.destroy()


def test_indefinite_preconditioner_reported(system):
    solver = InnerSolver(system.mat)
    pc = solver.ksp.getPC()
    pc.setType("python")
    pc.setPythonContext(IndefinitePC())
    _, record = solver.solve(system.rhs)
    assert not record.converged
    assert record.converged_reason == "DIVERGED_INDEFINITE_PC"
    assert record.reason_text == "the preconditioner is not positive definite"
    x0 = system.state.copy()
    with pytest.raises(InnerSolveError, match="preconditioner is not positive definite"):
        incremental_4dvar(system.operator, x0, system.observations, system.background,
                          solver=solver)
    assert np.array_equal(x0.getArray(), system.state.getArray())
    solver.destroy()


# Outer loop.


def test_cost_decreases_over_outer_loops(system):
    analysis, records, final_cost = incremental_4dvar(
        system.operator, system.state, system.observations, system.background, outer_loops=4
    )
    costs = [record["J"] for record in records] + [final_cost[0]]
    assert len(records) == 4
    for before, after in zip(costs, costs[1:]):
        assert after < before
    for record in records:
        assert record["J"] == pytest.approx(record["J_o"] + record["J_b"], rel=1e-14)
        assert record["converged_reason"] == "CONVERGED_RTOL"
    assert costs[-1] < 0.2 * costs[0]


def test_iteration_cap_still_updates(system):
    analysis, records, final_cost = incremental_4dvar(
        system.operator, system.state, system.observations, system.background,
        options={"ksp_max_it": 3},
    )
    assert records[0]["converged_reason"] == "DIVERGED_MAX_IT"
    assert records[0]["iterations"] == 3
    assert final_cost[0] < records[0]["J"]


def test_outer_loops_validated(system):
    with pytest.raises(ValueError, match="outer_loops = 0"):
        incremental_4dvar(system.operator, system.state, system.observations,
                          system.background, outer_loops=0)


# Twin experiment.

TWIN = TwinConfig(cycles=3, max_steps=8, perturbation=0.5, seed=4)


def test_twin_records(model, base):
    calls = []
    experiment = TwinExperiment(model, TOY_CONFIG, TWIN, base, base)
    records = experiment.run(on_system=lambda *args: calls.append(args[:2]), progress=False)
    assert calls == [(0, 0), (1, 0), (2, 0)]
    assert [record["cycle"] for record in records] == [0, 1, 2]
    for record in records:
        assert 1 <= record["steps"] <= 8
        assert record["J_analysis"] < record["J"]
        assert record["converged_reason"] == "CONVERGED_RTOL"
        assert set(record["rmse_analysis"]) == {"a", "b"}
    # The analysis of one cycle is the next linearization state, so its
    # background term carries over.
    assert records[1]["J_b"] == pytest.approx(records[0]["J_b_analysis"], rel=1e-12)


def test_twin_resumes_after_failure(model, base, tmp_path):
    fresh = TwinExperiment(model, TOY_CONFIG, TWIN, base, base).run(progress=False)

    def fail_at_second_cycle(cycle, outer, operator, mat, b):
        if cycle == 1:
            raise KeyboardInterrupt

    out = str(tmp_path / "twin")
    with pytest.raises(KeyboardInterrupt):
        TwinExperiment(model, TOY_CONFIG, TWIN, base, base, out=out).run(
            on_system=fail_at_second_cycle, progress=False)
    with open(os.path.join(out, "twin.json")) as handle:
        saved = json.load(handle)
    assert saved["cycles_done"] == 1
    assert saved["complete"] is False
    resumed = TwinExperiment(model, TOY_CONFIG, TWIN, base, base, out=out).run(progress=False)
    assert [r["J"] for r in resumed] == pytest.approx([r["J"] for r in fresh], rel=1e-12)
    assert [r["iterations"] for r in resumed] == [r["iterations"] for r in fresh]
    with open(os.path.join(out, "twin.json")) as handle:
        assert json.load(handle)["complete"] is True


def test_twin_rejects_other_run(model, base, tmp_path):
    out = str(tmp_path / "twin")
    TwinExperiment(model, TOY_CONFIG, TwinConfig(cycles=1, max_steps=2), base, base,
                   out=out).run(progress=False)
    other = TwinConfig(cycles=1, max_steps=2, seed=9)
    with pytest.raises(ValueError, match="belongs to another twin experiment"):
        TwinExperiment(model, TOY_CONFIG, other, base, base, out=out).run(progress=False)


@pytest.mark.parametrize("fields, message", [
    (dict(cycles=0), "cycles = 0"),
    (dict(min_steps=5, max_steps=2), "max_steps = 2 is below min_steps = 5"),
    (dict(perturbation=-1.0), "perturbation = -1.0"),
    (dict(first_guess="truth"), "first_guess = 'truth'"),
])
def test_twin_config_validated(fields, message):
    with pytest.raises(ValueError, match=message):
        TwinConfig(**fields)


def test_first_twin_system_matches_cycle_zero(model, base):
    from petsc_nnpc.fourdvar import first_twin_system

    seen = {}

    def keep_rhs(cycle, outer, operator, mat, b):
        seen.setdefault((cycle, outer), b.getArray().copy())

    TwinExperiment(model, TOY_CONFIG, TWIN, base, base).run(on_system=keep_rhs, progress=False)
    system = first_twin_system(model, TOY_CONFIG, TWIN, base, base)
    np.testing.assert_array_equal(system.rhs.getArray(), seen[(0, 0)])
