"""Progress of a benchmark's three stages — extraction, coreset, evaluation — with images/s and ETA.

On a terminal it draws tqdm bars; elsewhere (CI, ``ray job logs``, files) bars would be a mess of
carriage returns, so it writes plain log lines instead, at most one per ``interval_s`` unless a stage
finishes. It is a callable ``on_event(kind, info)`` for ``BenchmarkPipeline``, which reports a stage
once per category: the rates are whole-run averages (images over time since the start), the honest
figure when the stages overlap.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

if TYPE_CHECKING:
    from cluster.pipeline import CategoryJob

log = logging.getLogger("jobs.progress")


@dataclass
class Stage:
    """One stage's counter; ``unit`` is what ``total`` counts (images or categories)."""

    name: str
    total: int
    unit: str
    done: int = 0

    def rate(self, elapsed: float) -> float:
        return self.done / elapsed if elapsed > 0 else 0.0

    def eta(self, elapsed: float) -> float | None:
        rate = self.rate(elapsed)
        return (self.total - self.done) / rate if rate > 0 else None

    def line(self, elapsed: float) -> str:
        percent = 100.0 * self.done / self.total if self.total else 100.0
        eta = self.eta(elapsed)
        return (f"{self.name} {self.done}/{self.total} {self.unit} ({percent:.0f}%), "
                f"{self.rate(elapsed):.2f} {self.unit}/s, ETA {format_seconds(eta)}")


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    minutes, seconds = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


class Progress:
    """``on_event`` for the pipeline: bars on a TTY, periodic log lines otherwise; ``close()`` at the end."""

    def __init__(
        self,
        jobs: Sequence[CategoryJob],
        tty: bool | None = None,
        interval_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        stall_s: float = 0.0,
        passes: int = 1,
    ) -> None:
        # passes: how often each category goes through the stages (an ensemble: once per member).
        self.stages = {
            "extracted": Stage("extract", passes * sum(len(job.split.train) for job in jobs), "img"),
            "bank": Stage("coreset", passes * len(jobs), "categories"),
            "evaluated": Stage("evaluate", passes * sum(len(job.split.test) for job in jobs), "img"),
        }
        self.interval_s = interval_s
        self.clock = clock
        self.started = clock()
        self.last_line = float("-inf")
        self.last_event = self.started
        # What the run waits for, asked only when it stalls; the pipeline sets it once it exists.
        self.waiting: Callable[[], str] = lambda: "the cluster to start"
        self.stall_s = stall_s
        self._stop = threading.Event()
        if stall_s > 0:
            threading.Thread(target=self._watch, name="stall-watch", daemon=True).start()
        self.bars: dict[str, tqdm] = {}
        self.terminal = ExitStack()
        if (sys.stderr.isatty() if tty is None else tty):
            for position, (kind, stage) in enumerate(self.stages.items()):
                self.bars[kind] = tqdm(total=stage.total, desc=f"{stage.name:<8}", unit=stage.unit, position=position,
                                       file=sys.stderr, dynamic_ncols=True, leave=True)
            # Log records written while the bars are up would tear them; route them through tqdm.
            self.terminal.enter_context(logging_redirect_tqdm())

    def _watch(self) -> None:
        """Say what the run waits for when no stage has finished for ``stall_s`` (then every ``stall_s``)."""
        warned_at = self.last_event
        while not self._stop.wait(min(self.stall_s / 4, 30.0)):
            now = self.clock()
            quiet_since = max(self.last_event, warned_at)
            if now - quiet_since >= self.stall_s:
                warned_at = now
                log.warning("no progress for %s: waiting for %s", format_seconds(now - self.last_event), self.waiting())

    def __call__(self, kind: str, info: dict[str, Any]) -> None:
        self.last_event = self.clock()
        if kind == "done":
            self._finished(info.get("seconds", self.clock() - self.started))
            return
        stage = self.stages.get(kind)
        if stage is None:
            return
        step = 1 if kind == "bank" else int(info.get("images", 0))
        stage.done += step
        if self.bars:
            bar = self.bars[kind]
            bar.set_postfix_str(_detail(kind, info), refresh=False)
            bar.update(step)
            return
        now = self.clock()
        if now - self.last_line >= self.interval_s or stage.done >= stage.total:
            self.last_line = now
            log.info("%s — last: %s", stage.line(now - self.started), _detail(kind, info))

    def _finished(self, seconds: float) -> None:
        self.close()
        images = self.stages["extracted"].done + self.stages["evaluated"].done
        log.info("all stages done: %d images in %s (%.2f img/s)", images, format_seconds(seconds),
                 images / seconds if seconds > 0 else 0.0)

    def close(self) -> None:
        """Close the bars (idempotent), so later output does not land inside them; later events are logged."""
        self._stop.set()
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()
        self.terminal.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _detail(kind: str, info: dict[str, Any]) -> str:
    key = info.get("key", "?")
    if kind == "extracted":
        return f"{key} train {info.get('images', 0)} img in {info.get('seconds', 0.0):.1f} s"
    if kind == "bank":
        return f"{key} bank {info.get('memory_size', '?')} patches in {info.get('seconds', 0.0):.1f} s"
    report = info.get("report")
    auroc = report.values.get("image_auroc") if report is not None else None
    return f"{key} {info.get('images', 0)} test img" + (f", image AUROC {auroc:.3f}" if auroc is not None else "")
