"""Safe to load, safe to write: a model file or checkpoint runs no code when read, and nothing is overwritten unasked.

A hostile model.pt here is a real torch.save of a payload whose unpickling would create a file (builtins.exec of an
open()); every reader must refuse it naming the type, and the file must not exist afterwards.
"""

from __future__ import annotations

import builtins
from pathlib import Path

import numpy as np
import pytest
import torch

from scvi_scale import SCVI, persist
from scvi_scale.cli import main
from scvi_scale.datasets import synthetic_atlas

FIXTURE = Path(__file__).parent / "fixtures" / "scvi_tools"


class _CreatesAFile:
    """Unpickled, it creates `path` (what a hostile model file would do instead)."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return builtins.exec, (f"open({str(self.path)!r}, 'w').close()",)


@pytest.fixture
def store(tmp_path) -> Path:
    path = synthetic_atlas(tmp_path / "cells.zarr", n_cells=200, n_genes=50, n_batches=2, n_cell_types=3, seed=2,
                           chunk_rows=64).path
    SCVI.setup_zarr(path, batch_key="batch")
    return path


@pytest.fixture
def model_dir(store, tmp_path) -> Path:
    model = SCVI(store, n_hidden=8, n_latent=3)
    model.save(tmp_path / "model")
    return tmp_path / "model"


def _plant(model_file: Path, payload_change) -> None:
    """Rewrite `model_file` (trusted: written by this test) with `payload_change` applied to its payload."""
    payload = torch.load(model_file, weights_only=False)
    payload_change(payload)
    torch.save(payload, model_file)


def test_a_model_file_with_a_pickle_payload_is_refused_by_name_and_runs_nothing(model_dir, store, tmp_path):
    created = tmp_path / "payload_ran"
    _plant(persist.model_path(model_dir), lambda payload: payload["attr_dict"].update(run_=_CreatesAFile(created)))
    with pytest.raises(persist.UnsafeModelFile, match=r"model\.pt needs builtins\.exec.*convert_trusted_model"):
        SCVI.load(model_dir, store)
    assert not created.exists()


def test_cli_refuses_a_hostile_model_in_one_line_with_exit_2(model_dir, store, tmp_path, capsys):
    created = tmp_path / "payload_ran"
    _plant(persist.model_path(model_dir), lambda payload: payload.update(extra=_CreatesAFile(created)))
    assert main(["latent", str(store), "--model", str(model_dir)]) == 2
    error = capsys.readouterr().err
    assert "builtins.exec" in error and str(persist.model_path(model_dir)) in error and error.count("\n") == 1
    assert not created.exists()


def test_a_checkpoint_with_a_pickle_payload_is_refused_on_resume(store, tmp_path):
    run, created = tmp_path / "run", tmp_path / "payload_ran"
    SCVI(store, n_hidden=8, n_latent=3).train(max_epochs=2, checkpoint_dir=run, max_steps=1)
    _plant(run / "checkpoint.pt", lambda payload: payload["state"].update(history=_CreatesAFile(created)))
    with pytest.raises(persist.UnsafeModelFile, match=r"checkpoint\.pt needs builtins\.exec"):
        SCVI(store, n_hidden=8, n_latent=3).train(max_epochs=2, checkpoint_dir=run, resume=True)
    assert not created.exists()


def test_our_models_and_scvi_tools_models_load_without_running_code(model_dir, store):
    """Both formats in every option the fixtures hold (softplus variance names a torch function, the history is
    pandas frames, the registry defaultdicts) read with weights_only=True."""
    for directory in [FIXTURE / "model", *sorted((FIXTURE / "options").iterdir())]:
        saved = persist.read_model(directory)
        assert saved.source.startswith("scvi-tools") and saved.history["elbo_train"]
    model = SCVI(store, n_hidden=8, n_latent=3, var_activation=torch.nn.functional.softplus)
    model.save(model_dir, overwrite=True)
    reloaded = SCVI.load(model_dir, store)
    assert reloaded.init_params["var_activation"] is torch.nn.functional.softplus
    np.testing.assert_array_equal(reloaded.get_latent_representation(), model.get_latent_representation())


def test_an_old_directory_needing_another_type_is_refused_saying_how_to_convert(model_dir, store, tmp_path):
    """A directory as an earlier version could have written it (the store as a pathlib.Path): refused naming the
    type and the conversion, which gives a directory that loads to the same model."""
    original = SCVI.load(model_dir, store).get_latent_representation()
    _plant(persist.model_path(model_dir), lambda payload: payload["attr_dict"].update(data_path_=Path(store)))
    with pytest.raises(persist.UnsafeModelFile, match=r"pathlib\.PosixPath.*convert_trusted_model"):
        persist.read_model(model_dir)
    persist.convert_trusted_model(model_dir, tmp_path / "converted")
    converted = SCVI.load(tmp_path / "converted")  # over the store it names, now a str
    np.testing.assert_array_equal(converted.get_latent_representation(), original)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_a_damaged_model_file_is_one_cli_line_naming_it_exit_2(model_dir, store, capsys, damage):
    path = persist.model_path(model_dir)
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"not a model " * 100, "empty": b""}[damage])
    assert main(["latent", str(store), "--model", str(model_dir)]) == 2
    error = capsys.readouterr().err
    assert f"{path} is damaged" in error and "copy it again" in error and error.count("\n") == 1
