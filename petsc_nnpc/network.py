"""Eigenpair network: state image in, approximate leading eigenpairs out.

The network ``f_θ`` of Trappler & Vidard, "State-dependent preconditioning
for the inner-loop in Variational Data Assimilation using Machine Learning"
(their eq. 2.1), maps a linearization state ``x`` to ``r`` raw vectors
``Ũ ∈ R^{n×r}`` and ``r`` eigenvalue logits ``λ̃``. Post-processing gives
orthonormal vectors ``U = qr(Ũ)`` and eigenvalues ``Λ = S_M(λ̃)`` with the
scaled sigmoid ``S_M(t) = M / (1 + e^{−t})``, so that ``U Λ Uᵀ`` approximates
the Gauss-Newton matrix ``A_x``.

The state enters as a 3-channel ``ny × nx`` image (η, u, v). On the C-grid
``u`` has one column fewer than η and ``v`` one row fewer. The missing
column or row is the wall, filled with zeros on input and dropped on output.
The body is a U-Net whose downsampling path uses transformer blocks
(self-attention over the cells of each coarse level), the architecture
Trappler & Vidard report as working best for this problem.
The vectors are the output of a pointwise MLP with ``3 r`` output channels
plus an optional learned, state-independent base ``Ũ₀`` (one weight per
output entry, about ``n · r``). The logits come from the pooled bottleneck.
Without the base the parameter count grows like ``head_channels · r`` and
does not depend on the grid; no layer maps to ``U`` densely, which would
cost ``n · r`` times its input size.

Checkpoints are a folder with ``weights.safetensors`` and
``checkpoint.json``; loading reads tensors and JSON only and never runs
code from the file.
"""

import dataclasses
import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from petsc_nnpc.utils import atomic_write_bytes, atomic_write_json

log = logging.getLogger("petsc_nnpc.network")

