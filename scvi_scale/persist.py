"""Model directories: the one reader and writer of `model.pt`, in our format and in scvi-tools'.

    >>> saved = read_model("model_dir/")               # a SavedModel, whichever format wrote the directory
    >>> write_model("copy/", saved)                    # ours; format="scvi-tools" for scvi-tools' SCVI.load

A directory holds `{prefix}model.pt` (MODEL_FILE), a torch pickle of {"model_state_dict", "var_names",
"attr_dict"}: scvi-tools' layout, which ours follows, and, when saved with the data, `{prefix}adata.h5ad`. Ours has
attr_dict keys init_params_ (our SCVI keyword arguments), registry_ (Registry.to_dict), history_ (metric ->
[(epoch, value)]), is_trained_, train_indices_, validation_indices_, data_path_ (the store it was trained on), minified_
(type, latent mean and variance keys) and scvi_scale_version; scvi-tools' has its own init_params_ / registry_ /
history_ (pandas frames), translated by scvi_tools_format.py. Every write goes to a temporary file first and is renamed
into place, so a kill never leaves a torn model.pt.

Reading runs no code from the file: torch.load(weights_only=True) with only _safe_globals() allowed besides torch's
own tensor types (numpy arrays, the two variance activations a model may name, and the pandas frames of
scvi-tools' history). A file that needs any other type is refused naming it (UnsafeModelFile);
convert_trusted_model rewrites a trusted one in the allowed types. A damaged file is refused naming it
(DamagedModelFile).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from scvi_scale import scvi_tools_format
from scvi_scale.data import remote
from scvi_scale.data.registry import Registry
from scvi_scale.data.writer import write_atomically
from scvi_scale.module import VAE
from scvi_scale.version import __version__

MODEL_FILE = "model.pt"
ANNDATA_FILE = "adata.h5ad"
FORMATS = ("scvi-scale", "scvi-tools")


def _safe_globals() -> list:
    """What a model file may name besides torch's tensors (torch.serialization's own allow-list): each one builds a
    value from data and calls nothing the file chooses."""
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy 1
        from numpy.core import multiarray  # type: ignore[no-redef]
    from pandas._libs.internals import _unpickle_block
    from pandas.core.indexes.base import _new_Index
    from pandas.core.internals.managers import BlockManager

    return [
        # numpy arrays (var_names, split rows), under the names numpy 2 and numpy 1 pickle them with
        np.ndarray,
        np.dtype,
        *[
            (getattr(multiarray, name), f"numpy.{core}.multiarray.{name}")
            for name in ("_reconstruct", "scalar")
            for core in ("_core", "core")
        ],
        *{type(np.dtype(code)) for code in "?bhilqBHILQefdOUS"},  # numpy 2 pickles each dtype's class
        # the variance activations a saved model may name (init_params' var_activation)
        torch.exp,
        torch.nn.functional.softplus,
        # scvi-tools' history_: one DataFrame per metric, indexed by epoch
        pd.DataFrame,
        pd.Index,
        _new_Index,
        BlockManager,
        _unpickle_block,
        slice,
        bytes,
        # scvi-tools' registry_ holds defaultdict(dict)s, read as plain dicts (torch fills no other mapping)
        (_plain_dict, "collections.defaultdict"),
        dict,
    ]


def _plain_dict(*_default_factory) -> dict:
    return {}


class DamagedModelFile(ValueError):
    """A model file or checkpoint that is not a whole torch file (truncated, overwritten, another kind of file)."""


class ModelExists(FileExistsError):
    """The model directory holds a model file already (`where`: its path or URL) and overwrite was not asked for."""

    def __init__(self, where: str):
        super().__init__(f"{where} exists; pass overwrite=True to replace it")
        self.where = where


class UnsafeModelFile(ValueError):
    """A model file or checkpoint that needs a type loading does not allow (it could run code); names the types."""


def _global_name(entry) -> str:
    if isinstance(entry, tuple):
        return entry[1]
    return f"{entry.__module__}.{entry.__qualname__}"


def load_torch_file(path: Path, allowed: list, trusted_hint: str) -> dict:
    """torch.load(path) that runs no code from the file: weights_only=True, with `allowed` (torch.serialization
    safe globals) besides torch's own. A damaged file raises DamagedModelFile, one that needs another type
    UnsafeModelFile naming the types and `trusted_hint` (what to do when its source is trusted); both name `path`."""
    path = Path(path)
    damaged = "write it again, or copy it again from its source"
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; a truncated one has lost its directory
        raise DamagedModelFile(f"{path} is damaged or not a torch file (no whole zip archive): {damaged}")
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        names = {_global_name(entry) for entry in allowed}
        refused = sorted(set(torch.serialization.get_unsafe_globals_in_checkpoint(path)) - names)
        if not refused:
            reason = " ".join(
                str(error).partition("WeightsUnpickler error:")[2].split("Check the documentation")[0].split()
            )
            raise DamagedModelFile(f"{path} cannot be read ({reason or _first_line(error)}): {damaged}") from None
        raise UnsafeModelFile(
            f"{path} needs {', '.join(refused)}, which a model file may not use here (loading it "
            f"could run code); it was not loaded. {trusted_hint}"
        ) from None
    except (RuntimeError, EOFError, KeyError, zipfile.BadZipFile) as error:
        raise DamagedModelFile(f"{path} is damaged ({_first_line(error)}): {damaged}") from None


def save_torch_file(payload, path: Path) -> Path:
    """torch.save `payload` to `path` atomically (write_atomically), through a Python file: so a full disk is an
    OSError (ENOSPC) naming `path`, where torch's own writer says only "unexpected pos"."""

    def save(temporary: Path) -> None:
        with open(temporary, "wb") as file:
            torch.save(payload, file)

    return write_atomically(path, save)


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


