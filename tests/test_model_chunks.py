"""Batched TL and adjoint runs split into chunks give the same columns."""

import numpy as np

from petsc4py import PETSc

from shallow_water import model as sw_model
from shallow_water.config import get_config
from shallow_water.state import load_spunup_state


def test_batch_larger_than_chunk_matches_columns():
    model = sw_model.ShallowWaterModel(get_config("tiny"), comm=PETSc.COMM_WORLD)
    traj = model.linearize(model.from_natural(load_spunup_state("tiny")))
    k = sw_model.BATCH_CHUNK + 5
    rng = np.random.default_rng(7)
    dx = rng.standard_normal((model.local_size, k)) * 0.01
    tl = model.tl(traj, dx)
    adjoint = model.adjoint(traj, tl)
    for j in (0, sw_model.BATCH_CHUNK - 1, sw_model.BATCH_CHUNK, k - 1):
        single = model.tl(traj, dx[:, j:j + 1])
        np.testing.assert_allclose(tl[:, j:j + 1], single, rtol=1e-13, atol=1e-13)
        back = model.adjoint(traj, tl[:, j:j + 1])
        np.testing.assert_allclose(adjoint[:, j:j + 1], back, rtol=1e-13, atol=1e-13)
