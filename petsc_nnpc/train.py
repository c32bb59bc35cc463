"""Trainer of the eigenpair network on ``(x, Z, A_x Z)`` samples.

Minimises the randomized Frobenius loss of Trappler & Vidard,
"State-dependent preconditioning for the inner-loop in Variational Data
Assimilation using Machine Learning" (their eqs. 2.10–2.11) with AdamW:
decoupled weight decay is the usual choice for networks with attention
blocks, and Adam's per-parameter scaling copes with the very different
gradient scales of the vector and eigenvalue heads. The learning rate
rises linearly for the first steps, then follows a cosine decay.

The validation loss is always reported in the relative form, the fraction
of unexplained variance ``‖U Λ Uᵀ − A_x‖_F² / ‖A_x‖_F²`` (estimated with
the same ``Z``). Validation samples are the tail of the state chain, not a
random subset, because consecutive states are correlated and a random split
would overstate how well the network generalises.

An output folder contains ``train_config.json``, ``metrics.csv``, ``model/``
(the checkpoint with the best validation loss, read by
:func:`petsc_nnpc.network.load_checkpoint`) and ``state/`` (weights and
optimizer moments of the last epoch, to resume after a kill). Every file is
written atomically.
"""

import csv
import dataclasses
import io
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from petsc_nnpc.loss import LOSS_KINDS, frobenius_loss
from petsc_nnpc.network import (
    EigenpairNetwork,
    NetworkConfig,
    StateImage,
    resolve_device,
    save_checkpoint,
)
from petsc_nnpc.utils import atomic_write_bytes, atomic_write_json

log = logging.getLogger("petsc_nnpc.train")

# Default number of predicted eigenpairs per preset. The leading part of the
# spectrum is flat and about as wide as the number of observations, so r
# follows it: the tiny preset (100 observations, n = 280) has about 60
# eigenvalues near the top one, the small preset observes 256 cells, and
# Trappler & Vidard train r = 2000 on their 64×64 grid.
DEFAULT_RANK = {"tiny": 64, "small": 256, "paper": 2000}

METRIC_COLUMNS = (
    "epoch", "train_loss", "val_loss", "val_loss_absolute", "lr", "seconds", "samples_per_second",
)
STATE_DIR = "state"
STATE_FILE = "state.json"
MODEL_DIR = "model"
CONFIG_FILE = "train_config.json"
METRICS_FILE = "metrics.csv"


@dataclass
class TrainConfig:
    """Training hyper-parameters, validated at construction.

    Parameters
    ----------
    epochs : int
        Passes over the training samples (online: refreshes of the buffer).
    batch_size : int
        States per optimizer step.
    lr : float
        Peak learning rate of AdamW.
    weight_decay : float
        AdamW decoupled weight decay (not applied to biases and norms).
    warmup_fraction : float
        Fraction of all steps with a linear learning-rate warm-up.
    min_lr_ratio : float
        Final learning rate of the cosine decay relative to ``lr``.
    val_fraction : float
        Fraction of the samples (the chain's tail) held out for validation.
    loss : {"relative", "absolute"}
        Training loss: the Frobenius error relative to ``‖A_x‖_F²`` (eq. 2.11 of
        Trappler & Vidard) or absolute (their eq. 2.10).
    grad_clip : float
        Maximum gradient norm; 0 turns clipping off.
    seed : int
        Seed of weight initialisation and batch order.
    device : str
        ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    sigmoid_scale : float or None
        ``M``; ``None`` estimates it from the training states with
        :func:`estimate_sigmoid_scale`.
    init_eigenpairs : str or None
        ``.npz`` file with ``U`` ``(n, r)`` in natural ordering and ``lam``
        ``(r,)`` (as written by :func:`petsc_nnpc.pc.static.save_eigenpairs`)
        that the untrained network starts from; ``None`` starts from random
        weights. See :meth:`EigenpairNetwork.initialize_from_eigenpairs`.
    """

    epochs: int = 20
    batch_size: int = 4
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_fraction: float = 0.05
    min_lr_ratio: float = 0.05
    val_fraction: float = 0.2
    loss: str = "relative"
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "cpu"
    sigmoid_scale: Optional[float] = None
    init_eigenpairs: Optional[str] = None

    def __post_init__(self):
        if self.epochs < 1:
            raise ValueError(f"epochs = {self.epochs} is invalid: expected >= 1")
        if self.batch_size < 1:
            raise ValueError(f"batch_size = {self.batch_size} is invalid: expected >= 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr = {self.lr} is invalid: expected a positive learning rate")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay = {self.weight_decay} is invalid: expected >= 0")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"warmup_fraction = {self.warmup_fraction} is invalid: expected [0, 1)")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio = {self.min_lr_ratio} is invalid: expected [0, 1]")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction = {self.val_fraction} is invalid: expected (0, 1)")
        if self.loss not in LOSS_KINDS:
            raise ValueError(f"loss = {self.loss!r} is invalid: expected one of {LOSS_KINDS}")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip = {self.grad_clip} is invalid: expected >= 0")
        if self.sigmoid_scale is not None and not self.sigmoid_scale > 0:
            raise ValueError(f"sigmoid_scale = {self.sigmoid_scale} is invalid: expected > 0")

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values):
        return cls(**values)


