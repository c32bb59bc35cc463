"""The shallow-water model on 1, 2 and 4 ranks: adjoint tests and identical results."""

import os

import numpy as np
import pytest

from conftest import run_mpi

SCRIPT = os.path.join(os.path.dirname(__file__), "mpi", "model_parallel.py")


def _run(ranks, out):
    run_mpi(SCRIPT, ranks, out, timeout=120)
    return dict(np.load(out))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model_mpi")
    return {ranks: _run(ranks, folder / f"ranks{ranks}.npz") for ranks in (1, 2, 4)}


@pytest.mark.mpi
@pytest.mark.parametrize("ranks", [1, 2, 4])
@pytest.mark.parametrize("backend", ["numba", "numpy"])
@pytest.mark.parametrize("case", ["tiny", "odd"])
def test_adjoint_dot_product_parallel(results, ranks, backend, case):
    assert results[ranks][f"{case}_{backend}_adjoint_error_step"] <= 1e-12
    assert results[ranks][f"{case}_{backend}_adjoint_error_window"] <= 1e-12


@pytest.mark.mpi
@pytest.mark.parametrize("case", ["tiny", "odd"])
@pytest.mark.parametrize("backend", ["numba", "numpy"])
@pytest.mark.parametrize("run", ["forward", "tl", "adjoint"])
@pytest.mark.parametrize("ranks", [2, 4])
def test_same_result_as_one_rank(results, case, backend, run, ranks):
    assert int(results[ranks]["ranks"]) == ranks
    one = results[1][f"{case}_{backend}_{run}"]
    many = results[ranks][f"{case}_{backend}_{run}"]
    assert np.max(np.abs(one - many)) <= 1e-12 * np.max(np.abs(one))


@pytest.mark.mpi
@pytest.mark.parametrize("case", ["tiny", "odd"])
@pytest.mark.parametrize("run", ["forward", "tl", "adjoint"])
def test_backends_agree_on_two_ranks(results, case, run):
    compiled = results[2][f"{case}_numba_{run}"]
    reference = results[2][f"{case}_numpy_{run}"]
    assert np.max(np.abs(compiled - reference)) <= 1e-12 * np.max(np.abs(reference))
