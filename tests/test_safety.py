"""Safe to load, safe to write: a model file or checkpoint runs no code when read, nothing is overwritten unasked,
and the exit code says whose the error is (2: the user's input or the place they named, 1: our bug).

A hostile model.pt here is a real torch.save of a payload whose unpickling would create a file (builtins.exec of an
open()); every reader must refuse it naming the type, and the file must not exist afterwards. OS errors are
injected where the writes happen (the tests run as root, whom permissions do not stop).
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from scvi_scale import SCVI, persist
from scvi_scale.cli import main
from scvi_scale.datasets import synthetic_atlas
from scvi_scale.outputs import writer

FIXTURE = Path(__file__).parent / "fixtures" / "scvi_tools"


class _CreatesAFile:
    """Unpickled, it creates `path` (what a hostile model file would do instead)."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return builtins.exec, (f"open({str(self.path)!r}, 'w').close()",)


@pytest.fixture
def store(tmp_path) -> Path:
    path = synthetic_atlas(
        tmp_path / "cells.zarr", n_cells=200, n_genes=50, n_batches=2, n_cell_types=3, seed=2, chunk_rows=64
    ).path
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


# --- exit codes -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bug", [KeyError("registry_"), TypeError("unsupported operand")])
def test_a_keyerror_or_typeerror_from_inside_is_our_bug_exit_1(model_dir, store, capsys, monkeypatch, bug):
    def load_with_a_bug(*args, **kwargs):
        raise bug

    monkeypatch.setattr(SCVI, "load", load_with_a_bug)
    assert main(["latent", str(store), "--model", str(model_dir)]) == 1
    assert f"{type(bug).__name__}:" in capsys.readouterr().err


def test_bad_input_is_exit_2(model_dir, store, capsys):
    assert main(["sample", str(store), "--model", str(model_dir), "--n-samples", "0"]) == 2
    assert "n_samples=0" in capsys.readouterr().err


# --- nothing overwritten unasked ------------------------------------------------------------------------------------


def _de(store, model_dir, *extra) -> int:
    return main(
        ["de", str(store), "--model", str(model_dir), "--groupby", "batch", "--n-samples-overall", "20", *extra]
    )


def test_de_table_is_written_to_exactly_its_path_and_never_replaced_unasked(model_dir, store, tmp_path, capsys):
    table = tmp_path / "de.csv"
    assert _de(store, model_dir, "--table", str(table), "--key", "first") == 0
    written = table.read_bytes()
    assert [path.name for path in tmp_path.glob("de*")] == ["de.csv"]
    capsys.readouterr()
    assert _de(store, model_dir, "--table", str(table), "--key", "second") == 2
    error = capsys.readouterr().err
    assert f"{table} exists" in error and "--overwrite" in error
    assert table.read_bytes() == written
    import anndata

    assert "second" not in anndata.read_zarr(store).uns  # refused before the work
    assert _de(store, model_dir, "--table", str(table), "--key", "second", "--overwrite") == 0


def test_a_table_suffix_of_no_known_format_is_refused_naming_the_formats(model_dir, store, tmp_path, capsys):
    assert _de(store, model_dir, "--table", str(tmp_path / "de.txt")) == 2
    assert ".csv or .parquet" in capsys.readouterr().err
    assert not list(tmp_path.glob("de*"))


def test_a_report_is_not_replaced_unasked(model_dir, store, tmp_path, capsys):
    out = tmp_path / "report"
    out.mkdir()
    (out / "report.html").write_text("an earlier report")
    assert main(["report", str(store), "--model", str(model_dir), "--out", str(out), "--max-cells", "100"]) == 2
    assert f"{out / 'report.html'} exists" in capsys.readouterr().err
    assert (out / "report.html").read_text() == "an earlier report"


# --- OS errors --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "code, advice", [(errno.ENOSPC, "free space"), (errno.EACCES, "permissions"), (errno.EROFS, "read-only")]
)
def test_an_os_error_while_writing_an_output_is_one_line_naming_the_store_and_leaves_nothing(
    model_dir, store, capsys, monkeypatch, code, advice
):
    """A disk filling up (a write that names no file) at the second of four chunks: exit 2, the store and what to
    do in one line, no obsm/X_scvi visible; the rerun finishes with the values of an in-memory pass."""
    original = writer.DenseOutput.write_chunk

    def write_failing_at_chunk_1(self, chunk, values):
        if chunk == 1:
            raise OSError(code, os.strerror(code))
        original(self, chunk, values)

    monkeypatch.setattr(writer.DenseOutput, "write_chunk", write_failing_at_chunk_1)
    arguments = ["latent", str(store), "--model", str(model_dir), "--chunk-rows", "50"]
    assert main(arguments) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"scvi-scale latent: error: {store}: {os.strerror(code)}; ") and advice in error
    assert error.count("\n") == 1
    import anndata

    assert "X_scvi" not in anndata.read_zarr(store).obsm
    monkeypatch.setattr(writer.DenseOutput, "write_chunk", original)
    assert main(arguments) == 0
    np.testing.assert_array_equal(
        anndata.read_zarr(store).obsm["X_scvi"], SCVI.load(model_dir, store).get_latent_representation()
    )


