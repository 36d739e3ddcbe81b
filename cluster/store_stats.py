"""How much of Ray's object store a run used: bytes put through it, the most held at once, and at the end.

Read from the raylets' own store statistics, the numbers ``ray memory --stats-only`` prints, through
``ray._private.internal_api.get_memory_info_reply``. That function is private; it is used because the
public route, the state API (``ray.util.state.summarize_objects``), is served by Ray's dashboard, which
the embedded Ray does not start (``include_dashboard=False``) and which needs ``ray[default]``'s extra
packages (absent on the offline GPU image), and because it lists object references and their sizes, not
what the store holds, spills or writes to its disk fallback. The raylet asked sums over all nodes.

The store keeps no peak of its own, so a thread samples it while the run goes: ``peak_used_bytes`` is the
largest sample, a lower bound of the true peak. Statistics must never fail a run: a failed sample is
counted and skipped, and a store that cannot be read at all gives ``{"error": ...}``.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import ray

log = logging.getLogger("cluster.store_stats")


def store_stats() -> dict[str, int]:
    """The cluster's object-store statistics now (bytes; ``created`` and ``spilled`` count since start)."""
    from ray._private.internal_api import get_memory_info_reply

    node = next(node for node in ray.nodes() if node["Alive"])
    stats = get_memory_info_reply(None, node["NodeManagerAddress"], node["NodeManagerPort"],
                                  timeout_seconds=10.0).store_stats
    return {"used": stats.object_store_bytes_used, "capacity": stats.object_store_bytes_avail,
            "created": stats.cumulative_created_bytes, "spilled": stats.spilled_bytes_total,
            "fallback": stats.object_store_bytes_fallback, "objects": stats.num_local_objects}


class StoreMonitor:
    """Samples ``store_stats`` every ``every`` seconds between ``__enter__`` and ``__exit__``."""

    def __init__(self, every: float = 0.5) -> None:
        self.every = every
        self.first: dict[str, int] | None = None
        self.last: dict[str, int] | None = None
        self.peak_used = self.peak_fallback = self.samples = self.failed = 0
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="store-stats", daemon=True)

    def _sample(self) -> None:
        try:
            stats = store_stats()
        except Exception as error:  # noqa: BLE001 - statistics never fail the run
            self.failed += 1
            self.error = f"{type(error).__name__}: {error}"
            return
        self.first = self.first or stats
        self.last = stats
        self.samples += 1
        self.peak_used = max(self.peak_used, stats["used"])
        self.peak_fallback = max(self.peak_fallback, stats["fallback"])

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self._sample()

    def __enter__(self) -> "StoreMonitor":
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def summary(self) -> dict[str, Any]:
        """For ``summary.json`` ``cluster.object_store``: bytes, and how they were read."""
        if self.first is None or self.last is None:
            log.warning("object-store statistics unavailable: %s", self.error)
            return {"error": self.error}
        return {
            "peak_used_bytes": self.peak_used,
            "used_bytes_end": self.last["used"],
            "capacity_bytes": self.last["capacity"],
            "created_bytes": self.last["created"] - self.first["created"],  # put through the store in this run
            "spilled_bytes": self.last["spilled"] - self.first["spilled"],
            "peak_fallback_bytes": self.peak_fallback,  # objects in the store's disk fallback, when full
            "objects_end": self.last["objects"],
            "samples": self.samples, "failed_samples": self.failed, "sample_every_s": self.every,
            "source": "raylet store statistics (ray memory --stats-only), sampled",
        }


def object_bytes(refs: list[ray.ObjectRef]) -> int | None:
    """Bytes these objects take in the object store, as their owner records them (objects small enough to
    travel inline with their task's reply count 0); None where Ray cannot say. Never fails a run."""
    if not refs:
        return 0
    try:
        locations = ray.experimental.get_object_locations(list(refs), timeout_ms=10_000)
    except Exception as error:  # noqa: BLE001 - statistics never fail the run
        log.warning("object sizes unavailable: %s", error)
        return None
    return sum(int(entry.get("object_size") or 0) for entry in locations.values())
