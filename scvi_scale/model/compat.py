"""scvi-tools arguments that have no meaning here: accepted, and explained once per process with a warning.

A scvi-tools notebook passes Lightning trainer arguments, data-loader keyword arguments and the like; our loop and
our streaming readers have no use for them. Rather than a TypeError, each is named in one UserWarning saying why it
is ignored (docs/compatibility.md). What would change the result silently (a data module, a custom
data loader) is refused instead.
"""

from __future__ import annotations

import warnings

# Lightning Trainer arguments scvi-tools passes through **trainer_kwargs: nothing to configure in our loop.
LIGHTNING_TRAINER_ARGUMENTS = frozenset(
    {
        "logger",
        "log_every_n_steps",
        "enable_checkpointing",
        "checkpointing_monitor",
        "learning_rate_monitor",
        "callbacks",
        "precision",
        "strategy",
        "num_nodes",
        "deterministic",
        "benchmark",
        "profiler",
        "accumulate_grad_batches",
        "limit_train_batches",
        "limit_val_batches",
        "num_sanity_val_steps",
        "val_check_interval",
        "default_root_dir",
        "progress_bar_refresh_rate",
        "simple_progress_bar",
        "save_log_on_disk",
        "reload_dataloaders_every_n_epochs",
        "detect_anomaly",
        "inference_mode",
        "use_distributed_sampler",
        "sync_batchnorm",
        "min_epochs",
        "min_steps",
        "max_time",
        "overfit_batches",
        "early_stopping_mode",
    }
)
# torch DataLoader options scvi-tools' data loaders take (**data_loader_kwargs, datasplitter_kwargs): our
# readers are threads over the store; the batch size is the method's own batch_size.
DATA_LOADER_ARGUMENTS = frozenset(
    {
        "num_workers",
        "pin_memory",
        "persistent_workers",
        "prefetch_factor",
        "shuffle",
        "collate_fn",
        "timeout",
        "worker_init_fn",
        "multiprocessing_context",
        "generator",
        "sampler",
        "batch_sampler",
        "iter_mode",
        "load_sparse_tensor",
        "data_and_attributes",
        "distributed_sampler",
        "drop_dataset_tail",
        "pin_memory_device",
        "external_indexing",
        "n_samples_per_label",
    }
)
# scvi-tools TrainingPlan options with no counterpart in our loop.
PLAN_ARGUMENTS = frozenset(
    {
        "optimizer_creator",
        "compile",
        "compile_kwargs",
        "loss_kwargs",
        "update_only_decoder",
        "on_step",
        "on_epoch",
        "max_kl_weight_steps",
    }
)

# why the data-loader arguments are ignored (named in the warning)
IGNORED_LOADER = "scvi-scale reads the data itself, in threads (the method's batch_size sets the forward pass)"

_explained: set[tuple[str, str]] = set()


def explain_ignored(method: str, names, why: str) -> None:
    """One UserWarning per (method, argument) and process: `names` were accepted by `method` but do nothing."""
    fresh = sorted(name for name in names if (method, name) not in _explained)
    if not fresh:
        return
    _explained.update((method, name) for name in fresh)
    warnings.warn(
        f"{method}: {', '.join(fresh)} accepted for scvi-tools compatibility and ignored: {why}",
        UserWarning,
        stacklevel=3,
    )


def split_known(kwargs: dict, known, method: str, ignorable, why: str) -> dict:
    """The entries of `kwargs` named in `known`; those in `ignorable` are explained and dropped; any other name is
    a TypeError naming it (a misspelt argument must not pass silently)."""
    taken = {key: value for key, value in kwargs.items() if key in known}
    ignored = [key for key in kwargs if key not in known and key in ignorable]
    unknown = sorted(key for key in kwargs if key not in known and key not in ignorable)
    if unknown:
        raise TypeError(f"{method}() got unexpected keyword argument(s) {unknown}")
    explain_ignored(method, ignored, why)
    return taken


def refuse(method: str, **given) -> None:
    """Arguments scvi-tools accepts that would change the result if ignored: refused, naming them."""
    used = sorted(name for name, value in given.items() if value is not None)
    if used:
        raise NotImplementedError(
            f"{method}: {', '.join(used)} is not supported by scvi-scale (it streams the data itself): pass adata "
            "(an AnnData or a Zarr store) and, where the method takes them, indices"
        )