def test_a_read_only_store_gives_outputs_in_memory_and_refuses_write_to_before_any_work(
    model_dir, store, monkeypatch, capsys
):
    """Read-only simulated through os.access (the tests run as root, whom permissions do not stop)."""
    from scvi_scale.outputs import runner

    real_access = os.access
    monkeypatch.setattr(
        writer.os,
        "access",
        lambda path, mode: (
            False if Path(path).resolve() == Path(store).resolve() and mode == os.W_OK else real_access(path, mode)
        ),
    )
    model = SCVI.load(model_dir, store)
    assert model.get_latent_representation().shape == (200, 3)

    def no_work(*args, **kwargs):
        raise AssertionError("computed before refusing")

    monkeypatch.setattr(runner, "run_units", no_work)
    with pytest.raises(writer.OutputError, match="read-only.*in memory.*output_store"):
        model.write_latent_representation("X_scvi")
    assert main(["normalize", str(store), "--model", str(model_dir)]) == 2
    assert "read-only" in capsys.readouterr().err


# --- one writer at a time -------------------------------------------------------------------------------------------

HOLD_FLOCK = """
import fcntl, os, sys, time
descriptor = os.open(sys.argv[1], os.O_RDONLY | (os.O_CREAT if sys.argv[2] == "file" else 0), 0o644)
fcntl.flock(descriptor, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(120)
"""


@contextlib.contextmanager
def another_process_holding(path: Path, kind: str):
    """A process holding the flock of `path` (a "file" it creates, or a "folder"), as a running writer does; it
    is SIGKILLed on leaving, as a killed run would be."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD_FLOCK, str(path), kind], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield
    finally:
        holder.kill()
        holder.wait(timeout=30)


def test_a_second_train_on_the_same_out_is_refused_and_a_killed_run_leaves_no_lock(store, tmp_path, capsys):
    from scvi_scale.cli.train import LOCK_FILE

    out = tmp_path / "run"
    out.mkdir()
    argv = ["train", str(store), "--batch-key", "batch", "--out", str(out), "--max-epochs", "1", "--n-hidden", "8"]
    with another_process_holding(out / LOCK_FILE, "file"):
        assert main(argv) == 2
        assert f"{out} is being trained by another run" in capsys.readouterr().err
        assert [path.name for path in out.iterdir()] == [LOCK_FILE]
    assert main(argv) == 0
    assert persist.model_path(out).exists()


def test_a_second_writer_of_an_output_is_refused_and_a_killed_one_leaves_no_lock(model_dir, store, capsys):
    import anndata

    argv = ["latent", str(store), "--model", str(model_dir)]
    with another_process_holding(store, "folder"):
        assert main(argv) == 2
        assert "another process is writing outputs into it" in capsys.readouterr().err
        assert "X_scvi" not in anndata.read_zarr(store).obsm
    assert main(argv) == 0
    np.testing.assert_array_equal(
        anndata.read_zarr(store).obsm["X_scvi"], SCVI.load(model_dir, store).get_latent_representation()
    )


def test_a_full_disk_while_training_names_the_checkpoint_and_leaves_no_part_of_it(store, tmp_path, capsys, monkeypatch):
    """The first checkpoint's write gets part way, then the disk is full: exit 2, one line naming the checkpoint,
    no checkpoint or temporary file left; the rerun trains."""
    real_save = torch.save

    def save_until_the_disk_is_full(payload, file):
        file.write(b"PK\x03\x04 the first bytes")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    out = tmp_path / "run"
    argv = ["train", str(store), "--batch-key", "batch", "--out", str(out), "--max-epochs", "1", "--n-hidden", "8"]
    monkeypatch.setattr(torch, "save", save_until_the_disk_is_full)
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert f"{out / 'checkpoint.pt'}: No space left on device; free space" in error and error.count("\n") == 1
    assert not out.exists()  # nothing in it: the folder this run created is gone again
    monkeypatch.setattr(torch, "save", real_save)
    assert main(argv) == 0