def load_initial_eigenpairs(path, rank):
    """Return the first ``rank`` pairs ``(U (n, rank), lam (rank,))`` stored in ``path``."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            U, lam = archive["U"], archive["lam"].reshape(-1)
    except (OSError, KeyError, ValueError) as error:
        raise ValueError(
            f"cannot read initial eigenpairs from {path}: {error}; give an .npz file with "
            "U (n, r) and lam (r,), e.g. from petsc_nnpc.pc.static.save_eigenpairs"
        ) from None
    if lam.size < rank:
        raise ValueError(
            f"{path} contains {lam.size} eigenpairs but the network predicts {rank}: "
            f"compute at least {rank} eigenpairs"
        )
    return U[:, :rank], lam[:rank]


class Subset:
    """Samples ``indices`` of a source with a ``batch``/``states`` interface."""

    def __init__(self, source, indices):
        self.source = source
        self.indices = np.asarray(indices, dtype=np.int64)

    def __len__(self):
        return self.indices.size

    def batch(self, positions):
        return self.source.batch(self.indices[np.asarray(positions)])

    def states(self, positions):
        return self.source.states(self.indices[np.asarray(positions)])

    def epoch_order(self, rng):
        """Return a shuffled order of positions, shard by shard when the source has shards."""
        if not hasattr(self.source, "epoch_order"):
            return rng.permutation(len(self))
        position_of = {index: position for position, index in enumerate(self.indices.tolist())}
        order = self.source.epoch_order(self.indices, rng)
        return np.array([position_of[index] for index in order.tolist()], dtype=np.int64)


def split_samples(source, val_fraction):
    """Return ``(train, val)`` subsets: validation is the chain's last samples."""
    size = len(source)
    n_val = max(1, int(round(val_fraction * size)))
    if size - n_val < 1:
        raise ValueError(
            f"{size} samples cannot be split into training and validation sets "
            f"(val_fraction = {val_fraction}); generate more states"
        )
    return Subset(source, np.arange(size - n_val)), Subset(source, np.arange(size - n_val, size))


