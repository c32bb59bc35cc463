"""Tables and figures of a twin experiment: ``report.md`` and PNG files.

The input is the list of records that :mod:`petsc_nnpc.experiment` writes to
``results.json``, one per preconditioner and cycle, with at least the keys
``preconditioner``, ``form``, ``cycle``, ``iterations``, ``products``,
``wall_time``, ``converged_reason`` and ``residual_norms``. Ratios are taken
against the unpreconditioned solve (``none``) of the same form, because both
forms solve the same inner-loop problem with operators of very different
conditioning.
"""

import math
import os
from collections import OrderedDict

import numpy as np

FORM_TITLES = {
    "paper": "A_x (the paper's form)",
    "bhalf": "I + B^1/2 GᵀR⁻¹G B^1/2 (first-level change of variable)",
}


def group_records(records):
    """Return ``{(form, preconditioner): [records]}`` in first-seen order."""
    groups = OrderedDict()
    for record in records:
        key = (record.get("form", "paper"), record["preconditioner"])
        groups.setdefault(key, []).append(record)
    return groups


def summarize(records):
    """Return one summary row per form and preconditioner.

    Each row contains the means over cycles of iterations, products (setup
    included) and wall time (setup included), the number of converged
    solves, and the ratio of each mean to that of ``none`` in the same form
    (``nan`` when that form has no ``none`` record).
    """
    groups = group_records(records)
    rows = []
    for (form, name), members in groups.items():
        rows.append({
            "form": form,
            "preconditioner": name,
            "cycles": len(members),
            "iterations": float(np.mean([m["iterations"] for m in members])),
            "products": float(np.mean([m["products"] for m in members])),
            "wall_time": float(np.mean([m["wall_time"] for m in members])),
            "converged": sum(1 for m in members if _converged(m)),
        })
    baseline = {row["form"]: row for row in rows if row["preconditioner"] == "none"}
    for row in rows:
        base = baseline.get(row["form"])
        for key in ("iterations", "products", "wall_time"):
            ratio = math.nan
            if base is not None and base[key] > 0:
                ratio = row[key] / base[key]
            row[f"{key}_ratio"] = ratio
    return rows


def _converged(record):
    return str(record.get("converged_reason", "")).startswith("CONVERGED")


def markdown_table(rows):
    """Return the summary rows as a Markdown table."""
    header = (
        "| form | preconditioner | cycles | converged | iterations | ratio | "
        "products | ratio | wall time (s) | ratio |\n"
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n"
    )
    lines = []
    for row in rows:
        lines.append(
            f"| {row['form']} | {row['preconditioner']} | {row['cycles']} | "
            f"{row['converged']} | {row['iterations']:.1f} | {_ratio(row['iterations_ratio'])} | "
            f"{row['products']:.1f} | {_ratio(row['products_ratio'])} | "
            f"{row['wall_time']:.3f} | {_ratio(row['wall_time_ratio'])} |"
        )
    return header + "\n".join(lines) + "\n"