WEIGHTS_FILE = "weights.safetensors"
METADATA_FILE = "checkpoint.json"
CHECKPOINT_FORMAT = "petsc_nnpc-eigenpair-network"
CHECKPOINT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or made for another problem."""


class DeviceError(RuntimeError):
    """A requested torch device is not available."""


# Network sizes per preset: seconds on CPU for ``tiny``, minutes for
# ``small``, a GPU for ``paper`` (64×64, r = 2000).
NETWORK_PRESETS = {
    "tiny": dict(width=8, depth=2, heads=2, blocks_per_level=1, eigen_hidden=32),
    "small": dict(width=16, depth=3, heads=4, blocks_per_level=1, eigen_hidden=128),
    "paper": dict(width=32, depth=4, heads=8, blocks_per_level=2, eigen_hidden=512),
}


def state_size(grid_shape):
    """Return ``n = ny·nx + ny·(nx−1) + (ny−1)·nx`` for a C-grid of ``(ny, nx)`` cells."""
    ny, nx = grid_shape
    return ny * nx + ny * (nx - 1) + (ny - 1) * nx


@dataclass
class NetworkConfig:
    """Configuration of :class:`EigenpairNetwork`, validated at construction.

    Parameters
    ----------
    grid_shape : tuple of int
        ``(ny, nx)`` cells of the η grid.
    rank : int
        Number ``r`` of eigenpairs the network predicts.
    sigmoid_scale : float
        ``M`` of the scaled sigmoid: an upper bound of the eigenvalues.
    width : int
        Channels at full resolution; level ``l`` has ``width · 2^l``.
    depth : int
        Number of downsampling levels. The image is zero-padded to a
        multiple of ``2^depth`` and the output cropped back.
    heads : int
        Attention heads; must divide ``width``.
    blocks_per_level : int
        Transformer blocks after each downsampling.
    mlp_ratio : float
        Hidden size of the transformer MLP relative to its channels.
    eigen_hidden : int
        Hidden size of the eigenvalue head.
    head_channels : int
        Hidden channels of the pointwise MLP that outputs the vectors; 0
        chooses ``min(max(2·width, r), 1024)``. ``Ũ`` has rank at most
        ``3 · head_channels``, so it must not be much below ``r / 3``.
    base_vectors : bool
        Add a learned, state-independent ``Ũ₀`` (``n · r`` weights, one per
        output entry) to the network's vectors, so that the convolutions
        only learn how the leading subspace moves with the state.
    """

    grid_shape: tuple
    rank: int
    sigmoid_scale: float
    width: int = 16
    depth: int = 3
    heads: int = 4
    blocks_per_level: int = 1
    mlp_ratio: float = 2.0
    eigen_hidden: int = 128
    head_channels: int = 0
    base_vectors: bool = True

    def __post_init__(self):
        self.grid_shape = tuple(int(v) for v in self.grid_shape)
        if len(self.grid_shape) != 2 or min(self.grid_shape) < 2:
            raise ValueError(
                f"grid_shape = {self.grid_shape} is invalid: expected (ny, nx) with both >= 2"
            )
        n = state_size(self.grid_shape)
        if not 1 <= self.rank <= n:
            raise ValueError(f"rank = {self.rank} is invalid: expected 1 <= rank <= n = {n}")
        if not (math.isfinite(self.sigmoid_scale) and self.sigmoid_scale > 0):
            raise ValueError(
                f"sigmoid_scale M = {self.sigmoid_scale} is invalid: expected a positive "
                "upper bound of the eigenvalues of A_x"
            )
        for name in ("width", "depth", "heads", "blocks_per_level", "eigen_hidden"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} = {getattr(self, name)} is invalid: expected >= 1")
        if self.width % self.heads:
            raise ValueError(
                f"heads = {self.heads} does not divide width = {self.width}; "
                "choose a width that is a multiple of heads"
            )
        if self.head_channels < 0:
            raise ValueError(f"head_channels = {self.head_channels} is invalid: expected >= 0")
        if 0 < self.head_channels and 3 * self.head_channels < self.rank:
            raise ValueError(
                f"head_channels = {self.head_channels} limits the vectors to rank "
                f"{3 * self.head_channels} < r = {self.rank}; use head_channels >= {-(-self.rank // 3)} "
                "or 0 for the default"
            )
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio = {self.mlp_ratio} is invalid: expected > 0")

    @property
    def n(self):
        return state_size(self.grid_shape)

    @property
    def head_width(self):
        """Hidden channels of the vector head (``head_channels`` or its default)."""
        if self.head_channels:
            return self.head_channels
        return min(max(2 * self.width, self.rank), 1024)

    @classmethod
    def for_preset(cls, preset, grid_shape, rank, sigmoid_scale, **overrides):
        """Return the configuration sized for ``preset`` (``tiny``, ``small``, ``paper``)."""
        if preset not in NETWORK_PRESETS:
            raise ValueError(
                f"unknown preset {preset!r}: expected one of {sorted(NETWORK_PRESETS)}"
            )
        values = dict(NETWORK_PRESETS[preset])
        values.update(overrides)
        return cls(grid_shape=grid_shape, rank=rank, sigmoid_scale=sigmoid_scale, **values)

    def to_dict(self):
        values = dataclasses.asdict(self)
        values["grid_shape"] = list(self.grid_shape)
        return values

    @classmethod
    def from_dict(cls, values):
        names = {field.name for field in dataclasses.fields(cls)}
        unknown = set(values) - names
        if unknown:
            raise ValueError(f"unknown network configuration keys {sorted(unknown)}")
        return cls(**values)


class StateImage:
    """Index maps between the natural ordering and the ``(3, ny, nx)`` image.

    Natural ordering: η (``ny × nx``), then u (``ny × (nx−1)``), then v
    (``(ny−1) × nx``), each row-major with y the slow index. Pixel
    ``(c, j, i)`` of the image is channel ``c`` at row ``j``, column ``i``;
    u's last column and v's last row are walls.
    """

    def __init__(self, grid_shape):
        ny, nx = (int(v) for v in grid_shape)
        self.grid_shape = (ny, nx)
        self.n = state_size(self.grid_shape)
        rows, cols = np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij")
        eta = (0 * ny + rows) * nx + cols
        u = (1 * ny + rows[:, : nx - 1]) * nx + cols[:, : nx - 1]
        v = (2 * ny + rows[: ny - 1, :]) * nx + cols[: ny - 1, :]
        # (n,): flat pixel of each natural-ordering entry in a (3*ny*nx,) image.
        self.pixel_of_natural = np.concatenate([eta.ravel(), u.ravel(), v.ravel()])
        self.variable_slices = {
            "eta": slice(0, ny * nx),
            "u": slice(ny * nx, ny * nx + ny * (nx - 1)),
            "v": slice(ny * nx + ny * (nx - 1), self.n),
        }

    def to_image(self, x):
        """Return ``x`` (``(B, n)`` tensor) as a ``(B, 3, ny, nx)`` image, walls zero."""
        ny, nx = self.grid_shape
        index = torch.as_tensor(self.pixel_of_natural, device=x.device)
        image = x.new_zeros(x.shape[0], 3 * ny * nx)
        image[:, index] = x
        return image.view(x.shape[0], 3, ny, nx)

    def channel_statistics(self, states):
        """Return per-variable mean and standard deviation of ``states`` (``(m, n)``)."""
        states = np.asarray(states, dtype=np.float64)
        mean = np.empty(3)
        std = np.empty(3)
        for c, name in enumerate(("eta", "u", "v")):
            values = states[:, self.variable_slices[name]]
            mean[c] = values.mean()
            std[c] = values.std()
        # A variable that never varies (a state at rest) is only centred.
        std[~(std > 0)] = 1.0
        return mean, std


def _groups(channels):
    return math.gcd(channels, 8)


class ConvBlock(nn.Module):
    """Two 3×3 convolutions with GroupNorm and SiLU, plus a residual path."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(c_in), c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(_groups(c_out), c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class TransformerBlock(nn.Module):
    """Pre-norm self-attention and MLP over the cells of a feature map.

    A depthwise 3×3 convolution adds position information, so the block
    has no parameter tied to the grid size. Attention over ``T = h·w``
    tokens costs ``O(T² C)`` per image.
    """

    def __init__(self, channels, heads, mlp_ratio):
        super().__init__()
        self.heads = heads
        self.position = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.norm1 = nn.LayerNorm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)
        self.norm2 = nn.LayerNorm(channels)
        hidden = max(1, int(round(mlp_ratio * channels)))
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.GELU(), nn.Linear(hidden, channels))

    def forward(self, x):
        B, C, H, W = x.shape
        x = x + self.position(x)
        t = x.flatten(2).transpose(1, 2)  # (B, T, C), T = H*W
        q, k, v = self.qkv(self.norm1(t)).chunk(3, dim=-1)  # each (B, T, C)
        # (B, T, C) -> (B, heads, T, C/heads)
        q, k, v = (z.view(B, H * W, self.heads, C // self.heads).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v)  # (B, heads, T, C/heads)
        a = a.transpose(1, 2).reshape(B, H * W, C)  # (B, T, C)
        t = t + self.proj(a)
        t = t + self.mlp(self.norm2(t))
        return t.transpose(1, 2).reshape(B, C, H, W)


class EigenpairNetwork(nn.Module):
    """U-Net with attention in its downsampling path, predicting ``(U, Λ)``.

    The buffers ``input_mean`` and ``input_std`` (shape ``(3,)``) scale each
    channel of the state image to unit variance; they are saved with the
    weights. Costs per state: the convolutions are ``O(n · width²)``, the
    attention ``O((n/4^l)² · width · 2^l)`` at level ``l ≥ 1``, the vector
    head ``O(n · head_channels · r)`` and the QR ``O(n r²)``.
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.image = StateImage(config.grid_shape)
        self.register_buffer("input_mean", torch.zeros(3, dtype=torch.float64))
        self.register_buffer("input_std", torch.ones(3, dtype=torch.float64))
        self.register_buffer(
            "pixel_of_natural", torch.as_tensor(self.image.pixel_of_natural), persistent=False
        )

        widths = [config.width * 2 ** level for level in range(config.depth + 1)]
        # Input channels: η, u, v and the cell coordinates (x, y) in [−1, 1],
        # which let the convolutions place patterns that do not move with
        # the flow (basin modes, boundary layers).
        self.stem = nn.Conv2d(5, widths[0], 3, padding=1)
        self.encoder0 = ConvBlock(widths[0], widths[0])
        self.down = nn.ModuleList()
        self.encoder = nn.ModuleList()
        for level in range(1, config.depth + 1):
            # 2×2 patch merging halves each side and doubles the channels.
            self.down.append(nn.Conv2d(widths[level - 1], widths[level], 2, stride=2))
            self.encoder.append(nn.Sequential(*[
                TransformerBlock(widths[level], config.heads, config.mlp_ratio)
                for _ in range(config.blocks_per_level)
            ]))
        self.up = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for level in range(config.depth, 0, -1):
            self.up.append(nn.ConvTranspose2d(widths[level], widths[level - 1], 2, stride=2))
            self.decoder.append(ConvBlock(2 * widths[level - 1], widths[level - 1]))
        # A 1×1 convolution from C channels gives Ũ of rank at most 3·C, so
        # the vectors go through a pointwise MLP whose hidden width scales
        # with r (see NetworkConfig.head_width).
        self.head_norm = nn.GroupNorm(_groups(widths[0]), widths[0])
        self.vector_head = nn.Sequential(
            nn.Conv2d(widths[0], config.head_width, 1),
            nn.SiLU(),
            nn.Conv2d(config.head_width, 3 * config.rank, 1),
        )
        self.base = None
        if config.base_vectors:
            ny, nx = config.grid_shape
            self.base = nn.Parameter(torch.zeros(1, 3 * config.rank, ny, nx))
        self.eigen_head = nn.Sequential(
            nn.LayerNorm(widths[-1]),
            nn.Linear(widths[-1], config.eigen_hidden),
            nn.SiLU(),
            nn.Linear(config.eigen_hidden, config.rank),
        )
        # Start from eigenvalues spread between M/2 (about λ_max when M is
        # estimated as twice it) and 0.05 M, far from the sigmoid's saturation.
        with torch.no_grad():
            self.eigen_head[-1].bias.copy_(torch.linspace(0.0, -3.0, config.rank))

    def set_normalisation(self, mean, std):
        """Set the per-channel input mean and standard deviation (η, u, v)."""
        mean = torch.as_tensor(np.asarray(mean, dtype=np.float64))
        std = torch.as_tensor(np.asarray(std, dtype=np.float64))
        if mean.shape != (3,) or std.shape != (3,):
            raise ValueError(f"normalisation needs 3 means and 3 deviations, got {mean.shape}, {std.shape}")
        if not torch.all(std > 0):
            raise ValueError(f"input standard deviations must be positive, got {std.tolist()}")
        self.input_mean.copy_(mean)
        self.input_std.copy_(std)

    def initialize_from_eigenpairs(self, U, lam):
        """Start from fixed eigenpairs: the untrained network then returns ``(U, lam)``.

        The learned base ``Ũ₀`` takes the columns of ``U`` (natural ordering,
        shape ``(n, r)``), the last layers of the vector and eigenvalue heads
        start at zero, and the eigenvalue bias is ``S_M⁻¹(lam)``. Training then
        learns how the eigenpairs change with the state, from the loss of
        these fixed pairs instead of that of random ones. The usual source is
        the exact leading eigenpairs at the background state.
        """
        config = self.config
        U = np.asarray(U, dtype=np.float64)
        lam = np.asarray(lam, dtype=np.float64).reshape(-1)
        if self.base is None:
            raise ValueError(
                "this network has no base vectors (base_vectors = False): build it with "
                "base_vectors = True to start from given eigenpairs"
            )
        if U.shape != (config.n, config.rank) or lam.shape != (config.rank,):
            raise ValueError(
                f"initial eigenpairs of shapes U {U.shape} and lam {lam.shape} do not fit "
                f"this network (n = {config.n}, r = {config.rank}): compute r = {config.rank} "
                "eigenpairs of the same operator"
            )
        if not (np.all(np.isfinite(lam)) and np.all(lam > 0)):
            raise ValueError("initial eigenvalues must be positive and finite")
        ny, nx = config.grid_shape
        r = config.rank
        # Columns are scaled to entries of order one, like the head's outputs.
        scale = np.sqrt(config.n)
        pixels = np.zeros((r, 3 * ny * nx))
        pixels[:, self.pixel_of_natural.cpu().numpy()] = scale * U.T  # (r, 3*ny*nx)
        base = pixels.reshape(r, 3, ny * nx).transpose(1, 0, 2).reshape(1, 3 * r, ny, nx)
        fraction = np.clip(lam / config.sigmoid_scale, 1e-6, 1.0 - 1e-6)
        logits = np.log(fraction / (1.0 - fraction))  # S_M⁻¹(lam)
        with torch.no_grad():
            self.base.copy_(torch.as_tensor(base, dtype=self.base.dtype))
            last = self.vector_head[-1]
            last.weight.zero_()
            last.bias.zero_()
            self.eigen_head[-1].weight.zero_()
            self.eigen_head[-1].bias.copy_(torch.as_tensor(logits, dtype=self.eigen_head[-1].bias.dtype))

    def _padded_shape(self):
        ny, nx = self.config.grid_shape
        multiple = 2 ** self.config.depth
        return -(-ny // multiple) * multiple, -(-nx // multiple) * multiple

    def encode(self, x):
        """Return the raw outputs ``(Ũ, λ̃)`` for states ``x`` (``(B, n)``).

        ``Ũ`` has shape ``(B, n, r)`` in natural ordering, wall entries
        dropped; ``λ̃`` has shape ``(B, r)``.
        """
        config = self.config
        ny, nx = config.grid_shape
        B = x.shape[0]
        dtype = self.stem.weight.dtype
        x = x.to(torch.float64)
        image = x.new_zeros(B, 3 * ny * nx)
        image[:, self.pixel_of_natural] = x
        image = image.view(B, 3, ny, nx)  # (B, 3, ny, nx), walls zero
        mean = self.input_mean.view(1, 3, 1, 1)
        std = self.input_std.view(1, 3, 1, 1)
        image = ((image - mean) / std).to(dtype)
        wall = image.new_zeros(1, 3, ny, nx, dtype=torch.bool)
        wall[:, 1, :, nx - 1] = True
        wall[:, 2, ny - 1, :] = True
        image = image.masked_fill(wall, 0.0)
        rows = torch.linspace(-1.0, 1.0, ny, dtype=dtype, device=image.device)
        cols = torch.linspace(-1.0, 1.0, nx, dtype=dtype, device=image.device)
        coords = torch.stack(torch.meshgrid(cols, rows, indexing="xy"))  # (2, ny, nx)
        image = torch.cat([image, coords.expand(B, 2, ny, nx)], dim=1)  # (B, 5, ny, nx)
        py, px = self._padded_shape()
        image = F.pad(image, (0, px - nx, 0, py - ny))  # (B, 5, py, px)

        h = self.encoder0(self.stem(image))  # (B, width, py, px)
        skips = [h]
        for down, blocks in zip(self.down, self.encoder):
            h = blocks(down(h))  # (B, width*2^l, py/2^l, px/2^l)
            skips.append(h)
        logits = self.eigen_head(h.mean(dim=(2, 3)))  # (B, r)
        for up, block, skip in zip(self.up, self.decoder, reversed(skips[:-1])):
            h = block(torch.cat([up(h), skip], dim=1))
        out = self.vector_head(F.silu(self.head_norm(h)))  # (B, 3r, py, px)
        out = out[:, :, :ny, :nx]  # (B, 3r, ny, nx)
        if self.base is not None:
            out = out + self.base  # (1, 3r, ny, nx) broadcast over the batch
        r = config.rank
        out = out.reshape(B, 3, r, ny * nx).transpose(1, 2)  # (B, r, 3, ny*nx)
        out = out.reshape(B, r, 3 * ny * nx)  # (B, r, 3*ny*nx)
        vectors = out.index_select(2, self.pixel_of_natural)  # (B, r, n)
        return vectors.transpose(1, 2), logits  # (B, n, r), (B, r)

    def forward(self, x, qr_dtype=None):
        """Return ``(U, lam)``: orthonormal ``(B, n, r)`` and ``(B, r)`` descending.

        ``U = qr(Ũ)`` (reduced) and ``lam = S_M(λ̃)``; the columns of ``U``
        are permuted with the eigenvalues. ``qr_dtype`` (e.g.
        ``torch.float64``) runs the QR in a wider type than the network.
        """
        vectors, logits = self.encode(x)
        return postprocess(vectors, logits, self.config.sigmoid_scale, qr_dtype=qr_dtype)

    def parameter_count(self):
        return sum(p.numel() for p in self.parameters())

    def summary(self, batch_size=1):
        """Return a one-paragraph description: sizes, parameters and memory."""
        config = self.config
        params = self.parameter_count()
        bytes_per = self.stem.weight.element_size()
        output_bytes = batch_size * config.n * config.rank * bytes_per
        return (
            f"eigenpair network: grid {config.grid_shape[0]}x{config.grid_shape[1]}, n = {config.n}, "
            f"r = {config.rank}, M = {config.sigmoid_scale:g}, width {config.width}, depth "
            f"{config.depth}, {params:,} parameters ({params * bytes_per / 2**20:.1f} MiB; "
            f"{4 * params * bytes_per / 2**20:.1f} MiB with gradients and AdamW moments); "
            f"output U of {batch_size} state(s): {output_bytes / 2**20:.1f} MiB"
        )


def postprocess(vectors, logits, sigmoid_scale, qr_dtype=None):
    """Return ``(U, lam)`` from raw vectors ``(B, n, r)`` and logits ``(B, r)``.

    ``U`` is the Q factor of the reduced QR of ``Ũ``, ``lam = S_M(λ̃)``, both
    sorted by decreasing ``lam``. Gradients flow through QR and the sigmoid;
    the sort only permutes. Cost ``O(n r²)`` per state.
    """
    if qr_dtype is not None:
        vectors = vectors.to(qr_dtype)
        logits = logits.to(qr_dtype)
    Q, _ = torch.linalg.qr(vectors, mode="reduced")  # (B, n, r)
    lam = sigmoid_scale * torch.sigmoid(logits)  # (B, r)
    lam, order = torch.sort(lam, dim=-1, descending=True)
    U = torch.gather(Q, 2, order.unsqueeze(1).expand_as(Q))  # (B, n, r)
    return U, lam


def resolve_device(name):
    """Return a ``torch.device`` for ``name``, with a clear error if it is unavailable."""
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise DeviceError(f"device {name!r} is invalid ({error}); use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise DeviceError(f"device {name!r} is not supported; use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(
            f"device {name!r} requested but CUDA is not available on this machine; "
            "use --device cpu"
        )
    return device


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _versions():
    import petsc_nnpc

    return {
        "petsc_nnpc": petsc_nnpc.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
    }


def save_checkpoint(directory, network, metadata=None):
    """Write ``network`` to the folder ``directory``, atomically per file.

    The folder gets ``weights.safetensors`` and ``checkpoint.json``
    (configuration, grid, ``n``, rank, ``M``, normalisation, versions, the
    weights' SHA-256 and the caller's ``metadata``, e.g. preset and form).
    The JSON is written last, so a reader never pairs it with other weights.
    """
    from safetensors.torch import save

    os.makedirs(directory, exist_ok=True)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in network.state_dict().items()}
    weights_path = os.path.join(directory, WEIGHTS_FILE)
    atomic_write_bytes(weights_path, save(tensors))
    config = network.config
    record = dict(metadata or {})
    record.update(
        format=CHECKPOINT_FORMAT,
        format_version=CHECKPOINT_VERSION,
        network=config.to_dict(),
        grid_shape=list(config.grid_shape),
        n=config.n,
        rank=config.rank,
        sigmoid_scale=config.sigmoid_scale,
        normalisation={
            "mean": network.input_mean.tolist(),
            "std": network.input_std.tolist(),
        },
        parameters=network.parameter_count(),
        versions=_versions(),
        weights_sha256=_sha256(weights_path),
    )
    atomic_write_json(os.path.join(directory, METADATA_FILE), record)
    return record


def read_checkpoint_metadata(path):
    """Return the JSON record of the checkpoint at ``path`` (folder or one of its files)."""
    directory = _checkpoint_directory(path)
    metadata_path = os.path.join(directory, METADATA_FILE)
    try:
        with open(metadata_path, encoding="utf-8") as handle:
            record = json.load(handle)
    except FileNotFoundError:
        raise CheckpointError(
            f"checkpoint not found: {metadata_path} does not exist; give the checkpoint "
            "folder, the 'model' subfolder of the output of `nnpc train` (it contains "
            "checkpoint.json and weights.safetensors)"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"checkpoint metadata {metadata_path} is corrupt: {error}") from None
    if not isinstance(record, dict) or record.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{metadata_path} is not a petsc_nnpc network checkpoint (format "
            f"{record.get('format') if isinstance(record, dict) else None!r})"
        )
    if record.get("format_version", 0) > CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{metadata_path} has format version {record['format_version']}, newer than "
            f"this petsc_nnpc reads ({CHECKPOINT_VERSION}); upgrade petsc_nnpc"
        )
    return record


def _checkpoint_directory(path):
    path = os.fspath(path)
    if os.path.basename(path) in (WEIGHTS_FILE, METADATA_FILE):
        return os.path.dirname(path) or "."
    return path


def load_network(path, device="cpu"):
    """Return ``(network, metadata)`` read from the checkpoint folder ``path``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = _checkpoint_directory(path)
    record = read_checkpoint_metadata(directory)
    weights_path = os.path.join(directory, WEIGHTS_FILE)
    if not os.path.exists(weights_path):
        raise CheckpointError(f"checkpoint weights not found: {weights_path} does not exist")
    if _sha256(weights_path) != record.get("weights_sha256"):
        raise CheckpointError(
            f"{weights_path} does not match {METADATA_FILE} (SHA-256 differs): the "
            "checkpoint was changed or its write was interrupted; save it again"
        )
    try:
        config = NetworkConfig.from_dict(record["network"])
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"invalid network configuration in {directory}: {error}") from None
    try:
        tensors = load_file(weights_path)
    except SafetensorError as error:
        raise CheckpointError(f"cannot read {weights_path}: {error}") from None
    network = EigenpairNetwork(config)
    try:
        network.load_state_dict(tensors, strict=True)
    except RuntimeError as error:
        raise CheckpointError(
            f"weights in {weights_path} do not fit the configured network: {error}"
        ) from None
    network.to(resolve_device(device))
    network.eval()
    return network, record


class EigenpairPredictor:
    """Inference wrapper around a trained network, in numpy and float64.

    ``predict(x)`` returns ``U`` (``(n, r)``, orthonormal columns, QR in
    float64) and ``lam`` (``(r,)``, descending) for a state ``x`` in natural
    ordering. ``metadata`` is the checkpoint's JSON record.
    """

    def __init__(self, network, metadata, device):
        self.network = network
        self.metadata = metadata
        self.device = torch.device(device)
        config = network.config
        self.n = config.n
        self.grid_shape = config.grid_shape
        self.rank = config.rank
        self.sigmoid_scale = config.sigmoid_scale

    def check_compatible(self, n=None, grid_shape=None, rank=None, form=None):
        """Raise :class:`CheckpointError` if the network does not fit the problem.

        ``rank`` may be smaller than the trained rank (the leading pairs are
        used) but not larger.
        """
        source = self.metadata.get("path", "checkpoint")
        if grid_shape is not None and tuple(grid_shape) != tuple(self.grid_shape):
            raise CheckpointError(
                f"{source} was trained on a {self.grid_shape[0]}x{self.grid_shape[1]} grid "
                f"but the problem has a {grid_shape[0]}x{grid_shape[1]} grid; train a "
                "network for this grid (nnpc train --preset ...)"
            )
        if n is not None and int(n) != self.n:
            raise CheckpointError(
                f"{source} was trained for state size n = {self.n} but the problem has "
                f"n = {n}; train a network for this model"
            )
        if rank is not None and not 1 <= int(rank) <= self.rank:
            raise CheckpointError(
                f"{source} predicts r = {self.rank} eigenpairs but rank {rank} was "
                f"requested; use a rank between 1 and {self.rank} or train with --rank {rank}"
            )
        trained_form = self.metadata.get("form")
        if form is not None and trained_form is not None and form != trained_form:
            raise CheckpointError(
                f"{source} was trained on the {trained_form!r} form of the operator but the "
                f"problem uses the {form!r} form; train on data generated with --form {form}"
            )

    @torch.no_grad()
    def predict(self, x_natural, rank=None):
        """Return ``(U, lam)`` for one state in natural ordering (``(n,)`` float64)."""
        x = np.asarray(x_natural, dtype=np.float64)
        if x.shape != (self.n,):
            raise ValueError(
                f"state has shape {x.shape}, expected ({self.n},) in natural ordering "
                f"for the {self.grid_shape[0]}x{self.grid_shape[1]} grid"
            )
        if not np.all(np.isfinite(x)):
            raise ValueError("state contains NaN or Inf; the network needs a finite state")
        self.check_compatible(rank=rank)
        batch = torch.from_numpy(x).to(self.device).unsqueeze(0)  # (1, n)
        U, lam = self.network(batch, qr_dtype=torch.float64)  # (1, n, r), (1, r)
        U = U[0].cpu().numpy()
        lam = lam[0].cpu().numpy()
        if rank is not None:
            U, lam = U[:, :rank], lam[:rank]
        return np.ascontiguousarray(U), np.ascontiguousarray(lam)


def load_checkpoint(path, device="cpu", n=None, grid_shape=None, rank=None, form=None):
    """Return an :class:`EigenpairPredictor` for the checkpoint folder ``path``.

    Only JSON and safetensors are read, so an untrusted file cannot run
    code. Given ``n``, ``grid_shape``, ``rank`` or ``form``, the checkpoint
    is checked against them (see :meth:`EigenpairPredictor.check_compatible`).
    """
    network, metadata = load_network(path, device=device)
    metadata = dict(metadata, path=os.fspath(_checkpoint_directory(path)))
    predictor = EigenpairPredictor(network, metadata, device)
    predictor.check_compatible(n=n, grid_shape=grid_shape, rank=rank, form=form)
    return predictor