@dataclass
class SavedModel:
    """What a model directory holds, in our terms.

    module_state: the VAE's state dict (our parameter names); init_params: SCVI's keyword arguments; registry: the
    set-up (its library statistics may be None for a scvi-tools model with an observed library, which does not
    save them: the loader computes them from the store); history: metric -> [(epoch, value)]; train_indices /
    validation_indices: store rows (None when not trained); source: "scvi-scale <version>" or "scvi-tools <version>".
    """

    module_state: dict
    var_names: list[str]
    init_params: dict
    registry: Registry
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    is_trained: bool = False
    train_indices: np.ndarray | None = None
    validation_indices: np.ndarray | None = None
    source: str = f"scvi-scale {__version__}"
    data_path: str | list[str] | None = None  # the store (or stores) it was saved from (None: an AnnData)
    minified: tuple[str, str, str] | None = None  # (minified type, obsm key of q(z) means, of its variances)
    run: dict = field(default_factory=dict)  # measurements of the training run (seconds, cells/s, peak RSS, ...)

    def __post_init__(self):
        # int32 where the rows fit: a loaded model of a 10M-cell atlas keeps 40 MB of row index, not 80
        for name in ("train_indices", "validation_indices"):
            rows = getattr(self, name)
            if rows is not None:
                rows = np.asarray(rows)
                fits = rows.size == 0 or (rows.min() >= 0 and rows.max() < 2**31)
                setattr(self, name, rows.astype(np.int32, copy=False) if fits else rows)

    def build_module(self) -> VAE:
        """The saved VAE, its weights loaded, in eval mode on the CPU."""
        module = VAE.from_registry(self.registry, **self.init_params)
        missing, unexpected = module.load_state_dict(self.module_state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"the saved weights ({self.source}) do not fit the module its set-up builds: missing {missing}, "
                f"unexpected {unexpected}"
            )
        return module.eval()


def model_path(dir_path, prefix: str | None = None) -> Path:
    return Path(dir_path) / f"{prefix or ''}{MODEL_FILE}"


def anndata_path(dir_path, prefix: str | None = None) -> Path:
    return Path(dir_path) / f"{prefix or ''}{ANNDATA_FILE}"


# --- model directories at URLs (s3://, gs://; http(s):// to read) ----------------------------------------------


