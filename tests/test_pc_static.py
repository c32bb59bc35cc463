"""``lmpfile``: the state-independent LMP from stored eigenpairs."""

import numpy as np
import pytest

import petsc_nnpc  # noqa: F401  (registers the PC types)
from petsc_nnpc.fourdvar import build_inner_loop_system, solve_inner_loop
from petsc_nnpc.layout import NaturalLayout
from petsc_nnpc.pc.static import save_eigenpairs
from petsc_nnpc.study import leading_eigenpairs


@pytest.fixture(scope="module")
def system():
    return build_inner_loop_system("tiny", seed=3)


@pytest.fixture(scope="module")
def exact_file(system, tmp_path_factory):
    operator = system.operator
    U, lam, lam_next, products = leading_eigenpairs(system.mat, 12)
    layout = NaturalLayout(operator.comm, operator.natural_indices, operator.n)
    path = tmp_path_factory.mktemp("static") / "exact.npz"
    save_eigenpairs(str(path), layout.gather(U), lam, lam_next)
    return str(path), lam, products


def _solve(system, prefix, **options):
    return solve_inner_loop(system, prefix=prefix, options=options)[1]


def test_lmpfile_matches_lmpexact(system, exact_file):
    path, lam, _ = exact_file
    from_file = _solve(system, "file_", pc_type="lmpfile", pc_lmpfile_path=path,
                       pc_lmpfile_rank=8, pc_lmpfile_mu="min")
    exact = _solve(system, "exact_", pc_type="lmpexact", pc_lmpexact_rank=8,
                   pc_lmpexact_mu="min")
    assert from_file.setup_products == 0
    assert exact.setup_products > 0
    assert abs(from_file.iterations - exact.iterations) <= 2
    assert from_file.true_relative_residual <= 1.01e-7


def test_eigensolver_gives_descending_pairs(exact_file):
    _, lam, products = exact_file
    assert np.all(np.diff(lam) <= 0)
    assert products > 0


@pytest.mark.parametrize("options, message", [
    ({}, "no eigenpair file given"),
    ({"pc_lmpfile_path": "/nonexistent/pairs.npz"}, "cannot use -pc_lmpfile_path"),
    ({"pc_lmpfile_rank": 13}, "contains 12 eigenpairs"),
])
def test_lmpfile_bad_input(system, exact_file, options, message):
    options = dict(options)
    if "pc_lmpfile_rank" in options:
        options["pc_lmpfile_path"] = exact_file[0]
    with pytest.raises(Exception, match=message):
        _solve(system, f"bad{len(options)}_", pc_type="lmpfile", **options)


def test_lmpfile_rejects_other_grid(system, tmp_path, rng):
    path = tmp_path / "other.npz"
    save_eigenpairs(str(path), np.linalg.qr(rng.standard_normal((50, 3)))[0], [3.0, 2.0, 1.0])
    with pytest.raises(Exception, match="made for this operator"):
        _solve(system, "grid_", pc_type="lmpfile", pc_lmpfile_path=str(path))
