"""Spin-up from rest, background states, gyre diagnostics and state figures."""

import logging
import os

import numpy as np

from shallow_water.state import check_finite, read_state_file, save_state, split_fields

log = logging.getLogger("shallow_water.spinup")

SECONDS_PER_DAY = 86400.0

# Spin-up length and background averaging period per preset [days]. On the
# 64 × 64 grid the double gyre and its jet form within about three years of
# model time. On the small grid the gyre is formed after about three years
# and its jet then keeps varying; the very viscous tiny preset settles
# within a year.
SPINUP_DAYS = {
    "tiny": dict(spinup=365.0, background=90.0),
    "small": dict(spinup=5 * 365.0, background=365.0),
    "paper": dict(spinup=7 * 365.0, background=365.0),
}


def spinup_days(preset):
    """Return ``(spin-up days, background days)`` for a preset (defaults for ``custom``)."""
    days = SPINUP_DAYS.get(preset, SPINUP_DAYS["paper"])
    return days["spinup"], days["background"]


def steps_for_days(config, days):
    """Return the number of time steps covering ``days`` days (at least one)."""
    if not days > 0:
        raise ValueError(f"days = {days!r} is invalid: use a positive number of days")
    return max(1, int(round(days * SECONDS_PER_DAY / config.dt)))


def check_bounded(config, natural, time):
    """Raise ``RuntimeError`` if a state blew up: NaN, Inf or a vanishing layer (H + η ≤ 0)."""
    try:
        check_finite(config, natural, source=f"state at day {time / SECONDS_PER_DAY:.1f}")
    except ValueError as error:
        raise RuntimeError(f"{error}") from None
    eta = split_fields(config, natural)["eta"]
    if eta.min() <= -config.H:
        raise RuntimeError(
            f"the layer thickness vanished at day {time / SECONDS_PER_DAY:.1f} "
            f"(min eta = {eta.min():.1f} m, H = {config.H:g} m): reduce tau0 = {config.tau0:g} "
            "or raise nu or c_b"
        )


def _progress(total, enabled, description):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=description, unit="day", leave=False, disable=None)


def spin_up(model, days, x0=None, checkpoint=None, checkpoint_days=30.0, progress=True):
    """Return the natural-ordering state after ``days`` days from ``x0`` (rest by default).

    The run advances one day at a time and checks after each day that the
    flow is bounded. With ``checkpoint`` (a ``.npz`` path) the state is
    written atomically every ``checkpoint_days`` days, and a later call with
    the same path resumes from it. Cost: ``days · 86400 / dt`` RK4 steps.
    """
    config = model.config
    steps_per_day = SECONDS_PER_DAY / config.dt
    total_steps = steps_for_days(config, days)
    rank0 = model.comm.getRank() == 0

    step = 0
    natural = np.zeros(model.n) if x0 is None else np.asarray(x0, dtype=np.float64)
    if checkpoint is not None and os.path.exists(checkpoint):
        saved, saved_config, time = read_state_file(checkpoint)
        if saved_config.grid != config.grid:
            raise ValueError(
                f"checkpoint {checkpoint} is for another grid ({saved_config.grid}, model "
                f"{config.grid}): delete it or pass another --out"
            )
        natural = saved
        step = int(round(time / config.dt))
        log.info("resuming the spin-up from %s at day %.1f", checkpoint, time / SECONDS_PER_DAY)

    x = model.from_natural(natural)
    bar = _progress(total_steps / steps_per_day, progress and rank0, f"spin-up {config.preset}")
    if bar is not None:
        bar.update(step / steps_per_day)
    chunk = max(1, int(round(steps_per_day)))
    since_checkpoint = 0
    while step < total_steps:
        count = min(chunk, total_steps - step)
        x = model.advance(x, count)
        step += count
        since_checkpoint += count
        natural = model.to_natural(x)
        check_bounded(config, natural, step * config.dt)
        if bar is not None:
            bar.update(count / steps_per_day)
        if checkpoint is not None and since_checkpoint * config.dt >= checkpoint_days * SECONDS_PER_DAY:
            if rank0:
                save_state(checkpoint, config, natural, time=step * config.dt)
            since_checkpoint = 0
    if bar is not None:
        bar.close()
    return natural


def time_mean(model, x0, days, sample_days=1.0, progress=True):
    """Return the mean of states sampled every ``sample_days`` over ``days`` days from ``x0``.

    ``x0`` is a natural-ordering state; the result is too. This is the
    background state: the time mean of the flow after the spin-up.
    """
    config = model.config
    interval = steps_for_days(config, sample_days)
    samples = max(1, int(round(days / sample_days)))
    rank0 = model.comm.getRank() == 0
    x = model.from_natural(x0)
    total = np.zeros(model.n)
    bar = _progress(samples * sample_days, progress and rank0, f"background {config.preset}")
    for index in range(samples):
        x = model.advance(x, interval)
        natural = model.to_natural(x)
        check_bounded(config, natural, (index + 1) * interval * config.dt)
        total += natural
        if bar is not None:
            bar.update(sample_days)
    if bar is not None:
        bar.close()
    return total / samples


def gyre_diagnostics(config, natural):
    """Return figures that tell whether a state is a wind-driven double gyre.

    Keys: ``eta_min``, ``eta_max`` [m], ``speed_max`` [m s⁻¹];
    ``jet_u``: mean u over the western half of the basin in the rows within
    ``Ly/8`` of mid-basin (positive for an eastward jet) [m s⁻¹];
    ``eta_south_minus_north``: mean η of the southern half minus that of the
    northern half (positive for an anticyclonic southern and a cyclonic
    northern gyre) [m].
    """
    fields = split_fields(config, natural)
    eta, u, v = fields["eta"], fields["u"], fields["v"]
    ny, nx = eta.shape
    y = -config.Ly / 2 + (np.arange(ny) + 0.5) * config.dy
    band = np.abs(y) <= config.Ly / 8
    u_c = np.zeros((ny, nx))
    u_c[:, :-1] += 0.5 * u
    u_c[:, 1:] += 0.5 * u
    v_c = np.zeros((ny, nx))
    v_c[:-1] += 0.5 * v
    v_c[1:] += 0.5 * v
    return {
        "eta_min": float(eta.min()),
        "eta_max": float(eta.max()),
        "speed_max": float(np.sqrt(u_c**2 + v_c**2).max()),
        "jet_u": float(u[band, : (nx - 1) // 2].mean()),
        "eta_south_minus_north": float(eta[: ny // 2].mean() - eta[ny - ny // 2:].mean()),
    }


def plot_state(path, config, natural, title=None):
    """Write a PNG of η, u and v of a natural-ordering state to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fields = split_fields(config, natural)
    extent = [0, config.Lx / 1e3, -config.Ly / 2e3, config.Ly / 2e3]
    figure, axes = plt.subplots(1, 3, figsize=(13, 4), constrained_layout=True)
    labels = {"eta": "η [m]", "u": "u [m/s]", "v": "v [m/s]"}
    for axis, (name, array) in zip(axes, fields.items()):
        limit = float(np.abs(array).max()) or 1.0
        image = axis.imshow(
            array, origin="lower", extent=extent, cmap="RdBu_r", vmin=-limit, vmax=limit
        )
        axis.set_title(labels[name])
        axis.set_xlabel("x [km]")
        axis.set_ylabel("y [km]")
        figure.colorbar(image, ax=axis, shrink=0.85)
    if title:
        figure.suptitle(title)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
