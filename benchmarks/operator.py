"""Benchmark the Gauss-Newton shell matrix and unpreconditioned CG on a preset.

Measures, on one inner-loop system built by
:func:`petsc_nnpc.fourdvar.build_inner_loop_system`:

* ``products``: the time of one linearization, of one ``A_x v``, and the
  per-vector time of a block product ``A_x Z`` with ``k`` columns;
* ``cg``: unpreconditioned CG iterations to ``‖b − A δx‖ ≤ 10⁻⁷ ‖b‖`` (cap
  2000) in the paper form and the ``bhalf`` form, with PETSc's estimate of
  the extreme singular values from CG's Lanczos coefficients;
* ``eigs``: the leading eigenvalues of ``A_x`` from a block Lanczos run on
  the block product (full reorthogonalization, Rayleigh-Ritz on the whole
  Krylov basis), to compare with the ≈ 2·10⁴ reported by Trappler & Vidard,
  "State-dependent preconditioning for the inner-loop in Variational Data
  Assimilation using Machine Learning".

Results go to a Markdown page and a JSON file, both written atomically::

    OMP_NUM_THREADS=1 python benchmarks/operator.py --preset paper \\
        --out benchmarks/operator.md
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

from petsc_nnpc.utils import atomic_write_bytes, atomic_write_json, init_petsc

PETSc = init_petsc([])

from petsc_nnpc.fourdvar import (  # noqa: E402
    InnerSolver,
    TwinConfig,
    build_inner_loop_system,
    create_preset_model,
    first_twin_system,
)
from petsc_nnpc.operator import da_config_for_preset  # noqa: E402

PARTS = ("products", "cg", "eigs")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="paper", help="model preset (default: paper)")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help=f"comma-separated parts to run, from {', '.join(PARTS)}")
    parser.add_argument("--k", type=int, default=100, help="columns of the block product")
    parser.add_argument("--repeats", type=int, default=5,
                        help="repetitions of the single product (the median is reported)")
    parser.add_argument("--block", type=int, default=20, help="block size of the Lanczos run")
    parser.add_argument("--lanczos-steps", type=int, default=10,
                        help="block Lanczos steps (block × steps products)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the system and the vectors")
    parser.add_argument("--state", default=None, metavar="FILE",
                        help="spun-up state file to use instead of the preset's shipped one")
    parser.add_argument("--background", default=None, metavar="FILE",
                        help="background state file to use instead of the preset's shipped one")
    parser.add_argument("--out", default="benchmarks/operator.md",
                        help="Markdown page to write; the JSON goes beside it")
    args = parser.parse_args(argv)
    parts = [part for part in args.parts.split(",") if part]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}: use {', '.join(PARTS)}")
    for name in ("k", "repeats", "block", "lanczos_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} = {getattr(args, name)} is invalid: use >= 1")
    if (args.state is None) != (args.background is None):
        parser.error("--state and --background go together: give both or neither")
    args.parts = parts
    return args


def build_system(args, form=None):
    """Return the twin experiment's first system, from shipped or given states."""
    if args.state is None:
        return build_inner_loop_system(args.preset, form=form, seed=args.seed)
    from shallow_water.state import load_state

    model = create_preset_model(args.preset)
    base = model.from_natural(load_state(args.state, model.config))
    background = model.from_natural(load_state(args.background, model.config))
    twin_config = TwinConfig(max_steps=model.config.window_steps, seed=args.seed)
    return first_twin_system(model, da_config_for_preset(args.preset, form=form), twin_config,
                             base, background)


def natural_block(system, seed, k):
    """Return ``(local_size, k)`` Gaussian columns drawn in natural ordering."""
    Z = np.random.default_rng(seed).standard_normal((system.operator.n, k))  # (n, k)
    return np.ascontiguousarray(Z[system.operator.natural_indices])


def bench_products(system, args):
    operator = system.operator
    mpi = system.model.comm.tompi4py()
    start = time.perf_counter()
    operator.linearize(system.state)
    linearize_time = time.perf_counter() - start

    v, w = system.mat.createVecs()
    v.getArray()[:] = natural_block(system, args.seed, 1)[:, 0]
    single = []
    for _ in range(args.repeats):
        mpi.Barrier()
        start = time.perf_counter()
        system.mat.mult(v, w)
        single.append(time.perf_counter() - start)

    Z = natural_block(system, args.seed + 1, args.k)  # (local_size, k)
    mpi.Barrier()
    start = time.perf_counter()
    operator.mult_block(Z)
    block_time = time.perf_counter() - start
    single_time = statistics.median(single)
    return {
        "linearize_s": linearize_time,
        "single_product_s": single_time,
        "block_k": args.k,
        "block_product_s": block_time,
        "block_per_vector_s": block_time / args.k,
        "block_per_vector_over_single": block_time / args.k / single_time,
    }


