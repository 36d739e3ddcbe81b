"""System metrics of an actor or training process (CPU %, resident memory, GPU utilisation and memory),
sampled on a thread of its own, and the driver's poll that logs them while the run goes.

Why a thread in the process rather than a stats call the driver makes: an extractor runs one task at a
time, so a call would wait behind the shard being embedded and miss exactly the busy periods. A daemon
thread samples every few seconds into a bounded buffer. An actor's buffer is drained by the driver
(``SamplesSystem.system_samples``, asked by ``SystemPoll`` every ``POLL_EVERY_S`` and at the end); a
training process, a Ray task with no method to call, sends its samples itself over the channel its
training events take (``send``). Reading counters never touches the computation, so results stay
bit-identical.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import deque
from typing import Any, Callable

import psutil

SAMPLE_EVERY_S = 2.0
MAX_SAMPLES = 7200  # four hours at the default period; the oldest go first
SEND_EVERY = 5  # a training process sends its samples in batches of this many (every 10 s by default)
POLL_EVERY_S = 30.0  # the driver asks the actors for their samples this often

log = logging.getLogger("cluster.system_stats")
Samples = dict[str, list[dict[str, Any]]]  # by process name (``extractor_0``, ``fit_1``): its samples in time order


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
    """Samples this process every ``every_s`` seconds on a daemon thread, keeping the last ``keep``.

    With ``send``, every ``send_every`` samples go to ``send`` from that thread, and ``close`` (or the end of
    a ``with`` block) sends the rest and one of now: a task's sampler must stop with the task, as Ray reuses
    its process. A ``send`` that fails stops the sending and the sampling, never the process's work."""

    def __init__(self, every_s: float = SAMPLE_EVERY_S, keep: int = MAX_SAMPLES,
                 send: Callable[[list[dict[str, Any]]], object] | None = None, send_every: int = SEND_EVERY) -> None:
        self.process = psutil.Process()
        self.process.cpu_percent(None)  # starts the first interval
        self.every_s, self.send, self.send_every = every_s, send, send_every
        self.samples: deque[dict[str, Any]] = deque(maxlen=keep)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="system-sampler", daemon=True)
        self._thread.start()

    def __enter__(self) -> "SystemSampler":
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def sample(self) -> dict[str, Any]:
        """Now: wall time (s since the epoch), CPU % since the last sample (100 = one core), RSS (MiB), GPU."""
        with self._lock:  # cpu_percent measures from the previous call: one caller at a time
            cpu = self.process.cpu_percent(None)
        return {"time": time.time(), "cpu_percent": cpu,
                "rss_mib": round(self.process.memory_info().rss / 2**20, 1), **gpu_stats()}

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self.samples.append(self.sample())
            if self.send is not None and len(self.samples) >= self.send_every:
                self._send(self._take())

    def _send(self, samples: list[dict[str, Any]]) -> None:
        try:
            self.send(samples)
        except Exception as error:  # noqa: BLE001 - the receiver is gone: its samples are lost, the work goes on
            log.warning("system samples not sent (%s); sampling stops", _first_line(error))
            self.send = None
            self._stop.set()

    def close(self) -> None:
        """Stop sampling; with ``send``, the samples not sent yet and one of now go."""
        self._stop.set()
        self._thread.join()
        if self.send is not None:
            self._send(self.drain())

    def drain(self) -> list[dict[str, Any]]:
        """The samples so far and one of now (so a run shorter than the period still has one); clears them."""
        return [*self._take(), self.sample()]

    def _take(self) -> list[dict[str, Any]]:
        return [self.samples.popleft() for _ in range(len(self.samples))]


class SamplesSystem:
    """Actors whose process is sampled from their start (``SystemSampler``)."""

    def start_sampling(self) -> None:
        self.sampler = SystemSampler()

    def system_samples(self) -> list[dict[str, Any]]:
        return self.sampler.drain()


class SystemPoll:
    """On a driver thread, every ``every_s`` seconds (default ``POLL_EVERY_S``), ``log(collect())``: the actors'
    samples logged while the run goes; ``close`` logs the ones since (not after a failure: no waiting on the
    actors then).

    ``collect`` drains the actors' buffers (each sample is returned once), so no sample is logged twice. It may
    wait behind an actor's running task; that waits on this thread, never the driver's. A failed ``collect``
    or ``log`` (an actor gone, W&B trouble) skips that round with one warning; it never fails the run."""

    def __init__(self, collect: Callable[[], Samples], log: Callable[[Samples], object],
                 every_s: float | None = None) -> None:
        self.collect, self.log = collect, log
        self.every_s = POLL_EVERY_S if every_s is None else every_s
        self.warned = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="system-poll", daemon=True)
        self._thread.start()

    def __enter__(self) -> "SystemPoll":
        return self

    def __exit__(self, kind: type | None, *_: object) -> None:
        self.close(final=kind is None)  # a failing run does not wait on its actors for the last samples

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self._once()

    def _once(self) -> None:
        try:
            self.log(self.collect())
        except Exception as error:  # noqa: BLE001 - system metrics are worth a warning, never a failed run
            if not self.warned:
                self.warned = True
                log.warning("actors' system samples not collected (%s)", _first_line(error))

    def close(self, final: bool = True) -> None:
        self._stop.set()
        self._thread.join()
        if final:
            self._once()


def _first_line(error: Exception) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__
