"""Tests of the LMP PC types on a small SPD shell operator with known eigenpairs."""

import os
import subprocess
import sys

import numpy as np
import pytest
from petsc4py import PETSc

import petsc_nnpc  # noqa: F401  (registers the PC types)
from lmp_helpers import (
    FixedPredictor,
    SpectralOperator,
    SpectralProblem,
    StandInPredictor,
    clear_options,
    make_ksp,
    solve,
    true_relative_residual,
)

TESTS = os.path.dirname(os.path.abspath(__file__))
RTOL = 1e-7


@pytest.fixture(autouse=True)
def clean_options():
    clear_options("pc_")
    yield
    clear_options("pc_")


@pytest.fixture(scope="module")
def problem():
    # n = 192, a head decaying from 100 onto a floor of 1: unpreconditioned CG
    # needs about 40 iterations, far fewer than n, so rounding cannot change
    # the counts that the tests compare.
    return SpectralProblem(ny=12, nx=16, lam_max=1.0e2, lam_min=1.0, decay=6.0, seed=3)


@pytest.fixture
def system(problem):
    operator = SpectralOperator(problem)
    A = operator.create_mat()
    operator.linearize(problem.state(0.5))
    b = operator.create_state()
    b.getArray()[:] = np.random.default_rng(12).standard_normal(b.getLocalSize())
    return operator, A, b


def iterations(A, b, pc_type, options=None, predictor=None):
    options = options or {}
    database = PETSc.Options()
    for name, value in options.items():
        database[name] = value
    ksp = make_ksp(A, pc_type)
    if predictor is not None:
        ksp.getPC().getPythonContext().set_predictor(predictor)
    ksp.setFromOptions()
    x, its, reason = solve(ksp, b)
    assert reason > 0, f"{pc_type} diverged with reason {reason}"
    assert true_relative_residual(A, b, x) < 10 * RTOL
    return its, ksp


def test_registered_type_names(system):
    _, A, _ = system
    for name in ("nnpc", "lmpexact", "lmpnystrom", "lmpritz"):
        pc = make_ksp(A, name).getPC()
        assert pc.getType() == name
        assert type(pc.getPythonContext()).__name__.lower().endswith(name.replace("lmp", "")) \
            or name == "nnpc"


def test_python_type_path_works(system):
    _, A, b = system
    PETSc.Options()["pc_python_type"] = "petsc_nnpc.pc.exact.LMPExact"
    its, ksp = iterations(A, b, "python", {"pc_lmpexact_rank": 10})
    PETSc.Options().delValue("pc_python_type")
    assert type(ksp.getPC().getPythonContext()).__name__ == "LMPExact"
    none, _ = iterations(A, b, "none")
    assert its < none


def test_identity_pairs_reproduce_unpreconditioned(system, problem):
    _, A, b = system
    rng = np.random.default_rng(13)
    U, _ = np.linalg.qr(rng.standard_normal((problem.n, 8)))
    none, _ = iterations(A, b, "none")
    identity, _ = iterations(A, b, "nnpc", {"pc_nnpc_mu": 1},
                             predictor=FixedPredictor(U, np.ones(8)))
    assert identity == none


def test_full_rank_exact_pairs_converge_at_once(system, problem):
    _, A, b = system
    its, _ = iterations(A, b, "lmpexact", {"pc_lmpexact_rank": problem.n})
    assert its <= 3


def test_leading_exact_pairs_reduce_iterations(system):
    _, A, b = system
    none, _ = iterations(A, b, "none")
    exact, ksp = iterations(A, b, "lmpexact", {"pc_lmpexact_rank": 20})
    assert exact < 0.8 * none
    context = ksp.getPC().getPythonContext()
    assert context.method_used == "lanczos"
    assert 0 < context.setup_products < 10 * A.getSize()[0]


def test_single_precision_basis(system):
    _, A, b = system
    double, _ = iterations(A, b, "lmpexact", {"pc_lmpexact_rank": 20})
    single, ksp = iterations(A, b, "lmpexact",
                             {"pc_lmpexact_rank": 20, "pc_lmpexact_precision": "single"})
    assert ksp.getPC().getPythonContext().lmp.U.dtype == np.float32
    assert abs(single - double) <= 1


