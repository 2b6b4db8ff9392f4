"""How outputs run: chunks of cells (units) through a job, in-process or on `dask.distributed` workers, their
results returned in memory or written chunk by chunk into a store.

    >>> inputs = ModelInputs(module, store, obs_arrays, save=model.save)
    >>> request = OutputRequest.of_call(indices=None, batch_size=None, silent=True, seed=3)
    >>> run(inputs, LatentJob(), request)                                   # {"latent": (n, L) array}
    >>> run(inputs, LatentJob(), request, {"latent": OutputSpec("obsm", "X_scvi", "dense", 10)}, arguments)

A unit is one chunk of cells: `Unit(index, rows)`, rows increasing store rows (chunk_rows of them, the last unit
possibly fewer), plus an optional per-unit payload (group codes, requested cells). Writes of unit k go to chunk k
of the outputs, rows k * chunk_rows ... of the store. The job maths live in jobs.py; this file only moves units.

In-process, units compute on as many threads as torch has (each unit's torch operations on one), while the
sampler reads the next units ahead and a thread writes each result one unit behind. With a client, units fan out
over the workers; each worker loads the model once from a model directory (persist.read_model) and checks that it
is the caller's model (a digest of the weights).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import shutil
import tempfile
import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields

import numpy as np
import torch
from tqdm.auto import tqdm

from scvi_scale import persist
from scvi_scale.data import remote
from scvi_scale.data.store import CountStore, StoreError
from scvi_scale.outputs import writer
from scvi_scale.outputs.jobs import ScaleSampleJob
from scvi_scale.outputs.noise import NOISE_VERSION
from scvi_scale.sampler import SequentialSampler, stack_rows
from scvi_scale.settings import settings
from scvi_scale.threads import torch_threads

DEFAULT_BATCH_SIZE = 1024  # cells per forward pass (scvi-tools' 128 was slower: benchmarks/history/from-code.md)
IN_FLIGHT_BYTES = 2 << 30  # in-process, units compute at once while their dense counts and outputs fit in this
MAX_MODELS_PER_WORKER = 2


# --- what a call asks for ---------------------------------------------------------------------------------------


@dataclass
class ModelInputs:
    """What outputs are computed from: the trained module, the store of the cells it runs on and their per-cell
    encoded obs fields (Registry.encode of that store). save(dir) writes the model for dask workers to load.
    minified: obs_arrays hold each cell's cached posterior (qzm, qzv, observed_lib_size), and jobs read no
    counts (except those that need them: needs_counts)."""

    module: torch.nn.Module
    store: CountStore
    obs_arrays: dict[str, np.ndarray]
    save: Callable[[str], None] | None = None
    minified: bool = False

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device


@dataclass(frozen=True)
class OutputRequest:
    """How one output call runs and where its results go, built once per public call.

    indices: store rows of the cells (None: all), results in their order; batch_size: cells per forward pass; seed:
    keys every random draw (jobs.py; default settings.seed); chunk_rows: cells per unit and per written row chunk
    (None: the store's chunk_rows); client: a dask.distributed Client to fan units out over; model_dir: where the
    workers load the model from (None: it is saved to a temporary folder); output_store: where written outputs go
    (None: the input store); overwrite: replace an existing output of that key; silent: no progress bar.
    """

    indices: np.ndarray | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    seed: int = 0
    chunk_rows: int | None = None
    client: object = None
    model_dir: str | None = None
    output_store: str | None = None
    overwrite: bool = False
    silent: bool = True

    # what a public method takes in **options (the other fields are its own named arguments)
    OPTIONS = ("seed", "chunk_rows", "client", "model_dir", "output_store", "overwrite")

    @classmethod
    def of_call(cls, *, indices=None, batch_size: int | None = None, silent: bool = True, **options):
        """The request of a public call: its indices, batch_size and silent, and **options among OPTIONS."""
        unknown = sorted(set(options) - set(cls.OPTIONS))
        if unknown:
            raise TypeError(f"unexpected keyword argument(s) {unknown}; the output options are {list(cls.OPTIONS)}")
        if indices is not None:
            indices = np.asarray(indices)
            if indices.ndim != 1 or indices.size == 0 or not np.issubdtype(indices.dtype, np.integer):
                raise ValueError(f"indices must be a non-empty 1-D array of integer cell positions, got {indices!r}")
        chunk_rows = options.get("chunk_rows")
        if chunk_rows is not None and int(chunk_rows) < 1:
            raise ValueError(f"chunk_rows={chunk_rows}: must be positive")
        options.setdefault("seed", settings.seed)
        return cls(indices=indices, batch_size=batch_size or DEFAULT_BATCH_SIZE, silent=silent, **options)

    def replace(self, **changes) -> OutputRequest:
        return OutputRequest(**{**{f.name: getattr(self, f.name) for f in fields(self)}, **changes})

    def unit_rows(self, store: CountStore) -> int:
        return int(self.chunk_rows or store.chunk_rows)


@dataclass(frozen=True)
class OutputSpec:
    """One written output: entry group/key ("obsm", "layers"), kind "dense" or "csr", its number of columns and,
    for dense outputs, its dtype ("float32", or "float16" for half the disk)."""

    group: str
    key: str
    kind: str
    n_columns: int
    dtype: str = "float32"


@dataclass(frozen=True)
class Unit:
    """One chunk of cells: its index, its store rows (increasing: an array, or a range for consecutive rows, so
    that the units over all cells of an atlas hold no row array) and what its job needs besides the counts."""

    index: int
    rows: np.ndarray | range
    payload: object = None


def cut_units(rows: np.ndarray | range, chunk_rows: int) -> list[Unit]:
    """Runs of chunk_rows consecutive entries of `rows` (sorted store rows, or a range), numbered from 0."""
    starts = range(0, len(rows), chunk_rows)
    return [Unit(index, rows[start : start + chunk_rows]) for index, start in enumerate(starts)]


# --- the one run path -------------------------------------------------------------------------------------------


def run(
    inputs: ModelInputs,
    job,
    request: OutputRequest,
    outputs: dict[str, OutputSpec] | None = None,
    arguments: dict | None = None,
    description: str = "",
) -> dict:
    """Run `job` for the request's cells. Without `outputs`: {result name: values}, cells in the order of
    request.indices on the first axis (numpy arrays or CSR matrices). With `outputs` ({result name: OutputSpec}):
    every cell's results are written chunk by chunk (an unfinished write with the same `arguments`, seed and model
    resumes) and the outputs are returned read back lazily (writer.read_output)."""
    if outputs is None:
        return _in_memory(inputs, job, request, description)
    return _written(inputs, job, request, outputs, arguments or {}, description)


def _in_memory(inputs: ModelInputs, job, request: OutputRequest, description: str) -> dict:
    rows: np.ndarray | range = range(inputs.store.n_obs)
    restore = None
    if request.indices is not None:
        rows = request.indices.astype(np.int64)
        if not np.all(rows[1:] > rows[:-1]):  # results come in store order: put them back in the caller's
            order = np.argsort(rows, kind="stable")
            rows, restore = rows[order], np.argsort(order)
    results = run_units(inputs, job, cut_units(rows, request.unit_rows(inputs.store)), request, description=description)
    assert results is not None, "no outputs: the results come back"
    joined = {}
    for name in list(results[0]):
        values = stack_rows([result.pop(name) for result in results])
        joined[name] = values if restore is None else values[restore]
    return joined


def _written(inputs, job, request: OutputRequest, outputs: dict[str, OutputSpec], arguments: dict, description):
    """Every cell's results written into the store; a collection's cells into the store each came from (one call
    per store, its rows offset), read back as one lazy array over the collection."""
    import dask.array as da

    if request.indices is not None:
        raise writer.OutputError("outputs written to a store cover every cell: pass indices=None with write_to")
    record = {
        **arguments,
        "seed": request.seed,
        "batch_size": request.batch_size,
        "model": model_digest(inputs.module),
        "noise": NOISE_VERSION,
    }  # other streams would mix two sets of draws
    members = getattr(inputs.store, "stores", None)
    if members is None:
        new_store = request.output_store is not None and not writer.store_exists(request.output_store)
        target = writer.output_store(inputs.store.path, request.output_store)
        with writer.exclusive_writer(target):
            return _write_into(
                inputs, job, request, outputs, record, description, target, inputs.store.n_obs, 0, new_store
            )
    if request.output_store is not None:
        raise writer.OutputError("the outputs of a collection of stores go into each store; output_store= names one")
    for member in members:  # all of them before any work
        writer.check_writable(member.path)
    parts = []
    for member, first in zip(members, inputs.store.offsets[:-1]):
        with writer.exclusive_writer(member.path):
            parts.append(
                _write_into(
                    inputs, job, request, outputs, record, description, member.path, member.n_obs, int(first), False
                )
            )
    return {name: da.concatenate([part[name] for part in parts]) for name in outputs}


def _write_into(
    inputs,
    job,
    request,
    outputs: dict[str, OutputSpec],
    record: dict,
    description: str,
    target: str,
    n_rows: int,
    first_row: int,
    new_store: bool,
) -> dict:
    """Write the results of inputs' rows first_row ... first_row + n_rows as outputs of the store `target`
    (`new_store`: this call created it, so a failure removes it)."""
    chunk_rows = request.unit_rows(inputs.store)
    chunked = {
        name: writer.DenseOutput(target, spec.group, spec.key, n_rows, spec.n_columns, chunk_rows, record, spec.dtype)
        if spec.kind == "dense"
        else writer.CsrOutput(target, spec.group, spec.key, n_rows, spec.n_columns, chunk_rows, record)
        for name, spec in outputs.items()
    }
    # A call writing several outputs (posterior samples <key>_0, <key>_1, ...) that was killed after finishing some
    # of them resumes the others; when all are finished, prepare refuses as for one output.
    finished = set() if request.overwrite else {name for name, out in chunked.items() if out.complete_as_recorded()}
    for name in finished:
        chunked[name].tidy()  # its last steps, in case a kill came after it was in place
    active = {name: out for name, out in chunked.items() if name not in finished or len(finished) == len(chunked)}
    started = [output for output in active.values() if request.overwrite or not output.progress.exists()]
    try:
        todo = sorted(set().union(*(output.prepare(overwrite=request.overwrite) for output in active.values())))
        first = next(iter(active.values()))
        if todo:
            units = [Unit(chunk, range(*(first_row + bound for bound in first.bounds(chunk)))) for chunk in todo]
            run_units(inputs, job, units, request, outputs=active, description=description)
    except StoreError as error:
        if not isinstance(error, writer.OutputError):  # a damaged input block: leave nothing this call started
            for output in started:
                output.abandon()
            if new_store:
                writer.remove_store(target)
        raise
    for output in active.values():
        output.finish()
    return {name: writer.read_output(target, output.entry) for name, output in chunked.items()}


def request_units(
    inputs: ModelInputs, request: OutputRequest, rows: np.ndarray, batches: np.ndarray, numbers: np.ndarray
) -> list[Unit]:
    """Units over the cells of requests: request i is cell rows[i] decoded in batches[i] (jobs.OWN_BATCH: its
    own batch), keyed by numbers[i]; each cell is read once however often it is requested. A unit's payload is
    (positions of its requests' cells in the unit, their batches, their numbers)."""
    rows = np.asarray(rows, dtype=np.int64)
    batches = np.asarray(batches, dtype=np.int64)
    numbers = np.asarray(numbers, dtype=np.int64)
    order = np.argsort(rows, kind="stable")
    sorted_rows = rows[order]
    units = []
    for unit in cut_units(np.unique(rows), request.unit_rows(inputs.store)):
        first = np.searchsorted(sorted_rows, unit.rows[0], side="left")
        last = np.searchsorted(sorted_rows, unit.rows[-1], side="right")
        requests = order[first:last]
        positions = np.searchsorted(unit.rows, rows[requests])
        units.append(Unit(unit.index, unit.rows, (positions, batches[requests], numbers[requests])))
    return units


def scale_draws(
    inputs: ModelInputs,
    request: OutputRequest,
    rows: np.ndarray,
    batches: np.ndarray,
    numbers: np.ndarray,
    *,
    genes,
    library_size,
    description: str = "posterior samples",
):
    """Posterior draws of px_scale * library_size, request i being cell rows[i] decoded in batches[i] and keyed by
    numbers[i] (a number asked for twice is one draw: each is decoded once). Yields (numbers (k,), draws (k, G')
    float32) unit by unit, every number once, in one pass over the requested cells' chunks."""
    # a number asked for twice is one draw (keyed by it): decode each once
    numbers, first = np.unique(np.asarray(numbers, dtype=np.int64), return_index=True)
    rows, batches = np.asarray(rows)[first], np.asarray(batches)[first]
    job = ScaleSampleJob(genes=genes, library_size=library_size)
    units = request_units(inputs, request, rows, batches, numbers)
    for _, result in iter_results(inputs, job, units, request, description=description):
        yield result["requests"], result["scales"]


def posterior_scales(
    inputs: ModelInputs,
    request: OutputRequest,
    rows: np.ndarray,
    batches: np.ndarray,
    *,
    genes,
    library_size,
    first_request: int = 0,
    numbers: np.ndarray | None = None,
    description: str = "posterior samples",
) -> np.ndarray:
    """scale_draws in request order, request i keyed by numbers[i] (default first_request + i): (len(rows), G')
    float32."""
    if numbers is None:
        numbers = first_request + np.arange(len(rows), dtype=np.int64)
    unique, repeat = np.unique(np.asarray(numbers, dtype=np.int64), return_inverse=True)
    n_genes = inputs.store.n_vars if genes is None else len(genes)
    scales = np.empty((len(unique), n_genes), dtype=np.float32)
    for drawn, values in scale_draws(
        inputs, request, rows, batches, numbers, genes=genes, library_size=library_size, description=description
    ):
        scales[np.searchsorted(unique, drawn)] = values
    return scales if np.array_equal(repeat, np.arange(len(repeat))) else scales[repeat]


# --- running units ----------------------------------------------------------------------------------------------


def run_units(
    inputs: ModelInputs,
    job,
    units: list[Unit],
    request: OutputRequest,
    outputs: dict | None = None,
    description: str = "",
) -> list[dict] | None:
    """Run `job` on every unit. With `outputs` ({result name: DenseOutput | CsrOutput}), unit k's results are
    written as chunk k where they are computed and None is returned; else the results come back in unit order.
    Units may differ in size only in the last one."""
    results = dict(iter_results(inputs, job, units, request, outputs, description))
    return None if outputs is not None else [results[unit.index] for unit in units]


def iter_results(
    inputs: ModelInputs,
    job,
    units: list[Unit],
    request: OutputRequest,
    outputs: dict | None = None,
    description: str = "",
):
    """Yield (unit index, result, or None where `outputs` were written) as units finish, with a progress bar:
    run_units for a caller that keeps only a share of each result."""
    with contextlib.ExitStack() as stack:
        if request.client is None:
            finished = _run_here(inputs, job, units, request, outputs)
        else:
            reference = stack.enter_context(_worker_reference(inputs, request))
            finished = _run_on_workers(request.client, reference, job, units, request, outputs)
        progress = stack.enter_context(
            tqdm(total=len(units), desc=description, unit="chunk", disable=request.silent or not settings.progress_bar)
        )
        for index, result in finished:
            progress.update(1)
            yield index, result


@torch.no_grad()
def _compute(module, job, unit: Unit, minibatch: dict, seed: int, batch_size: int, device) -> dict:
    if not np.array_equal(minibatch["rows"], unit.rows):
        raise RuntimeError(f"unit {unit.index}: the sampler yielded other rows than the unit's (a bug)")
    return job.compute(module, minibatch, unit, seed, batch_size, device)


def _write(outputs: dict, unit: Unit, result: dict) -> None:
    for name, output in outputs.items():
        output.write_chunk(unit.index, result[name])


def _minibatches(inputs: ModelInputs, job, rows: np.ndarray | range, unit_size: int):
    """The sampler's minibatches of unit_size cells over `rows`, read ahead in threads. A CSR store's counts come
    as CSR only (the encoder reads the non-zeros; the module makes them dense where it must), unless the job asks
    for dense counts too (needs_dense); a dense store's come dense, with CSR too if the job asks (needs_csr).
    A minified model's minibatches hold the cached posterior only: no counts are read."""
    if inputs.minified and not getattr(job, "needs_counts", False):
        return (
            {"rows": part, **{key: values[part] for key, values in inputs.obs_arrays.items()}}
            for part in np.split(rows, range(unit_size, len(rows), unit_size))
        )
    sparse = inputs.store.is_sparse
    sampler = SequentialSampler(
        inputs.store,
        rows,
        batch_size=unit_size,
        obs_arrays=inputs.obs_arrays,
        return_csr=sparse or getattr(job, "needs_csr", False),
        dense=not sparse or getattr(job, "needs_dense", False),
    )
    return iter(sampler)


@contextlib.contextmanager
def _compute_threads(device, unit_bytes: int):
    """How many units compute at once in-process: on the CPU, one per torch thread, each unit's torch operations
    on its own thread (faster than one unit on all threads for every output, the numpy-bound posterior samples
    most: benchmarks/history/from-code.md), as many as IN_FLIGHT_BYTES holds of units of
    `unit_bytes` (a unit of 4096 cells x 33k genes holds ~1 GB); on an accelerator, one."""
    if torch.device(device).type != "cpu":
        yield 1
        return
    threads = torch.get_num_threads()
    n_units = max(1, min(threads, IN_FLIGHT_BYTES // max(1, unit_bytes)))
    with torch_threads(max(1, threads // n_units)):
        yield n_units


def _joined_rows(units: list[Unit]) -> np.ndarray | range:
    """The units' rows as one index: a range when they are consecutive ranges (every chunk of a written output),
    so that the sampler needs no row array; else one array."""
    ranges = all(isinstance(unit.rows, range) for unit in units)
    if ranges and all(before.rows.stop == after.rows.start for before, after in zip(units, units[1:])):  # type: ignore[union-attr]  # ranges, checked above
        return range(units[0].rows.start, units[-1].rows.stop)  # type: ignore[union-attr]
    return np.concatenate([np.asarray(unit.rows, dtype=np.int64) for unit in units])


def _run_here(inputs: ModelInputs, job, units: list[Unit], request: OutputRequest, outputs: dict | None):
    """Yield (unit index, result or None when written) in unit order (see the module docstring)."""
    inputs.module.eval()
    rows = _joined_rows(units)
    # an upper bound of what one unit holds: its counts made dense, and an output as wide, float32
    unit_bytes = 2 * len(units[0].rows) * inputs.store.n_vars * 4
    with contextlib.ExitStack() as stack:
        stream = stack.enter_context(contextlib.closing(_minibatches(inputs, job, rows, len(units[0].rows))))
        n_units = stack.enter_context(_compute_threads(inputs.device, unit_bytes))
        computer = stack.enter_context(ThreadPoolExecutor(n_units, thread_name_prefix="scvi-scale-compute"))
        write_thread = stack.enter_context(ThreadPoolExecutor(1, thread_name_prefix="scvi-scale-write"))
        computing: deque = deque()  # (unit, future), in unit order; at most n_units + 1 in flight
        writing = None

        def finish(unit: Unit, future):  # the unit's result, or None once its write is handed to the writer
            nonlocal writing
            result = future.result()
            if outputs is None:
                return unit.index, result
            if writing is not None:
                writing.result()  # raises a failed write here
            writing = write_thread.submit(_write, outputs, unit, result)
            return unit.index, None

        for unit, minibatch in zip(units, stream, strict=True):
            future = computer.submit(
                _compute, inputs.module, job, unit, minibatch, request.seed, request.batch_size, inputs.device
            )
            computing.append((unit, future))
            if len(computing) > n_units:
                yield finish(*computing.popleft())
        while computing:
            yield finish(*computing.popleft())
        if writing is not None:
            writing.result()


# --- dask workers -------------------------------------------------------------------------------------------------


def model_digest(module: torch.nn.Module) -> str:
    """A short hash of the module's weights and buffers: outputs record it, workers check it."""
    digest = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class ModelReference:
    """How a dask worker gets the model: persist.read_model(model_dir) over `store` (pickled as its path), once per
    worker process; `digest` (model_digest of the caller's model) guards against a model_dir holding another one."""

    model_dir: str
    digest: str
    store_path: str
    store: CountStore = field(compare=False)


@contextlib.contextmanager
def _worker_reference(inputs: ModelInputs, request: OutputRequest):
    """The ModelReference the workers load the model from; saves the model to a temporary folder, deleted
    afterwards, when the request names no model_dir."""
    digest = model_digest(inputs.module)
    if request.model_dir is not None:
        yield ModelReference(remote.resolved(request.model_dir), digest, inputs.store.path, inputs.store)
        return
    if inputs.save is None:
        raise ValueError("outputs on dask workers need a model_dir, or a model that can save itself")
    folder = tempfile.mkdtemp(prefix="scvi-scale-model-")
    try:
        inputs.save(folder)
        yield ModelReference(folder, digest, inputs.store.path, inputs.store)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# A worker process keeps the last models it loaded (the model of one output call is used by all its units).
_worker_models: OrderedDict[ModelReference, ModelInputs] = OrderedDict()
_loading = threading.Lock()


def _worker_inputs(reference: ModelReference) -> ModelInputs:
    """The model of `reference`, loaded on first use in this process; torch uses as many threads as the dask
    worker has."""
    with _loading:
        if reference not in _worker_models:
            with contextlib.suppress(ImportError, ValueError, AttributeError):  # ValueError: not on a worker
                from distributed import get_worker

                torch.set_num_threads(max(1, get_worker().state.nthreads))
            saved = persist.read_model(reference.model_dir)
            module = saved.build_module()
            if model_digest(module) != reference.digest:
                raise RuntimeError(
                    f"the model saved in {reference.model_dir} is not the model the outputs were asked of; save it "
                    "there again (model.save(model_dir, overwrite=True)) or pass no model_dir"
                )
            _worker_models[reference] = ModelInputs(module, reference.store, saved.registry.encode(reference.store))
            while len(_worker_models) > MAX_MODELS_PER_WORKER:
                _worker_models.popitem(last=False)
        return _worker_models[reference]


def _remote_unit(unit: Unit, reference: ModelReference, job, seed: int, batch_size: int, outputs: dict | None):
    """A dask task: compute one unit on a worker; write it there (returns None) or return the result."""
    inputs = _worker_inputs(reference)
    with contextlib.closing(_minibatches(inputs, job, unit.rows, len(unit.rows))) as stream:
        minibatch = next(stream)
    result = _compute(inputs.module, job, unit, minibatch, seed, batch_size, inputs.device)
    if outputs is None:
        return result
    _write(outputs, unit, result)
    return None


def _run_on_workers(
    client, reference: ModelReference, job, units: list[Unit], request: OutputRequest, outputs: dict | None
):
    """Yield (unit index, result or None when written there) as the client's workers finish units."""
    from distributed import as_completed

    task = functools.partial(
        _remote_unit, reference=reference, job=job, seed=request.seed, batch_size=request.batch_size, outputs=outputs
    )  # a partial: client.map would take batch_size for itself
    futures = client.map(task, units, pure=False)
    index_of = {future.key: unit.index for future, unit in zip(futures, units)}
    for future, result in as_completed(futures, with_results=True):
        yield index_of[future.key], result
