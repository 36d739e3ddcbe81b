"""Shards go to whichever extractor is free, not to a slot fixed when they are queued.

Dealing shards round robin at submission binds each to one actor: a slow or restarting node then holds
up its share of every category while the others idle. Here shards wait in one FIFO queue and a
background thread hands the next one to an extractor as soon as it has fewer than ``depth`` shards
submitted (one running plus one queued at the actor, so it never idles between shards).

Why not ``ray.util.ActorPool``: it returns results by fetching them into the driver, and the features
must stay in the object store, referenced by the holders and evaluators. Each shard is still an
ordinary actor task whose two returns the driver owns, so Ray's retries and lineage (an extractor
killed mid-shard, a lost node) work as before. Results are keyed by sample index, so which extractor
ran a shard changes no number.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Sequence

import ray


@dataclass(eq=False)
class Shard:
    """One queued extraction call; ``features`` and ``timing`` are its two object refs once submitted."""

    args: tuple
    slot: int | None = None  # the extractor that got it
    features: ray.ObjectRef | None = None
    timing: ray.ObjectRef | None = None  # the small second return (seconds, stage times)
    error: BaseException | None = None
    submitted: threading.Event = field(default_factory=threading.Event)

    def refs(self) -> tuple[ray.ObjectRef, ray.ObjectRef]:
        """Block until the shard is on an extractor; its (features, timing) refs."""
        self.submitted.wait()
        if self.error is not None:
            raise self.error
        return self.features, self.timing


class ShardDispatcher:
    """A FIFO of extraction shards fed to the extractors that have room, by a background thread.

    The thread runs only while shards wait or run: an idle dispatcher holds no thread and no reference to
    finished features (the object store frees them when their consumers do), and a pipeline that is
    dropped releases its actors (Ray ends an actor when its last handle goes) as it did before.
    """

    def __init__(self, extractors: Sequence[Any], depth: int = 2) -> None:
        self.extractors = list(extractors)
        self.depth = depth
        self._queue: list[Shard] = []
        self._running: list[list[Shard]] = [[] for _ in self.extractors]  # submitted, not known finished
        self._lock = threading.Lock()
        self._closed = False
        self._thread: threading.Thread | None = None

    def put(self, *args: Any) -> Shard:
        """Queue ``extract(*args)`` on the next free extractor."""
        shard = Shard(args)
        with self._lock:
            if self._closed:
                raise RuntimeError("the shard dispatcher is closed")
            self._queue.append(shard)
            if self._thread is None:
                self._thread = threading.Thread(target=self._pump, name="shard-dispatch", daemon=True)
                self._thread.start()
        return shard

    def busy_slots(self) -> set[int] | None:
        """Extractor slots with shards submitted and not finished; None while shards still wait for a slot
        (every extractor is then busy)."""
        with self._lock:
            if self._queue:
                return None
            running = [(slot, shard) for slot, shards in enumerate(self._running) for shard in shards]
        if not running:
            return set()
        refs = [shard.features for _, shard in running]
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)
        finished = set(done)
        return {slot for slot, shard in running if shard.features not in finished}

    def close(self) -> None:
        """Stop the thread; shards still queued fail with an error instead of waiting forever."""
        self._stop(RuntimeError("the run stopped before this shard was extracted"))
        thread = self._thread
        if thread is not None:
            thread.join(timeout=10)

    def _stop(self, error: BaseException) -> None:
        with self._lock:
            self._closed = True
            for shard in self._queue:
                shard.error = error
                shard.submitted.set()
            self._queue.clear()

    def _pump(self) -> None:
        try:
            self._feed()
        except Exception as error:  # Ray itself failed (shut down under us): waiting shards learn why
            self._stop(error)
            self._thread = None

    def _feed(self) -> None:
        while True:
            with self._lock:
                if not self._closed:
                    self._fill()
                running = [shard.features for shards in self._running for shard in shards]
                if self._closed or not (self._queue or running):  # idle: the thread ends until the next put
                    self._thread = None
                    return
            if running:  # wait (outside the lock) for a shard to finish, then fill its slot
                done, _ = ray.wait(running, num_returns=1, timeout=1.0, fetch_local=False)
                if done:  # every shard finished by now, not only the first
                    done, _ = ray.wait(running, num_returns=len(running), timeout=0, fetch_local=False)
                with self._lock:
                    finished = set(done)
                    self._running = [[s for s in shards if s.features not in finished] for shards in self._running]

    def _fill(self) -> None:
        """Submit queued shards to extractors with room, least loaded first (ties: lowest slot)."""
        while self._queue:
            slot = min(range(len(self.extractors)), key=lambda s: (len(self._running[s]), s))
            if len(self._running[slot]) >= self.depth:
                return
            shard = self._queue.pop(0)
            try:
                shard.features, shard.timing = self.extractors[slot].extract.remote(*shard.args)
                shard.slot = slot
                self._running[slot].append(shard)
            except Exception as error:  # an actor that can no longer take calls: the consumer sees why
                shard.error = error
            shard.submitted.set()