def test_lanczos_finds_the_known_eigenpairs(system, problem):
    operator, A, b = system
    before = operator.products
    its, ksp = iterations(
        A, b, "lmpexact", {"pc_lmpexact_rank": 12, "pc_lmpexact_method": "lanczos"})
    context = ksp.getPC().getPythonContext()
    solve_products = operator.products - before - context.setup_products
    _, lam = problem.eigenpairs(problem.state(0.5))
    assert np.abs(context.lmp.lam / lam[:12] - 1.0).max() < 1e-8
    assert context.largest_residual <= 1e-8 * lam[0]
    # CG spends one product per iteration plus one for the initial residual at most.
    assert its <= solve_products <= its + 1


def test_nystrom_reduces_iterations_and_counts(system):
    _, A, b = system
    none, _ = iterations(A, b, "none")
    its, ksp = iterations(A, b, "lmpnystrom",
                          {"pc_lmpnystrom_rank": 20, "pc_lmpnystrom_sketch": 40})
    assert its < none
    assert ksp.getPC().getPythonContext().setup_products == 40


def test_nnpc_setup_once_per_state(system, problem):
    operator, A, b = system
    predictor = StandInPredictor(problem, rank=20)
    ksp = make_ksp(A, "nnpc")
    context = ksp.getPC().getPythonContext()
    context.set_predictor(predictor)
    ksp.setFromOptions()
    solve(ksp, b)
    solve(ksp, b)
    assert predictor.calls == 1
    assert context.setup_count == 1
    operator.linearize(problem.state(0.7))
    solve(ksp, b)
    assert predictor.calls == 2
    solve(ksp, b)
    assert predictor.calls == 2
    operator.state.getArray()[0] += 1.0
    solve(ksp, b)
    assert predictor.calls == 3


def test_nnpc_exact_network_reduces_iterations(system, problem):
    _, A, b = system
    none, _ = iterations(A, b, "none")
    its, _ = iterations(A, b, "nnpc", {"pc_nnpc_rank": 20},
                        predictor=StandInPredictor(problem, rank=30))
    assert its < 0.8 * none


def test_nnpc_refine_counts_products(system, problem):
    _, A, b = system
    noisy = StandInPredictor(problem, rank=20, noise=0.3)
    plain, _ = iterations(A, b, "nnpc", predictor=noisy)
    refined, ksp = iterations(A, b, "nnpc", {"pc_nnpc_refine": "true"}, predictor=noisy)
    assert ksp.getPC().getPythonContext().setup_products == 20
    assert refined <= plain


def test_ritz_second_nearby_system(problem):
    operator = SpectralOperator(problem)
    A = operator.create_mat()
    operator.linearize(problem.state(0.5))
    rng = np.random.default_rng(14)
    b = operator.create_state()
    b.getArray()[:] = rng.standard_normal(b.getLocalSize())
    PETSc.Options()["pc_lmpritz_rank"] = 20
    ksp = make_ksp(A, "lmpritz")
    ksp.setFromOptions()
    _, first, _ = solve(ksp, b)
    context = ksp.getPC().getPythonContext()
    assert context.lmp is None
    operator.linearize(problem.state(0.55))
    b.getArray()[:] = rng.standard_normal(b.getLocalSize())
    none, _ = iterations(A, b, "none")
    x, second, reason = solve(ksp, b)
    assert reason > 0
    assert context.lmp is not None and context.lmp.rank > 0
    assert true_relative_residual(A, b, x) < 10 * RTOL
    assert second < none
    assert context.setup_products == 0


def test_ritz_sequence_keeps_helping(problem):
    operator = SpectralOperator(problem)
    A = operator.create_mat()
    rng = np.random.default_rng(18)
    b = operator.create_state()
    PETSc.Options()["pc_lmpritz_rank"] = 20
    ksp = make_ksp(A, "lmpritz")
    ksp.setFromOptions()
    for step, parameter in enumerate([0.5, 0.55, 0.6, 0.65]):
        operator.linearize(problem.state(parameter))
        b.getArray()[:] = rng.standard_normal(b.getLocalSize())
        none, _ = iterations(A, b, "none")
        x, its, reason = solve(ksp, b)
        assert reason > 0
        assert true_relative_residual(A, b, x) < 10 * RTOL
        if step > 0:
            assert its < 0.6 * none, f"solve {step}: {its} iterations against {none} without"