def bench_cg(system, form, args):
    if form != system.operator.form:
        system = build_system(args, form=form)
    solver = InnerSolver(system.mat)
    solver.ksp.setComputeSingularValues(True)
    _, record = solver.solve(system.rhs)
    smax, smin = solver.ksp.computeExtremeSingularValues()
    solver.destroy()
    return {
        "form": form,
        "iterations": record.iterations,
        "converged_reason": record.converged_reason,
        "wall_time_s": record.wall_time,
        "products": record.products,
        "true_relative_residual": record.true_relative_residual,
        "lambda_max_estimate": float(smax),
        "lambda_min_estimate": float(smin),
        "condition_estimate": float(smax / smin) if smin > 0 else float("inf"),
    }


def _orthonormalize(W, mpi, basis=None):
    """Orthonormalize the distributed block ``W`` against ``basis`` and itself.

    Two passes of classical Gram-Schmidt against ``basis`` and two of
    Cholesky-QR, each with one allreduce of small matrices.
    """
    for _ in range(2):
        if basis is not None:
            W = W - basis @ mpi.allreduce(basis.T @ W)
    for _ in range(2):
        gram = mpi.allreduce(W.T @ W)
        R = np.linalg.cholesky(gram).T
        W = np.linalg.solve(R.T, W.T).T
    return W


def bench_eigs(system, args):
    """Return the leading Ritz values of ``A_x`` from block Lanczos.

    Cost: ``block × lanczos_steps`` products in ``lanczos_steps`` block
    products, and O(n (block · steps)²) for the reorthogonalization.
    """
    operator = system.operator
    mpi = system.model.comm.tompi4py()
    operator.linearize(system.state)
    Q = _orthonormalize(natural_block(system, args.seed + 2, args.block), mpi)
    basis, images = [], []
    start = time.perf_counter()
    for step in range(args.lanczos_steps):
        AQ = operator.mult_block(Q)  # (local_size, block)
        basis.append(Q)
        images.append(AQ)
        if step + 1 < args.lanczos_steps:
            Q = _orthonormalize(AQ, mpi, np.hstack(basis))
    V = np.hstack(basis)  # (local_size, block · steps)
    AV = np.hstack(images)
    H = mpi.allreduce(V.T @ AV)  # (block · steps, block · steps) Rayleigh quotient
    theta, vectors = np.linalg.eigh(0.5 * (H + H.T))
    ritz, vectors = theta[::-1], vectors[:, ::-1]  # descending
    # Residual norms ‖A y − θ y‖ tell which Ritz values have converged.
    residual = AV @ vectors - (V @ vectors) * ritz
    residual_norms = np.sqrt(mpi.allreduce(np.sum(residual**2, axis=0)))
    return {
        "block": args.block,
        "steps": args.lanczos_steps,
        "products": args.block * args.lanczos_steps,
        "wall_time_s": time.perf_counter() - start,
        "ritz_values": ritz[: 2 * args.block].tolist(),
        "ritz_residual_norms": residual_norms[: 2 * args.block].tolist(),
    }


def machine_description():
    model = platform.processor() or platform.machine()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in lscpu.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, Python {platform.python_version()}"


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=False).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def comparison_lines(results):
    """Return Markdown lines that set the results beside the paper's figures."""
    lines = ["## Beside the paper", ""]
    products = results.get("products")
    if products:
        ratio = products["block_per_vector_over_single"]
        verdict = ("batching saves little, because nearly all the time is in the model's "
                   "batched TL and adjoint runs" if ratio > 0.5 else
                   f"batching saves {100 * (1 - ratio):.0f}% per vector")
        lines.append(
            f"* One `A_x v` costs {products['single_product_s'] / products['linearize_s']:.2f} "
            "times the linearization run (a forward run that stores the trajectory). "
            f"A block of {products['block_k']} vectors costs {ratio:.2f} times a single "
            f"product per vector: {verdict}."
        )
    runs = {run["form"]: run for run in results.get("cg", [])}
    if "paper" in runs:
        run = runs["paper"]
        lines.append(
            f"* Unpreconditioned CG on `A_x` needs {run['iterations']} iterations to 1e-7; "
            "Trappler & Vidard's baseline needs hundreds of iterations up to their cap of 2000."
        )
    if "bhalf" in runs:
        run = runs["bhalf"]
        lines.append(
            f"* With the change of variable `v = B^-1/2 dx`, CG needs {run['iterations']} "
            f"iterations (condition number about {run['condition_estimate']:.0f}); the paper "
            "does not use this form."
        )
    eigs = results.get("eigs")
    if eigs and len(eigs["ritz_values"]) >= 40:
        values = eigs["ritz_values"]
        lines.append(
            f"* Leading eigenvalue {values[0]:.4g}, against about 2·10⁴ in the paper. The head "
            f"of the spectrum is flat: λ₂ = {values[1]:.4g}, λ₁₀ = {values[9]:.4g}, "
            f"λ₄₀ = {values[39]:.4g} (λ₄₀/λ₁ = {values[39] / values[0]:.2f}), where the paper "
            "describes a roughly exponential decay."
        )
    lines.append("")
    return lines


