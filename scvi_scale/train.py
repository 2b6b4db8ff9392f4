"""The training loop, in plain PyTorch: Adam, KL warm-up, validation ELBO, early stopping, LR on plateau,
atomic checkpoints and exact resume.

Defaults are scvi-tools' (`TrainingPlan`, `TrainRunner`, `EarlyStopping` as scvi-tools configures it). The loop
knows nothing of Zarr: it takes a module with `loss(tensors, kl_weight)` and two minibatch streams that yield
dicts of numpy arrays and expose `set_epoch`, `state_dict`, `load_state_dict` and `__len__` (see `sampler.py`).

Data-parallel: when a torch.distributed process group is up (see `distributed.py`), the module trains under
DistributedDataParallel, each rank on its own stream; epoch sums and validation sums are all-reduced, so metrics,
history and the early-stopping and LR decisions are global and the same on every rank.

Metrics follow scvi-tools' names and meaning. Per epoch, over the cells seen (by all ranks):
    reconstruction_loss_{train,validation} = mean over cells of -log p(x | z, l)
    kl_local_{train,validation}            = mean over cells of KL(q(z|x) || p(z)) (+ KL on l)
    elbo_{train,validation}                = their sum (a negative ELBO per cell: lower is better)
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from scvi_scale import distributed
from scvi_scale.settings import settings

logger = logging.getLogger("scvi_scale.train")

# Minibatch entries that the module reads; the sampler's other entries (rows, library) stay on the host.
MODULE_KEYS = ("x", "batch", "labels", "cat_covs", "cont_covs", "size_factor")


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class TrainingConfig:
    """Optimisation settings with scvi-tools' names and defaults."""

    max_epochs: int
    lr: float = 1e-3
    weight_decay: float = 1e-6
    eps: float = 0.01
    n_epochs_kl_warmup: int | None = 400
    n_steps_kl_warmup: int | None = None
    max_kl_weight: float = 1.0
    min_kl_weight: float = 0.0
    early_stopping: bool = False
    early_stopping_monitor: str = "elbo_validation"
    early_stopping_patience: int = 45
    early_stopping_min_delta: float = 0.0
    reduce_lr_on_plateau: bool = False
    lr_factor: float = 0.6
    lr_patience: int = 30
    lr_threshold: float = 0.0
    lr_min: float = 0.0
    lr_scheduler_metric: str = "elbo_validation"
    check_val_every_n_epoch: int = 1
    checkpoint_every_n_steps: int | None = None

    def __post_init__(self):
        if self.max_epochs < 1:
            raise ValueError(f"max_epochs={self.max_epochs}: must be at least 1")
        if self.min_kl_weight > self.max_kl_weight:
            raise ValueError(f"min_kl_weight={self.min_kl_weight} is larger than max_kl_weight={self.max_kl_weight}")
        for key in ("early_stopping_monitor", "lr_scheduler_metric"):
            metric = getattr(self, key)
            if metric not in ("elbo_validation", "reconstruction_loss_validation", "kl_local_validation"):
                raise ValueError(f"{key}={metric!r}: expected a validation metric such as 'elbo_validation'")


def max_epochs_heuristic(n_obs: int, epochs_cap: int = 400, decay_at_n_obs: int = 20_000) -> int:
    """scvi-tools' default number of epochs: 400 up to 20k cells, then shrinking as 20k/n_obs * 400, at least 1."""
    return max(1, int(min(round(decay_at_n_obs / n_obs * epochs_cap), epochs_cap)))


def kl_weight(config: TrainingConfig, epoch: int, step: int) -> float:
    """Linear KL warm-up from min to max weight over epochs (or, if epochs are None, over steps)."""
    slope = config.max_kl_weight - config.min_kl_weight
    if config.n_epochs_kl_warmup:
        if epoch < config.n_epochs_kl_warmup:
            return config.min_kl_weight + slope * epoch / config.n_epochs_kl_warmup
    elif config.n_steps_kl_warmup:
        if step < config.n_steps_kl_warmup:
            return config.min_kl_weight + slope * step / config.n_steps_kl_warmup
    return config.max_kl_weight


