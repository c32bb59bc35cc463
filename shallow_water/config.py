"""Configuration of the shallow-water model: ``ModelConfig`` and its presets.

A preset names a grid, the physical parameters and the time step that
together reproduce one use: ``tiny`` for tests (milliseconds per window),
``small`` for the default study on two CPU cores, ``paper`` for the sizes of
Trappler & Vidard, "State-dependent preconditioning for the inner-loop in
Variational Data Assimilation using Machine Learning" (64 × 64 cells,
n = 12160, a 2-day window of 48 RK4 steps of 3600 s).
"""

import dataclasses
import math

# Stability region of classical RK4: it contains the imaginary axis up to
# |z| = 2√2 and the negative real axis up to about 2.785.
RK4_IMAGINARY_LIMIT = 2.0 * math.sqrt(2.0)
RK4_REAL_LIMIT = 2.785


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Grid, physics and time stepping of the reduced-gravity double gyre.

    All quantities are SI. The basin is ``[0, Lx] × [-Ly/2, Ly/2]`` with
    ``nx × ny`` cells of size ``dx = Lx/nx``, ``dy = Ly/ny``.

    Parameters
    ----------
    nx, ny : int
        Number of cells in x (east) and y (north), each at least 3.
    Lx, Ly : float
        Basin size [m].
    H : float
        Resting layer thickness [m].
    g_prime : float
        Reduced gravity g' [m s⁻²].
    f0, beta : float
        Coriolis parameter at mid-basin [s⁻¹] and its meridional gradient
        β [m⁻¹ s⁻¹].
    rho0 : float
        Reference density [kg m⁻³].
    nu : float
        Lateral (Laplacian) viscosity [m² s⁻¹].
    c_b : float
        Linear bottom drag [s⁻¹].
    tau0 : float
        Wind-stress amplitude [N m⁻²]; ``tau_x = tau0 cos(2π y / Ly)``.
    dt : float
        RK4 time step [s].
    window_steps : int
        Time steps in one assimilation window.
    u_max : float
        Largest flow speed expected [m s⁻¹], used only in the stability
        estimate (gravity waves are Doppler-shifted by the flow).
    preset : str
        Name of the preset this configuration came from, or ``"custom"``.

    Raises
    ------
    ValueError
        On a non-positive size or parameter, or a time step beyond the
        estimated stability limit of RK4 on this grid (see
        :meth:`stable_dt`).
    """

    nx: int
    ny: int
    Lx: float = 1.8e6
    Ly: float = 1.8e6
    H: float = 500.0
    g_prime: float = 0.03
    f0: float = 1.0e-4
    beta: float = 2.0e-11
    rho0: float = 1000.0
    nu: float = 500.0
    c_b: float = 1.0e-7
    tau0: float = 0.05
    dt: float = 3600.0
    window_steps: int = 48
    u_max: float = 1.0
    preset: str = "custom"

    def __post_init__(self):
        for name in ("nx", "ny"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 3:
                raise ValueError(f"{name} = {value!r} is invalid: use an integer of at least 3 cells")
        if not isinstance(self.window_steps, int) or self.window_steps < 1:
            raise ValueError(
                f"window_steps = {self.window_steps!r} is invalid: use a positive integer"
            )
        for name in ("Lx", "Ly", "H", "g_prime", "rho0", "dt"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} = {value!r} is invalid: it must be positive and finite")
        for name in ("f0", "beta", "tau0"):
            value = getattr(self, name)
            if not math.isfinite(value):
                raise ValueError(f"{name} = {value!r} is invalid: it must be finite")
        for name in ("nu", "c_b", "u_max"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(
                    f"{name} = {value!r} is invalid: it must be non-negative and finite"
                )
        limit = self.stable_dt()
        if self.dt > limit:
            raise ValueError(
                f"dt = {self.dt:g} s exceeds the estimated RK4 stability limit "
                f"{limit:.0f} s on this {self.nx} x {self.ny} grid (gravity-wave speed "
                f"{self.wave_speed:.2f} m/s, viscosity {self.nu:g} m^2/s): "
                f"use dt <= {limit:.0f} s and raise window_steps to keep the window length"
            )

    @property
    def dx(self):
        """Cell width in x [m]."""
        return self.Lx / self.nx

    @property
    def dy(self):
        """Cell width in y [m]."""
        return self.Ly / self.ny

    @property
    def wave_speed(self):
        """Long gravity-wave speed ``sqrt(g' H)`` [m s⁻¹]."""
        return math.sqrt(self.g_prime * self.H)

    @property
    def n(self):
        """State size: ``nx·ny`` η, ``(nx−1)·ny`` u and ``nx·(ny−1)`` v entries."""
        return self.nx * self.ny + (self.nx - 1) * self.ny + self.nx * (self.ny - 1)

    @property
    def window_seconds(self):
        """Length of the assimilation window [s]."""
        return self.dt * self.window_steps

    @property
    def grid(self):
        """The grid identity recorded in state files: ``(nx, ny, Lx, Ly)``."""
        return (self.nx, self.ny, float(self.Lx), float(self.Ly))

    def stable_dt(self):
        """Return the estimated largest stable RK4 time step [s].

        The C-grid gravity-wave frequency is at most
        ``ω = 2 (c + u_max) sqrt(1/dx² + 1/dy²)`` with ``c = sqrt(g' H)``,
        and inertial oscillations add up to ``|f|``; RK4 is stable for
        ``(ω + |f|) dt ≤ 2√2``. Laplacian viscosity and drag damp at a rate
        of at most ``4 ν (1/dx² + 1/dy²) + c_b``, stable for rate × dt ≤ 2.785.
        The smaller of the two limits is returned. It is an estimate: nonlinear
        terms and thickness variations are not included, so keep a margin.
        """
        inv_h = math.sqrt(1.0 / self.dx**2 + 1.0 / self.dy**2)
        f_max = abs(self.f0) + abs(self.beta) * self.Ly / 2.0
        omega = 2.0 * (self.wave_speed + self.u_max) * inv_h + f_max
        damping = 4.0 * self.nu * inv_h**2 + self.c_b
        limits = [RK4_IMAGINARY_LIMIT / omega]
        if damping > 0:
            limits.append(RK4_REAL_LIMIT / damping)
        return min(limits)

    def to_dict(self):
        """Return the configuration as a JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values):
        """Build a configuration from :meth:`to_dict` output."""
        names = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields {unknown}: valid fields are {sorted(names)}")
        return cls(**values)


# Physics of the paper preset (64 × 64, dx = 28 km): Munk width
# (ν/β)^(1/3) = 29 km ≈ dx. The tiny preset is very viscous so that tests
# see a smooth, steady gyre. On the small grid (dx = 56 km) a Munk width of
# one cell (ν ≈ 3500) gives a steady gyre; spin-ups of 6 years from rest
# with ν = 2000, 800 and 400 settled to a nearly steady flow, while ν = 300
# keeps a time-dependent jet (the rms change of η over 60 days stays near
# 3 m) and stays bounded, so small uses ν = 300 and dt = 7200 s (24 steps
# per 2-day window).
# NOTE: at ν = 300 the western boundary layer is under-resolved on the small
# grid, and v shows two-cell features near the west wall and along the jet.
PRESETS = {
    "tiny": dict(nx=10, ny=10, nu=8000.0, dt=7200.0, window_steps=4),
    "small": dict(nx=32, ny=32, nu=300.0, dt=7200.0, window_steps=24),
    "paper": dict(nx=64, ny=64, nu=500.0, dt=3600.0, window_steps=48),
}


def preset_names():
    """Return the names of the presets."""
    return tuple(PRESETS)


def get_config(preset, **overrides):
    """Return the ``ModelConfig`` of a named preset, with optional overrides.

    Raises
    ------
    ValueError
        If ``preset`` is not one of :func:`preset_names`.
    """
    if preset not in PRESETS:
        raise ValueError(
            f"unknown preset {preset!r}: valid presets are {', '.join(PRESETS)}"
        )
    values = dict(PRESETS[preset], preset=preset)
    values.update(overrides)
    return ModelConfig(**values)