def render_markdown(results):
    lines = [
        "# Gauss-Newton operator benchmark",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Machine: {results['machine']}; {results['ranks']} MPI rank(s); "
        f"commit {results['commit']}; {results['date']}.",
        "",
        f"System: preset `{results['preset']}`, n = {results['n']}, "
        f"{results['observations']} observations, seed {results['seed']}, "
        f"states {results['states']}.",
        "",
        f"Load average at the start: {results['load_average_at_start']:.1f} on "
        f"{os.cpu_count()} cores. Other jobs shared the machine when it is above the "
        "core count, and then the times are upper bounds.",
        "",
    ]
    products = results.get("products")
    if products:
        lines += [
            "## Products",
            "",
            "| quantity | value |",
            "| --- | --- |",
            f"| linearization (forward run, trajectory stored) | {products['linearize_s']:.3f} s |",
            f"| one `A_x v` (median of the repeats) | {products['single_product_s']:.3f} s |",
            f"| `A_x Z`, k = {products['block_k']} | {products['block_product_s']:.2f} s |",
            f"| per vector in `A_x Z` | {products['block_per_vector_s']:.4f} s |",
            f"| per vector in `A_x Z` / one `A_x v` | "
            f"{products['block_per_vector_over_single']:.3f} |",
            "",
        ]
    runs = results.get("cg")
    if runs:
        lines += [
            "## Unpreconditioned CG to 1e-7",
            "",
            "| form | iterations | reason | wall time | λ_max estimate | λ_min estimate "
            "| κ estimate |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for run in runs:
            lines.append(
                f"| {run['form']} | {run['iterations']} | {run['converged_reason']} | "
                f"{run['wall_time_s']:.1f} s | {run['lambda_max_estimate']:.4g} | "
                f"{run['lambda_min_estimate']:.4g} | {run['condition_estimate']:.3g} |"
            )
        lines += [
            "",
            "The λ estimates are PETSc's extreme singular values from CG's Lanczos "
            "coefficients (`KSPComputeExtremeSingularValues`).",
            "",
        ]
    lines += comparison_lines(results)
    eigs = results.get("eigs")
    if eigs:
        values = eigs["ritz_values"]
        resid = eigs["ritz_residual_norms"]
        shown = [0, 1, 2, 4, 9, 19, 29, 39]
        lines += [
            "## Leading eigenvalues of A_x",
            "",
            f"Block Lanczos, block {eigs['block']}, {eigs['steps']} steps "
            f"({eigs['products']} products, {eigs['wall_time_s']:.1f} s). A Ritz value has "
            "converged when its residual norm is small next to it.",
            "",
            "| index | Ritz value | residual norm |",
            "| --- | --- | --- |",
        ]
        for index in shown:
            if index < len(values):
                lines.append(f"| {index + 1} | {values[index]:.5g} | {resid[index]:.3g} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    mpi = PETSc.COMM_WORLD.tompi4py()
    system = build_system(args)
    results = {
        "command": "OMP_NUM_THREADS=1 python " + " ".join([sys.argv[0], *sys.argv[1:]]),
        "machine": machine_description(),
        "ranks": mpi.size,
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "preset": args.preset,
        "n": system.operator.n,
        "observations": system.operator.observations.p,
        "seed": args.seed,
        "states": "shipped" if args.state is None else f"{args.state}, {args.background}",
        "load_average_at_start": os.getloadavg()[0],
    }
    if "products" in args.parts:
        results["products"] = bench_products(system, args)
        PETSc.Sys.Print(json.dumps(results["products"]))
    if "cg" in args.parts:
        results["cg"] = [bench_cg(system, form, args) for form in ("paper", "bhalf")]
        PETSc.Sys.Print(json.dumps(results["cg"]))
    if "eigs" in args.parts:
        results["eigs"] = bench_eigs(system, args)
        PETSc.Sys.Print(json.dumps(results["eigs"]["ritz_values"][:10]))
    if mpi.rank == 0:
        atomic_write_json(os.path.splitext(args.out)[0] + ".json", results)
        atomic_write_bytes(args.out, render_markdown(results).encode("utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
