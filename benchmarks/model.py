"""Benchmark of the shallow-water model: forward, tangent linear, adjoint, batch, ranks.

Run from the repository root::

    OMP_NUM_THREADS=1 python benchmarks/model.py --preset paper --out benchmarks/model.md

Both kernel backends (``numba``, compiled, and ``numpy``) are timed side by
side in one run. Single-process figures are the best of ``--repeat`` runs in
CPU time: the forward window, and one tangent-linear and one adjoint window
as ratios to the forward. A batch of ``--batch`` directions is timed per
direction, relative to one direction of the same backend.

The forward window is timed on 1 and on ``--ranks`` ranks, both under
``mpiexec`` so that the two runs start the same way. Each such run times
``--windows`` consecutive windows, best of ``--repeat``, and the runs are
repeated ``--rounds`` times, alternating the rank counts, so that a
disturbance of the machine shows up as a spread instead of a wrong ratio.
The table gives the median and the range of the per-round speed-ups.
Results go to stdout as a Markdown table and, with ``--out``, to that file
with the command and the machine.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

BACKENDS = ("numba", "numpy")


def best_time(function, repeat, clock=time.perf_counter):
    best = float("inf")
    for _ in range(repeat):
        start = clock()
        function()
        best = min(best, clock() - start)
    return best


def linearization_state(model, preset):
    from shallow_water.state import load_spunup_state

    try:
        return model.from_natural(load_spunup_state(preset))
    except FileNotFoundError:
        rng = np.random.default_rng(0)
        return model.from_natural(rng.standard_normal(model.n) * 0.1)


def time_forward(preset, backend, repeat, windows):
    """Return the wall time of one forward window on the current ranks (best of ``repeat``)."""
    from petsc4py import PETSc

    from shallow_water import ShallowWaterModel, get_config

    config = get_config(preset)
    model = ShallowWaterModel(config, comm=PETSc.COMM_WORLD, backend=backend)
    x = linearization_state(model, preset)
    model.forward(x)
    comm = model.comm.tompi4py()
    steps = windows * config.window_steps

    def run():
        comm.Barrier()
        model.advance(x, steps)
        comm.Barrier()

    return best_time(run, repeat) / windows


def time_linear(preset, backend, repeat, batch):
    from shallow_water import ShallowWaterModel, checks, get_config

    model = ShallowWaterModel(get_config(preset), backend=backend)
    x = linearization_state(model, preset)
    traj = model.linearize(x)
    single = checks.random_directions(model, seed=1, k=1)
    many = checks.random_directions(model, seed=2, k=batch)
    model.tl(traj, many[:, :1])
    # CPU time of this process: on a shared machine it is less disturbed by
    # other jobs than the wall-clock time.
    cpu = time.process_time
    return {
        "forward": best_time(lambda: model.forward(x), repeat, cpu),
        "linearize": best_time(lambda: model.linearize(x), repeat, cpu),
        "tl": best_time(lambda: model.tl(traj, single), repeat, cpu),
        "adjoint": best_time(lambda: model.adjoint(traj, single), repeat, cpu),
        "tl_batch": best_time(lambda: model.tl(traj, many), repeat, cpu),
        "adjoint_batch": best_time(lambda: model.adjoint(traj, many), repeat, cpu),
    }


def time_chunks(preset, repeat, batch, chunks):
    """Return ``{chunk: TL + adjoint CPU time per direction}`` of the compiled kernels."""
    from shallow_water import ShallowWaterModel, checks, get_config
    from shallow_water import model as sw_model

    model = ShallowWaterModel(get_config(preset), backend="numba")
    traj = model.linearize(linearization_state(model, preset))
    many = checks.random_directions(model, seed=2, k=batch)
    default = sw_model.BATCH_CHUNK
    results = {}
    try:
        for chunk in chunks:
            sw_model.BATCH_CHUNK = chunk
            seconds = best_time(lambda: (model.tl(traj, many), model.adjoint(traj, many)),
                                repeat, time.process_time)
            results[chunk] = seconds / batch
    finally:
        sw_model.BATCH_CHUNK = default
    return results


def time_on_ranks(args, backend, ranks):
    command = [
        "mpiexec", "--allow-run-as-root", "--oversubscribe", "-n", str(ranks),
        sys.executable, os.path.abspath(__file__), "--preset", args.preset, "--backend", backend,
        "--repeat", str(args.repeat), "--windows", str(args.windows), "--forward-only",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    completed = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800, check=False)
    if completed.returncode != 0:
        raise SystemExit(f"the {ranks}-rank run failed:\n{completed.stdout}\n{completed.stderr}")
    return json.loads(completed.stdout.strip().splitlines()[-1])["forward"]


def parallel_speedups(args):
    """Return, per backend, the forward times on 1 and ``--ranks`` ranks over the rounds."""
    times = {backend: {1: [], args.ranks: []} for backend in BACKENDS}
    for _ in range(args.rounds):
        for backend in BACKENDS:
            for ranks in (1, args.ranks):
                times[backend][ranks].append(time_on_ranks(args, backend, ranks))
    return times


def tl_state_dependence(preset, days, k):
    """Return ``‖M'_x1 Z − M'_x2 Z‖ / ‖M'_x1 Z‖`` for states x1, x2 = x1 advanced ``days`` days."""
    from shallow_water import ShallowWaterModel, checks, get_config
    from shallow_water.spinup import steps_for_days

    config = get_config(preset)
    model = ShallowWaterModel(config)
    x1 = linearization_state(model, preset)
    x2 = model.advance(x1, steps_for_days(config, days))
    directions = checks.random_directions(model, seed=3, k=k)
    first = model.tl(model.linearize(x1), directions)
    second = model.tl(model.linearize(x2), directions)
    return float(np.linalg.norm(first - second) / np.linalg.norm(first))


