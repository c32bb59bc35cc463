"""CG iteration counts with every LMP PC type, printed as one JSON line on rank 0.

Run under ``mpiexec -n P``; the counts must not depend on P. The operator is
the small SPD shell of ``tests/lmp_helpers.py``.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import petsc_nnpc  # noqa: E402,F401  (first: PETSc reads -log_view from sys.argv)
import numpy as np  # noqa: E402
from petsc4py import PETSc  # noqa: E402
from lmp_helpers import (  # noqa: E402
    SpectralOperator,
    SpectralProblem,
    StandInPredictor,
    make_ksp,
    solve,
    true_relative_residual,
)


def main():
    problem = SpectralProblem(ny=12, nx=16, lam_max=1.0e2, lam_min=1.0, decay=6.0, seed=3)
    operator = SpectralOperator(problem)
    A = operator.create_mat()
    operator.linearize(problem.state(0.5))
    b_natural = np.random.default_rng(21).standard_normal(problem.n)
    b = operator.natural_to_vec(b_natural)

    options = PETSc.Options()
    options["pc_lmpexact_rank"] = 20
    options["pc_lmpnystrom_rank"] = 20
    options["pc_lmpnystrom_sketch"] = 40
    options["pc_lmpritz_rank"] = 20
    options["pc_nnpc_rank"] = 20
    options["pc_nnpc_mu"] = "spectral"

    results = {}
    residuals = {}
    for name in ("none", "lmpexact", "lmpnystrom", "nnpc", "nnpc_refine", "lmpritz"):
        pc_type = "nnpc" if name.startswith("nnpc") else name
        options["pc_nnpc_refine"] = "true" if name == "nnpc_refine" else "false"
        ksp = make_ksp(A, pc_type)
        if pc_type == "nnpc":
            ksp.getPC().getPythonContext().set_predictor(StandInPredictor(problem, 30, noise=0.2))
        ksp.setFromOptions()
        x, its, reason = solve(ksp, b)
        if name == "lmpritz":
            operator.linearize(problem.state(0.55))
            x, its, reason = solve(ksp, b)
        results[name] = its
        residuals[name] = true_relative_residual(A, b, x)
        if reason <= 0:
            raise RuntimeError(f"{name}: CG diverged with reason {reason}")
        operator.linearize(problem.state(0.5))

    # A bad rank must raise on every rank, not hang the ranks that wait for rank 0.
    options["pc_nnpc_rank"] = 31
    ksp = make_ksp(A, "nnpc")
    ksp.getPC().getPythonContext().set_predictor(StandInPredictor(problem, 30))
    ksp.setFromOptions()
    try:
        solve(ksp, b)
        rank_error = ""
    except ValueError as error:
        rank_error = str(error)
    errors = PETSc.COMM_WORLD.tompi4py().allgather(rank_error)
    if PETSc.COMM_WORLD.getRank() == 0:
        print(json.dumps({"iterations": results, "residuals": residuals, "errors": errors}))


if __name__ == "__main__":
    main()
