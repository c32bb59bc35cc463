"""Starting the eigenpair network from given eigenpairs (warm start)."""

import numpy as np
import pytest
import torch

from petsc_nnpc.network import EigenpairNetwork, NetworkConfig, state_size
from petsc_nnpc.train import load_initial_eigenpairs


def _network(grid_shape=(6, 7), rank=5, scale=100.0):
    torch.manual_seed(0)
    config = NetworkConfig(grid_shape=grid_shape, rank=rank, sigmoid_scale=scale, width=8,
                           depth=1, heads=2, eigen_hidden=16)
    return EigenpairNetwork(config).double()


def test_warm_start_reproduces_given_pairs(rng):
    network = _network()
    n, r = network.config.n, network.config.rank
    U0 = np.linalg.qr(rng.standard_normal((n, r)))[0]  # (n, r) orthonormal
    lam0 = np.array([80.0, 40.0, 20.0, 10.0, 5.0])
    network.initialize_from_eigenpairs(U0, lam0)
    x = torch.as_tensor(rng.standard_normal((3, n)))  # three different states
    U, lam = network(x)
    for b in range(3):
        # Same columns up to sign, same eigenvalues, whatever the state.
        overlap = np.abs(np.sum(U[b].detach().numpy() * U0, axis=0))
        np.testing.assert_allclose(overlap, 1.0, atol=1e-10)
        np.testing.assert_allclose(lam[b].detach().numpy(), lam0, rtol=1e-8)


def test_warm_start_keeps_gradients(rng):
    network = _network()
    n, r = network.config.n, network.config.rank
    network.initialize_from_eigenpairs(np.linalg.qr(rng.standard_normal((n, r)))[0],
                                       np.linspace(50.0, 10.0, r))
    U, lam = network(torch.as_tensor(rng.standard_normal((2, n))))
    (U.sum() + lam.sum()).backward()
    head = network.vector_head[-1].weight.grad
    assert head is not None
    assert torch.count_nonzero(head) > 0
    assert torch.count_nonzero(network.eigen_head[-1].weight.grad) > 0


def test_warm_start_rejects_wrong_shapes(rng):
    network = _network()
    n = state_size(network.config.grid_shape)
    with pytest.raises(ValueError, match="do not fit this network"):
        network.initialize_from_eigenpairs(rng.standard_normal((n, 3)), np.ones(3))
    with pytest.raises(ValueError, match="positive and finite"):
        network.initialize_from_eigenpairs(np.linalg.qr(rng.standard_normal((n, 5)))[0],
                                           np.array([1.0, 1.0, 0.0, 1.0, 1.0]))


def test_initial_eigenpairs_file_needs_enough_pairs(tmp_path, rng):
    path = tmp_path / "pairs.npz"
    np.savez(path, U=rng.standard_normal((20, 3)), lam=np.ones(3))
    with pytest.raises(ValueError, match="contains 3 eigenpairs but the network predicts 4"):
        load_initial_eigenpairs(str(path), 4)
    U, lam = load_initial_eigenpairs(str(path), 2)
    assert U.shape == (20, 2)
    assert lam.shape == (2,)
    with pytest.raises(ValueError, match="cannot read initial eigenpairs"):
        load_initial_eigenpairs(str(tmp_path / "missing.npz"), 2)