def test_ritz_residuals_match_true_residuals(system):
    operator, A, b = system
    PETSc.Options()["pc_lmpritz_rank"] = 5
    ksp = make_ksp(A, "lmpritz")
    ksp.setFromOptions()
    solve(ksp, b)
    pairs = ksp.getPC().getPythonContext().pending
    AY = operator.mult_block(pairs.U)
    residuals = np.linalg.norm(AY - pairs.U * pairs.lam, axis=0) / pairs.lam
    assert residuals.max() <= 1e-2


def test_preconditioned_norm_warning(system, caplog):
    _, A, b = system
    PETSc.Options()["pc_lmpexact_rank"] = 20
    ksp = make_ksp(A, "lmpexact")
    ksp.setNormType(PETSc.KSP.NormType.PRECONDITIONED)
    ksp.setFromOptions()
    with caplog.at_level("WARNING", logger="petsc_nnpc"):
        solve(ksp, b)
        solve(ksp, b)
    warnings = [record for record in caplog.records if "preconditioned residual" in record.message]
    assert len(warnings) == 1
    assert "-ksp_norm_type unpreconditioned" in warnings[0].message


def test_ksp_view_reports_lmp(system, problem, tmp_path):
    _, A, b = system
    its, ksp = iterations(A, b, "nnpc", {"pc_nnpc_mu": "min"},
                          predictor=StandInPredictor(problem, rank=12))
    path = str(tmp_path / "view.txt")
    viewer = PETSc.Viewer().createASCII(path)
    ksp.view(viewer)
    viewer.destroy()
    text = open(path).read()
    assert "type: nnpc" in text
    assert "rank: 12" in text
    assert "theta = mu^2 = min(lambda)" in text
    assert "device: network on cpu of rank 0" in text
    assert "setup: 1 setups" in text


def test_misspelled_option_reported(system):
    _, A, _ = system
    PETSc.Options()["pc_nnpc_rnak"] = 5
    ksp = make_ksp(A, "nnpc")
    with pytest.raises(ValueError, match=r"-pc_nnpc_rnak \(did you mean -pc_nnpc_rank\?\)"):
        ksp.setFromOptions()


def test_unknown_option_lists_valid_ones(system):
    _, A, _ = system
    PETSc.Options()["pc_lmpexact_frobnicate"] = 1
    ksp = make_ksp(A, "lmpexact")
    with pytest.raises(ValueError, match="valid options are .*-pc_lmpexact_rank"):
        ksp.setFromOptions()


def solve_expecting(A, b, pc_type, error, match, options=None, predictor=None):
    database = PETSc.Options()
    for name, value in (options or {}).items():
        database[name] = value
    ksp = make_ksp(A, pc_type)
    if predictor is not None:
        ksp.getPC().getPythonContext().set_predictor(predictor)
    with pytest.raises(error, match=match):
        ksp.setFromOptions()
        solve(ksp, b)


def test_missing_model_file(system, tmp_path):
    _, A, b = system
    solve_expecting(A, b, "nnpc", RuntimeError, "model file not found",
                    {"pc_nnpc_model": str(tmp_path / "missing")})


def test_no_model_given(system):
    _, A, b = system
    solve_expecting(A, b, "nnpc", ValueError, "set -pc_nnpc_model")


def test_corrupt_model_file(system, tmp_path):
    _, A, b = system
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    (folder / "model.json").write_text("{ truncated")
    solve_expecting(A, b, "nnpc", RuntimeError, "cannot load the network",
                    {"pc_nnpc_model": str(folder)})


def test_rank_larger_than_network(system, problem):
    _, A, b = system
    solve_expecting(A, b, "nnpc", ValueError, "provides 10 eigenpairs",
                    {"pc_nnpc_rank": 11}, StandInPredictor(problem, rank=10))


