"""The system sampler: real samples of this process, the GPU fields only where CUDA is in use, a training
process's samples sent on while it works, and the driver's poll that logs the actors' as the run goes."""

from __future__ import annotations

import logging
import sys
import threading
import time
import types

import numpy as np
import pytest

from cluster.system_stats import SystemPoll, SystemSampler, gpu_stats


def test_sampler_records_this_process_cpu_and_memory_on_its_own_thread():
    sampler = SystemSampler(every_s=0.05, keep=3)
    ballast = np.ones(64 * 2**20 // 8)  # 64 MiB resident while sampled
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:  # one core busy: the samples must see it
        ballast.sum()
    samples = sampler.drain()
    assert 2 <= len(samples) <= 4  # at most `keep` kept, and one taken now
    assert [sample["time"] for sample in samples] == sorted(sample["time"] for sample in samples)
    assert max(sample["cpu_percent"] for sample in samples) > 30
    assert min(sample["rss_mib"] for sample in samples) > 64
    assert not any(name.startswith("gpu") for sample in samples for name in sample)  # no CUDA here
    time.sleep(0.02)
    assert len(sampler.drain()) <= 2  # drained: only what came since, and now


class FakeCuda:
    """torch.cuda of a process that uses a GPU, on a machine without pynvml (torch's utilization needs it)."""

    def __init__(self, initialized: bool) -> None:
        self.initialized = initialized

    def is_initialized(self) -> bool:
        return self.initialized

    def memory_reserved(self) -> int:
        return 3 * 2**29

    def utilization(self) -> int:
        raise ModuleNotFoundError("No module named 'pynvml'")


@pytest.mark.parametrize("initialized", [True, False])
def test_gpu_stats_report_memory_without_pynvml_and_nothing_without_cuda(monkeypatch, initialized):
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=FakeCuda(initialized)))
    assert gpu_stats() == ({"gpu_memory_mib": 1536.0} if initialized else {})


def test_a_sending_sampler_sends_while_its_process_works_and_the_rest_when_closed():
    """Batches of ``send_every`` samples leave while the block runs; its end sends the rest and one of now, stops
    the thread (Ray reuses a task's process), and every sample is sent exactly once, in time order."""
    sent: list[list[dict]] = []
    with SystemSampler(every_s=0.02, send=sent.append, send_every=3) as sampler:
        deadline = time.monotonic() + 2
        while len(sent) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        during = len(sent)
    assert during >= 2  # sent before the block ended
    assert not sampler._thread.is_alive() and all(len(batch) == 3 for batch in sent[:-1]) and sent[-1]  # then the rest
    times = [sample["time"] for batch in sent for sample in batch]
    assert times == sorted(times) and len(set(times)) == len(times)
    assert all(sample["rss_mib"] > 50 for batch in sent for sample in batch)
    count = len(sent)
    time.sleep(0.05)
    assert len(sent) == count


def test_a_failing_send_stops_the_sampler_with_one_warning_not_the_work(caplog):
    def send(samples):
        raise ConnectionError("queue actor died")

    with caplog.at_level(logging.WARNING, logger="cluster.system_stats"):
        with SystemSampler(every_s=0.01, send=send, send_every=1) as sampler:
            sampler._thread.join(timeout=2)  # the thread ends on the failed send
        assert not sampler._thread.is_alive()
    assert [record.getMessage() for record in caplog.records] == [
        "system samples not sent (queue actor died); sampling stops"]


def test_the_poll_logs_while_the_run_goes_and_each_sample_once():
    """Every period the collected samples are logged on the poll's thread; closing logs what came since (and
    nothing after a failure: a failing run does not wait on its actors); a failing collect warns once."""
    taken = iter(range(1000))
    logged: list[dict] = []
    collected = threading.Event()

    def collect():
        collected.set()
        return {"extractor_0": [{"time": float(next(taken))}]}

    poll = SystemPoll(collect, logged.append, every_s=0.01)
    assert collected.wait(2)
    while not logged:
        time.sleep(0.01)
    poll.close()
    times = [sample["time"] for entry in logged for sample in entry["extractor_0"]]
    assert times == list(range(len(times))) and len(times) >= 2  # at least one round, then the closing one

    rounds: list[int] = []
    broken = lambda: rounds.append(1) or 1 / 0  # noqa: E731
    with pytest.raises(RuntimeError), SystemPoll(broken, logged.append, every_s=60) as failed:
        raise RuntimeError("the run failed")
    assert rounds == [] and not failed._thread.is_alive()  # no closing round after a failure
    with SystemPoll(broken, logged.append, every_s=60) as poll:
        pass
    assert rounds == [1] and poll.warned  # the collect failed: a warning, not an error
