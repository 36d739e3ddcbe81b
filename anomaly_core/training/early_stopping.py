"""Early stopping on a monitored value; a resumed run rebuilds it from the recorded history (trainer.py)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EarlyStopping:
    """Tracks the best value of a monitored quantity and the checks since it last improved.

    A value improves on the best when it is better by more than ``min_delta``; after ``patience`` checks
    without improvement, ``should_stop`` turns true (never with ``patience=None``: only the best is tracked).
    """

    mode: str  # "min" or "max"
    patience: int | None = None
    min_delta: float = 0.0
    best: float | None = None
    best_epoch: int | None = None
    checks_without_improvement: int = 0

    def __post_init__(self) -> None:
        if self.mode not in ("min", "max"):
            raise ValueError(f"mode must be min or max, got {self.mode!r}")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience must be >= 1 or None, got {self.patience}")
        if self.min_delta < 0:
            raise ValueError(f"min_delta must be >= 0, got {self.min_delta}")

    def update(self, value: float, epoch: int) -> bool:
        """Record ``epoch``'s value; True if it is the new best."""
        if self.best is None or self._improves(value):
            self.best, self.best_epoch, self.checks_without_improvement = float(value), epoch, 0
            return True
        self.checks_without_improvement += 1
        return False

    def _improves(self, value: float) -> bool:
        if self.mode == "max":
            return value > self.best + self.min_delta
        return value < self.best - self.min_delta

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.checks_without_improvement >= self.patience