@contextlib.contextmanager
def model_folder(dir_path, prefix: str | None = None, overwrite: bool = False, keep: tuple[str, ...] = ()):
    """The local folder to write the model directory `dir_path` in: dir_path itself, or for a URL a staging folder
    under TMPDIR (remote.staging_folder) uploaded to it when the block ends without error, every model file last
    (publish_model_folder; the files named in `keep` stay local). ModelExists first when dir_path holds
    {prefix}model.pt and not overwrite. The staging folder is kept after an error (a resumed run finds its
    checkpoint there) and removed after the upload."""
    if not remote.is_url(os.fspath(dir_path)):
        path = model_path(dir_path, prefix)
        if path.exists() and not overwrite:
            raise ModelExists(str(path))
        yield Path(dir_path)
        return
    url = os.fspath(dir_path).rstrip("/")
    if url.split("://", 1)[0].lower() in remote.READ_ONLY_SCHEMES:
        raise remote.RemoteStoreError(f"{url}: http(s) URLs are read-only; save the model to s3://, gs:// or disk")
    fs, root = remote.filesystem(url)
    if not overwrite and fs.exists(f"{root}/{prefix or ''}{MODEL_FILE}"):
        raise ModelExists(f"{url}/{prefix or ''}{MODEL_FILE}")
    folder = remote.staging_folder(url)
    folder.mkdir(exist_ok=True)
    yield folder
    publish_model_folder(folder, url, keep)
    shutil.rmtree(folder, ignore_errors=True)


def publish_model_folder(folder: Path, url: str, keep: tuple[str, ...] = ()) -> None:
    """Upload the local model directory `folder` to `url`: first every file but the model files (*model.pt) and
    those named in `keep`, then the model files. An object appears whole or not at all, and model.pt is what makes
    a directory a model, so a reader sees no model, or the old one, until everything it refers to is there. No
    credential is written: the directory holds what SCVI.save writes, and the storage options stay in memory."""
    fs, root = remote.filesystem(url)
    files = sorted(path for path in folder.rglob("*") if path.is_file() and path.name not in keep)
    last = [path for path in files if path.name.endswith(MODEL_FILE) and path.parent == folder]
    first = [path for path in files if path not in last and ".partial" not in path.name]
    for group in (first, last):
        if group:
            fs.put([str(path) for path in group], [f"{root}/{path.relative_to(folder).as_posix()}" for path in group])


@contextlib.contextmanager
def _fetched(dir_path, name: str):
    """The file `name` of the model directory `dir_path` as a local path: itself, or for a URL a copy downloaded
    into a temporary folder (removed afterwards); FileNotFoundError naming it when it is not there."""
    if not remote.is_url(os.fspath(dir_path)):
        yield Path(dir_path) / name
        return
    url = f"{os.fspath(dir_path).rstrip('/')}/{name}"
    fs, path = remote.filesystem(url)
    with tempfile.TemporaryDirectory(prefix="scvi-scale-model-") as scratch:
        local = Path(scratch) / name
        try:
            fs.get_file(path, str(local))
        except FileNotFoundError:
            raise FileNotFoundError(f"{url} does not exist") from None
        yield local


def _exists(dir_path, name: str) -> bool:
    if not remote.is_url(os.fspath(dir_path)):
        return (Path(dir_path) / name).exists()
    fs, root = remote.filesystem(os.fspath(dir_path).rstrip("/"))
    return fs.exists(f"{root}/{name}")


def saved_data(dir_path, prefix: str | None, saved: SavedModel):
    """The data to load a model over when none is given: the AnnData saved beside it, else the store it was saved
    from (when it still exists)."""
    import anndata

    if _exists(dir_path, f"{prefix or ''}{ANNDATA_FILE}"):
        with _fetched(dir_path, f"{prefix or ''}{ANNDATA_FILE}") as path:
            return anndata.read_h5ad(path)
    paths = [saved.data_path] if isinstance(saved.data_path, str) else saved.data_path or []
    # a URL is taken as it is: opening it says what is wrong, if anything (a bucket cannot be asked cheaply)
    if paths and all(remote.is_url(path) or Path(path).exists() for path in paths):
        return saved.data_path
    raise ValueError(
        f"{dir_path} holds no {ANNDATA_FILE} and names no store that exists "
        f"({saved.data_path}): pass adata= (an AnnData or a store path)"
    )


def history_frames(history: dict[str, list[tuple[int, float]]]) -> dict[str, pd.DataFrame]:
    """metric -> [(epoch, value)] as scvi-tools shows its history: metric -> DataFrame (one column, by epoch)."""
    return {
        key: pd.DataFrame({key: [value for _, value in pairs]}, index=pd.Index([e for e, _ in pairs], name="epoch"))
        for key, pairs in history.items()
    }


def history_lists(frames: dict) -> dict[str, list[tuple[int, float]]]:
    """The inverse of history_frames (frames without their metric's column are skipped)."""
    return {
        key: [(int(epoch), float(value)) for epoch, value in frame[key].items()]
        for key, frame in frames.items()
        if isinstance(frame, pd.DataFrame) and key in frame
    }


