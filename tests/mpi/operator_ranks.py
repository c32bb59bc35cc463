"""Print, as one JSON line on rank 0, what must not depend on the rank count.

Usage: operator_ranks.py toy|tiny [paper|bhalf]. ``toy`` uses
tests/toy_model.py (put tests/ on PYTHONPATH); ``tiny`` uses the
shallow-water ``tiny`` preset. The script builds one inner-loop system in
the given form (``paper`` by default), checks the symmetry of the shell
matrix, solves with the default CG and runs two outer loops with a loose
inner tolerance.
"""

import json
import sys

import numpy as np

from petsc_nnpc.fourdvar import (
    build_inner_loop_system,
    incremental_4dvar,
    make_inner_loop_system,
    observe_with_noise,
    perturb,
    solve_inner_loop,
)
from petsc_nnpc.layout import NaturalLayout
from petsc_nnpc.operator import (
    BackgroundErrorConfig,
    DAConfig,
    GaussNewtonOperator,
    ObservationConfig,
)


def toy_system(form):
    from toy_model import ToyModel

    model = ToyModel(m=40)
    config = DAConfig(
        observations=ObservationConfig(variable="a", stride=2, sigma_o=0.5),
        background_error=BackgroundErrorConfig({"a": 1.0, "b": 0.5}),
        form=form,
    )
    base = model.initial_state(seed=5)
    operator = GaussNewtonOperator.from_config(model, config)
    truth = perturb(operator, base, 0.5, 7, 0)
    state = perturb(operator, base, 0.5, 7, 1)
    y = observe_with_noise(operator, truth, 7, 3)
    return make_inner_loop_system(model, config, state, y, base, truth=truth)


def main():
    name = sys.argv[1]
    form = sys.argv[2] if len(sys.argv) > 2 else "paper"
    if name == "toy":
        system = toy_system(form)
    else:
        system = build_inner_loop_system(name, form=form, seed=2)
    operator = system.operator
    layout = NaturalLayout(system.model.comm, operator.natural_indices, operator.n)

    # The same natural-ordering vectors on every rank count.
    rng = np.random.default_rng(31)
    u_natural, v_natural = rng.standard_normal((2, operator.n))
    u, v = system.mat.createVecs()
    u.getArray()[:] = layout.from_replicated(u_natural)
    v.getArray()[:] = layout.from_replicated(v_natural)
    Au, Av = u.duplicate(), v.duplicate()
    system.mat.mult(u, Au)
    system.mat.mult(v, Av)
    symmetry = abs(Au.dot(v) - u.dot(Av)) / abs(Au.dot(v))
    Au_natural = layout.gather(Au, to_all=True)

    solution, record = solve_inner_loop(system)
    solution_natural = layout.gather(solution, to_all=True)
    # A loose inner tolerance keeps the outer loops cheap and inside the
    # iterations where CG runs on 1 and 2 ranks agree to round-off.
    _, outer, final_cost = incremental_4dvar(
        operator, system.state, system.observations, system.background, outer_loops=2,
        options={"ksp_rtol": 1e-3})

    if system.model.comm.tompi4py().rank == 0:
        print(json.dumps({
            "ranks": system.model.comm.tompi4py().size,
            "symmetry": symmetry,
            "Au": Au_natural.tolist(),
            "iterations": record.iterations,
            "residual_norms": record.residual_norms,
            "solution": solution_natural.tolist(),
            "outer_iterations": [r["iterations"] for r in outer],
            "J": [r["J"] for r in outer] + [final_cost[0]],
        }))


if __name__ == "__main__":
    main()
