"""The training loop, in plain PyTorch: Adam, KL warm-up, validation ELBO, early stopping, LR on plateau,
atomic checkpoints and exact resume.

Defaults are scvi-tools' (`TrainingPlan`, `TrainRunner`, `EarlyStopping` as scvi-tools configures it). The loop
knows nothing of Zarr: it takes a module with `loss(tensors, kl_weight)` and two minibatch streams that yield
dicts of numpy arrays (see `sampler.py`). The training stream owns the position: its `epoch` and `batches_done`
say where the loop is, `state_dict` / `load_state_dict` save and restore it, iterating it runs the rest of its
epoch and moves it to the next. The loop is `fit` -> `_Loop.run_epoch` per epoch -> `_Loop.step` per minibatch.

Data-parallel: when a torch.distributed process group is up (see `distributed.py`), the module trains under
DistributedDataParallel, each rank on its own stream; epoch sums and validation sums are all-reduced, so metrics,
history and the early-stopping and LR decisions are global and the same on every rank.

Metrics follow scvi-tools' (1.5) names and meaning. Per epoch, over the cells seen (by all ranks):
    train_loss / validation_loss           = mean over cells of the loss minimised: reconstruction +
                                             kl_weight * KL(z) + KL(l), at the epoch's KL weight
    reconstruction_loss_{train,validation} = mean over cells of -log p(x | z, l)
    kl_local_{train,validation}            = mean over cells of KL(q(z|x) || p(z)) (+ KL on l)
    kl_global_{train,validation}           = 0 (scVI has no global latent variables)
    elbo_{train,validation}                = reconstruction + kl_local + kl_global (a negative ELBO per cell)
and kl_weight, lr and epoch_seconds. Validation runs as scvi-tools runs it: never, unless check_val_every_n_epoch
asks for it or early stopping or LR-on-plateau needs it (then every epoch).
The step reads one value back to the host, the loss (to stop on NaN); the epoch's sums stay on the device.

Stopping on a signal: inside `stop_on_signals()` (the CLI's train, one process), SIGINT or SIGTERM asks the
running fit to stop after its current step: it checkpoints (a run that is not healthy keeps its previous, healthy
checkpoint) and raises TrainingInterrupted, from which a resume continues as an uninterrupted run would.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import gc
import logging
import math
import signal
import time
from collections import deque
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from scvi_scale import distributed, optim, persist, surgery
from scvi_scale.data.writer import remove_abandoned_siblings
from scvi_scale.module import to_tensors
from scvi_scale.settings import settings
from scvi_scale.threads import ThreadTuner

logger = logging.getLogger("scvi_scale.train")


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; the last healthy checkpoint (if one was written) is kept."""


class TrainingInterrupted(Exception):
    """fit stopped at a signal (see stop_on_signals), after checkpointing; `signal_number` says which."""

    def __init__(self, message: str, signal_number: int):
        super().__init__(message)
        self.signal_number = signal_number


_stop_signals: list[int] = []  # the signals that asked the running fit to stop (stop_on_signals)


@contextlib.contextmanager
def stop_on_signals(signal_numbers=(signal.SIGINT, signal.SIGTERM)):
    """While inside, the first of these signals asks fit to stop after its current step, checkpoint and raise
    TrainingInterrupted; a second one acts as it would outside (the default: Ctrl-C twice still stops at once).
    For one process, in its main thread (ranks would stop at different steps and wait on each other)."""
    previous = {number: signal.getsignal(number) for number in signal_numbers}

    def ask_to_stop(number, frame):
        _stop_signals.append(number)
        for each, handler in previous.items():
            signal.signal(each, handler)

    for number in signal_numbers:
        signal.signal(number, ask_to_stop)
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        _stop_signals.clear()


# A checkpoint is written only when the run is healthy: every parameter finite and the loss at those weights within
# this factor of the median of the recent ones, so the checkpoint kept after a divergence holds weights from before it.
EXPLODING_LOSS_FACTOR = 10.0
RECENT_LOSSES = 64
TIME_CHECK_STEPS = 50  # steps between looks at the clock for time-based checkpoints (agreed across ranks)
# Settings a resume takes from the new call rather than from the checkpoint's optimizer state.
RESUMABLE_SETTINGS = ("lr", "weight_decay", "eps")


