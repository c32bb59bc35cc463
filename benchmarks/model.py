"""Benchmark of the shallow-water model: forward, tangent linear, adjoint, batch, ranks.

Run from the repository root::

    OMP_NUM_THREADS=1 python benchmarks/model.py --preset paper --out benchmarks/model.md

Each figure is the best of ``--repeat`` runs. It times the forward window,
and one tangent-linear and one adjoint window as ratios to the forward. A
batch of ``--batch`` directions is timed per direction, relative to one
direction. The forward window is timed on 1 and on ``--ranks`` ranks; the
parallel run is this script under ``mpiexec ... --forward-only``. Results
go to stdout as a Markdown table and, with ``--out``, to that file with the
command and the machine.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np


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


def time_forward(preset, repeat):
    from petsc4py import PETSc

    from shallow_water import ShallowWaterModel, get_config

    model = ShallowWaterModel(get_config(preset), comm=PETSc.COMM_WORLD)
    x = linearization_state(model, preset)
    model.forward(x)
    comm = model.comm.tompi4py()

    def run():
        comm.Barrier()
        model.forward(x)
        comm.Barrier()

    return best_time(run, repeat)


def time_linear(preset, repeat, batch):
    from shallow_water import ShallowWaterModel, checks, get_config

    model = ShallowWaterModel(get_config(preset))
    x = linearization_state(model, preset)
    traj = model.linearize(x)
    single = checks.random_directions(model, seed=1, k=1)
    many = checks.random_directions(model, seed=2, k=batch)
    # CPU time of this process: on a shared machine it is less disturbed by
    # other jobs than the wall-clock time.
    cpu = time.process_time
    results = {
        "forward": best_time(lambda: model.forward(x), repeat, cpu),
        "linearize": best_time(lambda: model.linearize(x), repeat, cpu),
        "tl": best_time(lambda: model.tl(traj, single), repeat, cpu),
        "adjoint": best_time(lambda: model.adjoint(traj, single), repeat, cpu),
        "tl_batch": best_time(lambda: model.tl(traj, many), max(1, repeat // 2), cpu),
        "adjoint_batch": best_time(lambda: model.adjoint(traj, many), max(1, repeat // 2), cpu),
    }
    return results


def half_patch_forward(preset, ranks, repeat):
    """Return the CPU time of a forward window on one rank's share of the grid.

    The grid is split along y into ``ranks`` strips, as a DMDA does on a
    few ranks. The time of one strip bounds the parallel forward time from
    below when the ranks get a core each, because the halo exchange between
    ranks of one node costs little next to the kernels.
    """
    import dataclasses

    from shallow_water import ShallowWaterModel, get_config

    config = get_config(preset)
    strip = dataclasses.replace(config, ny=-(-config.ny // ranks), preset="custom")
    model = ShallowWaterModel(strip)
    rng = np.random.default_rng(0)
    x = model.from_natural(rng.standard_normal(model.n) * 0.1)
    return best_time(lambda: model.forward(x), repeat, time.process_time)


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
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    return (
        f"{os.cpu_count()} CPUs ({model}), {platform.system()} {platform.machine()}, "
        f"Python {platform.python_version()}, NumPy {np.__version__}; load average at the end {load}"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="paper", help="model preset (default: paper)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per figure; the best is kept (default: 3)")
    parser.add_argument("--batch", type=int, default=100, help="directions in the batched runs (default: 100)")
    parser.add_argument("--ranks", type=int, default=2, help="ranks of the parallel forward run (default: 2)")
    parser.add_argument(
        "--lead-days", type=float, default=20.0,
        help="days between the two states of the state-dependence figure (default: 20)",
    )
    parser.add_argument("--out", default=None, help="Markdown file for the results")
    parser.add_argument("--forward-only", action="store_true", help="print the forward time as JSON and stop")
    args = parser.parse_args()

    from petsc_nnpc.utils import init_petsc

    init_petsc([])
    if args.forward_only:
        seconds = time_forward(args.preset, args.repeat)
        from petsc4py import PETSc

        if PETSc.COMM_WORLD.getRank() == 0:
            print(json.dumps({"forward": seconds, "ranks": PETSc.COMM_WORLD.getSize()}))
        return 0

    forward = time_forward(args.preset, args.repeat)
    linear = time_linear(args.preset, args.repeat, args.batch)
    command = [
        "mpiexec", "--allow-run-as-root", "--oversubscribe", "-n", str(args.ranks),
        sys.executable, os.path.abspath(__file__), "--preset", args.preset,
        "--repeat", str(args.repeat), "--forward-only",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    completed = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800, check=False)
    if completed.returncode != 0:
        raise SystemExit(f"the {args.ranks}-rank run failed:\n{completed.stdout}\n{completed.stderr}")
    parallel = json.loads(completed.stdout.strip().splitlines()[-1])["forward"]
    dependence = tl_state_dependence(args.preset, args.lead_days, k=8)
    strip = half_patch_forward(args.preset, args.ranks, args.repeat)

    single = linear["tl"] + linear["adjoint"]
    per_direction = (linear["tl_batch"] + linear["adjoint_batch"]) / args.batch
    base = linear["forward"]
    rows = [
        ("forward window (CPU time)", f"{base * 1e3:.1f} ms", ""),
        ("linearize: forward + stored trajectory (CPU time)", f"{linear['linearize'] * 1e3:.1f} ms",
         f"{linear['linearize'] / base:.2f} x forward"),
        ("tangent-linear window (CPU time)", f"{linear['tl'] * 1e3:.1f} ms", f"{linear['tl'] / base:.2f} x forward"),
        ("adjoint window (CPU time)", f"{linear['adjoint'] * 1e3:.1f} ms", f"{linear['adjoint'] / base:.2f} x forward"),
        ("TL + adjoint, one direction (CPU time)", f"{single * 1e3:.1f} ms",
         f"{single / base:.2f} x forward (target <= 4)"),
        (f"TL + adjoint per direction, batch of {args.batch} (CPU time)", f"{per_direction * 1e3:.1f} ms",
         f"{per_direction / single:.2f} x one direction (target <= 0.25)"),
        ("forward window, 1 rank (wall time)", f"{forward * 1e3:.1f} ms", ""),
        (f"forward window, {args.ranks} ranks (wall time)", f"{parallel * 1e3:.1f} ms",
         f"speed-up {forward / parallel:.2f} (target >= 1.4)"),
        (f"forward window on a 1/{args.ranks} strip of the grid (CPU time)", f"{strip * 1e3:.1f} ms",
         f"speed-up bound {base / strip:.2f} with a free core per rank"),
        (f"state dependence: relative change of M' Z between states {args.lead_days:g} days apart",
         f"{dependence:.3f}", "8 random directions with physical scales"),
    ]
    from shallow_water import get_config

    config = get_config(args.preset)
    lines = [
        f"# Shallow-water model benchmark ({args.preset} preset)",
        "",
        f"Grid {config.nx} x {config.ny} (n = {config.n}), window of {config.window_steps} RK4 steps "
        f"of {config.dt:g} s. Best of {args.repeat} runs each.",
        "",
        f"Command: `OMP_NUM_THREADS=1 python benchmarks/model.py --preset {args.preset} "
        f"--repeat {args.repeat} --batch {args.batch} --ranks {args.ranks}`",
        "",
        f"Machine: {machine()}.",
        "",
        "| measure | time | ratio |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {name} | {value} | {ratio} |" for name, value, ratio in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