@pytest.mark.parametrize("mu", ["0", "-2"])
def test_non_positive_mu(system, problem, mu):
    _, A, b = system
    solve_expecting(A, b, "nnpc", ValueError, "mu must be a positive",
                    {"pc_nnpc_mu": mu}, StandInPredictor(problem, rank=10))


@pytest.mark.parametrize("bad, match", [(np.nan, "NaN"), (0.0, "not positive"), (-3.0, "not positive")])
def test_bad_eigenvalues(system, problem, bad, match):
    _, A, b = system
    U, _ = np.linalg.qr(np.random.default_rng(15).standard_normal((problem.n, 4)))
    lam = np.array([5.0, 4.0, 3.0, bad])
    solve_expecting(A, b, "nnpc", ValueError, match, predictor=FixedPredictor(U, lam))


def test_non_orthonormal_vectors(system, problem):
    _, A, b = system
    U = np.random.default_rng(16).standard_normal((problem.n, 4))
    solve_expecting(A, b, "nnpc", ValueError, "not orthonormal",
                    predictor=FixedPredictor(U, np.array([4.0, 3.0, 2.0, 1.0])))


def test_nan_in_vectors(system, problem):
    _, A, b = system
    U, _ = np.linalg.qr(np.random.default_rng(17).standard_normal((problem.n, 4)))
    U[3, 2] = np.nan
    solve_expecting(A, b, "nnpc", ValueError, "NaN or Inf",
                    predictor=FixedPredictor(U, np.array([4.0, 3.0, 2.0, 1.0])))


class FailingPredictor:
    rank = 4

    def predict(self, x_natural):
        raise ValueError("state contains NaN or Inf")


def test_network_failure_reported(system):
    _, A, b = system
    solve_expecting(A, b, "nnpc", ValueError, "the network failed on this state",
                    predictor=FailingPredictor())


def test_invalid_precision(system, problem):
    _, A, b = system
    solve_expecting(A, b, "nnpc", ValueError, "invalid -pc_nnpc_precision",
                    {"pc_nnpc_precision": "half"}, StandInPredictor(problem, rank=4))


def test_flag_without_value_turns_on(system, problem):
    _, A, _ = system
    PETSc.Options()["pc_nnpc_refine"] = None
    ksp = make_ksp(A, "nnpc")
    ksp.setFromOptions()
    assert ksp.getPC().getPythonContext().parameters["refine"] is True


def test_network_for_another_grid(system):
    _, A, b = system
    other = SpectralProblem(ny=16, nx=12, lam_max=1.0e2, lam_min=1.0)
    predictor = StandInPredictor(other, rank=4)
    solve_expecting(A, b, "nnpc", ValueError, "grid_shape", predictor=predictor)


def test_no_state_on_operator(problem):
    operator = SpectralOperator(problem)
    operator.linearize(problem.state(0.5))
    A = operator.create_mat()
    b = operator.create_state()
    b.set(1.0)
    solve_expecting(A, b, "nnpc", ValueError, "carries no linearization state",
                    predictor=StandInPredictor(problem, rank=4))


def test_invalid_device(system, problem):
    _, A, b = system
    solve_expecting(A, b, "nnpc", ValueError, "invalid -pc_nnpc_device",
                    {"pc_nnpc_device": "gpu", "pc_nnpc_model": __file__})


def test_cuda_without_gpu(system):
    import torch
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    _, A, b = system
    solve_expecting(A, b, "nnpc", RuntimeError, "no CUDA device",
                    {"pc_nnpc_device": "cuda", "pc_nnpc_model": __file__})


def test_log_view_shows_events():
    script = os.path.join(TESTS, "mpi", "pc_iterations.py")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    completed = subprocess.run(
        [sys.executable, script, "-log_view"], capture_output=True, text=True,
        timeout=120, env=env, check=False,
    )
    assert completed.returncode == 0, completed.stderr
    for event in ("LMPSetUp", "LMPApply", "NNPCInference", "NNPCScatter", "NNPCRefine",
                  "LMPOrthonormalize", "LMPExactEigensolve", "LMPNystromSketch", "LMPRitzPairs"):
        assert event in completed.stdout, f"{event} missing from -log_view"
