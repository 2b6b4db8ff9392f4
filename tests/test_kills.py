"""Kill tests: CLI commands killed with SIGKILL at seeded random moments and rerun until they finish end where an
uninterrupted run ends, bit for bit; between kills, no reader ever sees a torn or incomplete result.

Cases: `scvi-scale train` (with time-based checkpoints, --checkpoint-every 0.01: the CLI checkpoints every
TIME_CHECK_STEPS steps and at each epoch's end), and the multi-part outputs `sample --n-samples 4` (four CSR layers),
`latent --return-dist` (two obsm entries) and a dense `normalize`. Also here: two CLI runs with the same --seed give
the same model, two with different seeds do not.

How the kills are made. A CLI process starts in ~7 s on a loaded 2-core machine, mostly imports; forty of them would
take minutes. So a fork server (SERVER, a subprocess) imports the package once, then forks one child per run, which
calls `scvi_scale.cli.main(argv)` (what `python -m scvi_scale.cli` calls) with stdout and stderr in a log file
(the server also imports what the commands import on first use, matplotlib and torch._dynamo).
Before forking, the server checks that it runs no thread but its main one, so a child inherits no lock held by a
thread. The server is the children's parent: it kills them itself (no pid can be reused under it). A run's plan
(drawn by the test from a seeded numpy Generator and printed, so a failure replays) is one of
    {"after_seconds": t}       SIGKILL from the server t seconds after the fork;
    {"before_change": k, "counted_from": c}
                               the child SIGKILLs itself just before its k-th change to the file system (os.replace,
                               rename, unlink, remove, rmdir, mkdir: every rename that publishes a file, every
                               deletion), counted from its start (c "all"), from the first call of an output's
                               finish ("finish": the final assembly and the moves into the store; changes inside the
                               staging folder not counted) or from the first model save ("save"). With
                               "signal": "SIGINT" or "SIGTERM", it sends itself that signal there instead, and goes on.
The second kind needs no hook in the package: the child wraps those os functions (and the two landmarks, to start
counting) before calling main. Kills at a change hit the moments that matter for crash consistency (between a
write and its rename, between parts, inside the assembly) far more often than kills at random times would.
A fresh `python -m scvi_scale.cli` process trains the same model as a forked child (the --seed test).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import anndata
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from scvi_scale.cli.train import LOCK_FILE
from scvi_scale.datasets import synthetic_atlas

pytestmark = pytest.mark.filterwarnings("ignore:.*zarr v2 data will no longer be the default.*")

N_CELLS, N_GENES, CHUNK_ROWS = 800, 40, 32  # 25 row chunks
TRAIN = [
    "--batch-key",
    "batch",
    "--max-epochs",
    "2",
    "--batch-size",
    "16",
    "--n-hidden",
    "16",
    "--n-latent",
    "4",
    "--checkpoint-every",
    "0.01",
]  # 720 training cells: 45 steps an epoch; checkpoints at step 50 too
SEED = 3
KILLS_PER_CASE = 10
MAX_RUNS_PER_CASE = 60
CHILD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "SCVI_SCALE_PROGRESS": "0"}

SERVER = r"""
import json, os, signal, sys, threading, time, traceback

import torch

torch.set_num_threads(1)
import matplotlib.figure  # the loss curves' (imported on first use: 1 s a run)
import scvi_scale.cli
from scvi_scale import persist
from scvi_scale.outputs import writer

CHANGES = ("replace", "rename", "unlink", "remove", "rmdir", "mkdir")
LANDMARKS = {"finish": (writer._ChunkedOutput, "finish"), "save": (persist, "write_model")}
MAX_SECONDS = 300


