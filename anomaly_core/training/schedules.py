"""Learning-rate schedules, as callables LambdaLR can checkpoint (their fields go into its state dict)."""

from __future__ import annotations

import math
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


@dataclass
class WarmCosine:
    """Factor of the base learning rate ``base_lr`` at optimisation step ``step`` (0-based): Dinomaly's
    ``WarmCosineScheduler`` (guojiajeremy/Dinomaly utils.py, anomalib's dinomaly/components/optimizer.py).

    A linear warm-up from 0 to ``base_lr`` over ``warmup_steps`` (np.linspace: step 0 has rate 0, step
    warmup_steps - 1 the full rate), then a cosine from ``base_lr`` down towards ``final_lr`` over the remaining
    steps of ``total_steps``; ``final_lr`` from ``total_steps`` on. A run shorter than its warm-up ends inside it
    (then drops to ``final_lr``), as the reference's concatenated schedule does.
    """

    base_lr: float
    final_lr: float
    total_steps: int
    warmup_steps: int

    def __post_init__(self) -> None:
        if self.total_steps < 1 or self.warmup_steps < 0:
            raise ValueError(f"need total_steps >= 1 and warmup_steps >= 0, got {self.total_steps}, {self.warmup_steps}")

    def __call__(self, step: int) -> float:
        if step >= self.total_steps:
            return self.final_lr / self.base_lr
        if step < self.warmup_steps:  # np.linspace(0, base_lr, warmup_steps)[step]
            rate = step * (self.base_lr / (self.warmup_steps - 1)) if self.warmup_steps > 1 else 0.0
        else:
            cosine = 1 + math.cos(math.pi * (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
            rate = self.final_lr + 0.5 * (self.base_lr - self.final_lr) * cosine
        return rate / self.base_lr


@dataclass
class MultiStepDecay:
    """Factor of the base learning rate at optimisation step ``step``: ``decay_factor`` to the number of
    ``milestones`` (fractions of the epochs) its epoch has reached, as MultiStepLR stepped once per epoch.

    A milestone's epoch is ``round(fraction * epochs)``: DRAEM's ``[0.8 epochs, 0.9 epochs]`` (train_DRAEM.py),
    and anomalib's epochs 400 and 600 of 700 as 4/7 and 6/7. (The authors' MultiStepLR never reaches a milestone
    that is not a whole epoch; this one rounds it.)
    """

    steps_per_epoch: int
    epochs: int
    milestones: tuple[float, ...]
    decay_factor: float

    def __post_init__(self) -> None:
        if self.steps_per_epoch < 1 or self.epochs < 1:
            raise ValueError(f"need steps_per_epoch >= 1 and epochs >= 1; got {self}")
        if not all(0 < m <= 1 for m in self.milestones) or not 0 < self.decay_factor <= 1:
            raise ValueError(f"milestones and decay_factor must be in (0, 1], got {self.milestones}, "
                             f"{self.decay_factor}")
        self.milestones = tuple(self.milestones)

    def __call__(self, step: int) -> float:
        epoch = step // self.steps_per_epoch
        return self.decay_factor ** sum(epoch >= round(m * self.epochs) for m in self.milestones)