def read_model(dir_path, prefix: str | None = None) -> SavedModel:
    """The model saved in `dir_path`, written by our save or by scvi-tools' SCVI.save (translated; an option we
    cannot map raises scvi_tools_format.UnsupportedScviToolsModel naming it)."""
    name = f"{prefix or ''}{MODEL_FILE}"
    if not _exists(dir_path, name):
        where = (
            f"{os.fspath(dir_path).rstrip('/')}/{name}"
            if remote.is_url(os.fspath(dir_path))
            else model_path(dir_path, prefix)
        )
        raise FileNotFoundError(f"{where} does not exist: a model directory (SCVI.save) holds {MODEL_FILE}")
    hint = (
        f"If you trust whoever wrote it, rewrite it in the allowed types with "
        f"scvi_scale.persist.convert_trusted_model({str(dir_path)!r}, NEW_DIR)"
    )
    with _fetched(dir_path, name) as path:
        return _saved_model(load_torch_file(path, _safe_globals(), hint), dir_path)


def convert_trusted_model(dir_path, new_dir_path, prefix: str | None = None) -> Path | str:
    """Rewrite the model in `dir_path` (ours, of any earlier version, or scvi-tools') as our directory in
    `new_dir_path` that read_model loads. This loads the old file with weights_only=False, which runs whatever
    code it holds: only for a file whose source you trust. Returns the new model file's path."""
    payload = torch.load(model_path(dir_path, prefix), map_location="cpu", weights_only=False)
    saved = _saved_model(payload, dir_path)
    if saved.data_path is not None:  # earlier versions may have kept Paths
        saved.data_path = (
            os.fspath(saved.data_path)
            if isinstance(saved.data_path, (str, os.PathLike))
            else [os.fspath(path) for path in saved.data_path]
        )
    return write_model(new_dir_path, saved, prefix=prefix)


def _saved_model(payload: dict, dir_path) -> SavedModel:
    attrs = payload.get("attr_dict", {})
    if "scvi_scale_version" not in attrs:
        fields = scvi_tools_format.to_ours(payload, dir_path)
        return SavedModel(**{**fields, "history": history_lists(fields["history"])})
    return SavedModel(
        module_state=payload["model_state_dict"],
        var_names=list(payload["var_names"]),
        init_params=dict(attrs["init_params_"]),
        registry=Registry.from_dict(attrs["registry_"]),
        history=attrs["history_"],
        is_trained=attrs["is_trained_"],
        train_indices=attrs["train_indices_"],
        validation_indices=attrs["validation_indices_"],
        source=f"scvi-scale {attrs['scvi_scale_version']}",
        data_path=attrs.get("data_path_"),
        minified=attrs.get("minified_"),
        run=attrs.get("run_", {}),
    )


def write_model(
    dir_path,
    saved: SavedModel,
    module=None,
    overwrite: bool = False,
    format: str = "scvi-scale",
    prefix: str | None = None,
) -> Path | str:
    """Write `saved` as `dir_path/{prefix}model.pt`, atomically (a URL: uploaded, see model_folder); returns its
    path. format="scvi-tools" writes the directory scvi-tools' SCVI.load reads, and needs the `module` itself
    (scvi-tools builds parts ours leaves out)."""
    if format not in FORMATS:
        raise ValueError(f"format={format!r}: expected one of {FORMATS}")
    if format == "scvi-tools":
        payload = scvi_tools_format.from_ours(saved, module, history_frames(saved.history))
    else:
        payload = {
            "model_state_dict": saved.module_state,
            "var_names": list(saved.var_names),
            "attr_dict": {
                "init_params_": saved.init_params,
                "registry_": saved.registry.to_dict(),
                "history_": saved.history,
                "is_trained_": saved.is_trained,
                "train_indices_": saved.train_indices,
                "validation_indices_": saved.validation_indices,
                "data_path_": saved.data_path,
                "minified_": saved.minified,
                "run_": saved.run,
                "scvi_scale_version": __version__,
            },
        }
    with model_folder(dir_path, prefix, overwrite) as folder:  # a URL: staged, then uploaded
        written = save_torch_file(payload, model_path(folder, prefix))
    return written if not remote.is_url(os.fspath(dir_path)) else f"{os.fspath(dir_path).rstrip('/')}/{written.name}"