def count_changes(plan, report):
    # Wrap the os functions that change the file system. Changes are counted from the start ("all") and from the
    # first call of each landmark; the process SIGKILLs itself just before change plan["before_change"] as counted
    # from plan["counted_from"]. From "finish", changes inside a staging folder are not counted: the assembly writes
    # hundreds of chunks there, and the kills aim at the moves and deletions that publish an output.
    counts, lock = {"all": 0}, threading.Lock()
    die_at, counted_from = plan.get("before_change"), plan.get("counted_from", "all")
    for landmark, (owner, attribute) in LANDMARKS.items():
        def started(*args, _real=getattr(owner, attribute), _landmark=landmark, **kwargs):
            with lock:
                counts.setdefault(_landmark, 0)
            return _real(*args, **kwargs)

        setattr(owner, attribute, started)
    for name in CHANGES:
        def changed(*args, _real=getattr(os, name), **kwargs):
            staged = all("staging" in str(arg) for arg in args if isinstance(arg, (str, os.PathLike)))
            with lock:
                for counter in counts:
                    counts[counter] += counter != "finish" or not staged
                report.update(counts)
                die = die_at is not None and counts.get(counted_from) == die_at
            if die:
                os.kill(os.getpid(), getattr(signal, plan.get("signal", "SIGKILL")))
            return _real(*args, **kwargs)

        setattr(os, name, changed)


def child(request):
    log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    report = {}
    count_changes(request["plan"], report)
    code = 1
    try:
        code = scvi_scale.cli.main(request["argv"])
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        with open(request["log"] + ".changes", "w") as file:
            json.dump(report, file)
        os._exit(code)


print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    request = json.loads(line)
    threads = threading.enumerate()
    if len(threads) != 1 or len(os.listdir("/proc/self/task")) != 1:
        print(json.dumps({"error": f"the server runs threads {threads}: a forked child could deadlock"}), flush=True)
        continue
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:
        child(request)
    kill_at = started + request["plan"].get("after_seconds", MAX_SECONDS)
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() >= kill_at:
            os.kill(pid, signal.SIGKILL)  # our own child, not yet reaped
            _, status = os.waitpid(pid, 0)
            break
        time.sleep(0.002)
    seconds = time.monotonic() - started
    killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    print(json.dumps({"killed": killed, "rc": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
                      "seconds": seconds, "timed_out": seconds >= MAX_SECONDS}), flush=True)