VALIDATION_METRICS = (
    "elbo_validation",
    "reconstruction_loss_validation",
    "kl_local_validation",
    "kl_global_validation",
    "validation_loss",
)
OPTIMIZERS = ("Adam", "AdamW")


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
    check_val_every_n_epoch: int | None = None
    checkpoint_every_n_steps: int | None = None
    checkpoint_every_seconds: float | None = 600.0  # also checkpoint after this long (a kill loses at most this)
    optimizer: str = "Adam"
    gradient_clip_val: float = 0.0
    early_stopping_warmup_epochs: int = 0

    def __post_init__(self):
        if self.max_epochs < 1:
            raise ValueError(f"max_epochs={self.max_epochs}: must be at least 1")
        if self.min_kl_weight > self.max_kl_weight:
            raise ValueError(f"min_kl_weight={self.min_kl_weight} is larger than max_kl_weight={self.max_kl_weight}")
        for key in ("early_stopping_monitor", "lr_scheduler_metric"):
            metric = getattr(self, key)
            if metric not in VALIDATION_METRICS:
                raise ValueError(f"{key}={metric!r}: expected a validation metric, one of {VALIDATION_METRICS}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer={self.optimizer!r}: expected one of {OPTIMIZERS}")

    @property
    def validation_every(self) -> int | None:
        """Epochs between validations: check_val_every_n_epoch, else 1 when early stopping or LR on plateau
        needs the metric, else None (no validation), as scvi-tools' Trainer decides."""
        if self.check_val_every_n_epoch is not None:
            return int(self.check_val_every_n_epoch)
        return 1 if self.early_stopping or self.reduce_lr_on_plateau else None


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


@dataclass
class _EpochSums:
    """Running sums over the cells seen so far in an epoch. The loss sums stay tensors on the module's device
    until the epoch's end (adding floats would read each back to the host, a sync per step on a GPU)."""

    n_cells: int = 0
    reconstruction_loss: float | torch.Tensor = 0.0
    kl_local: float | torch.Tensor = 0.0
    kl_z: float | torch.Tensor = 0.0
    loss: float | torch.Tensor = 0.0  # sum over cells of each step's mean loss, so train_loss weighs by cells

    def add(self, losses: dict[str, torch.Tensor]) -> None:
        n_cells = int(losses["reconstruction_loss"].shape[0])
        self.n_cells += n_cells
        self.reconstruction_loss = self.reconstruction_loss + losses["reconstruction_loss"].sum()
        self.kl_local = self.kl_local + losses["kl_local"].sum()
        self.kl_z = self.kl_z + losses["kl_z"].sum()
        self.loss = self.loss + losses["loss"] * n_cells

    def as_floats(self) -> dict[str, float]:
        return {f.name: float(getattr(self, f.name)) for f in fields(self)}

    def all_reduced(self, device: torch.device) -> _EpochSums:
        """These sums added up over all ranks (themselves when there is one), as floats."""
        values = self.as_floats()
        totals = distributed.all_reduce_sum(list(values.values()), device)
        reduced = dict(zip(values, totals))
        reduced["n_cells"] = int(reduced["n_cells"])
        return _EpochSums(**reduced)  # type: ignore[arg-type]  # n_cells made an int above

    def metrics(self, mode: str, kl_weight: float) -> dict[str, float]:
        """The epoch's metrics in scvi-tools' names (see the module docstring); loss at `kl_weight` for
        validation (training records the loss it minimised)."""
        n = max(self.n_cells, 1)
        rec, kl = float(self.reconstruction_loss) / n, float(self.kl_local) / n
        if mode == "train":
            loss = float(self.loss) / n
        else:
            loss = rec + kl - (1.0 - kl_weight) * float(self.kl_z) / n
        return {
            "train_loss" if mode == "train" else "validation_loss": loss,
            f"elbo_{mode}": rec + kl,
            f"reconstruction_loss_{mode}": rec,
            f"kl_local_{mode}": kl,
            f"kl_global_{mode}": 0.0,
        }


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
    """What a resumed run needs besides the module, the optimizer and the stream's position: what it has seen."""

    global_step: int = 0
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # metric -> [(epoch, value)]
    epoch_sums: _EpochSums = field(default_factory=_EpochSums)
    early_stopping: _EarlyStopping | None = None
    stopped_early: bool = False


