"""Learning-rate schedules, as callables LambdaLR can checkpoint (their fields go into its state dict)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class WarmupStepDecay:
    """Factor of the base learning rate at optimisation step ``step`` (0-based).

    Linear warm-up over the first ``warmup_epochs`` epochs, step by step (step s uses (s + 1) / warm-up
    steps), so the first large updates of a random decoder do not wreck it; then the base rate; then
    ``decay_factor`` times it from epoch ``int(decay_at * epochs)`` on. A decay epoch inside the warm-up
    multiplies the warm-up factor.
    """

    steps_per_epoch: int
    epochs: int
    warmup_epochs: int
    decay_at: float
    decay_factor: float  # 1: a constant rate after the warm-up

    def __post_init__(self) -> None:
        if self.steps_per_epoch < 1 or self.epochs < 1 or self.warmup_epochs < 0:
            raise ValueError(f"need steps_per_epoch >= 1, epochs >= 1, warmup_epochs >= 0; got {self}")
        if not 0 < self.decay_at <= 1 or not 0 < self.decay_factor <= 1:
            raise ValueError(f"decay_at and decay_factor must be in (0, 1], got {self.decay_at}, {self.decay_factor}")

    def __call__(self, step: int) -> float:
        warmup_steps = self.warmup_epochs * self.steps_per_epoch
        factor = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
        if step // self.steps_per_epoch >= int(self.decay_at * self.epochs):
            factor *= self.decay_factor
        return factor