"""


class ForkServer:
    """The SERVER subprocess: run(argv, plan) forks a child running the CLI under `plan` and returns what happened:
    {"killed", "rc", "seconds", "log" (the child's output), "changes" (when it was not killed: its count of
    file-system changes from the start, "all", and from each landmark it reached, "finish" and "save")}."""

    def __init__(self, folder: Path):
        self.folder, self.runs = folder, 0
        self.process = subprocess.Popen(
            [sys.executable, "-c", SERVER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, **CHILD_ENV, "PYTHONHASHSEED": "1"},
        )
        assert json.loads(self.process.stdout.readline()) == {"ready": True}

    def run(self, argv: list[str], plan: dict) -> dict:
        self.runs += 1
        log = self.folder / f"run{self.runs}.log"
        self.process.stdin.write(json.dumps({"argv": [str(a) for a in argv], "plan": plan, "log": str(log)}) + "\n")
        self.process.stdin.flush()
        reply = json.loads(self.process.stdout.readline())
        assert "error" not in reply, reply["error"]
        reply["log"] = log.read_text() if log.exists() else ""
        assert not reply["timed_out"], f"{argv} ran past {reply['seconds']:.0f} s\n{reply['log']}"
        counts = Path(f"{log}.changes")
        reply["changes"] = json.loads(counts.read_text()) if counts.exists() else None
        return reply

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    started = ForkServer(tmp_path_factory.mktemp("server"))
    yield started
    started.close()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("pristine") / "s.zarr"
    synthetic_atlas(path, n_cells=N_CELLS, n_genes=N_GENES, n_batches=2, n_cell_types=3, seed=1, chunk_rows=CHUNK_ROWS)
    return path


def cli(*argv: str, hash_seed: str = "0") -> subprocess.CompletedProcess:
    """A real `python -m scvi_scale.cli` process, one torch thread."""
    env = {**os.environ, **CHILD_ENV, "PYTHONHASHSEED": hash_seed}
    return subprocess.run(
        [sys.executable, "-m", "scvi_scale.cli", *map(str, argv)], capture_output=True, text=True, env=env, timeout=600
    )


def model_tensors(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "model.pt", weights_only=False)["model_state_dict"]


def assert_same_model(out: Path, reference: Path) -> None:
    ours, theirs = (
        torch.load(out / "model.pt", weights_only=False),
        torch.load(reference / "model.pt", weights_only=False),
    )
    assert ours["model_state_dict"].keys() == theirs["model_state_dict"].keys()
    for name, tensor in theirs["model_state_dict"].items():
        assert torch.equal(ours["model_state_dict"][name], tensor), name
    ours, theirs = ours["attr_dict"], theirs["attr_dict"]
    np.testing.assert_array_equal(ours["train_indices_"], theirs["train_indices_"])
    for metric, values in theirs["history_"].items():
        if metric != "epoch_seconds":
            assert ours["history_"][metric] == values, metric


@pytest.fixture(scope="module")
def reference_run(store, server, tmp_path_factory) -> dict:
    """An uninterrupted training run (a forked child): what the server says of it, and its model directory "out"."""
    out = tmp_path_factory.mktemp("reference") / "model"
    run = server.run(["train", store, "--out", out, "--seed", SEED, *TRAIN], {})
    assert run["rc"] == 0, run["log"]
    assert '"threads": 1' in run["log"]
    return {**run, "out": out}


@pytest.fixture(scope="module")
def reference_model(reference_run) -> Path:
    return reference_run["out"]


# --- seeds ------------------------------------------------------------------------------------------------------


def test_same_seed_same_model_other_seed_other_model(store, reference_model, server, tmp_path):
    """The twin is a fresh `python -m scvi_scale.cli` process with another hash seed than the server's: so a forked
    child also trains as a fresh process does."""
    twin = cli("train", store, "--out", tmp_path / "twin", "--seed", SEED, *TRAIN, hash_seed="2")
    assert twin.returncode == 0, twin.stderr
    assert_same_model(tmp_path / "twin", reference_model)
    other = server.run(["train", store, "--out", tmp_path / "other", "--seed", SEED + 1, *TRAIN], {})
    assert other["rc"] == 0, other["log"]
    reference, different = model_tensors(reference_model), model_tensors(tmp_path / "other")
    weights = [name for name, tensor in reference.items() if tensor.is_floating_point() and tensor.numel() > 1]
    assert [name for name in weights if torch.equal(reference[name], different[name])] == []


# --- kills ------------------------------------------------------------------------------------------------------


def draw_plan(rng: np.random.Generator, reference: dict, kinds: tuple[str, ...]) -> dict:
    """A kill plan (see the module docstring) within the span of the uninterrupted run `reference`: "time", or a
    change counted from the start ("all") or from a landmark ("finish": an output's finish; "save": the model's)."""
    kind = kinds[int(rng.integers(len(kinds)))]
    if kind == "time":
        return {"after_seconds": round(float(rng.uniform(0.0, reference["seconds"])), 3)}
    return {"before_change": int(rng.integers(1, reference["changes"][kind] + 1)), "counted_from": kind}


def kill_and_rerun(
    server, rng, reference: dict, kinds, fresh, argv_of, check_after_kill, check_done, finished_already=None
) -> None:
    """Runs of argv_of(attempt, first) under seeded kill plans, rerun after each kill until one finishes; then
    check_done(). Repeated on fresh() targets until KILLS_PER_CASE runs were killed. check_after_kill() runs after
    every kill. finished_already(run) says whether a rerun's refusal means the killed run had finished its work."""
    kills = runs = 0
    while kills < KILLS_PER_CASE:
        target, first = fresh(), True
        while True:
            runs += 1
            assert runs <= MAX_RUNS_PER_CASE, f"{kills} kills in {runs} runs"
            plan = draw_plan(rng, reference, kinds)
            run = server.run(argv_of(target, first), plan)
            print(
                f"run {runs} on {target.relative_to(target.parents[1])}: plan {plan} -> killed {run['killed']}, "
                f"rc {run['rc']}, {run['seconds']:.1f} s"
            )
            if run["killed"]:
                kills += 1
                first = False
                check_after_kill(target)
                continue
            if run["rc"] != 0 and not (finished_already and not first and finished_already(run)):
                pytest.fail(f"plan {plan}: rc {run['rc']}\n{run['log']}")
            check_done(target)
            break