def _ratio(value):
    return "–" if math.isnan(value) else f"{value:.2f}"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_iterations(records, path, max_iterations=2000):
    """Plot iterations per preconditioner, one panel per form (as figure 5 of Trappler & Vidard).

    Each cycle is a dot, the mean a bar; the dotted line is the mean of the
    unpreconditioned solves of that form.
    """
    plt = _pyplot()
    groups = group_records(records)
    forms = list(OrderedDict.fromkeys(form for form, _ in groups))
    figure, axes = plt.subplots(
        len(forms), 1, figsize=(10, 3.6 * len(forms)), squeeze=False
    )
    for axis, form in zip(axes[:, 0], forms):
        names = [name for f, name in groups if f == form]
        for position, name in enumerate(names):
            counts = [m["iterations"] for m in groups[(form, name)]]
            axis.bar(position, np.mean(counts), color="0.85", edgecolor="0.4")
            axis.plot([position] * len(counts), counts, "o", color="tab:blue", ms=4)
        if (form, "none") in groups:
            none_mean = np.mean([m["iterations"] for m in groups[(form, "none")]])
            axis.axhline(none_mean, linestyle=":", color="k", label="no preconditioner")
            axis.legend(loc="upper right")
        axis.axhline(max_iterations, color="tab:red", linewidth=0.8)
        axis.set_xticks(range(len(names)))
        axis.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
        axis.set_ylabel("CG iterations to 1e-7")
        axis.set_ylim(0, 1.05 * max(max(m["iterations"] for m in records), 1))
        axis.set_title(FORM_TITLES.get(form, form), fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_residuals(records, path, cycle=0):
    """Plot the relative residual norm against the iteration (as figure 6 of Trappler & Vidard)."""
    plt = _pyplot()
    groups = group_records(records)
    forms = list(OrderedDict.fromkeys(form for form, _ in groups))
    figure, axes = plt.subplots(
        1, len(forms), figsize=(6.5 * len(forms), 4.5), squeeze=False
    )
    for axis, form in zip(axes[0], forms):
        for (f, name), members in groups.items():
            if f != form:
                continue
            chosen = [m for m in members if m["cycle"] == cycle] or members[:1]
            norms = np.asarray(chosen[0]["residual_norms"], dtype=float)
            if norms.size == 0 or norms[0] <= 0:
                continue
            style = ":" if name == "none" else "-"
            color = "k" if name == "none" else None
            axis.semilogy(norms / norms[0], style, color=color, label=name, linewidth=1)
        axis.axhline(1e-7, color="0.5", linewidth=0.8)
        axis.set_xlabel("CG iteration")
        axis.set_ylabel("‖b − A δx‖ / ‖b‖")
        axis.set_title(f"{FORM_TITLES.get(form, form)}, cycle {cycle}", fontsize=9)
        axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def split_natural(vector, grid_shape):
    """Return ``(eta, u, v)`` images of a natural-ordering vector.

    ``eta`` is ``ny × nx``, ``u`` is ``ny × (nx − 1)`` and ``v`` is
    ``(ny − 1) × nx``.
    """
    ny, nx = grid_shape
    vector = np.asarray(vector)
    n_eta, n_u = ny * nx, ny * (nx - 1)
    eta = vector[:n_eta].reshape(ny, nx)
    u = vector[n_eta:n_eta + n_u].reshape(ny, nx - 1)
    v = vector[n_eta + n_u:].reshape(ny - 1, nx)
    return eta, u, v


def plot_eigenvectors(U, indices, grid_shape, path, title="predicted eigenvectors"):
    """Show columns ``indices`` of ``U`` (natural ordering) as η, u, v images (as figure 7 of Trappler & Vidard)."""
    plt = _pyplot()
    figure, axes = plt.subplots(
        3, len(indices), figsize=(2.6 * len(indices), 7.2), squeeze=False
    )
    for column, index in enumerate(indices):
        for row, (label, image) in enumerate(zip(("η", "u", "v"), split_natural(U[:, index], grid_shape))):
            axis = axes[row, column]
            limit = np.abs(image).max() or 1.0
            axis.imshow(image, origin="lower", cmap="RdBu_r", vmin=-limit, vmax=limit)
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(f"i = {index + 1}", fontsize=9)
            if column == 0:
                axis.set_ylabel(label)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_eigenvalues(exact, predicted, path):
    """Plot predicted against exact leading eigenvalues of the same operator."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6, 4.2))
    axis.semilogy(np.arange(1, len(exact) + 1), exact, "k-", label="exact (Lanczos)")
    axis.semilogy(np.arange(1, len(predicted) + 1), predicted, "o", ms=3, label="network")
    axis.set_xlabel("index i")
    axis.set_ylabel("eigenvalue λ_i")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_limit(limit, learned_points, path):
    """Plot the oracle's iterations against r for each form, with the learned PC's points.

    ``limit`` maps a form to ``{"rank": [...], "iterations": [...], "none": N}``;
    ``learned_points`` is a list of ``{"form", "rank", "iterations", "label"}``.
    """
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6.5, 4.5))
    colors = {"paper": "tab:blue", "bhalf": "tab:green"}
    for form, curve in limit.items():
        color = colors.get(form)
        mu = f", mu={curve['mu']}" if "mu" in curve else ""
        axis.plot(curve["rank"], curve["iterations"], "-o", color=color, ms=4,
                  label=f"exact eigenpairs{mu}, {form}")
        if curve.get("none") is not None:
            axis.axhline(curve["none"], linestyle=":", color=color, label=f"none, {form}")
    for point in learned_points:
        axis.plot(point["rank"], point["iterations"], "x", ms=8,
                  color=colors.get(point["form"], "k"))
    if learned_points:
        axis.plot([], [], "kx", label="nnpc (learned)")
    axis.set_xlabel("rank r")
    axis.set_ylabel("CG iterations to 1e-7")
    axis.set_yscale("log")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_report(out_dir, records, metadata, analysis=None):
    """Write ``report.md`` and the figures to ``out_dir``; return the report's path.

    ``metadata`` describes the run (preset, grid, cycles, command, machine);
    ``analysis`` may contain ``spectrum`` (``exact`` and ``predicted`` lists),
    ``limit`` and ``learned_points`` (see :func:`plot_limit`), and
    ``eigenvectors`` (``U`` in natural ordering with ``indices``).
    """
    from petsc_nnpc.utils import atomic_write_bytes

    analysis = analysis or {}
    rows = summarize(records)
    figures = []
    plot_iterations(records, os.path.join(out_dir, "iterations.png"))
    figures.append(("Iterations per preconditioner (dotted: none)", "iterations.png"))
    plot_residuals(records, os.path.join(out_dir, "residuals.png"))
    figures.append(("Residual norm against iteration", "residuals.png"))
    if "eigenvectors" in analysis:
        vectors = analysis["eigenvectors"]
        plot_eigenvectors(vectors["U"], vectors["indices"], metadata["grid_shape"],
                          os.path.join(out_dir, "eigenvectors.png"))
        figures.append(("Predicted eigenvectors at the first linearization state", "eigenvectors.png"))
    if "spectrum" in analysis:
        plot_eigenvalues(analysis["spectrum"]["exact"], analysis["spectrum"]["predicted"],
                         os.path.join(out_dir, "eigenvalues.png"))
        figures.append(("Predicted against exact leading eigenvalues", "eigenvalues.png"))
    if "limit" in analysis:
        plot_limit(analysis["limit"], analysis.get("learned_points", []),
                   os.path.join(out_dir, "limit.png"))
        figures.append(("Oracle iterations against rank, both forms", "limit.png"))

    lines = [f"# Twin experiment on the `{metadata.get('preset', '?')}` preset", ""]
    for key, value in metadata.items():
        lines.append(f"- {key}: {value}")
    lines += [
        "",
        "Means over cycles. Products count every matrix-vector product with the",
        "Gauss-Newton operator, those spent on preconditioner setup included; wall",
        "time includes setup (network inference, orthonormalization, transfers).",
        "Ratios are to `none` of the same form.",
        "",
        markdown_table(rows),
    ]
    if "spectrum" in analysis and analysis["spectrum"].get("exact"):
        exact = analysis["spectrum"]["exact"]
        lines += [
            "Leading eigenvalues of the operator at the first linearization state: "
            f"λ_1 = {exact[0]:.4g}, λ_{len(exact)} = {exact[-1]:.4g}.",
            "",
        ]
    for caption, name in figures:
        lines += [f"## {caption}", "", f"![{caption}]({name})", ""]
    path = os.path.join(out_dir, "report.md")
    atomic_write_bytes(path, "\n".join(lines).encode("utf-8"))
    return path