def machine():
    import numba

    from petsc_nnpc.utils import cpu_model

    model = cpu_model(default="unknown")
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    return (
        f"{os.cpu_count()} CPUs ({model}), {platform.system()} {platform.machine()}, "
        f"Python {platform.python_version()}, NumPy {np.__version__}, Numba {numba.__version__}; "
        f"load average at the end {load}"
    )


def table(args, linear, parallel, dependence, chunks):
    def ms(seconds):
        return f"{seconds * 1e3:.1f} ms"

    rows = []

    def row(name, cell):
        rows.append(f"| {name} | " + " | ".join(cell(backend) for backend in BACKENDS) + " |")

    def single(backend):
        return linear[backend]["tl"] + linear[backend]["adjoint"]

    def per_direction(backend):
        return (linear[backend]["tl_batch"] + linear[backend]["adjoint_batch"]) / args.batch

    def base(backend):
        return linear[backend]["forward"]

    row("forward window (CPU time)", lambda b: ms(base(b)))
    row("linearize: forward + stored trajectory (CPU time)",
        lambda b: f"{ms(linear[b]['linearize'])} ({linear[b]['linearize'] / base(b):.2f} x forward)")
    row("tangent-linear window (CPU time)",
        lambda b: f"{ms(linear[b]['tl'])} ({linear[b]['tl'] / base(b):.2f} x forward)")
    row("adjoint window (CPU time)",
        lambda b: f"{ms(linear[b]['adjoint'])} ({linear[b]['adjoint'] / base(b):.2f} x forward)")
    row("TL + adjoint, one direction (CPU time); target <= 4 x forward",
        lambda b: f"{ms(single(b))} ({single(b) / base(b):.2f} x forward)")
    row(f"TL + adjoint per direction, batch of {args.batch} (CPU time); target <= 0.25 x one direction",
        lambda b: f"{ms(per_direction(b))} ({per_direction(b) / single(b):.2f} x one direction)")
    row("forward window, 1 rank (wall time, median over rounds)",
        lambda b: ms(statistics.median(parallel[b][1])))
    row(f"forward window, {args.ranks} ranks (wall time, median over rounds)",
        lambda b: ms(statistics.median(parallel[b][args.ranks])))

    def speedup(backend):
        ratios = [one / many for one, many in zip(parallel[backend][1], parallel[backend][args.ranks])]
        return f"{statistics.median(ratios):.2f} (range {min(ratios):.2f}-{max(ratios):.2f})"

    row(f"speed-up on {args.ranks} ranks, median of {args.rounds} rounds; target >= 1.4", speedup)
    compiled_batch = per_direction("numba") / single("numpy")
    from shallow_water import get_config

    config = get_config(args.preset)
    lines = [
        f"# Shallow-water model benchmark ({args.preset} preset)",
        "",
        f"Grid {config.nx} x {config.ny} (n = {config.n}), window of {config.window_steps} RK4 steps "
        f"of {config.dt:g} s.",
        "",
        f"Command: `OMP_NUM_THREADS=1 python benchmarks/model.py --preset {args.preset} "
        f"--repeat {args.repeat} --batch {args.batch} --ranks {args.ranks} --rounds {args.rounds} "
        f"--windows {args.windows}" + (f" --chunks {args.chunks}" if args.chunks else "") + "`",
        "",
        f"Machine: {machine()}.",
        "",
        "| measure | numba | numpy |",
        "| --- | --- | --- |",
        *rows,
        "",
        f"Across backends: a batched direction with the compiled kernels costs {compiled_batch:.2f} x "
        "one direction with the NumPy kernels.",
        "",
        f"State dependence: the tangent linear applied to 8 random directions with physical scales "
        f"changes by {dependence:.3f} (relative) between states {args.lead_days:g} days apart.",
    ]
    if chunks:
        lines += [
            "",
            f"Chunk size of the batched runs (numba, batch of {args.batch}, TL + adjoint per direction, "
            "CPU time):",
            "",
            "| chunk | per direction | ratio to one direction |",
            "| --- | --- | --- |",
        ]
        lines += [f"| {chunk} | {ms(seconds)} | {seconds / single('numba'):.2f} |"
                  for chunk, seconds in chunks.items()]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="paper", help="model preset (default: paper)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per figure; the best is kept (default: 3)")
    parser.add_argument("--batch", type=int, default=100, help="directions in the batched runs (default: 100)")
    parser.add_argument("--ranks", type=int, default=2, help="ranks of the parallel forward run (default: 2)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="alternating 1-rank and parallel runs per backend (default: 5)")
    parser.add_argument("--windows", type=int, default=5,
                        help="consecutive forward windows per parallel timing (default: 5)")
    parser.add_argument(
        "--lead-days", type=float, default=20.0,
        help="days between the two states of the state-dependence figure (default: 20)",
    )
    parser.add_argument("--chunks", default="",
                        help="comma-separated chunk sizes of the batched runs to time, e.g. 4,8,16,32 "
                             "(default: none)")
    parser.add_argument("--out", default=None, help="Markdown file for the results")
    parser.add_argument("--backend", choices=BACKENDS, default="numba", help=argparse.SUPPRESS)
    parser.add_argument("--forward-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    for name in ("repeat", "batch", "ranks", "rounds", "windows"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} = {getattr(args, name)} must be at least 1")
    try:
        chunk_sizes = [int(item) for item in args.chunks.split(",") if item.strip()]
    except ValueError:
        parser.error(f"--chunks {args.chunks!r} is invalid: give comma-separated integers, e.g. 4,8,16")
    if any(chunk < 1 for chunk in chunk_sizes):
        parser.error(f"--chunks {args.chunks!r} is invalid: every chunk size must be at least 1")

    from petsc_nnpc.utils import init_petsc

    init_petsc([])
    if args.forward_only:
        # One parallel timing, started by the main run under mpiexec.
        seconds = time_forward(args.preset, args.backend, args.repeat, args.windows)
        from petsc4py import PETSc

        if PETSc.COMM_WORLD.getRank() == 0:
            print(json.dumps({"forward": seconds, "ranks": PETSc.COMM_WORLD.getSize()}))
        return 0

    linear = {backend: time_linear(args.preset, backend, args.repeat, args.batch) for backend in BACKENDS}
    parallel = parallel_speedups(args)
    dependence = tl_state_dependence(args.preset, args.lead_days, k=8)
    chunks = time_chunks(args.preset, args.repeat, args.batch, chunk_sizes) if chunk_sizes else {}
    text = table(args, linear, parallel, dependence, chunks)
    print(text)
    if args.out:
        from petsc_nnpc.utils import atomic_write_bytes

        atomic_write_bytes(args.out, text.encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