def test_cli_training_killed_at_random_moments_resumes_to_the_uninterrupted_model(
    store, reference_run, reference_model, server, tmp_path
):
    rng = np.random.default_rng(14)
    sequences = iter(range(1000))

    def fresh() -> Path:
        return tmp_path / f"run{next(sequences)}"

    def argv_of(out: Path, first: bool) -> list:
        return ["train", store, "--out", out, "--seed", SEED, *TRAIN, *([] if first else ["--resume"])]

    def check_after_kill(out: Path) -> None:
        if (out / "checkpoint.pt").exists():  # never torn
            assert torch.load(out / "checkpoint.pt", weights_only=False)["state"]["global_step"] > 0
        if (out / "model.pt").exists():  # written only once training is over: it is the final model
            assert_same_model(out, reference_model)

    def check_done(out: Path) -> None:
        assert_same_model(out, reference_model)
        left = [
            path.name
            for path in out.iterdir()
            if not path.name.startswith((".history.csv.tmp", ".loss_curves.png.tmp", LOCK_FILE))
        ]
        assert sorted(left) == ["checkpoint.pt", "history.csv", "loss_curves.png", "model.pt"]  # no temporary file
        # (the report's temporary files: see test_training_removes_the_temporary_files_of_killed_runs)

    kill_and_rerun(server, rng, reference_run, ("time", "all", "save"), fresh, argv_of, check_after_kill, check_done)


@pytest.mark.parametrize("signal_name, exit_code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_cli_training_stopped_by_a_signal_checkpoints_and_resumes_to_the_uninterrupted_model(
    store, reference_run, reference_model, server, tmp_path, signal_name, exit_code
):
    """The signal comes just before a seeded one of the file-system changes the run makes before saving its model
    (the lock, set-up, checkpoints): the run checkpoints at the end of its step, exits 128 + the signal saying how
    to resume, and --resume ends at the uninterrupted model, bit for bit. A signal at the last checkpoint comes
    after the last step: that run finishes (exit 0, the same model)."""
    rng = np.random.default_rng(exit_code)
    changes = reference_run["changes"]
    stops = 0
    for attempt in range(3):
        out = tmp_path / f"run{attempt}"
        argv = ["train", store, "--out", out, "--seed", SEED, *TRAIN]
        plan = {"before_change": int(rng.integers(1, changes["all"] - changes["save"] + 1)), "signal": signal_name}
        stopped = server.run(argv, plan)
        print(f"plan {plan} -> rc {stopped['rc']}, {stopped['seconds']:.1f} s")
        if stopped["rc"] != 0:
            assert stopped["rc"] == exit_code, stopped["log"]
            assert f"training stopped by {signal_name}" in stopped["log"] and "--resume" in stopped["log"]
            assert not (out / "model.pt").exists()
            assert torch.load(out / "checkpoint.pt", weights_only=False)["state"]["global_step"] > 0
            stops += 1
            resumed = server.run([*argv, "--resume"], {})
            assert resumed["rc"] == 0, resumed["log"]
        assert_same_model(out, reference_model)
    assert stops >= 2  # the seeded draws do stop runs (not only signal finished ones)


LEFTOVERS = {  # what a run killed while writing each file leaves, named as its writer names it ({pid}: a dead one)
    "checkpoint.pt": ".checkpoint.pt.partial-{host}-{pid}-0123456789ab",
    "model.pt": ".model.pt.partial-{host}-{pid}-0123456789ab",
    "history.csv": ".history.csv.partial-{host}-{pid}-0123456789ab",
    "loss_curves.png": ".loss_curves.png.partial-{host}-{pid}-0123456789ab",
}


