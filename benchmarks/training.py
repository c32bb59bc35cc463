"""Benchmark of training-set generation and network training.

Measures, and prints as one JSON object:

* generation throughput (states per minute) on a preset, with the preset's
  generation defaults (``k``, lead times) and a given number of states; run
  under ``mpiexec -n P`` for P ranks;
* training throughput (samples per second: forward, loss, backward and an
  AdamW step) of the preset's network at its default rank;
* parameter count and memory of the ``paper`` network (64×64, r = 2000,
  k = 100) at batch 1 and at ``--paper-batch``. On CUDA the peak memory
  of real training steps is measured with ``torch.cuda.max_memory_allocated``;
  on CPU it is estimated from the tensors saved for the backward pass
  (:func:`petsc_nnpc.train.estimate_training_memory`) and marked
  ``"estimated"``.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/training.py --preset small --states 6
    python benchmarks/training.py --part paper --device cuda
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time


def measure_generation(preset, states, k):
    from petsc4py import PETSc

    from petsc_nnpc.dataset import GenerationConfig, build_problem, generate_dataset, initial_state

    model, operator, _ = build_problem(preset, comm=PETSc.COMM_WORLD)
    config = GenerationConfig.for_preset(preset, model.config.window_steps, states=states, k=k,
                                         shard_size=states)
    rank0 = model.comm.getRank() == 0
    x0 = initial_state(preset) if rank0 else None
    folder = tempfile.mkdtemp(prefix="nnpc-bench-") if rank0 else None
    folder = model.comm.tompi4py().bcast(folder, root=0)
    try:
        started = time.perf_counter()
        generate_dataset(model, operator, config, folder, x0, progress=False)
        seconds = time.perf_counter() - started
    finally:
        if rank0:
            shutil.rmtree(folder, ignore_errors=True)
    return {
        "preset": preset,
        "ranks": model.comm.getSize(),
        "states": states,
        "k": config.k,
        "lead_steps": [config.lead_min, config.lead_max],
        "seconds": round(seconds, 2),
        "states_per_minute": round(60.0 * states / seconds, 2),
    }


def _network(preset, rank, device):
    import torch

    from petsc_nnpc.network import EigenpairNetwork, NetworkConfig
    from shallow_water.config import get_config

    config = get_config(preset)
    torch.manual_seed(0)
    # M only scales the eigenvalues; it does not change the cost.
    network_config = NetworkConfig.for_preset(preset, (config.ny, config.nx), rank, 2.0e4)
    return EigenpairNetwork(network_config).to(device)


def _batch(network, batch, k, device, dtype):
    import torch

    generator = torch.Generator().manual_seed(0)
    n = network.config.n
    x = torch.randn(batch, n, dtype=torch.float64, generator=generator).to(device)  # (b, n)
    Z = torch.randn(batch, n, k, generator=generator).to(device=device, dtype=dtype)  # (b, n, k)
    return x, Z, 1.0e3 * Z


def measure_training(preset, rank, k, batch, steps, device):
    import torch

    from petsc_nnpc.loss import frobenius_loss

    network = _network(preset, rank, device)
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3)
    x, Z, AZ = _batch(network, batch, k, device, torch.float32)

    def step():
        U, lam = network(x)
        loss = frobenius_loss(U, lam, Z, AZ).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # warm-up: allocations, kernel selection
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    return {
        "preset": preset,
        "device": str(device),
        "rank": rank,
        "k": k,
        "batch_size": batch,
        "parameters": network.parameter_count(),
        "seconds_per_step": round(seconds / steps, 4),
        "samples_per_second": round(batch * steps / seconds, 2),
    }


def measure_paper(device, batches, k):
    import torch

    from petsc_nnpc.loss import frobenius_loss
    from petsc_nnpc.train import estimate_training_memory

    network = _network("paper", 2000, device)
    result = {"parameters": network.parameter_count(), "device": str(device), "k": k, "batches": {}}
    for batch in batches:
        entry = {}
        estimate = estimate_training_memory(network, batch, k)
        entry["estimated_training_mib"] = round(estimate["total"] / 2**20, 1)
        entry["estimated_activations_per_state_mib"] = round(estimate["activations_per_state"] / 2**20, 1)
        if device.type == "cuda":
            optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3)
            x, Z, AZ = _batch(network, batch, k, device, torch.float32)
            torch.cuda.reset_peak_memory_stats(device)
            torch.cuda.synchronize(device)
            started = time.perf_counter()
            for _ in range(2):
                U, lam = network(x)
                loss = frobenius_loss(U, lam, Z, AZ).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            torch.cuda.synchronize(device)
            entry["measured_peak_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
            entry["seconds_per_step"] = round((time.perf_counter() - started) / 2, 3)
            del optimizer, x, Z, AZ, U, lam, loss
            torch.cuda.empty_cache()
        else:
            entry["memory"] = "estimated"
        result["batches"][str(batch)] = entry
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("all", "generation", "training", "paper"), default="all")
    parser.add_argument("--preset", default="small", help="preset of the generation and training parts")
    parser.add_argument("--states", type=int, default=6, help="states generated for the throughput")
    parser.add_argument("--k", type=int, default=None, help="probe vectors (default: the preset's)")
    parser.add_argument("--batch-size", type=int, default=4, help="training batch size")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps")
    parser.add_argument("--paper-batch", type=int, default=8, help="recommended paper batch size to size")
    parser.add_argument("--device", default="cpu", help="torch device: cpu or cuda")
    args = parser.parse_args(argv)

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from petsc_nnpc.utils import init_petsc

    init_petsc([])
    import torch

    from petsc_nnpc.dataset import GENERATION_PRESETS
    from petsc_nnpc.network import resolve_device
    from petsc_nnpc.train import DEFAULT_RANK

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    device = resolve_device(args.device)
    k = args.k or GENERATION_PRESETS[args.preset]["k"]
    results = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    if args.part in ("all", "generation"):
        results["generation"] = measure_generation(args.preset, args.states, k)
    from mpi4py import MPI

    if MPI.COMM_WORLD.Get_rank() == 0:
        if args.part in ("all", "training"):
            results["training"] = measure_training(args.preset, DEFAULT_RANK[args.preset], k,
                                                   args.batch_size, args.steps, device)
        if args.part in ("all", "paper"):
            results["paper_network"] = measure_paper(device, sorted({1, args.paper_batch}), 100)
        json.dump(results, sys.stdout, indent=2)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
