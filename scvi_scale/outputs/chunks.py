"""Model outputs computed chunk by chunk: what one chunk computes (the jobs) and the loop that runs the chunks,
in-process with the sampler's read-ahead or on `dask.distributed` workers.

A unit is one chunk of cells: `Unit(index, rows)`, rows increasing store rows (chunk_rows of them, the last unit
possibly fewer), plus an optional per-unit payload (group codes, requested cells). Writes of unit k go to chunk k
of the outputs, rows k * chunk_rows ... of the store.

A job is a small picklable object whose `compute(module, minibatch, unit, seed, batch_size, device)` turns the
unit's minibatch (the sampler's dict of numpy arrays, all its cells) into a dict of named results, cells on the
first axis (or, for `ScaleSampleJob`, one row per requested cell). It runs the module on sub-batches of
`batch_size` cells to bound memory.

Randomness: a job draws its noise with `noise.CellNoise(seed, keys)`, keys being the cells' store rows (the
requests' numbers for ScaleSampleJob), one stream per purpose below. A cell's values are therefore the same
whatever chunk size, batch size, process or resumed run computed them: written in chunks equals computed at once.
Within a stream, the draws of a cell come in a fixed order: (n_draws, ...) first, then what each draw needs.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import threading
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
from tqdm.auto import tqdm

from scvi_scale.outputs.de import GroupStatistics
from scvi_scale.outputs.noise import CellNoise, invert_counts
from scvi_scale.sampler import SequentialSampler
from scvi_scale.settings import settings
from scvi_scale.train import to_tensors

IN_FLIGHT_BYTES = 2 << 30  # in-process, units compute at once while their dense counts and outputs fit in this
LN_MEAN_BLOCK_VALUES = 1 << 22  # latent values per block of draws when averaging softmax(z) for "ln"
LIKELIHOOD_OUTPUTS = ("px_rate", "theta", "zi_logits")  # what likelihood parameters and samples decode
# Noise streams of a cell (shifted by stream_offset(transform batch), so each batch gets its own draws).
STREAM_Z, STREAM_LIBRARY, STREAM_COUNTS, N_STREAMS = 0, 1, 2, 3


@dataclass(frozen=True)
class Unit:
    """One chunk of cells: its index, its store rows (increasing) and what its job needs besides the counts."""

    index: int
    rows: np.ndarray
    payload: object = None


def cut_units(rows: np.ndarray, chunk_rows: int) -> list[Unit]:
    """Runs of chunk_rows consecutive entries of `rows` (sorted store rows), numbered from 0."""
    starts = range(0, len(rows), chunk_rows)
    return [Unit(index, rows[start : start + chunk_rows]) for index, start in enumerate(starts)]


# --- the module's posterior and decoder, with our own draws --------------------------------------------------------


def sub_batches(minibatch: dict, noise: CellNoise, batch_size: int, device):
    """(module inputs as tensors on `device`, their cells' noise) for consecutive slices of batch_size cells.

    When the minibatch has the counts in CSR too (a CSR store, or a job with needs_csr), the slices carry them as
    "x_csr": the module then runs the encoder's first layer on the non-zeros only (about a tenth of the entries).
    """
    n_cells = len(minibatch["rows"])
    arrays = {key: value for key, value in minibatch.items() if isinstance(value, np.ndarray)}
    for start in range(0, n_cells, batch_size):
        part = slice(start, start + batch_size)
        tensors = to_tensors({key: value[part] for key, value in arrays.items()}, device)
        if "x_csr" in minibatch:
            indptr, indices, data = minibatch["x_csr"]
            row_starts = indptr[start : start + batch_size + 1]
            entries = slice(row_starts[0], row_starts[-1])
            tensors["x_csr"] = tuple(
                torch.from_numpy(array).to(device)
                for array in (row_starts - row_starts[0], indices[entries], data[entries])
            )
        yield tensors, noise.subset(part)


def select(minibatch: dict, positions: np.ndarray) -> dict:
    """The minibatch restricted to (possibly repeated) cell positions."""
    return {key: value[positions] for key, value in minibatch.items() if isinstance(value, np.ndarray)}


def _normal(noise: CellNoise, stream: int, shape: tuple, like: torch.Tensor) -> torch.Tensor:
    """(S, B, *shape[1:]) standard normals on like's device from per-cell draws of shape (S, *shape[1:])."""
    return torch.from_numpy(noise.normal(stream, shape)).to(like.device).transpose(0, 1)


def stream_offset(transform_batch: int | None) -> int:
    """Where the noise streams of draws decoded in a batch start: each batch has its own, None (the observed batch)
    the first; so averaging over batches [a, b] averages exactly what decoding in a, then in b, gives."""
    return 0 if transform_batch is None else N_STREAMS * (int(transform_batch) + 1)


def posterior_draws(module, tensors: dict, noise: CellNoise, n_draws: int, transform_batch: int | None = None):
    """n_draws draws of (z, log library) per cell from q, to be decoded in `transform_batch`: z (S, B, L)
    transformed as the decoder sees it ("ln": softmax), library (S, B, 1): the observed one, or draws of q(l | x).
    Also returns the inference outputs."""
    inference = module.inference(tensors)
    qz, ql = inference["qz"], inference["ql"]
    offset = stream_offset(transform_batch)
    noise_z = _normal(noise, STREAM_Z + offset, (n_draws, qz.loc.shape[1]), qz.loc)
    z = module.z_encoder.transform(qz.loc + qz.scale * noise_z)
    if ql is None:
        library = inference["library"].reshape(1, -1, 1).expand(n_draws, -1, -1)
    else:
        library = ql.loc + ql.scale * _normal(noise, STREAM_LIBRARY + offset, (n_draws, 1), ql.loc)
    return z, library, inference


def decode(
    module, z: torch.Tensor, library: torch.Tensor, tensors: dict, transform_batch: int | None, outputs: tuple
) -> dict:
    """The decoder's `outputs` for S draws at once: px_scale, px_rate, zi_logits (S, B, G); theta (G,) or
    (S, B, G).

    The draws are stacked along the cell axis (each input tensor repeated S times) for one generative call.
    """
    n_draws, n_cells = z.shape[:2]
    tensors = {key: value for key, value in tensors.items() if key != "x_csr"}  # the decoder does not read x
    tiled = tensors if n_draws == 1 else {
        key: value.repeat(n_draws, *([1] * (value.dim() - 1))) for key, value in tensors.items()
    }
    decoded = module.generative(
        z.reshape(n_draws * n_cells, -1),
        library.reshape(n_draws * n_cells, 1),
        tiled,
        transform_batch=transform_batch,
        outputs=outputs,
    )
    return {
        key: value if value is None or value.dim() == 1 else value.reshape(n_draws, n_cells, *value.shape[1:])
        for key, value in decoded.items()
        if key in outputs
    }


def concatenate(parts: list[torch.Tensor]) -> np.ndarray:
    """The sub-batches' results as one numpy array on the CPU (one part is not copied)."""
    return (parts[0] if len(parts) == 1 else torch.cat(parts)).cpu().numpy()


def expression_outputs(library_size: float | str) -> tuple[str]:
    """The decoder output `scaled_expression` reads."""
    return ("px_rate",) if library_size == "latent" else ("px_scale",)


def scaled_expression(outputs: dict, library_size: float | str) -> torch.Tensor:
    """px_scale * library_size, or px_rate for library_size="latent" (scvi-tools' get_normalized_expression)."""
    if library_size == "latent":
        return outputs["px_rate"]
    return outputs["px_scale"] if library_size == 1 else outputs["px_scale"] * library_size


# --- jobs -----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LatentJob:
    """{"latent": (n, L)} the mean of q(z | x) (give_mean; for "ln" the mean of softmax(z) over mc_samples draws)
    or one draw; with return_dist also {"variance": (n, L)}, the variance of q(z | x)."""

    give_mean: bool = True
    mc_samples: int = 5000
    return_dist: bool = False

    def compute(self, module, minibatch, unit, seed, batch_size, device) -> dict:
        latent, variance = [], []
        for tensors, noise in sub_batches(minibatch, CellNoise(seed, unit.rows), batch_size, device):
            qz = module.inference(tensors)["qz"]
            if self.return_dist:
                latent.append(qz.loc)
                variance.append(qz.scale.square())
            elif not self.give_mean:
                latent.append(posterior_draws(module, tensors, noise, 1)[0][0])
            elif module.latent_distribution == "ln":
                latent.append(self._ln_mean(module, qz, noise))
            else:
                latent.append(qz.loc)
        result = {"latent": concatenate(latent)}
        if self.return_dist:
            result["variance"] = concatenate(variance)
        return result

    def _ln_mean(self, module, qz, noise: CellNoise) -> torch.Tensor:
        """Mean of softmax(z) over mc_samples draws, transformed in blocks of draws that bound memory."""
        draws = _normal(noise, STREAM_Z, (self.mc_samples, qz.loc.shape[1]), qz.loc)
        block = max(1, LN_MEAN_BLOCK_VALUES // qz.loc.numel())
        total = torch.zeros_like(qz.loc)
        for start in range(0, self.mc_samples, block):
            total += module.z_encoder.transform(qz.loc + qz.scale * draws[start : start + block]).sum(0)
        return total / self.mc_samples


@dataclass(frozen=True)
class LibraryJob:
    """{"library": (n, 1)}: the mean of the log-normal q(l | x) (give_mean, latent library only) or exp(l), the
    observed library or a draw of q(l | x)."""

    give_mean: bool = True

    def compute(self, module, minibatch, unit, seed, batch_size, device) -> dict:
        parts = []
        for tensors, noise in sub_batches(minibatch, CellNoise(seed, unit.rows), batch_size, device):
            if self.give_mean:
                ql = module.inference(tensors)["ql"]
                parts.append(torch.exp(ql.loc + 0.5 * ql.scale.square()))
            else:
                parts.append(torch.exp(posterior_draws(module, tensors, noise, 1)[1][0]))
        return {"library": concatenate(parts)}


@dataclass(frozen=True)
class ExpressionJob:
    """{"expression": (n, G') or (n, S, G')}: px_scale * library_size (px_rate for library_size="latent") over the
    genes `genes` (None: all), averaged over the batches of transform_batches (None: the observed batch; one draw of
    z per batch, as scvi-tools re-runs inference for each), and over the S = n_samples draws when return_mean."""

    transform_batches: tuple = (None,)
    genes: tuple | None = None
    library_size: float | str = 1.0
    n_samples: int = 1
    return_mean: bool = True

    def compute(self, module, minibatch, unit, seed, batch_size, device) -> dict:
        parts = []
        for tensors, noise in sub_batches(minibatch, CellNoise(seed, unit.rows), batch_size, device):
            total = 0.0
            for batch in self.transform_batches:
                z, library, _ = posterior_draws(module, tensors, noise, self.n_samples, batch)
                outputs = decode(module, z, library, tensors, batch, expression_outputs(self.library_size))
                values = scaled_expression(outputs, self.library_size)
                total = total + (values if self.genes is None else values[..., list(self.genes)])
            expression = total / len(self.transform_batches)  # (S, B, G')
            if self.n_samples == 1:
                parts.append(expression[0])
            elif self.return_mean:
                parts.append(expression.mean(0))
            else:
                parts.append(expression.transpose(0, 1))
        return {"expression": concatenate(parts)}


@dataclass(frozen=True)
class LikelihoodJob:
    """{"mean": px_rate, "dispersions": theta (not for Poisson), "dropout": sigmoid(zi_logits) (ZINB only)}, each
    (n, G), or (n, S, G) for n_samples > 1 without give_mean (give_mean averages over the draws)."""

    n_samples: int = 1
    give_mean: bool = False

    def compute(self, module, minibatch, unit, seed, batch_size, device) -> dict:
        parts: dict[str, list] = {}
        for tensors, noise in sub_batches(minibatch, CellNoise(seed, unit.rows), batch_size, device):
            z, library, _ = posterior_draws(module, tensors, noise, self.n_samples)
            outputs = decode(module, z, library, tensors, None, LIKELIHOOD_OUTPUTS)
            values = {"mean": outputs["px_rate"]}
            if outputs["theta"] is not None:
                values["dispersions"] = outputs["theta"].expand_as(outputs["px_rate"])
            if outputs["zi_logits"] is not None:
                values["dropout"] = torch.sigmoid(outputs["zi_logits"])
            for name, value in values.items():
                value = value.mean(0) if self.give_mean or self.n_samples == 1 else value.transpose(0, 1)
                parts.setdefault(name, []).append(value)
        return {name: concatenate(value) for name, value in parts.items()}


@dataclass(frozen=True)
class PosteriorPredictiveJob:
    """{"sample_0", ..., "sample_{S-1}"}: (n, G') float32 CSR counts drawn from the fitted likelihood (NB, ZINB or
    Poisson; noise.invert_counts) given one draw of q(z, l | x) each, over the genes `genes` (None: all; a gene's
    draws do not depend on the selection); with several transform_batches the draws of the batches are averaged,
    as scvi-tools does."""

    transform_batches: tuple = (None,)
    genes: tuple | None = None
    n_samples: int = 1

    def compute(self, module, minibatch, unit, seed, batch_size, device) -> dict:
        parts = [[] for _ in range(self.n_samples)]
        genes = slice(None) if self.genes is None else list(self.genes)
        for tensors, noise in sub_batches(minibatch, CellNoise(seed, unit.rows), batch_size, device):
            n_cells, n_genes = len(noise.keys), module.n_input
            total = 0
            for batch in self.transform_batches:
                z, library, _ = posterior_draws(module, tensors, noise, self.n_samples, batch)
                outputs = decode(module, z, library, tensors, batch, LIKELIHOOD_OUTPUTS)

                def stacked(value):  # (S, B, G) -> (S * B, G') on the CPU, draws one after the other
                    return value[..., genes].reshape(-1, value.shape[-1] if self.genes is None else len(genes)).cpu()

                uniforms = noise.uniform(STREAM_COUNTS + stream_offset(batch), self.n_samples * n_genes)
                uniforms = uniforms.reshape(n_cells, self.n_samples, n_genes)[..., genes].transpose(1, 0, 2)
                theta = outputs["theta"]
                if theta is not None:
                    theta = theta[genes].cpu() if theta.dim() == 1 else stacked(theta)
                zi_logits = outputs["zi_logits"]
                total = total + invert_counts(
                    np.ascontiguousarray(uniforms).reshape(self.n_samples * n_cells, -1),
                    stacked(outputs["px_rate"]),
                    theta,
                    None if zi_logits is None else torch.sigmoid(stacked(zi_logits)),
                )
            if len(self.transform_batches) > 1:
                total = total / len(self.transform_batches)
            for draw in range(self.n_samples):
                parts[draw].append(total[draw * n_cells : (draw + 1) * n_cells])
        return {f"sample_{draw}": sp.vstack(part, format="csr") for draw, part in enumerate(parts)}


@dataclass(frozen=True)
class RawStatsJob:
    """{"stats": GroupStatistics} of the unit's raw counts; the unit's payload holds its cells' group codes."""

    n_groups: int
    needs_csr = True  # sparse sums are ~10x cheaper than dense ones at ~10% non-zeros

    def compute(self, module, minibatch, unit, seed, batch_size, device) -> dict:
        n_cells, n_genes = len(minibatch["rows"]), module.n_input
        indptr, indices, data = minibatch["x_csr"]
        statistics = GroupStatistics(self.n_groups, n_genes)
        statistics.add(sp.csr_matrix((data, indices, indptr), shape=(n_cells, n_genes)), unit.payload)
        return {"stats": statistics}


@dataclass(frozen=True)
class ScaleSampleJob:
    """Posterior samples of px_scale * library_size (px_rate for "latent") for requested cells of the unit.

    The payload is (positions, batches, requests): per request, the cell's position in the unit (a cell may be
    requested many times), the batch to decode it in (-1: its observed batch) and the request's number, which keys
    its draw and says where the sample goes. Returns {"requests": (m,), "scales": (m, G') float32} over `genes`.
    """

    genes: tuple | None = None
    library_size: float | str = 1.0
    needs_dense = True  # requested cells are selected (and repeated) from the dense counts

    def compute(self, module, minibatch, unit, seed, batch_size, device) -> dict:
        positions, batches, requests = unit.payload
        order = np.argsort(batches, kind="stable")
        scales = []
        for batch in np.unique(batches):
            chosen = order[batches[order] == batch]
            selected = select(minibatch, positions[chosen])
            decode_in = None if batch < 0 else int(batch)
            for tensors, noise in sub_batches(selected, CellNoise(seed, requests[chosen]), batch_size, device):
                z, library, _ = posterior_draws(module, tensors, noise, 1, decode_in)
                outputs = decode(module, z, library, tensors, decode_in, expression_outputs(self.library_size))
                values = scaled_expression(outputs, self.library_size)
                scales.append(values[0] if self.genes is None else values[0][:, list(self.genes)])
        return {"requests": requests[order], "scales": concatenate(scales)}


# --- running the units ----------------------------------------------------------------------------------------------


def model_digest(module: torch.nn.Module) -> str:
    """A short hash of the module's weights and buffers: outputs record it, workers check it."""
    digest = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class ModelReference:
    """How a dask worker gets the model: model_class.load(model_dir, store), once per worker process; `digest`
    (model_digest of the caller's model) guards against a model_dir that holds another model."""

    model_class: type
    model_dir: str
    store: str
    digest: str


MAX_MODELS_PER_WORKER = 2
_worker_models: OrderedDict[ModelReference, object] = OrderedDict()
_loading = threading.Lock()


def _worker_model(reference: ModelReference):
    """The model of `reference`, loaded on first use in this process and kept (the last MAX_MODELS_PER_WORKER);
    torch uses as many threads as the dask worker has."""
    with _loading:
        if reference not in _worker_models:
            with contextlib.suppress(ImportError, ValueError, AttributeError):  # ValueError: not on a worker
                from distributed import get_worker

                torch.set_num_threads(max(1, get_worker().state.nthreads))
            model = reference.model_class.load(reference.model_dir, reference.store)
            if model_digest(model.module) != reference.digest:
                raise RuntimeError(
                    f"the model saved in {reference.model_dir} is not the model the outputs were asked of; save it "
                    "there again (model.save(model_dir, overwrite=True)) or pass no model_dir"
                )
            _worker_models[reference] = model
            while len(_worker_models) > MAX_MODELS_PER_WORKER:
                _worker_models.popitem(last=False)
        return _worker_models[reference]


@torch.no_grad()
def _compute(module, job, unit: Unit, minibatch: dict, seed: int, batch_size: int, device) -> dict:
    if not np.array_equal(minibatch["rows"], unit.rows):
        raise RuntimeError(f"unit {unit.index}: the sampler yielded other rows than the unit's (a bug)")
    return job.compute(module, minibatch, unit, seed, batch_size, device)


def _write(outputs: dict, unit: Unit, result: dict) -> None:
    for name, output in outputs.items():
        output.write_chunk(unit.index, result[name])


def _minibatches(model, job, rows: np.ndarray, unit_size: int):
    """The sampler's minibatches of unit_size cells over `rows`, read ahead in threads. A CSR store's counts come
    as CSR only (the encoder reads the non-zeros; the module makes them dense where it must), unless the job asks
    for dense counts too (needs_dense); a dense store's come dense, with CSR too if the job asks (needs_csr)."""
    sparse = model.store.is_sparse
    sampler = SequentialSampler(
        model.store, rows, batch_size=unit_size, obs_arrays=model.obs_arrays,
        return_csr=sparse or getattr(job, "needs_csr", False),
        dense=not sparse or getattr(job, "needs_dense", False),
    )
    return iter(sampler)


def _remote_unit(unit: Unit, reference: ModelReference, job, seed: int, batch_size: int, outputs: dict | None):
    """A dask task: compute one unit on a worker; write it there (returns None) or return the result."""
    model = _worker_model(reference)
    with contextlib.closing(_minibatches(model, job, unit.rows, len(unit.rows))) as stream:
        minibatch = next(stream)
    result = _compute(model.module, job, unit, minibatch, seed, batch_size, model.device)
    if outputs is None:
        return result
    _write(outputs, unit, result)
    return None


@contextlib.contextmanager
def _compute_threads(device, unit_bytes: int):
    """How many units compute at once in-process: on the CPU, one per torch thread, each unit's torch operations
    on its own thread (measured on 2 cores at 200k cells: normalized expression 25k cells/s with one unit on 2
    torch threads, 31k with one on 1, 31-37k with two on 1 each, bound by writing 1.6 GB; posterior samples,
    mostly numpy on one thread, 8.5k -> 16.8k; latent 80k -> 94k), as many as IN_FLIGHT_BYTES holds of units of
    `unit_bytes` (a unit of 4096 cells x 33k genes holds ~1 GB); on an accelerator, one."""
    if torch.device(device).type != "cpu":
        yield 1
        return
    threads = torch.get_num_threads()
    n_units = max(1, min(threads, IN_FLIGHT_BYTES // max(1, unit_bytes)))
    torch.set_num_threads(max(1, threads // n_units))
    try:
        yield n_units
    finally:
        torch.set_num_threads(threads)


def run_units(
    model,
    job,
    units: list[Unit],
    *,
    seed: int,
    batch_size: int,
    outputs: dict | None = None,
    client=None,
    reference: ModelReference | None = None,
    description: str = "",
    silent: bool = True,
) -> list[dict] | None:
    """Run `job` on every unit. With `outputs` ({result name: DenseOutput | CsrOutput}), unit k's results are
    written as chunk k where they are computed and None is returned; else the results come back in unit order.

    Without a client the units run here (`_run_here`); with a dask.distributed client they fan out over its
    workers (`_run_on_workers`; `reference` says how a worker loads the model). Units may differ in size only in
    the last one.
    """
    if client is None:
        finished = _run_here(model, job, units, seed, batch_size, outputs)
    else:
        finished = _run_on_workers(client, reference, job, units, seed, batch_size, outputs)
    results: dict[int, dict] = {}
    with tqdm(total=len(units), desc=description, unit="chunk", disable=silent or not settings.progress_bar) as bar:
        for index, result in finished:
            if outputs is None:
                results[index] = result
            bar.update(1)
    return None if outputs is not None else [results[unit.index] for unit in units]


def _run_here(model, job, units: list[Unit], seed: int, batch_size: int, outputs: dict | None):
    """Yield (unit index, result or None when written) in unit order: units compute on as many threads as torch
    has (each unit's torch operations on one; `_compute_threads`), while the sampler reads the next ones ahead in
    threads and a thread writes each result one unit behind."""
    model.module.eval()
    rows = np.concatenate([unit.rows for unit in units])
    # an upper bound of what one unit holds: its counts made dense, and an output as wide, float32
    unit_bytes = 2 * len(units[0].rows) * model.store.n_vars * 4
    with contextlib.ExitStack() as stack:
        stream = stack.enter_context(contextlib.closing(_minibatches(model, job, rows, len(units[0].rows))))
        n_units = stack.enter_context(_compute_threads(model.device, unit_bytes))
        computer = stack.enter_context(ThreadPoolExecutor(n_units, thread_name_prefix="scvi-scale-compute"))
        writer = stack.enter_context(ThreadPoolExecutor(1, thread_name_prefix="scvi-scale-write"))
        computing: deque = deque()  # (unit, future), in unit order; at most n_units + 1 in flight
        writing = None

        def finish(unit: Unit, future):  # the unit's result, or None once its write is handed to the writer
            nonlocal writing
            result = future.result()
            if outputs is None:
                return unit.index, result
            if writing is not None:
                writing.result()  # raises a failed write here
            writing = writer.submit(_write, outputs, unit, result)
            return unit.index, None

        for unit, minibatch in zip(units, stream, strict=True):
            future = computer.submit(_compute, model.module, job, unit, minibatch, seed, batch_size, model.device)
            computing.append((unit, future))
            if len(computing) > n_units:
                yield finish(*computing.popleft())
        while computing:
            yield finish(*computing.popleft())
        if writing is not None:
            writing.result()


def _run_on_workers(client, reference: ModelReference, job, units: list[Unit], seed: int, batch_size: int,
                    outputs: dict | None):
    """Yield (unit index, result or None when written there) as the client's workers finish units."""
    from distributed import as_completed

    task = functools.partial(
        _remote_unit, reference=reference, job=job, seed=seed, batch_size=batch_size, outputs=outputs
    )  # a partial: client.map would take batch_size for itself
    futures = client.map(task, units, pure=False)
    index_of = {future.key: unit.index for future, unit in zip(futures, units)}
    for future, result in as_completed(futures, with_results=True):
        yield index_of[future.key], result
