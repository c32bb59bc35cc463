"""The operator benchmark runs on the tiny preset, so that it cannot rot."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT

SCRIPT = os.path.join(REPO_ROOT, "benchmarks", "operator.py")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "operator.md"
    completed = subprocess.run(
        [sys.executable, SCRIPT, "--preset", "tiny", "--k", "8", "--repeats", "2",
         "--block", "10", "--lanczos-steps", "6", "--out", str(out)],
        capture_output=True, text=True, timeout=180, cwd=REPO_ROOT,
        env=dict(os.environ, OMP_NUM_THREADS="1"), check=False,
    )
    assert completed.returncode == 0, completed.stderr
    with open(out.with_suffix(".json")) as handle:
        data = json.load(handle)
    data["markdown"] = out.read_text()
    return data


def test_benchmark_products(results):
    products = results["products"]
    assert products["block_k"] == 8
    assert products["single_product_s"] > 0
    assert products["block_per_vector_s"] == pytest.approx(products["block_product_s"] / 8)


def test_benchmark_cg_forms(results):
    paper, bhalf = results["cg"]
    assert paper["form"] == "paper"
    assert bhalf["form"] == "bhalf"
    assert paper["converged_reason"] == "CONVERGED_RTOL"
    assert bhalf["iterations"] < paper["iterations"]
    # The B^1/2 form has every eigenvalue >= 1.
    assert bhalf["lambda_min_estimate"] == pytest.approx(1.0, rel=1e-6)


def test_benchmark_ritz_values(results):
    ritz = np.array(results["eigs"]["ritz_values"])
    assert np.all(np.diff(ritz) <= 0)
    # Ritz values bound the eigenvalues from below; a short run already comes
    # within a few percent of CG's estimate of the largest one.
    lambda_max = results["cg"][0]["lambda_max_estimate"]
    assert ritz[0] <= lambda_max * (1 + 1e-9)
    assert ritz[0] >= 0.97 * lambda_max
    assert "## Leading eigenvalues of A_x" in results["markdown"]


def test_benchmark_rejects_unknown_part():
    completed = subprocess.run(
        [sys.executable, SCRIPT, "--parts", "products,spectra"],
        capture_output=True, text=True, timeout=60, cwd=REPO_ROOT, check=False,
    )
    assert completed.returncode == 2
    assert "unknown part(s) spectra" in completed.stderr
