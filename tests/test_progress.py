"""Progress: periodic log lines with rate and ETA when not a TTY, tqdm bars on a terminal."""

import logging
import time
from types import SimpleNamespace

from anomaly_core.metrics import MetricReport
from jobs.progress import Progress, format_seconds


def _jobs():
    split = lambda n_train, n_test: SimpleNamespace(train=[0] * n_train, test=[0] * n_test)  # noqa: E731
    return [SimpleNamespace(split=split(10, 6)), SimpleNamespace(split=split(30, 4))]


def test_log_lines_are_rate_limited_with_rate_and_eta(caplog):
    now = [0.0]
    progress = Progress(_jobs(), tty=False, interval_s=10.0, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="jobs.progress"):
        now[0] = 10.0
        progress("extracted", {"key": "d/a", "images": 10, "seconds": 9.0})
        now[0] = 12.0
        progress("bank", {"key": "d/a", "memory_size": 100, "seconds": 1.5})  # within the interval: silent
        now[0] = 30.0
        progress("extracted", {"key": "d/b", "images": 30, "seconds": 19.0})  # stage complete: always logged
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 2
    assert lines[0].startswith("extract 10/40 img (25%), 1.00 img/s, ETA 0m30s")
    assert "d/a train 10 img in 9.0 s" in lines[0]
    assert lines[1].startswith("extract 40/40 img (100%)") and "ETA 0m00s" in lines[1]


def test_terminal_bars_count_each_stage():
    progress = Progress(_jobs(), tty=True)
    progress("extracted", {"key": "d/a", "images": 10, "seconds": 1.0})
    progress("bank", {"key": "d/a", "memory_size": 5, "seconds": 0.1})
    progress("evaluated", {"key": "d/a", "images": 6, "report": MetricReport({"image_auroc": 0.9}, {})})
    counts = {kind: bar.n for kind, bar in progress.bars.items()}
    assert counts == {"extracted": 10, "bank": 1, "evaluated": 6}
    assert progress.bars["evaluated"].total == 10
    progress.close()
    assert progress.bars == {}


def test_format_seconds():
    assert format_seconds(None) == "?"
    assert format_seconds(75) == "1m15s"
    assert format_seconds(3725) == "1h02m05s"


def test_a_stalled_run_says_what_it_waits_for(caplog):
    progress = Progress(_jobs(), tty=False, stall_s=0.2)
    progress.waiting = lambda: "extraction of d/a (10 train images, 2 extractors); free in the cluster now: {'CPU': 0.0}"
    with caplog.at_level(logging.WARNING, logger="jobs.progress"):
        deadline = time.monotonic() + 5
        while not caplog.records and time.monotonic() < deadline:
            time.sleep(0.05)
        progress.close()
    (record, *_) = caplog.records
    assert record.getMessage().startswith("no progress for 0m00s: waiting for extraction of d/a")
    assert "free in the cluster now: {'CPU': 0.0}" in record.getMessage()