def estimate_sigmoid_scale(samples, max_states=16):
    """Return ``M``: twice the largest Nyström eigenvalue of ``A_x`` over the states.

    With ``Y = A Z``, the Nyström approximation ``Y (Zᵀ Y)⁻¹ Yᵀ`` is below
    ``A`` in the Loewner order, so its largest eigenvalue (from the ``k × k``
    pencil ``(Yᵀ Y, Zᵀ Y)``) never exceeds ``λ_max(A_x)``, and it is close to
    it because ``Y`` has gone through ``A`` once. Doubling it gives the
    rough upper bound the scaled sigmoid needs. Cost ``O(n k²)`` per state.
    """
    largest = 0.0
    for position in range(min(len(samples), max_states)):
        _, Z, AZ = samples.batch([position])
        Z, Y = Z[0], AZ[0].astype(np.float64)  # (n, k)
        C = Z.T @ Y  # (k, k), symmetric positive definite for an SPD A
        C = 0.5 * (C + C.T)
        try:
            L = np.linalg.cholesky(C)
        except np.linalg.LinAlgError:
            raise ValueError(
                f"Zᵀ A Z of sample {position} is not positive definite: the operator of the "
                "training set is not SPD, or A Z is not the product with the stored Z"
            ) from None
        W = np.linalg.solve(L, (Y.T @ Y))  # L⁻¹ YᵀY, (k, k)
        W = np.linalg.solve(L, W.T)  # L⁻¹ YᵀY L⁻ᵀ
        largest = max(largest, float(np.linalg.eigvalsh(0.5 * (W + W.T))[-1]))
    if not largest > 0:
        raise ValueError("the samples give no positive eigenvalue estimate: is A_x Z all zeros?")
    return 2.0 * largest


def learning_rate(config, step, total_steps):
    """Return the learning rate at optimizer ``step`` of ``total_steps``."""
    warmup = max(1, int(config.warmup_fraction * total_steps))
    if step < warmup:
        return config.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    floor = config.min_lr_ratio
    return config.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def _is_out_of_memory(error):
    if isinstance(error, MemoryError):
        return True
    oom_types = tuple(
        t for t in (getattr(torch, "OutOfMemoryError", None),
                    getattr(torch.cuda, "OutOfMemoryError", None)) if t is not None
    )
    if oom_types and isinstance(error, oom_types):
        return True
    message = str(error)
    return isinstance(error, RuntimeError) and (
        "out of memory" in message or "can't allocate memory" in message
    )


def _available_memory(device):
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    from petsc_nnpc.dataset import _available_memory as host_available

    return host_available()


def estimate_training_memory(network, batch_size, k, loss="relative"):
    """Return an estimate of the memory of one training step, in bytes.

    Activations saved for the backward pass are measured on one state
    through ``torch.autograd.graph.saved_tensors_hooks`` (tensors that
    share storage are counted once, weights not at all) and scaled by
    ``batch_size``. Weights, gradients and the two AdamW moments add
    ``4 ×`` the parameters, and the batch's ``x``, ``Z`` and ``A_x Z`` add
    ``n (1 + 2k)`` values per state. Temporaries of the backward pass are
    not counted, so the real peak is higher.

    Returns
    -------
    dict
        ``parameters``, ``optimizer`` (weights, gradients, moments),
        ``activations_per_state``, ``data_per_state`` and ``total``.
    """
    config = network.config
    device = next(network.parameters()).device
    dtype = next(network.parameters()).dtype
    seen = {}
    weights = {p.untyped_storage().data_ptr() for p in network.parameters()}
    weights |= {b.untyped_storage().data_ptr() for b in network.buffers()}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    x = torch.zeros(1, config.n, dtype=torch.float64, device=device)
    Z = torch.randn(1, config.n, k, dtype=dtype, device=device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        U, lam = network(x)
        frobenius_loss(U, lam, Z, Z, kind=loss).sum()
    del U, lam
    element = torch.finfo(dtype).bits // 8
    params = network.parameter_count() * element
    activations = sum(seen.values())
    data = config.n * (8 + 2 * k * element)
    result = {
        "parameters": params,
        "optimizer": 4 * params,
        "activations_per_state": activations,
        "data_per_state": data,
    }
    result["total"] = result["optimizer"] + batch_size * (activations + data)
    return result


def check_batch_memory(network, batch_size, k, device, loss="relative"):
    """Raise ``MemoryError`` naming the batch size when a step cannot fit.

    The saved activations are counted 1.5 times, an allowance for the
    temporaries of the backward pass, and 10% of the free memory is kept.
    """
    estimate = estimate_training_memory(network, batch_size, k, loss=loss)
    available = _available_memory(device)
    per_state = 1.5 * estimate["activations_per_state"] + estimate["data_per_state"]
    need = estimate["optimizer"] + batch_size * per_state
    if available is not None and need > 0.9 * available:
        fits = int(max(0, 0.9 * available - estimate["optimizer"]) // max(1, per_state))
        raise MemoryError(
            f"batch size {batch_size} needs about {need / 2**30:.2f} GiB on {device} but "
            f"{available / 2**30:.2f} GiB is free; use --batch-size {max(1, fits)} or less, "
            "or a device with more memory"
        )
    return estimate


def _tensors_to_bytes(tensors):
    from safetensors.torch import save

    return save({name: t.detach().to("cpu").contiguous() for name, t in tensors.items()})


def _optimizer_tensors(optimizer):
    state = optimizer.state_dict()
    tensors = {}
    for pid, entry in state["state"].items():
        for name, value in entry.items():
            value = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"optimizer.{pid}.{name}"] = value
    return tensors, state["param_groups"]


def _load_optimizer(optimizer, tensors, param_groups):
    state = {}
    for key, value in tensors.items():
        if not key.startswith("optimizer."):
            continue
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})


