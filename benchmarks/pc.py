"""Benchmark of the spectral LMP preconditioners.

Two measurements, printed as Markdown tables:

1. Cost of one application of ``P = L Lᵀ`` at rank ``r`` relative to one
   product ``A_x v`` of the Gauss-Newton operator (``petsc_nnpc.operator``)
   on a preset grid. The defaults are the ``paper`` grid and ``r = 1000``,
   where the target ratio is at most 0.05.
   The LMP uses a random orthonormal ``U``: the cost does not depend on its
   values.
2. Setup time and operator products per eigenpair source on a preset
   (default ``tiny``). Without ``--model``, ``nnpc`` runs an untrained
   network of the preset's grid, so its time is that of inference, QR and
   scatter, and its eigenpairs mean nothing.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/pc.py
    OMP_NUM_THREADS=1 mpiexec -n 2 python benchmarks/pc.py --apply-preset paper --rank 1000
"""

import argparse
import statistics
import sys
import time

from petsc_nnpc.utils import init_petsc

PETSc = init_petsc([])

import numpy as np  # noqa: E402

import petsc_nnpc  # noqa: E402,F401
from petsc_nnpc.lmp import SplitLMP, cholesky_qr  # noqa: E402


def parse_arguments(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--apply-preset", default="paper", help="preset of the apply benchmark")
    parser.add_argument("--rank", type=int, default=1000, help="rank r of the apply benchmark")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats of A_x v")
    parser.add_argument("--apply-repeats", type=int, default=50, help="timed repeats of P v")
    parser.add_argument("--setup-preset", default="tiny", help="preset of the setup benchmark")
    parser.add_argument("--setup-rank", type=int, default=20, help="rank r of the setup benchmark")
    parser.add_argument("--model", default=None, help="network checkpoint for nnpc")
    parser.add_argument("--skip-apply", action="store_true", help="skip the apply benchmark")
    parser.add_argument("--skip-setup", action="store_true", help="skip the setup benchmark")
    return parser.parse_args(argv)


def build_operator(preset):
    """Return the Gauss-Newton operator of ``preset`` linearized at its spun-up (or rest) state."""
    from petsc_nnpc.fourdvar import create_preset_model, load_preset_states
    from petsc_nnpc.operator import GaussNewtonOperator, da_config_for_preset

    model = create_preset_model(preset)
    operator = GaussNewtonOperator.from_config(model, da_config_for_preset(preset))
    try:
        state, _ = load_preset_states(model)
        origin = "spun-up state"
    except (OSError, ValueError) as error:
        state = model.create_state()
        origin = f"state at rest ({error})"
    operator.linearize(state)
    return operator, origin


def median_time(function, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def benchmark_apply(arguments):
    operator, origin = build_operator(arguments.apply_preset)
    A = operator.create_mat()
    v, w = A.createVecs()
    v.getArray()[:] = np.random.default_rng(1).standard_normal(v.getLocalSize())
    A.mult(v, w)  # warm-up
    product = median_time(lambda: A.mult(v, w), arguments.repeats)

    n = A.getSize()[0]
    start, end = A.getOwnershipRange()
    rng = np.random.default_rng(2)
    U = cholesky_qr(A.getComm(), rng.standard_normal((n, arguments.rank))[start:end])
    lam = np.sort(rng.uniform(1.0, 2.0e4, arguments.rank))[::-1]
    lmp = SplitLMP(A.getComm(), U, lam, mu=1.0)
    lmp.apply(v, w)  # warm-up
    apply = median_time(lambda: lmp.apply(v, w), arguments.apply_repeats)
    split = median_time(lambda: lmp.apply_split(v, w), arguments.apply_repeats)
    single = SplitLMP(A.getComm(), U, lam, mu=1.0, dtype=np.float32)
    single.apply(v, w)
    apply_single = median_time(lambda: single.apply(v, w), arguments.apply_repeats)

    ranks = A.getComm().getSize()
    PETSc.Sys.Print(
        f"\n### One apply of P against one A_x v ({arguments.apply_preset} preset, n = {n}, "
        f"r = {arguments.rank}, {ranks} rank(s), linearized at the {origin})\n\n"
        "| quantity | seconds | ratio to A_x v |\n|---|---|---|\n"
        f"| A_x v | {product:.4g} | 1 |\n"
        f"| P v (PCApply) | {apply:.4g} | {apply / product:.4f} |\n"
        f"| L v (PCApplySymmetricLeft) | {split:.4g} | {split / product:.4f} |\n"
        f"| P v, U in single precision | {apply_single:.4g} | {apply_single / product:.4f} |\n"
    )


def untrained_predictor(grid_shape, rank, form):
    """Return a predictor of an untrained network for timing inference."""
    from petsc_nnpc.network import EigenpairNetwork, EigenpairPredictor, NetworkConfig

    import torch

    torch.manual_seed(0)
    network = EigenpairNetwork(NetworkConfig(grid_shape=grid_shape, rank=rank,
                                             sigmoid_scale=2.0e4))
    network.eval()
    return EigenpairPredictor(network, {"form": form, "path": "untrained network"}, "cpu")


def benchmark_setup(arguments):
    operator, origin = build_operator(arguments.setup_preset)
    A = operator.create_mat()
    rank = arguments.setup_rank
    options = PETSc.Options()
    sources = [
        ("lmpexact (dense)", "lmpexact", {"pc_lmpexact_rank": rank}),
        ("lmpexact (lanczos)", "lmpexact",
         {"pc_lmpexact_rank": rank, "pc_lmpexact_method": "lanczos", "pc_lmpexact_tol": 1e-6}),
        ("lmpnystrom", "lmpnystrom",
         {"pc_lmpnystrom_rank": rank, "pc_lmpnystrom_sketch": 2 * rank}),
        ("nnpc", "nnpc", {"pc_nnpc_rank": rank}),
        ("nnpc + refine", "nnpc", {"pc_nnpc_rank": rank, "pc_nnpc_refine": "true"}),
    ]
    rows = []
    for label, pc_type, values in sources:
        for name in list(options.getAll()):
            if name.startswith("pc_"):
                options.delValue(name)
        for name, value in values.items():
            options[name] = value
        if pc_type == "nnpc" and arguments.model:
            options["pc_nnpc_model"] = arguments.model
        ksp = PETSc.KSP().create(comm=A.getComm())
        ksp.setOperators(A)
        ksp.setType("cg")
        ksp.getPC().setType(pc_type)
        context = ksp.getPC().getPythonContext()
        if pc_type == "nnpc" and not arguments.model:
            context.set_predictor(untrained_predictor(operator.grid_shape, rank, operator.form),
                                  source="untrained network")
        ksp.setFromOptions()
        ksp.setUp()
        rows.append((label, context.setup_time, context.setup_products))
        ksp.destroy()
    PETSc.Sys.Print(
        f"\n### Setup per source ({arguments.setup_preset} preset, n = {A.getSize()[0]}, "
        f"r = {rank}, {A.getComm().getSize()} rank(s), {origin})\n\n"
        "| source | setup seconds | operator products |\n|---|---|---|"
    )
    for label, seconds, products in rows:
        PETSc.Sys.Print(f"| {label} | {seconds:.3g} | {products} |")


def main(argv=None):
    arguments = parse_arguments(sys.argv[1:] if argv is None else argv)
    if not arguments.skip_setup:
        benchmark_setup(arguments)
    if not arguments.skip_apply:
        benchmark_apply(arguments)


if __name__ == "__main__":
    main()
