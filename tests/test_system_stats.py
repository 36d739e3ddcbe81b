"""The actors' system sampler: real samples of this process, and the GPU fields only where CUDA is in use."""

from __future__ import annotations

import sys
import time
import types

import numpy as np
import pytest

from cluster.system_stats import SystemSampler, gpu_stats


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