@pytest.fixture(scope="module")
def run_over_leftovers(store, server, tmp_path_factory) -> Path:
    """A training run started in a folder where killed runs left their temporary files."""
    out = tmp_path_factory.mktemp("leftovers") / "model"
    out.mkdir()
    gone = subprocess.Popen([sys.executable, "-c", ""])
    gone.wait()
    for name in LEFTOVERS.values():
        (out / name.format(host=socket.gethostname(), pid=gone.pid)).write_bytes(b"torn")
    done = server.run(["train", store, "--out", out, *TRAIN, "--max-epochs", "1"], {})
    assert done["rc"] == 0, done["log"]
    return out


@pytest.mark.parametrize("written", [*LEFTOVERS])
def test_training_removes_the_temporary_files_of_killed_runs(run_over_leftovers, written):
    assert (run_over_leftovers / written).exists()
    assert not [path.name for path in run_over_leftovers.glob(f".{written}*")]


OUTPUT_CASES = {
    "sample": (["sample", "--n-samples", "4"], [f"layers/scvi_samples_{draw}" for draw in range(4)]),
    "latent": (["latent", "--return-dist"], ["obsm/X_scvi", "obsm/X_scvi_var"]),
    "normalize": (["normalize"], ["layers/scvi_normalized"]),
}


def entries_of(adata: anndata.AnnData) -> dict:
    """obsm and layers of `adata`, by entry name."""
    return {
        **{f"obsm/{key}": value for key, value in adata.obsm.items()},
        **{f"layers/{key}": value for key, value in adata.layers.items()},
    }


def assert_equal_entry(value, expected, entry: str) -> None:
    assert sp.issparse(value) == sp.issparse(expected), entry
    if sp.issparse(expected):
        value, expected = sp.csr_matrix(value), sp.csr_matrix(expected)
        for part in ("indptr", "indices", "data"):
            assert np.array_equal(getattr(value, part), getattr(expected, part)), f"{entry} {part}"
    else:
        assert np.array_equal(np.asarray(value), np.asarray(expected)), entry


@pytest.mark.parametrize("case", OUTPUT_CASES)
def test_output_command_killed_at_random_moments_resumes_to_the_uninterrupted_output(
    case, store, reference_model, server, tmp_path
):
    options, entries = OUTPUT_CASES[case]
    rng = np.random.default_rng(sorted(OUTPUT_CASES).index(case))
    x_expected = anndata.read_zarr(store).X.toarray()
    copies = iter(range(1000))

    def fresh() -> Path:
        copy = tmp_path / f"copy{next(copies)}" / "s.zarr"
        shutil.copytree(store, copy)
        return copy

    def argv_of(target: Path, first: bool) -> list:
        return [options[0], target, "--model", reference_model, "--chunk-rows", CHUNK_ROWS, *options[1:]]

    uninterrupted = fresh()
    reference = server.run(argv_of(uninterrupted, True), {})
    assert reference["rc"] == 0, reference["log"]
    expected = entries_of(anndata.read_zarr(uninterrupted))
    assert sorted(expected) == sorted(entries)

    def check_after_kill(target: Path) -> None:
        seen = anndata.read_zarr(target)  # opens after every kill, and shows only whole outputs
        np.testing.assert_array_equal(seen.X.toarray(), x_expected)
        shown = entries_of(seen)
        assert set(shown) <= set(entries), sorted(shown)
        for entry, value in shown.items():
            assert_equal_entry(value, expected[entry], entry)

    def check_done(target: Path) -> None:
        shown = entries_of(anndata.read_zarr(target))
        assert sorted(shown) == sorted(entries)
        for entry, value in shown.items():
            assert_equal_entry(value, expected[entry], entry)
        assert sorted(path.name for path in target.parent.iterdir()) == ["s.zarr"]  # no progress folder left

    def finished_already(run: dict) -> bool:  # the kill came after the last part was complete: the rerun refuses
        return run["rc"] == 2 and "already exists" in run["log"]

    kill_and_rerun(
        server,
        rng,
        reference,
        ("time", "all", "finish"),
        fresh,
        argv_of,
        check_after_kill,
        check_done,
        finished_already,
    )