def to_tensors(minibatch: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    """The module's inputs from one sampler minibatch, as tensors on `device` (zero-copy on the CPU)."""
    return {
        key: torch.from_numpy(np.ascontiguousarray(minibatch[key])).to(device, non_blocking=True)
        for key in MODULE_KEYS
        if key in minibatch
    }


@dataclass
class _EpochSums:
    """Running sums of per-cell losses over the cells seen so far in an epoch."""

    n_cells: int = 0
    reconstruction_loss: float = 0.0
    kl_local: float = 0.0
    loss: float = 0.0
    n_steps: int = 0

    def add(self, losses: dict[str, torch.Tensor]) -> None:
        self.n_cells += int(losses["reconstruction_loss"].shape[0])
        self.reconstruction_loss += float(losses["reconstruction_loss"].sum())
        self.kl_local += float(losses["kl_local"].sum())
        self.loss += float(losses["loss"])
        self.n_steps += 1

    def all_reduced(self, device: torch.device) -> "_EpochSums":
        """These sums added up over all ranks (themselves when there is one)."""
        names = [f.name for f in fields(self)]
        totals = distributed.all_reduce_sum([float(getattr(self, name)) for name in names], device)
        return _EpochSums(**{name: type(getattr(self, name))(total) for name, total in zip(names, totals)})

    def metrics(self, mode: str) -> dict[str, float]:
        n = max(self.n_cells, 1)
        rec, kl = self.reconstruction_loss / n, self.kl_local / n
        return {f"elbo_{mode}": rec + kl, f"reconstruction_loss_{mode}": rec, f"kl_local_{mode}": kl}


@dataclass
class _EarlyStopping:
    """Lightning's rule as scvi-tools sets it up: stop after `patience` checks without an improvement of
    more than `min_delta` (mode "min")."""

    patience: int
    min_delta: float
    best: float = math.inf
    wait: int = 0

    def should_stop(self, value: float) -> bool:
        if value < self.best - self.min_delta:
            self.best, self.wait = value, 0
        else:
            self.wait += 1
        return self.wait >= self.patience


@dataclass
class TrainingState:
    """Everything a resumed run needs besides the module and optimizer: where the loop is and what it has seen."""

    epoch: int = 0  # the epoch in progress (or next to start)
    step_in_epoch: int = 0  # minibatches of that epoch already taken
    global_step: int = 0
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # metric -> [(epoch, value)]
    epoch_sums: _EpochSums = field(default_factory=_EpochSums)
    early_stopping: _EarlyStopping | None = None
    stopped_early: bool = False


@torch.no_grad()
def evaluate(module: torch.nn.Module, stream, device: torch.device) -> dict[str, float]:
    """Validation metrics over one full pass of `stream` with the module in eval mode (KL weight 1); with several
    ranks, each passes over its own stream and the sums are added up."""
    was_training = module.training
    module.eval()
    sums = _EpochSums()
    try:
        for minibatch in stream:
            sums.add(module.loss(to_tensors(minibatch, device), kl_weight=1.0))
    finally:
        module.train(was_training)
    return sums.all_reduced(device).metrics("validation")


def save_checkpoint(
    path: Path, module, optimizer, scheduler, train_stream, state: TrainingState, torch_rng_states: list
) -> None:
    """Write the checkpoint to a temporary file and rename it over `path`, so a kill never leaves a torn file.

    With several ranks, rank 0 calls this with the epoch sums of all ranks in `state` and every rank's torch RNG
    state in `torch_rng_states` (one entry per rank); the sampler state is rank 0's (all ranks are at the same
    minibatch)."""
    payload = {
        "module": module.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "train_stream": train_stream.state_dict(),
        "torch_rng": torch_rng_states,
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "state": {
            "epoch": state.epoch,
            "step_in_epoch": state.step_in_epoch,
            "global_step": state.global_step,
            "history": state.history,
            "epoch_sums": asdict(state.epoch_sums),
            "early_stopping": asdict(state.early_stopping) if state.early_stopping else None,
            "stopped_early": state.stopped_early,
        },
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, module, optimizer, scheduler, train_stream) -> TrainingState:
    """Restore module, optimizer, scheduler, sampler position and RNG states from `path`, on every rank: each
    takes its own RNG state; rank 0 carries on the epoch's (all-rank) sums, the other ranks start theirs at zero."""
    rank, world_size = distributed.world()
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if len(payload["torch_rng"]) != world_size:
        raise ValueError(
            f"{path} was written by a run of {len(payload['torch_rng'])} process(es); resume it with that many, "
            f"not {world_size}"
        )
    module.load_state_dict(payload["module"])
    optimizer.load_state_dict(payload["optimizer"])
    if scheduler is not None and payload["scheduler"] is not None:
        scheduler.load_state_dict(payload["scheduler"])
    train_stream.load_state_dict({**payload["train_stream"], "rank": rank})
    torch.set_rng_state(payload["torch_rng"][rank])
    if payload["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(payload["cuda_rng"])
    saved = payload["state"]
    return TrainingState(
        epoch=saved["epoch"],
        step_in_epoch=saved["step_in_epoch"],
        global_step=saved["global_step"],
        history=saved["history"],
        epoch_sums=_EpochSums(**saved["epoch_sums"]) if rank == 0 else _EpochSums(),
        early_stopping=_EarlyStopping(**saved["early_stopping"]) if saved["early_stopping"] else None,
        stopped_early=saved["stopped_early"],
    )


def fit(
    module: torch.nn.Module,
    train_stream,
    validation_stream,
    config: TrainingConfig,
    *,
    device: torch.device | str = "cpu",
    checkpoint_path: str | Path | None = None,
    resume: bool = False,
    max_steps: int | None = None,
) -> TrainingState:
    """Train `module` in place and return the final state (its `history` holds the per-epoch metrics).

    With a torch.distributed process group up, every rank calls fit with its own shard of the training and
    validation cells (equal numbers of minibatches per epoch); see the module docstring.

    checkpoint_path: where the checkpoint lives; written at the end of every epoch (and every
        `config.checkpoint_every_n_steps` minibatches), atomically.
    resume: continue from `checkpoint_path` if it exists: the same minibatches, RNG draws and optimizer state as
        an uninterrupted run, so the result is the same.
    max_steps: stop after this many optimizer steps in total (a checkpoint is written first); for tests and
        time-boxed jobs.
    """
    device = torch.device(device)
    module.to(device)
    rank, world_size = distributed.world()
    train_loss = distributed.data_parallel_loss(module, device)  # module.loss, or DDP around it
    trainable = [p for p in module.parameters() if p.requires_grad]
    # fused: one kernel over all parameters (0.41 ms a step against 1.27 for the per-tensor loop on 2 CPU cores)
    optimizer = torch.optim.Adam(
        trainable, lr=config.lr, eps=config.eps, weight_decay=config.weight_decay,
        fused=device.type in ("cpu", "cuda"),
    )
    scheduler = None
    if config.reduce_lr_on_plateau:
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer,
            factor=config.lr_factor,
            patience=config.lr_patience,
            threshold=config.lr_threshold,
            threshold_mode="abs",
            min_lr=config.lr_min,
        )
    checkpoint_path = Path(checkpoint_path) if checkpoint_path is not None else None

    if resume and checkpoint_path is not None and checkpoint_path.exists():
        state = load_checkpoint(checkpoint_path, module, optimizer, scheduler, train_stream)
        logger.info("resumed from %s at epoch %d, step %d", checkpoint_path, state.epoch, state.step_in_epoch)
    else:
        state = TrainingState()
        train_stream.set_epoch(0)
    if config.early_stopping and state.early_stopping is None:
        state.early_stopping = _EarlyStopping(config.early_stopping_patience, config.early_stopping_min_delta)

    def checkpoint() -> None:
        """Every rank calls this at the same step: the sums and RNG states are gathered, rank 0 writes."""
        if checkpoint_path is None:
            return
        global_state = replace(state, epoch_sums=state.epoch_sums.all_reduced(device))
        rng_states = distributed.all_gather(torch.get_rng_state())
        arguments = (checkpoint_path, module, optimizer, scheduler, train_stream, global_state, rng_states)
        distributed.on_rank_zero(lambda: save_checkpoint(*arguments))

    steps_per_epoch = len(train_stream)
    progress = tqdm(
        total=config.max_epochs * steps_per_epoch,
        initial=state.epoch * steps_per_epoch + state.step_in_epoch,
        disable=not settings.progress_bar or rank != 0,
        unit="step",
        dynamic_ncols=True,
    )
    module.train()
    try:
        while state.epoch < config.max_epochs and not state.stopped_early:
            progress.set_description(f"Epoch {state.epoch + 1}/{config.max_epochs}")
            weight = kl_weight(config, state.epoch, state.global_step)
            epoch_start = time.perf_counter()
            for minibatch in train_stream:
                if config.n_epochs_kl_warmup is None and config.n_steps_kl_warmup:
                    weight = kl_weight(config, state.epoch, state.global_step)
                losses = train_loss(to_tensors(minibatch, device), weight)
                # the mean over ranks, so that all ranks stop together when one loss is not finite
                loss_value = distributed.all_reduce_sum([float(losses["loss"].detach())], device)[0] / world_size
                if not math.isfinite(loss_value):
                    rows = minibatch["rows"]
                    raise TrainingDivergedError(
                        f"loss is {loss_value} at epoch {state.epoch}, step {state.step_in_epoch} "
                        f"(store rows {int(rows.min())}..{int(rows.max())}); training stopped, "
                        f"the last good checkpoint is kept at {checkpoint_path}. Try a lower lr."
                    )
                optimizer.zero_grad(set_to_none=True)
                losses["loss"].backward()
                optimizer.step()
                state.epoch_sums.add({k: v.detach() for k, v in losses.items()})
                state.step_in_epoch += 1
                state.global_step += 1
                progress.update(1)
                progress.set_postfix(loss=f"{loss_value:.4g}", refresh=False)
                if config.checkpoint_every_n_steps and state.global_step % config.checkpoint_every_n_steps == 0:
                    checkpoint()
                if max_steps is not None and state.global_step >= max_steps:
                    checkpoint()
                    distributed.broadcast_buffers(module)
                    return state
            _end_epoch(module, validation_stream, config, state, scheduler, device, weight)
            state.history.setdefault("epoch_seconds", []).append((state.epoch - 1, time.perf_counter() - epoch_start))
            progress.set_postfix(
                loss=f"{state.history['train_loss_epoch'][-1][1]:.4g}",
                val=f"{state.history.get('elbo_validation', [(0, float('nan'))])[-1][1]:.4g}",
            )
            train_stream.set_epoch(state.epoch)
            checkpoint()
    finally:
        progress.close()
    distributed.broadcast_buffers(module)  # every rank ends with the same model: rank 0's BatchNorm statistics
    return state


def _end_epoch(module, validation_stream, config, state: TrainingState, scheduler, device, weight) -> None:
    """Record the epoch's metrics, validate, step the LR scheduler and early stopping, and advance the epoch."""
    sums = state.epoch_sums.all_reduced(device)
    record = sums.metrics("train")
    record["train_loss_epoch"] = sums.loss / max(sums.n_steps, 1)
    record["kl_weight"] = weight
    validate = validation_stream is not None and len(validation_stream) > 0
    validate = validate and (state.epoch + 1) % config.check_val_every_n_epoch == 0
    if validate:
        distributed.broadcast_buffers(module)  # BatchNorm running statistics: rank 0's on every rank
        record.update(evaluate(module, validation_stream, device))
    for key, value in record.items():
        state.history.setdefault(key, []).append((state.epoch, value))

    if validate and scheduler is not None:
        scheduler.step(record[config.lr_scheduler_metric])
    if validate and state.early_stopping is not None:
        if state.early_stopping.should_stop(record[config.early_stopping_monitor]):
            state.stopped_early = True
            logger.info(
                "early stopping at epoch %d: %s did not improve for %d epochs (best %.4f)",
                state.epoch,
                config.early_stopping_monitor,
                config.early_stopping_patience,
                state.early_stopping.best,
            )
    state.epoch += 1
    state.step_in_epoch = 0
    state.epoch_sums = _EpochSums()
