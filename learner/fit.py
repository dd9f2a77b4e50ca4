"""Training with early stopping on a held-out loss: the one loop the main job and ``launch/train.py`` share.

The trainer is given as callables, so a Ray learner group and a learner in this process (or
under torchrun) run the same loop: ``train(n)`` takes up to ``n`` steps and returns their metric
rows (fewer, or none, when it had to stop early: a signal, a time limit), ``validate()`` scores the
held-out batches, ``export()`` writes the weights. The best weights are exported whenever the
held-out loss improves, so what remains on disk after a stop is the best seen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable


@dataclass
class EarlyStopping:
    """Stops after ``patience`` validations without an improvement of more than ``min_delta``."""

    patience: int
    min_delta: float = 1e-4
    best: float = math.inf
    bad: int = 0

    def improved(self, loss: float) -> bool:
        """Record a held-out loss; True when it is the best so far (export then)."""
        if loss < self.best - self.min_delta:
            self.best, self.bad = loss, 0
            return True
        self.bad += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad >= self.patience


def fit(train: Callable[[int], list[dict[str, float]]], step: Callable[[], int], total: int, every: int,
        export: Callable[[], object], validate: Callable[[], float] | None = None, patience: int = 2,
        report: Callable[[list[dict[str, float]], float | None, EarlyStopping], None] | None = None,
        say: Callable[[str], None] = print, what: str = "training") -> EarlyStopping:
    """Train to ``total`` steps in chunks of ``every``, validating after each; returns the stopper (its best loss).

    Without ``validate`` the run takes its whole budget and exports at the end.
    """
    stopper = EarlyStopping(patience)
    exported = False
    while step() < total:
        rows = train(min(every, total - step()))
        if not rows:
            break
        loss = validate() if validate is not None else None
        if report is not None:
            report(rows, loss, stopper)
        if loss is None:
            continue
        if stopper.improved(loss):
            export()
            exported = True
        elif stopper.should_stop:
            say(f"{what}: held-out loss stopped improving at {stopper.best:.4f}; stopping at step {step()}")
            break
    if not exported:
        export()
    return stopper
