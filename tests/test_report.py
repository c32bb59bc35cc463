"""Report tables and figures of a twin experiment."""

import math
import os

import numpy as np

from petsc_nnpc.report import split_natural, summarize, write_report


def _records():
    records = []
    for form in ("paper", "bhalf"):
        for cycle in range(2):
            for name, iterations in (("none", 100), ("lmpexact r=10", 40)):
                records.append({
                    "form": form,
                    "preconditioner": name,
                    "cycle": cycle,
                    "iterations": iterations + cycle,
                    "products": iterations + cycle + (10 if name != "none" else 0),
                    "wall_time": 0.5 if name == "none" else 0.25,
                    "converged_reason": "CONVERGED_RTOL",
                    "residual_norms": list(np.logspace(0, -7, iterations + cycle + 1)),
                })
    return records


def test_summary_ratios_against_none():
    rows = {(row["form"], row["preconditioner"]): row for row in summarize(_records())}
    exact = rows[("paper", "lmpexact r=10")]
    assert exact["iterations"] == 40.5
    assert math.isclose(exact["iterations_ratio"], 40.5 / 100.5)
    assert math.isclose(exact["products_ratio"], 50.5 / 100.5)
    assert rows[("bhalf", "none")]["iterations_ratio"] == 1.0
    assert exact["converged"] == 2


def test_summary_without_none_gives_nan_ratio():
    records = [r for r in _records() if r["preconditioner"] != "none"]
    row = summarize(records)[0]
    assert math.isnan(row["iterations_ratio"])


def test_split_natural_shapes():
    ny, nx = 4, 5
    n = ny * nx + ny * (nx - 1) + (ny - 1) * nx
    eta, u, v = split_natural(np.arange(n), (ny, nx))
    assert eta.shape == (4, 5)
    assert u.shape == (4, 4)
    assert v.shape == (3, 5)
    assert v[-1, -1] == n - 1


def test_write_report_files(tmp_path):
    rng = np.random.default_rng(3)
    grid_shape = (4, 5)
    n = 20 + 16 + 15
    U = np.linalg.qr(rng.standard_normal((n, 3)))[0]
    analysis = {
        "eigenvectors": {"U": U, "indices": [0, 2]},
        "spectrum": {"exact": [100.0, 50.0, 10.0], "predicted": [90.0, 55.0, 12.0]},
        "limit": {"paper": {"rank": [1, 2, 3], "iterations": [90, 70, 40], "none": 100}},
        "learned_points": [{"form": "paper", "rank": 3, "iterations": 60}],
    }
    path = write_report(str(tmp_path), _records(), {"preset": "tiny", "grid_shape": grid_shape}, analysis)
    text = open(path, encoding="utf-8").read()
    assert "| paper | lmpexact r=10 | 2 | 2 | 40.5 | 0.40 |" in text
    for name in ("iterations.png", "residuals.png", "eigenvectors.png", "eigenvalues.png", "limit.png"):
        assert os.path.getsize(tmp_path / name) > 1000
        assert f"]({name})" in text
