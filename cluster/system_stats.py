"""System metrics of an actor process (CPU %, resident memory, GPU utilisation and memory), sampled on a
thread of its own.

Why a thread in the actor rather than a stats call the driver polls: an extractor runs one task at a
time, so a poll would wait behind the shard being embedded and miss exactly the busy periods. A daemon
thread samples every few seconds into a bounded buffer; the driver reads it at the end of the run
(``SamplesSystem.system_samples``) and W&B plots it against wall time. Reading counters never touches
the computation, so results stay bit-identical.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import deque
from typing import Any

import psutil

SAMPLE_EVERY_S = 2.0
MAX_SAMPLES = 7200  # four hours at the default period; the oldest go first


def gpu_stats() -> dict[str, float]:
    """This process's CUDA memory (MiB, reserved by torch's allocator) and its device's utilisation (%),
    where the process uses a GPU; nothing otherwise. Asking never creates a CUDA context, and the
    utilisation is left out where torch cannot read it (it needs ``pynvml``)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return {}
    stats = {"gpu_memory_mib": round(torch.cuda.memory_reserved() / 2**20, 1)}
    try:
        stats["gpu_percent"] = float(torch.cuda.utilization())
    except Exception:  # noqa: BLE001 - no pynvml (ImportError), or NVML's own error types: memory only
        pass
    return stats


class SystemSampler:
    """Samples this process every ``every_s`` seconds on a daemon thread, keeping the last ``keep``."""

    def __init__(self, every_s: float = SAMPLE_EVERY_S, keep: int = MAX_SAMPLES) -> None:
        self.process = psutil.Process()
        self.process.cpu_percent(None)  # starts the first interval
        self.every_s = every_s
        self.samples: deque[dict[str, Any]] = deque(maxlen=keep)
        self._lock = threading.Lock()
        threading.Thread(target=self._loop, name="system-sampler", daemon=True).start()

    def sample(self) -> dict[str, Any]:
        """Now: wall time (s since the epoch), CPU % since the last sample (100 = one core), RSS (MiB), GPU."""
        with self._lock:  # cpu_percent measures from the previous call: one caller at a time
            cpu = self.process.cpu_percent(None)
        return {"time": time.time(), "cpu_percent": cpu,
                "rss_mib": round(self.process.memory_info().rss / 2**20, 1), **gpu_stats()}

    def _loop(self) -> None:
        while True:
            time.sleep(self.every_s)
            self.samples.append(self.sample())

    def drain(self) -> list[dict[str, Any]]:
        """The samples so far and one of now (so a run shorter than the period still has one); clears them."""
        taken = [self.samples.popleft() for _ in range(len(self.samples))]
        return [*taken, self.sample()]


class SamplesSystem:
    """Actors whose process is sampled from their start (``SystemSampler``)."""

    def start_sampling(self) -> None:
        self.sampler = SystemSampler()

    def system_samples(self) -> list[dict[str, Any]]:
        return self.sampler.drain()