def _write_metrics(path, rows):
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=METRIC_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: row[key] for key in METRIC_COLUMNS})
    atomic_write_bytes(path, buffer.getvalue().encode("utf-8"))


def _to_device(arrays, device, dtype):
    x, Z, AZ = arrays
    return (
        torch.from_numpy(np.ascontiguousarray(x)).to(device),  # (b, n) float64
        torch.from_numpy(np.ascontiguousarray(Z)).to(device=device, dtype=dtype),  # (b, n, k)
        torch.from_numpy(np.ascontiguousarray(AZ)).to(device=device, dtype=dtype),  # (b, n, k)
    )


class Trainer:
    """Builds, trains, checkpoints and resumes one eigenpair network.

    Parameters
    ----------
    out_dir : str
        Output folder (see the module docstring).
    config : TrainConfig
    network_config : NetworkConfig or None
        Network to build; ``None`` reads it from a run being resumed.
    metadata : dict
        Recorded in every checkpoint: ``preset``, ``form``, data folder.
    progress : bool
        Show tqdm bars.
    on_epoch_end : callable, optional
        Called as ``on_epoch_end(epoch, row)`` after each epoch is saved
        (online: on every rank, with ``row=None`` except on rank 0).
    """

    def __init__(self, out_dir, config, network_config, metadata=None, progress=True,
                 on_epoch_end=None):
        self.out_dir = os.fspath(out_dir)
        self.config = config
        self.network_config = network_config
        self.metadata = dict(metadata or {})
        self.progress = progress
        self.on_epoch_end = on_epoch_end
        self.device = resolve_device(config.device)
        self.network = None
        self.optimizer = None
        self.rows = []
        self.best_val = math.inf
        self.initial_val = None
        self.start_epoch = 0

    # Set-up and resume.

    def _build(self, train):
        torch.manual_seed(self.config.seed)
        if self.device.type == "cuda":
            # NOTE: cuDNN is pinned to deterministic kernels, but the attention
            # backward on CUDA may still differ in the last bits between runs.
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False
        network = EigenpairNetwork(self.network_config)
        image = StateImage(self.network_config.grid_shape)
        states = train.states(np.arange(len(train)))
        mean, std = image.channel_statistics(states)
        network.set_normalisation(mean, std)
        if self.config.init_eigenpairs is not None:
            U, lam = load_initial_eigenpairs(self.config.init_eigenpairs, self.network_config.rank)
            network.initialize_from_eigenpairs(U, lam)
            log.info("network starts from the eigenpairs in %s", self.config.init_eigenpairs)
        self.network = network.to(self.device)
        decay, no_decay = [], []
        for name, parameter in network.named_parameters():
            (no_decay if parameter.dim() < 2 else decay).append(parameter)
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.config.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=self.config.lr,
        )

    def _state_dir(self):
        return os.path.join(self.out_dir, STATE_DIR)

    def _saved_config(self):
        return {
            "train": self.config.to_dict(),
            "network": self.network_config.to_dict(),
            "metadata": self.metadata,
        }

    def resume_or_start(self, train):
        """Load the last saved epoch if the output folder has one, else start anew."""
        from safetensors.torch import load

        state_path = os.path.join(self._state_dir(), STATE_FILE)
        config_path = os.path.join(self.out_dir, CONFIG_FILE)
        if not os.path.exists(state_path):
            self._build(train)
            os.makedirs(self.out_dir, exist_ok=True)
            atomic_write_json(config_path, self._saved_config())
            return None
        with open(config_path, encoding="utf-8") as handle:
            saved = json.load(handle)
        current = self._saved_config()
        for section in ("network", "metadata"):
            if saved[section] != current[section]:
                raise ValueError(
                    f"{config_path} records another {section} configuration "
                    f"({saved[section]}) than this run ({current[section]}); use another "
                    "--out folder, or the same options to resume"
                )
        for key, value in saved["train"].items():
            # More epochs stretch the cosine schedule from the saved epoch on.
            if key != "epochs" and current["train"].get(key) != value:
                raise ValueError(
                    f"{config_path} was trained with {key} = {value!r} but this run has "
                    f"{current['train'].get(key)!r}; use another --out folder, or the same "
                    "options to resume (only --epochs may change)"
                )
        with open(state_path, encoding="utf-8") as handle:
            state = json.load(handle)
        self._build(train)
        with open(os.path.join(self._state_dir(), state["file"]), "rb") as handle:
            tensors = load(handle.read())
        model = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        self.network.load_state_dict(model, strict=True)
        _load_optimizer(self.optimizer, tensors, state["param_groups"])
        self.rows = state["metrics"]
        self.best_val = state["best_val"]
        self.initial_val = state["initial_val"]
        self.start_epoch = state["epoch"]
        atomic_write_json(config_path, current)
        log.info("resuming %s after epoch %d", self.out_dir, self.start_epoch)
        return state

    def _save_state(self, epoch, extra_arrays=None):
        state_dir = self._state_dir()
        os.makedirs(state_dir, exist_ok=True)
        tensors = {f"model.{k}": v for k, v in self.network.state_dict().items()}
        optimizer_tensors, param_groups = _optimizer_tensors(self.optimizer)
        tensors.update(optimizer_tensors)
        name = f"epoch-{epoch:05d}.safetensors"
        atomic_write_bytes(os.path.join(state_dir, name), _tensors_to_bytes(tensors))
        online_name = None
        if extra_arrays is not None:
            from petsc_nnpc.utils import atomic_save_npz

            online_name = f"online-{epoch:05d}.npz"
            atomic_save_npz(os.path.join(state_dir, online_name), **extra_arrays)
        atomic_write_json(os.path.join(state_dir, STATE_FILE), {
            "epoch": epoch,
            "file": name,
            "online_file": online_name,
            "param_groups": param_groups,
            "metrics": self.rows,
            "best_val": self.best_val,
            "initial_val": self.initial_val,
        })
        # The JSON now names the new files, so older ones can go.
        for old in os.listdir(state_dir):
            if old.endswith((".safetensors", ".npz")) and old not in (name, online_name):
                os.unlink(os.path.join(state_dir, old))

    # Epochs.

    def evaluate(self, samples):
        """Return ``(relative, absolute)`` mean losses over ``samples``."""
        self.network.eval()
        relative, absolute = [], []
        largest = 0.0
        dtype = self.network.stem.weight.dtype
        with torch.no_grad():
            for start in range(0, len(samples), self.config.batch_size):
                positions = np.arange(start, min(start + self.config.batch_size, len(samples)))
                x, Z, AZ = _to_device(samples.batch(positions), self.device, dtype)
                U, lam = self.network(x)
                absolute.append(frobenius_loss(U, lam, Z, AZ, kind="absolute").double().cpu())
                relative.append(frobenius_loss(U, lam, Z, AZ, kind="relative").double().cpu())
                largest = max(largest, float(lam.max()))
        # U Λ Uᵀ = 0 gives a relative loss of exactly 1, and a sigmoid driven
        # into saturation stays there because its gradient vanishes. With M
        # about twice λ_max, a leading eigenvalue below M/100 means collapse.
        if largest < 1e-2 * self.network.config.sigmoid_scale:
            log.warning(
                "all predicted eigenvalues are below M/100 (largest %.3g, M = %.3g): the "
                "eigenvalue head has collapsed to zero; train again with a lower --lr",
                largest, self.network.config.sigmoid_scale,
            )
        return float(torch.cat(relative).mean()), float(torch.cat(absolute).mean())

    def train_epoch(self, samples, epoch, total_steps, steps_done):
        """Run one pass over ``samples``; return ``(mean loss, steps)``."""
        from tqdm.auto import tqdm

        self.network.train()
        config = self.config
        dtype = self.network.stem.weight.dtype
        rng = np.random.default_rng(np.random.SeedSequence([config.seed, epoch]))
        if hasattr(samples, "epoch_order"):
            order = samples.epoch_order(rng)
        else:
            order = rng.permutation(len(samples))
        batches = [order[i:i + config.batch_size] for i in range(0, len(order), config.batch_size)]
        losses = []
        bar = tqdm(batches, desc=f"epoch {epoch}", unit="batch", leave=False,
                   disable=None if self.progress else True)
        for step, positions in enumerate(bar):
            lr = learning_rate(config, steps_done + step, total_steps)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            try:
                x, Z, AZ = _to_device(samples.batch(positions), self.device, dtype)
                U, lam = self.network(x)
                loss = frobenius_loss(U, lam, Z, AZ, kind=config.loss).mean()
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
            except (RuntimeError, MemoryError) as error:
                if _is_out_of_memory(error):
                    raise MemoryError(
                        f"batch size {config.batch_size} ran out of memory on {self.device} "
                        f"({error}); use a smaller --batch-size"
                    ) from None
                raise
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"epoch {epoch}, step {step}: the loss is {loss.item()}; lower --lr "
                    "or check the training set for outliers"
                )
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.network.parameters(), config.grad_clip)
            self.optimizer.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{loss.item():.4g}")
        bar.close()
        return float(np.mean(losses)), len(batches)

    def _finish_epoch(self, epoch, train_loss, val, lr, seconds, samples):
        val_relative, val_absolute = val
        row = {
            "epoch": epoch,
            "train_loss": train_loss,
            "val_loss": val_relative,
            "val_loss_absolute": val_absolute,
            "lr": lr,
            "seconds": seconds,
            "samples_per_second": samples / seconds if seconds > 0 else float("nan"),
        }
        self.rows.append(row)
        log.info(
            "epoch %d: train loss %.4g, validation unexplained variance %.4g (%.3g s, %.1f samples/s)",
            epoch, train_loss, val_relative, seconds, row["samples_per_second"],
        )
        if val_relative < self.best_val:
            self.best_val = val_relative
            save_checkpoint(os.path.join(self.out_dir, MODEL_DIR), self.network, self._checkpoint_metadata(epoch))
        _write_metrics(os.path.join(self.out_dir, METRICS_FILE), self.rows)

    def _checkpoint_metadata(self, epoch):
        return dict(
            self.metadata,
            epoch=epoch,
            val_loss=self.best_val,
            train=self.config.to_dict(),
        )

    def fit(self, source):
        """Train on ``source`` (a sample set), split into training and validation."""
        train, val = split_samples(source, self.config.val_fraction)
        self.resume_or_start(train)
        check_batch_memory(self.network, min(self.config.batch_size, len(train)), source.k,
                           self.device, loss=self.config.loss)
        log.info("%s", self.network.summary(self.config.batch_size))
        log.info("%d training and %d validation samples, device %s", len(train), len(val), self.device)
        if self.initial_val is None:
            self.initial_val = self.evaluate(val)[0]
            log.info("untrained network: validation unexplained variance %.4g", self.initial_val)
        steps_per_epoch = -(-len(train) // self.config.batch_size)
        total_steps = steps_per_epoch * self.config.epochs
        for epoch in range(self.start_epoch + 1, self.config.epochs + 1):
            started = time.perf_counter()
            train_loss, _ = self.train_epoch(train, epoch, total_steps, (epoch - 1) * steps_per_epoch)
            seconds = time.perf_counter() - started
            val_losses = self.evaluate(val)
            self._finish_epoch(epoch, train_loss, val_losses, self.optimizer.param_groups[0]["lr"],
                               seconds, len(train))
            self._save_state(epoch)
            if self.on_epoch_end is not None:
                self.on_epoch_end(epoch, self.rows[-1])
        return self.summary()

    def fit_online(self, online):
        """Train while ``online`` (an :class:`~petsc_nnpc.dataset.OnlineSamples`) produces samples.

        Collective: every rank generates; rank 0 trains and writes. The
        network configuration may be a callable that builds it from the
        first training samples (to estimate ``M``).
        """
        mpi = online.chain.mpi
        root = mpi.rank == 0
        state = None
        error = None
        if root:
            try:
                state_path = os.path.join(self._state_dir(), STATE_FILE)
                if os.path.exists(state_path):
                    with open(state_path, encoding="utf-8") as handle:
                        state = json.load(handle)
            except (OSError, ValueError) as caught:
                error = caught
        error = mpi.bcast(error, root=0)
        if error is not None:
            raise error
        resuming = mpi.bcast(state is not None and state.get("online_file") is not None, root=0)
        if resuming:
            arrays = None
            if root:
                with np.load(os.path.join(self._state_dir(), state["online_file"]),
                             allow_pickle=False) as data:
                    arrays = {key: data[key] for key in data.files}
            online.restore(arrays)
        else:
            online.initialize()
        start_epoch = 0
        if root:
            train = online.train
            if callable(self.network_config):
                # The first buffer sets M; a resumed run keeps the saved configuration.
                if resuming:
                    with open(os.path.join(self.out_dir, CONFIG_FILE), encoding="utf-8") as handle:
                        self.network_config = NetworkConfig.from_dict(json.load(handle)["network"])
                else:
                    self.network_config = self.network_config(train)
            self.resume_or_start(train)
            check_batch_memory(self.network, self.config.batch_size, online.k, self.device,
                               loss=self.config.loss)
            log.info("%s", self.network.summary(self.config.batch_size))
            if self.initial_val is None:
                self.initial_val = self.evaluate(online.validation)[0]
            start_epoch = self.start_epoch
        start_epoch = mpi.bcast(start_epoch, root=0)
        steps_per_epoch = -(-online.capacity // self.config.batch_size)
        total_steps = steps_per_epoch * self.config.epochs
        steps_done = 0 if not root else sum(
            -(-min(online.capacity, (e + 1) * online.states_per_epoch) // self.config.batch_size)
            for e in range(start_epoch)
        )
        for epoch in range(start_epoch + 1, self.config.epochs + 1):
            if epoch > 1:
                online.refresh()
            arrays = online.state_arrays()
            if root:
                started = time.perf_counter()
                train_loss, steps = self.train_epoch(online.train, epoch, total_steps, steps_done)
                steps_done += steps
                seconds = time.perf_counter() - started
                self._finish_epoch(epoch, train_loss, self.evaluate(online.validation),
                                   self.optimizer.param_groups[0]["lr"], seconds, len(online.train))
                self._save_state(epoch, extra_arrays=arrays)
            # The callback runs on every rank, so that it can stop all of them.
            if self.on_epoch_end is not None:
                self.on_epoch_end(epoch, self.rows[-1] if root else None)
        return self.summary() if root else None

    def summary(self):
        return {
            "epochs": len(self.rows),
            "initial_val_loss": self.initial_val,
            "final_val_loss": self.rows[-1]["val_loss"] if self.rows else None,
            "best_val_loss": self.best_val,
            "model": os.path.join(self.out_dir, MODEL_DIR),
        }


def prepare_network_config(preset, grid_shape, rank, samples, train_config, **overrides):
    """Return the :class:`NetworkConfig` for ``preset``, with ``M`` set.

    ``M`` is ``train_config.sigmoid_scale`` when given, else estimated
    from ``samples`` by :func:`estimate_sigmoid_scale`.
    """
    scale = train_config.sigmoid_scale
    if scale is None:
        scale = estimate_sigmoid_scale(samples)
        log.info("sigmoid scale M = %.4g (twice the largest Nyström eigenvalue)", scale)
    return NetworkConfig.for_preset(preset, grid_shape, rank, scale, **overrides)


def _network_overrides(overrides):
    return {key: value for key, value in (overrides or {}).items() if value is not None}


def train_from_folder(data_dir, out_dir, preset, config, rank=None, network_overrides=None,
                      form=None, progress=True, on_epoch_end=None):
    """Train a network on the data folder ``data_dir`` and write it to ``out_dir``.

    ``rank`` defaults to :data:`DEFAULT_RANK` of the preset; a run already in
    ``out_dir`` with the same options resumes. Returns :meth:`Trainer.summary`.
    """
    from petsc_nnpc.dataset import ShardDataset

    resolve_device(config.device)  # fail before any work on an unavailable device
    data = ShardDataset(data_dir, preset=preset, form=form)
    rank = DEFAULT_RANK.get(preset, 8) if rank is None else rank
    if rank > data.n:
        raise ValueError(f"rank = {rank} is invalid: the state has only n = {data.n} entries")
    train, _ = split_samples(data, config.val_fraction)
    network_config = prepare_network_config(preset, data.grid_shape, rank, train, config,
                                            **_network_overrides(network_overrides))
    metadata = {
        "preset": preset,
        "form": data.metadata["form"],
        "data": os.path.abspath(data_dir),
        "k": data.k,
        "states": len(data),
    }
    trainer = Trainer(out_dir, config, network_config, metadata, progress=progress,
                      on_epoch_end=on_epoch_end)
    return trainer.fit(data)


def train_online(out_dir, preset, config, generation, x0, rank=None, states_per_epoch=8,
                 capacity=64, validation_states=8, network_overrides=None, comm=None,
                 progress=True, on_epoch_end=None):
    """Train while the training set is generated (collective over ``comm``).

    Each epoch adds ``states_per_epoch`` samples to a buffer of at most
    ``capacity`` samples and trains one pass over it; ``validation_states``
    samples drawn first stay fixed. Returns the summary on rank 0, ``None``
    elsewhere.
    """
    from petsc_nnpc.dataset import OnlineSamples, build_problem

    resolve_device(config.device)  # fail before any generation on an unavailable device
    model, operator, _ = build_problem(preset, form=generation.form, comm=comm)
    rank = DEFAULT_RANK.get(preset, 8) if rank is None else rank
    if rank > model.n:
        raise ValueError(f"rank = {rank} is invalid: the state has only n = {model.n} entries")
    online = OnlineSamples(model, operator, generation, x0, validation_states, states_per_epoch,
                           capacity, progress=progress)
    overrides = _network_overrides(network_overrides)

    def network_config(samples):
        return prepare_network_config(preset, tuple(model.grid_shape), rank, samples, config, **overrides)

    metadata = {
        "preset": preset,
        "form": generation.form,
        "data": "online",
        "k": generation.k,
        "generation": generation.to_dict(),
        "states_per_epoch": states_per_epoch,
        "capacity": capacity,
        "validation_states": validation_states,
    }
    trainer = Trainer(out_dir, config, network_config, metadata, progress=progress,
                      on_epoch_end=on_epoch_end)
    return trainer.fit_online(online)