@torch.no_grad()
def evaluate(module: torch.nn.Module, stream, device: torch.device, kl_weight: float = 1.0) -> dict[str, float]:
    """Validation metrics over one full pass of `stream` with the module in eval mode (the ELBO at KL weight 1,
    validation_loss at `kl_weight`); with several ranks, each passes over its own stream and the sums are added
    up."""
    was_training = module.training
    module.eval()
    sums = _EpochSums()
    try:
        for minibatch in stream:
            sums.add(module.loss(to_tensors(minibatch, device), kl_weight=1.0))  # type: ignore[operator]  # VAE.loss
    finally:
        module.train(was_training)
    return sums.all_reduced(device).metrics("validation", kl_weight)


def save_checkpoint(
    path: Path, module, optimizer, scheduler, train_stream, state: TrainingState, torch_rng_states: list
) -> None:
    """Write the checkpoint atomically (write_atomically), so a kill never leaves a torn file.

    With several ranks, rank 0 calls this with the epoch sums of all ranks in `state` and every rank's torch RNG
    state in `torch_rng_states` (one entry per rank); the stream state is rank 0's (all ranks are at the same
    minibatch)."""
    payload = {
        "settings": {name: optimizer.param_groups[0][name] for name in RESUMABLE_SETTINGS},
        "module": module.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "train_stream": train_stream.state_dict(),
        "torch_rng": torch_rng_states,
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "state": {
            "global_step": state.global_step,
            "history": state.history,
            "epoch_sums": state.epoch_sums.as_floats(),
            "early_stopping": asdict(state.early_stopping) if state.early_stopping else None,
            "stopped_early": state.stopped_early,
        },
    }
    persist.save_torch_file(payload, path)


