"""The training loop's thread tuner (threads.ThreadTuner): it keeps the faster of torch's thread count and one
thread, measured on the steps themselves, on a schedule fixed by the global step."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from scvi_scale import SCVI, settings
from scvi_scale.datasets import synthetic_atlas
from scvi_scale.threads import OTHERS_BUSY_CORES, ThreadTuner, others_cpu_seconds, torch_threads


@pytest.fixture
def threads_restored():
    yield
    torch.set_num_threads(1)  # the suite's setting (conftest)


def simulate(tuner: ThreadTuner, steps: range, step_ms, others_cores=lambda step: 1.0) -> list[int]:
    """Run the tuner over `steps` with a clock that advances by step_ms(threads, step) per step while other
    processes use others_cores(step) cores (one busy neighbour unless said; None: a machine where that cannot be
    measured); the thread count each step ran at."""
    now, others, used = [0.0], [0.0], []
    tuner.clock = lambda: now[0]
    tuner.others_cpu = (lambda: None) if others_cores is None else (lambda: others[0])
    for step in steps:
        tuner.step_started(step)
        used.append(torch.get_num_threads())
        seconds = step_ms(torch.get_num_threads(), step) / 1e3
        now[0] += seconds
        if others_cores is not None:
            others[0] += seconds * others_cores(step)
    return used


def test_a_contended_run_moves_to_one_thread_and_back_when_the_contention_ends(threads_restored):
    torch.set_num_threads(2)
    tuner = ThreadTuner(2, period=100, window=8, lead=10)
    # steps 0-299: two threads are 8x slower (a busy neighbour); from 300 on, two threads are 1.5x faster
    used = simulate(
        tuner,
        range(600),
        lambda threads, step: (80.0 if threads == 2 else 10.0) if step < 300 else (10.0 if threads == 2 else 15.0),
        others_cores=lambda step: 1.0 if step < 300 else 0.0,
    )
    # the first windows: steps 10-17 at two threads, 18-25 probing one; the decision at step 26
    assert used[10:18] == [2] * 8 and used[18:26] == [1] * 8
    assert set(used[26:118]) == {1}  # kept one thread until the next period's probe of two threads
    # that probe is stopped after 3 steps, each over twice as slow as the steps in use; so is the next
    assert used[118:126] == [2, 2, 2, 1, 1, 1, 1, 1] and used[218:226] == [2, 2, 2, 1, 1, 1, 1, 1]
    assert used[318:326] == [2] * 8  # the contention has ended: the whole probe runs, two threads are faster
    assert set(used[326:]) == {2}  # and the machine is quiet: one thread is no longer probed
    tuner.restore()
    assert torch.get_num_threads() == 2


def test_a_loaded_run_keeps_its_threads_when_one_thread_is_not_faster_by_the_margin(threads_restored):
    torch.set_num_threads(2)
    for one_thread_ms in (14.0, 10.5):  # one thread slower; one thread 5% faster: inside the margin
        tuner = ThreadTuner(2, period=100, window=8, lead=10)
        used = simulate(tuner, range(300), lambda threads, step: 11.0 if threads == 2 else one_thread_ms)
        probes = [step for step in range(10, 300) if 8 <= (step - 10) % 100 < 16]  # 18-25, 118-125, 218-225
        assert all(used[step] == 1 for step in probes)
        assert all(used[step] == 2 for step in range(300) if step not in probes)


def test_a_quiet_machine_is_not_probed_and_an_unmeasured_one_is(threads_restored):
    def cost(threads, step):  # one thread would be faster: only a probe could find it
        return 11.0 if threads == 2 else 5.0

    torch.set_num_threads(2)
    quiet = simulate(
        ThreadTuner(2, period=100, window=8, lead=10),
        range(300),
        cost,
        others_cores=lambda step: 0.9 * OTHERS_BUSY_CORES,
    )
    assert set(quiet) == {2}  # no probe, so no recompilation for one thread
    torch.set_num_threads(2)
    # no /proc/stat: probe as if loaded
    used = simulate(ThreadTuner(2, period=100, window=8, lead=10), range(100), cost, others_cores=None)
    assert used[18:26] == [1] * 8 and set(used[26:100]) == {1}


def test_other_processes_cpu_is_measured_and_our_own_is_left_out():
    if others_cpu_seconds() is None:
        pytest.skip("this machine has no /proc/stat")

    def others_cores_while(work) -> float:
        started_clock, started_others = time.perf_counter(), others_cpu_seconds()
        work()
        return (others_cpu_seconds() - started_others) / (time.perf_counter() - started_clock)

    def spin_here():
        until = time.perf_counter() + 1.5
        while time.perf_counter() < until:
            pass

    def spin_in_a_child():
        busy = "import time\nuntil = time.time() + 1.5\nwhile time.time() < until: pass"
        subprocess.run([sys.executable, "-c", busy], check=True)

    assert others_cores_while(spin_here) < 0.5  # our own busy core is not another process's
    assert others_cores_while(spin_in_a_child) > 0.7  # a busy child is (~1 core, less its start-up)


def test_the_schedule_follows_the_global_step_so_a_resumed_run_probes_at_the_same_steps(threads_restored):
    torch.set_num_threads(2)

    def cost(threads, step):
        return 50.0 if threads == 2 else 10.0

    whole = simulate(ThreadTuner(2, period=100, window=8, lead=10), range(400), cost)
    torch.set_num_threads(2)
    resumed = simulate(ThreadTuner(2, period=100, window=8, lead=10), range(150, 400), cost)
    # the resumed tuner starts at two threads; from its first decision (step 226) on it runs as the whole run did
    assert resumed[226 - 150 :] == whole[226:]


def test_training_restores_the_thread_count_and_the_setting_turns_the_tuner_off(
    tmp_path, threads_restored, monkeypatch
):
    store = tmp_path / "a.zarr"
    synthetic_atlas(store, n_cells=600, n_genes=200, seed=0)
    SCVI.setup_zarr(store, batch_key="batch")
    seen = []
    original = ThreadTuner.step_started
    monkeypatch.setattr(ThreadTuner, "step_started", lambda self, step: (seen.append(step), original(self, step)))
    torch.set_num_threads(2)
    SCVI(store).train(max_epochs=10, batch_size=64)  # 9 steps an epoch: the first windows (steps 32-63) inside
    assert seen == list(range(90)) and torch.get_num_threads() == 2
    seen.clear()
    monkeypatch.setattr(settings, "adaptive_threads", False)
    SCVI(store).train(max_epochs=1, batch_size=64)
    assert seen == [] and torch.get_num_threads() == 2
    torch.set_num_threads(1)
    monkeypatch.setattr(settings, "adaptive_threads", True)
    SCVI(store).train(max_epochs=1, batch_size=64)
    assert seen == []  # one thread: nothing to choose between


def test_the_first_slow_steps_at_one_thread_do_not_stop_its_probe(threads_restored):
    torch.set_num_threads(2)
    tuner = ThreadTuner(2, period=100, window=8, lead=10)

    def cost(threads, step):  # contended two threads; one thread's first 3 steps pay a setup of 300 ms each
        return 80.0 if threads == 2 else (300.0 if step < 21 else 10.0)

    used = simulate(tuner, range(120), cost)
    assert used[18:26] == [1] * 8 and set(used[26:118]) == {1}  # median 10 ms of 8 against 80: switched


def test_torch_threads_puts_the_count_back_after_the_block_changed_it(threads_restored):
    """torch_threads sets its count inside the block and restores the count from before it, even when the block
    set another one and raised (as numba's pool does to the report's caller)."""
    torch.set_num_threads(2)
    with pytest.raises(RuntimeError, match="inside"):
        with torch_threads(1):
            assert torch.get_num_threads() == 1
            torch.set_num_threads(3)
            raise RuntimeError("inside")
    assert torch.get_num_threads() == 2
    with torch_threads():
        assert torch.get_num_threads() == 2
        torch.set_num_threads(1)
    assert torch.get_num_threads() == 2
