"""The official two-cycle linear learning-rate schedule (method 3.6).

Multipliers of the base learning rate (1e-4): cycle 1 warms up linearly from 1e-6 to 1.0 over
``warmup_steps`` and then decays linearly to 0.3 at ``cycle_steps`` (LIBERO and RoboCasa: 1,000
and 30,000; ALOHA: 2,000 and 20,000; the ALOHA planning fine-tune: 1,500 and 15,000); cycle 2
holds 0.06 for good, a sharp fivefold drop after the first cycle.
"""

from __future__ import annotations

from dataclasses import dataclass

from cosmos_policy.errors import ConfigError


@dataclass(frozen=True)
class ScheduleConfig:
    """The official two-cycle linear schedule, as multipliers of the base learning rate."""

    warmup_steps: int = 1000
    """Linear warm-up from ``start`` to ``peak`` (the job sets it from offline.warmup_steps; 0 online)."""
    cycle_steps: int = 30000
    """End of the first cycle, where the multiplier has fallen linearly to ``end_of_cycle`` (the job: the phase's steps)."""
    start: float = 1e-6
    """Multiplier at step 0."""
    peak: float = 1.0
    """Multiplier at the end of the warm-up."""
    end_of_cycle: float = 0.3
    """Multiplier at the end of the first cycle.

    From there it falls at once to ``after``: a sharp fivefold drop (method 3.6)."""
    after: float = 0.06
    """Multiplier from then on."""

    def __post_init__(self) -> None:
        # Each message names the one field that is wrong by its dotted key (an experiment's override names it so);
        # ``not x >= 0`` also refuses NaN.
        if not self.warmup_steps >= 0:
            raise ConfigError(f"learner.schedule.warmup_steps: expected an integer >= 0, got {self.warmup_steps}")
        if not self.cycle_steps > self.warmup_steps:
            raise ConfigError(f"learner.schedule.cycle_steps: expected more than warmup_steps ({self.warmup_steps}), got {self.cycle_steps}")
        for name in ("start", "peak", "end_of_cycle", "after"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"learner.schedule.{name}: expected >= 0, got {getattr(self, name)}")


def lr_multiplier(step: int, cfg: ScheduleConfig) -> float:
    """The multiplier of the base learning rate at optimizer step ``step`` (0-based)."""
    if step < cfg.warmup_steps:
        return cfg.start + (cfg.peak - cfg.start) * step / cfg.warmup_steps
    if step < cfg.cycle_steps:
        frac = (step - cfg.warmup_steps) / (cfg.cycle_steps - cfg.warmup_steps)
        return cfg.peak + (cfg.end_of_cycle - cfg.peak) * frac
    return cfg.after