def load_checkpoint(path: Path, module, optimizer, scheduler, train_stream) -> TrainingState:
    """Restore module, optimizer, scheduler, stream position and RNG states from `path`, on every rank: each takes
    its own RNG state; rank 0 carries on the epoch's (all-rank) sums, the other ranks start theirs at zero."""
    rank, world_size = distributed.world()
    # tensors and plain values only: a checkpoint runs no code when read
    payload = persist.load_torch_file(
        path, [], "Remove it and start over (--overwrite), or resume from a checkpoint this version wrote"
    )
    if len(payload["torch_rng"]) != world_size:
        raise ValueError(
            f"{path} was written by a run of {len(payload['torch_rng'])} process(es); resume it with that many, "
            f"not {world_size}"
        )
    module.load_state_dict(payload["module"])
    asked = {name: optimizer.param_groups[0][name] for name in RESUMABLE_SETTINGS}
    optimizer.load_state_dict(payload["optimizer"])
    changed = {
        name: (group[name], asked[name])
        for group in optimizer.param_groups[:1]
        for name in RESUMABLE_SETTINGS
        if group[name] != asked[name]
    }
    for group in optimizer.param_groups:  # the new call's settings win (e.g. a lower lr after a divergence)
        group.update(asked)
    if changed and rank == 0:
        logger.warning(
            "resuming %s with new optimizer settings: %s",
            path,
            ", ".join(f"{name} {old:g} -> {new:g}" for name, (old, new) in changed.items()),
        )
    if scheduler is not None and payload["scheduler"] is not None:
        scheduler.load_state_dict(payload["scheduler"])
    train_stream.load_state_dict({**payload["train_stream"], "rank": rank})
    torch.set_rng_state(payload["torch_rng"][rank])
    if payload["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(payload["cuda_rng"])
    saved = payload["state"]
    return TrainingState(
        global_step=saved["global_step"],
        history=saved["history"],
        epoch_sums=_EpochSums(**saved["epoch_sums"]) if rank == 0 else _EpochSums(),
        early_stopping=_EarlyStopping(**saved["early_stopping"]) if saved["early_stopping"] else None,
        stopped_early=saved["stopped_early"],
    )


@functools.cache  # once a process
def _skip_the_collection_at_exit() -> None:
    """At interpreter exit, move every live object out of the garbage collector's reach (gc.freeze): finalization's
    last collection otherwise walks every object the imports made (torch's above all), seconds of a short job's
    wall time under load, to free memory the process hands back anyway. Python promises no finalizers for objects
    still alive at exit; atexit handlers and weakref.finalize callbacks still run. Registered by the first fit."""
    atexit.register(gc.freeze)


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
    _skip_the_collection_at_exit()
    loop = _Loop(module, train_stream, validation_stream, config, torch.device(device), checkpoint_path)
    if loop.checkpoint_path is not None:
        remove_abandoned_siblings(loop.checkpoint_path)  # the temporary file of a run killed while saving
    if resume and loop.checkpoint_path is not None and loop.checkpoint_path.exists():
        loop.state = load_checkpoint(loop.checkpoint_path, module, loop.optimizer, loop.scheduler, train_stream)
        logger.info(
            "resumed from %s at epoch %d, step %d", loop.checkpoint_path, train_stream.epoch, train_stream.batches_done
        )
    else:
        train_stream.set_epoch(0)
    if config.early_stopping and loop.state.early_stopping is None:
        loop.state.early_stopping = _EarlyStopping(config.early_stopping_patience, config.early_stopping_min_delta)
    module.train()
    try:
        with loop.progress_bar():
            while train_stream.epoch < config.max_epochs and not loop.state.stopped_early:
                if not loop.run_epoch(max_steps):
                    break
    finally:
        if loop.thread_tuner is not None:
            loop.thread_tuner.restore()
    distributed.broadcast_buffers(module)  # every rank ends with the same model: rank 0's BatchNorm statistics
    return loop.state


class _Loop:
    """The pieces of one training run and its two levels: an epoch (`run_epoch`) and a step (`step`)."""

    def __init__(self, module, train_stream, validation_stream, config: TrainingConfig, device, checkpoint_path):
        self.module, self.config, self.device = module.to(device), config, device
        self.train_stream, self.validation_stream = train_stream, validation_stream
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path is not None else None
        self.world_size = distributed.world()[1]
        self.train_loss = distributed.data_parallel_loss(module, device)  # module.loss, or DDP around it
        self.trainable = [p for p in module.parameters() if p.requires_grad]
        # fused: one kernel over all parameters, cheaper than the per-tensor loop (benchmarks/history/issue-04.md);
        # optim's own, as torch.optim's would import torch._dynamo (seconds of start-up)
        self.optimizer = optim.make_optimizer(
            self.trainable,
            config.optimizer,
            lr=config.lr,
            eps=config.eps,
            weight_decay=config.weight_decay,
            device=device,
        )
        self.frozen = surgery.partly_frozen(module)  # query models: entries restored after each step
        self.scheduler = None
        if config.reduce_lr_on_plateau:
            self.scheduler = optim.ReduceLROnPlateau(
                self.optimizer,
                factor=config.lr_factor,
                patience=config.lr_patience,
                threshold=config.lr_threshold,
                threshold_mode="abs",
                min_lr=config.lr_min,
            )
        self.state = TrainingState()
        self.progress: Any = None  # the tqdm bar, while progress_bar() is open
        self.recent_losses: deque[float] = deque(maxlen=RECENT_LOSSES)
        self.last_step: tuple[dict, float] | None = None  # (minibatch, KL weight) of the last step, for healthy()
        self.last_checkpoint_time = time.monotonic()
        threads = torch.get_num_threads()
        self.thread_tuner = (
            ThreadTuner(threads) if settings.adaptive_threads and device.type == "cpu" and threads > 1 else None
        )

    def progress_bar(self):
        steps_per_epoch = len(self.train_stream)
        self.progress = tqdm(
            total=self.config.max_epochs * steps_per_epoch,
            initial=self.train_stream.epoch * steps_per_epoch + self.train_stream.batches_done,
            disable=not settings.progress_bar or distributed.world()[0] != 0,
            unit="step",
            dynamic_ncols=True,
        )
        return self.progress

    def healthy(self) -> bool:
        """Finite weights whose loss is finite and not exploding (see EXPLODING_LOSS_FACTOR), on every rank. A step's
        own loss was computed before its update, so the loss of its minibatch is computed again at the weights it
        made: a diverging update (one step at a far too high lr) shows there, not in the step's loss."""
        finite = all(bool(torch.isfinite(p).all()) for p in self.module.parameters())
        exploding = False
        if finite and self.last_step is not None:
            loss = self._loss_at_these_weights(*self.last_step)
            typical = abs(float(np.median(self.recent_losses)))
            exploding = not math.isfinite(loss) or loss > EXPLODING_LOSS_FACTOR * typical
        return distributed.all_reduce_sum([float(not finite or exploding)], self.device)[0] == 0

    @torch.no_grad()
    def _loss_at_these_weights(self, minibatch: dict, weight: float) -> float:
        """The loss of `minibatch` at the current weights, leaving no trace: in eval mode (BatchNorm statistics are
        read, not updated) and with the RNG states put back, so a checkpoint never changes what the run computes."""
        self.module.eval()
        try:
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                return float(self.module.loss(to_tensors(minibatch, self.device), weight)["loss"])
        finally:
            self.module.train()

    def checkpoint(self) -> None:
        """Every rank calls this at the same step: the sums and RNG states are gathered, rank 0 writes. A run
        that is not healthy keeps its previous checkpoint."""
        if self.checkpoint_path is None:
            return
        self.last_checkpoint_time = time.monotonic()
        if not self.healthy():
            logger.warning(
                "not checkpointing at step %d: the loss is exploding or weights are not finite; %s is kept",
                self.state.global_step,
                self.checkpoint_path,
            )
            return
        state = replace(self.state, epoch_sums=self.state.epoch_sums.all_reduced(self.device))
        rng_states = distributed.all_gather(torch.get_rng_state())
        arguments = (
            self.checkpoint_path,
            self.module,
            self.optimizer,
            self.scheduler,
            self.train_stream,
            state,
            rng_states,
        )
        distributed.on_rank_zero(lambda: save_checkpoint(*arguments))

    def run_epoch(self, max_steps: int | None) -> bool:
        """The rest of the stream's current epoch, then its metrics, validation and checkpoint. Returns False when
        max_steps stopped it first (the stream keeps its position inside the epoch)."""
        epoch, config = self.train_stream.epoch, self.config
        self.progress.set_description(f"Epoch {epoch + 1}/{config.max_epochs}")
        weight = kl_weight(config, epoch, self.state.global_step)
        started = time.perf_counter()
        for minibatch in self.train_stream:
            if self.thread_tuner is not None:
                self.thread_tuner.step_started(self.state.global_step)
            if config.n_epochs_kl_warmup is None and config.n_steps_kl_warmup:
                weight = kl_weight(config, epoch, self.state.global_step)
            self.step(minibatch, weight)
            if config.checkpoint_every_n_steps and self.state.global_step % config.checkpoint_every_n_steps == 0:
                self.checkpoint()
            elif self.checkpoint_due():
                self.checkpoint()
            if _stop_signals:
                self.stop_for_signal(_stop_signals[0])
            if max_steps is not None and self.state.global_step >= max_steps:
                self.checkpoint()
                return False
        self.end_epoch(epoch, weight)
        self.state.history.setdefault("epoch_seconds", []).append((epoch, time.perf_counter() - started))
        postfix = {"loss": f"{self.state.history['train_loss'][-1][1]:.4g}"}
        if "elbo_validation" in self.state.history:
            postfix["val"] = f"{self.state.history['elbo_validation'][-1][1]:.4g}"
        self.progress.set_postfix(postfix)
        self.checkpoint()
        return True

    def end_epoch(self, epoch: int, weight: float) -> None:
        """Record the epoch's metrics (at KL weight `weight`), validate, step the LR scheduler and early stopping,
        reset the sums."""
        config, state, validation_stream = self.config, self.state, self.validation_stream
        record = state.epoch_sums.all_reduced(self.device).metrics("train", weight)
        record["kl_weight"] = weight
        record["lr"] = float(self.optimizer.param_groups[0]["lr"])
        every = config.validation_every
        validate = validation_stream is not None and len(validation_stream) > 0
        validate = validate and every is not None and (epoch + 1) % every == 0
        if validate:
            distributed.broadcast_buffers(self.module)  # BatchNorm running statistics: rank 0's on every rank
            record.update(evaluate(self.module, validation_stream, self.device, weight))
        for key, value in record.items():
            state.history.setdefault(key, []).append((epoch, value))

        if validate and self.scheduler is not None:
            self.scheduler.step(record[config.lr_scheduler_metric])
        warmed_up = epoch >= config.early_stopping_warmup_epochs
        if validate and state.early_stopping is not None and warmed_up:
            if state.early_stopping.should_stop(record[config.early_stopping_monitor]):
                state.stopped_early = True
                logger.info(
                    "early stopping at epoch %d: %s did not improve for %d epochs (best %.4f)",
                    epoch,
                    config.early_stopping_monitor,
                    config.early_stopping_patience,
                    state.early_stopping.best,
                )
        state.epoch_sums = _EpochSums()

    def stop_for_signal(self, signal_number: int) -> None:
        """Checkpoint (when healthy) and raise TrainingInterrupted saying where the run can be resumed from."""
        self.checkpoint()
        if self.checkpoint_path is not None and self.checkpoint_path.exists():
            kept = (
                f"{self.checkpoint_path} holds its last healthy step: continue with --resume (train(..., resume=True))"
            )
        else:
            kept = "no checkpoint was written (no checkpoint_dir, or no healthy step yet)"
        raise TrainingInterrupted(
            f"training stopped by {signal.Signals(signal_number).name} at step {self.state.global_step}; {kept}",
            signal_number,
        )

    def checkpoint_due(self) -> bool:
        """Time for a checkpoint_every_seconds checkpoint; looked at every TIME_CHECK_STEPS steps, agreed by all ranks
        (each calls checkpoint at the same step)."""
        every = self.config.checkpoint_every_seconds
        if self.checkpoint_path is None or not every or self.state.global_step % TIME_CHECK_STEPS:
            return False
        late = time.monotonic() - self.last_checkpoint_time >= every
        return distributed.all_reduce_sum([float(late)], self.device)[0] > 0

    def step(self, minibatch: dict, weight: float) -> None:
        """One optimizer step on one minibatch; a loss that is not finite stops the run (on every rank)."""
        losses = self.train_loss(to_tensors(minibatch, self.device), weight)
        # the mean over ranks, so that all ranks stop together when one loss is not finite
        loss_value = distributed.all_reduce_sum([float(losses["loss"].detach())], self.device)[0] / self.world_size
        if not math.isfinite(loss_value):
            rows = minibatch["rows"]
            if self.checkpoint_path is None:
                kept = "no checkpoint was written (pass checkpoint_dir= to keep one); try a lower lr"
            elif self.checkpoint_path.exists():
                kept = (
                    f"the last healthy checkpoint is kept at {self.checkpoint_path}: resume from it with a lower "
                    "lr (train(..., resume=True, plan_kwargs={'lr': ...}))"
                )
            else:
                kept = f"no healthy checkpoint was reached, so {self.checkpoint_path.parent} holds none; try a lower lr"
            raise TrainingDivergedError(
                f"loss is {loss_value} at epoch {self.train_stream.epoch}, step {self.train_stream.batches_done - 1} "
                f"(store rows {int(rows.min())}..{int(rows.max())}); training stopped; {kept}"
            )
        self.recent_losses.append(loss_value)
        self.last_step = (minibatch, weight)
        self.optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        if self.config.gradient_clip_val:
            torch.nn.utils.clip_grad_norm_(self.trainable, self.config.gradient_clip_val)
        self.optimizer.step()
        if self.frozen:
            surgery.restore_frozen_entries(self.frozen)
        self.state.epoch_sums.add({k: v.detach() for k, v in losses.items()})
        self.state.global_step += 1
        self.progress.update(1)
        self.progress.set_postfix(loss=f"{loss_value:.4g}", refresh=False)
