"""`SCVI.train` and `SCVI.history` (functions of the model, `self`, bound in SCVI's class body) and training's
set-up: scvi-tools' train arguments as one `TrainingSetup`, then the split, the two samplers, the run of train.fit and
what it measured (`train_model`).

    >>> setup = TrainingSetup.of_call(model.store.n_obs, max_epochs=20, plan={"lr": 2e-3}, trainer={})
    >>> train_model(model, setup)       # model.train_indices, history_, run_info, is_trained are set

The loop itself (train.py) knows nothing of SCVI, registries or stores; this is where they meet it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import resource
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from scvi_scale import distributed, persist
from scvi_scale.model import compat, docs
from scvi_scale.sampler import BlockShuffleSampler, SequentialSampler, train_validation_split
from scvi_scale.settings import settings
from scvi_scale.train import TrainingConfig, fit, max_epochs_heuristic

if TYPE_CHECKING:
    import pandas as pd

CHECKPOINT_FILE = "checkpoint.pt"
VALIDATION_BATCH_SIZE = 1024  # cells per validation forward pass, at least the training batch size
IGNORED_TRAINER = "scvi-scale trains in its own loop, not Lightning's"
IGNORED_PLAN = "scvi-scale's loop is plain PyTorch (no compile or custom optimizer creator)"


@docs.fill
def train(
    self,
    max_epochs: int | None = None,
    accelerator: str = "auto",
    devices: int | list[int] | str = "auto",
    train_size: float | None = None,
    validation_size: float | None = None,
    shuffle_set_split: bool = True,
    load_sparse_tensor: bool = False,
    batch_size: int = 128,
    early_stopping: bool = False,
    datasplitter_kwargs: dict | None = None,
    plan_config: dict | None = None,
    plan_kwargs: dict | None = None,
    datamodule=None,
    trainer_config: dict | None = None,
    *,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    seed: int | None = None,
    block_rows: int | None = None,
    buffer_blocks: int | None = None,
    **trainer_kwargs,
) -> None:
    """Train with scvi-tools' defaults (Adam lr 1e-3, eps 0.01, weight decay 1e-6, KL warm-up over 400 epochs,
    90/10 split; no validation unless early stopping, LR on plateau or check_val_every_n_epoch asks). Under
    torch.distributed (torchrun, `distributed.launch`) every rank trains on its share; rank 0 checkpoints (save
    with `distributed.on_rank_zero`).

    Parameters
    ----------
    max_epochs
        Default scvi-tools' heuristic, min(400, round(20,000 / n_cells * 400)).
    accelerator, devices
        "auto", "cpu", "gpu" or "cuda"; one process trains on one device (more: torchrun; else warned).
    train_size, validation_size, shuffle_set_split, batch_size, early_stopping
        scvi-tools' split (default 0.9 and the rest), cells per step and rank, stopping on the monitor.
    load_sparse_tensor, datasplitter_kwargs
        Ignored with a warning (CSR is read anyway); drop_last (data-loader options warned).
    {datamodule}
    plan_config, plan_kwargs
        TrainingPlan options: lr, weight_decay, eps, optimizer ("Adam", "AdamW"), n_epochs_kl_warmup,
        n_steps_kl_warmup, max_kl_weight, min_kl_weight, reduce_lr_on_plateau, lr_factor, lr_patience,
        lr_threshold, lr_min, lr_scheduler_metric.
    trainer_config, **trainer_kwargs
        check_val_every_n_epoch, early_stopping_{monitor,patience,min_delta,warmup_epochs}, enable_progress_bar,
        gradient_clip_val, max_steps, checkpoint_every_{n_steps,seconds}; Lightning's others are warned.
    checkpoint_dir, resume
        Checkpoint written atomically each epoch; resume=True continues a killed run to where it would have got.
    seed, block_rows, buffer_blocks
        Seeds split, sampler and torch (default settings.seed, which drew the initial weights: the same seed,
        machine and thread count give the same model); the sampler's shuffle block and buffer sizes.
    """
    compat.refuse("train", datamodule=datamodule)
    if self.minified_data_type is not None:
        raise ValueError("a minified model holds no counts to train on; train the full model")
    setup = TrainingSetup.of_call(
        self.store.n_obs,
        max_epochs=max_epochs,
        early_stopping=early_stopping,
        plan={**(plan_config or {}), **(plan_kwargs or {})},
        trainer={**(trainer_config or {}), **trainer_kwargs},
        splitter=datasplitter_kwargs,
        train_size=train_size,
        checkpoint_dir=checkpoint_dir,
        seed=seed,
        devices=devices,
        load_sparse_tensor=load_sparse_tensor,
        validation_size=validation_size,
        shuffle=shuffle_set_split,
        batch_size=batch_size,
        resume=resume,
        block_rows=block_rows,
        buffer_blocks=buffer_blocks,
        accelerator=accelerator,
    )
    train_model(self, setup)


def history(self) -> dict[str, pd.DataFrame]:
    """Per-epoch metrics as scvi-tools shows them: metric name -> DataFrame indexed by epoch."""
    return persist.history_frames(self.history_)


@dataclasses.dataclass(frozen=True)
class TrainingSetup:
    """One call of SCVI.train, resolved: the loop's config and the data's split and sampling.

    config: the loop's settings (train.TrainingConfig); progress_bar: shown (train(enable_progress_bar=...));
    max_steps: optimizer steps in all (None: no limit); batch_size: cells per step and rank; drop_last: drop each
    epoch's short last minibatch; train_size, validation_size, shuffle: the split (sampler.train_validation_split);
    seed: the split's, the sampler's and torch's; block_rows, buffer_blocks: the shuffle's block and buffer sizes
    (None: the sampler's defaults); checkpoint_path: the checkpoint file (None: none); resume: continue from it;
    accelerator: scvi-tools' ("auto", "cpu", "gpu", "cuda").
    """

    config: TrainingConfig
    progress_bar: bool = True
    max_steps: int | None = None
    batch_size: int = 128
    drop_last: bool = False
    train_size: float = 0.9
    validation_size: float | None = None
    shuffle: bool = True
    seed: int = 0
    block_rows: int | None = None
    buffer_blocks: int | None = None
    checkpoint_path: Path | None = None
    resume: bool = False
    accelerator: str = "auto"

    @classmethod
    def of_call(
        cls,
        n_obs: int,
        *,
        max_epochs: int | None = None,
        early_stopping: bool = False,
        plan: dict,
        trainer: dict,
        splitter: dict | None = None,
        train_size: float | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
        seed: int | None = None,
        devices: int | list[int] | str = "auto",
        load_sparse_tensor: bool = False,
        **options,
    ) -> TrainingSetup:
        """The set-up of a train call over `n_obs` cells: scvi-tools' plan arguments (plan_kwargs and plan_config,
        merged), trainer arguments (trainer_kwargs and trainer_config) and data-splitter arguments, the ones without
        a meaning here explained with a warning (devices and load_sparse_tensor too), any other unknown name a
        TypeError; `options` are the fields of the same names (batch_size, validation_size, shuffle, block_rows,
        buffer_blocks, resume, accelerator)."""
        if devices not in ("auto", 1, [0], "1"):
            compat.explain_ignored(
                "train",
                ["devices"],
                "one process trains on one device; for several, run under torchrun or `scvi-scale train --nproc N`",
            )
        if load_sparse_tensor:
            compat.explain_ignored("train", ["load_sparse_tensor"], "sparse counts are always read as CSR")
        names = {field.name for field in dataclasses.fields(TrainingConfig)} - {"max_epochs", "early_stopping"}
        known_plan = compat.split_known(plan, names, "train(plan_kwargs)", compat.PLAN_ARGUMENTS, IGNORED_PLAN)
        known_trainer = compat.split_known(
            trainer,
            names | {"enable_progress_bar", "max_steps"},
            "train",
            compat.LIGHTNING_TRAINER_ARGUMENTS,
            IGNORED_TRAINER,
        )
        known_splitter = compat.split_known(
            splitter or {}, ("drop_last",), "train", compat.DATA_LOADER_ARGUMENTS, compat.IGNORED_LOADER
        )
        progress_bar = known_trainer.pop("enable_progress_bar", True)
        max_steps = known_trainer.pop("max_steps", None)
        config = TrainingConfig(
            max_epochs=max_epochs or max_epochs_heuristic(n_obs),
            early_stopping=early_stopping,
            **known_plan,
            **known_trainer,
        )
        return cls(
            config,
            progress_bar=progress_bar,
            max_steps=None if max_steps is not None and max_steps < 0 else max_steps,  # < 0: Lightning's "no limit"
            drop_last=bool(known_splitter.get("drop_last", False)),
            train_size=0.9 if train_size is None else train_size,
            seed=settings.seed if seed is None else seed,
            checkpoint_path=None if checkpoint_dir is None else Path(checkpoint_dir) / CHECKPOINT_FILE,
            **options,
        )


def train_model(model, setup: TrainingSetup) -> None:
    """Train `model` (an SCVI) in place as `setup` says, on this rank's share of the cells, and record on it the
    split (train_indices, validation_indices), the history, run_info (the run's measurements) and is_trained."""
    device = distributed.setup(resolve_device(setup.accelerator))
    rank, world_size = distributed.world()
    torch.manual_seed(distributed.rank_seed(setup.seed))
    model.train_indices, model.validation_indices = train_validation_split(
        model.store.n_obs,
        train_size=setup.train_size,
        validation_size=setup.validation_size,
        seed=setup.seed,
        shuffle=setup.shuffle,
    )
    train_stream, validation_stream = _streams(model, setup, rank, world_size)
    started = time.perf_counter()
    with _progress_bars(setup.progress_bar):
        state = fit(
            model.module,
            train_stream,
            validation_stream,
            setup.config,
            device=device,
            checkpoint_path=setup.checkpoint_path,
            resume=setup.resume,
            max_steps=setup.max_steps,
        )
    epoch_seconds = [value for _, value in state.history.get("epoch_seconds", [])]
    model.run_info = {
        "seconds": round(time.perf_counter() - started, 2),
        "epochs": len(state.history.get("train_loss", [])),
        # per epoch, from its own clock: a resumed run's time before the kill is not in `seconds`
        "train_cells_per_second": round(len(model.train_indices) / float(np.median(epoch_seconds)), 1)
        if epoch_seconds
        else None,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "processes": world_size,
    }
    model.history_ = state.history
    model.is_trained = bool(state.history) or state.global_step > 0
    model.module.eval()


def _streams(model, setup: TrainingSetup, rank: int, world_size: int):
    """(training sampler, validation sampler or None) over this rank's share of the model's split."""
    store, obs_arrays = model.store, model.obs_arrays
    # a CSR store's minibatches stay CSR: the module reads the non-zeros (its likelihood and log1p), and
    # building the dense counts would cost the training thread more than the first layer's densifying scatter
    csr_only = {"return_csr": store.is_sparse, "dense": not store.is_sparse}
    train_stream = BlockShuffleSampler(
        store,
        model.train_indices,
        batch_size=setup.batch_size,
        obs_arrays=obs_arrays,
        seed=setup.seed,
        rank=rank,
        world_size=world_size,
        block_rows=setup.block_rows,
        buffer_blocks=setup.buffer_blocks,
        drop_last=setup.drop_last,
        **csr_only,
    )
    if len(model.validation_indices) < world_size or setup.config.validation_every is None:
        return train_stream, None
    validation_share = np.array_split(model.validation_indices, world_size)[rank]
    return train_stream, SequentialSampler(
        store,
        validation_share,
        batch_size=max(setup.batch_size, VALIDATION_BATCH_SIZE),
        obs_arrays=obs_arrays,
        **csr_only,
    )


@contextlib.contextmanager
def _progress_bars(enabled: bool):
    """Progress bars off for one call when not `enabled` (train(enable_progress_bar=False))."""
    saved = settings.progress_bar
    settings.progress_bar = saved and enabled
    try:
        yield
    finally:
        settings.progress_bar = saved


def resolve_device(accelerator: str, device: int | str = "auto") -> torch.device:
    """scvi-tools' accelerator ("auto", "cpu", "gpu"/"cuda") and device ("auto" or an index) as a torch device."""
    index = None if device in ("auto", None) else int(device)
    if accelerator in ("auto", "gpu", "cuda"):
        if torch.cuda.is_available():
            return torch.device("cuda" if index is None else f"cuda:{index}")
        if accelerator != "auto":
            raise RuntimeError(f"accelerator={accelerator!r} but torch sees no CUDA device")
        return torch.device("cpu")
    return torch.device(accelerator)
