"""One robot episode as plain numpy (``RobotEpisodeRecord``) and the builder the control loop fills step by step.

Plain numpy and no ``cosmos_policy``: a thin client builds it on the robot and ships it as is; the
job turns it into an ``Episode`` for replay (images JPEG-encoded there). Besides what replay keeps
(images, proprio, executed actions, the label) it keeps what a person needs to trust an episode:
which steps a human drove, which the envelope corrected or held, which chunks were acted on, and
the step timing.
"""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from actors.robots.chunks import Answer, Chunk
from actors.robots.config import RobotConfig
from actors.robots.observation import RobotObservation

MAX_NOTES = 50


@dataclass
class RobotEpisodeRecord:
    """A robot episode: per step what was seen and done, per episode how it ended and what went wrong."""

    robot_id: str
    instruction: str
    control_hz: float
    images: dict[str, np.ndarray]  # model camera name -> (T, H, W, 3) uint8, the images the policy saw
    proprio: np.ndarray  # (T, d_p) float32
    actions: np.ndarray  # (T, d_a) float32: executed, as the driver reported sending it (after the envelope)
    proposed: np.ndarray  # (T, d_a) float32: what the chunk, the teleop or the hold asked for, before the envelope
    intervention: np.ndarray  # (T,) bool: the teleop's action was executed
    clipped: np.ndarray  # (T,) bool: the envelope clipped to the limits or the workspace
    capped: np.ndarray  # (T,) bool: the envelope held the step to max_step
    held: np.ndarray  # (T,) bool: nothing to execute, the pose was held
    chunk_index: np.ndarray  # (T,) int: which of ``chunks`` the action came from (-1: teleop or hold)
    timestamps: np.ndarray  # (T,) float: time.time() of each observation
    tick_times: np.ndarray  # (T,) float: time.monotonic() at the start of each step (for jitter)
    success: bool | None  # the operator's label; None when it was not given
    interrupted: bool  # ended early (late chunk, stop, fault): its outcome is not a label
    reason: str  # why it ended: success, failure, rerecord, max_steps, or what interrupted it
    rerecord: bool = False  # the operator asked to discard it: the caller does not insert it
    counters: dict[str, int] = field(default_factory=dict)
    chunks: list[dict[str, Any]] = field(default_factory=list)  # per accepted chunk: versions, value, latency, skipped
    events: list[tuple[int, str]] = field(default_factory=list)  # (step, operator event) as they came
    notes: list[str] = field(default_factory=list)  # request failures and ignored events, the first MAX_NOTES of them
    driver: str = ""  # the driver class that played it (``package.module:Class``: which arm, or the simulated one)

    @property
    def steps(self) -> int:
        return len(self.actions)

    def versions(self) -> list[dict[str, int]]:
        """The weight versions of the chunks acted on, each once, in order."""
        out: list[dict[str, int]] = []
        for i in dict.fromkeys(int(c) for c in self.chunk_index if c >= 0):
            if self.chunks[i]["versions"] not in out:
                out.append(self.chunks[i]["versions"])
        return out

    def timing(self) -> dict[str, float]:
        """Step periods against the control rate: mean, worst, and the 99th percentile of lateness (seconds)."""
        if self.steps < 2:
            return {"mean_period_s": 0.0, "max_period_s": 0.0, "p99_jitter_s": 0.0}
        periods = np.diff(self.tick_times)
        jitter = np.abs(periods - 1.0 / self.control_hz)
        return {"mean_period_s": float(periods.mean()), "max_period_s": float(periods.max()),
                "p99_jitter_s": float(np.percentile(jitter, 99))}


class EpisodeBuilder:
    """Fills a ``RobotEpisodeRecord`` as the control loop steps."""

    def __init__(self, config: RobotConfig, instruction: str) -> None:
        self.config, self.instruction = config, instruction
        self.rows: list[dict[str, Any]] = []
        self.observed: list[float] = []  # each executed step's observation timestamp (monotonic, increasing)
        self.chunks: list[dict[str, Any]] = []
        self.counters: Counter[str] = Counter()
        self.events: list[tuple[int, str]] = []
        self.notes: list[str] = []

    def note(self, step: int, text: str) -> None:
        if len(self.notes) < MAX_NOTES:  # a source failing every step must not grow the record without bound
            self.notes.append(f"step {step}: {text}")

    def steps_since(self, observed_at: float) -> int:
        """Steps executed from the observation taken at ``observed_at`` on (a chunk's first actions were meant for them)."""
        return len(self.observed) - bisect.bisect_left(self.observed, observed_at)

    def add_chunk(self, chunk: Chunk, answer: Answer, skipped: int) -> int:
        self.chunks.append({"versions": dict(chunk.versions), "value": chunk.value, "length": len(chunk.actions), "skipped": skipped,
                            "observed_at": chunk.observed_at, "latency_s": answer.arrived_at - chunk.observed_at,
                            "request_s": answer.arrived_at - answer.sent_at, "extra": dict(chunk.extra)})
        return len(self.chunks) - 1

    def add_step(self, obs: RobotObservation, wall_time: float, tick: float, proposed: np.ndarray, executed: np.ndarray,
                 intervention: bool, clipped: bool, capped: bool, held: bool, chunk_index: int) -> None:
        self.observed.append(obs.timestamp)
        self.rows.append(dict(obs=obs, wall=wall_time, tick=tick, proposed=proposed, executed=executed, intervention=intervention,
                              clipped=clipped, capped=capped, held=held, chunk=chunk_index))

    def finish(self, reason: str, success: bool | None = None, interrupted: bool = False, rerecord: bool = False) -> RobotEpisodeRecord:
        cfg, rows = self.config, self.rows
        h, w = cfg.image_size
        flags = {k: np.array([r[k] for r in rows], dtype=bool) for k in ("intervention", "clipped", "capped", "held")}
        counters = dict(self.counters) | {
            "steps": len(rows), "clipped_steps": int(flags["clipped"].sum()), "capped_steps": int(flags["capped"].sum()),
            "held_steps": int(flags["held"].sum()), "intervention_steps": int(flags["intervention"].sum()),
        }
        for key in ("stale_chunks", "late_chunks", "failed_requests", "overruns"):
            counters.setdefault(key, 0)
        return RobotEpisodeRecord(
            robot_id=cfg.id, instruction=self.instruction, control_hz=cfg.control_hz,
            images={c: np.stack([r["obs"].images[c] for r in rows]) if rows else np.zeros((0, h, w, 3), np.uint8) for c in cfg.cameras},
            proprio=np.array([r["obs"].proprio for r in rows], dtype=np.float32).reshape(len(rows), len(cfg.proprio)),
            actions=np.array([r["executed"] for r in rows], dtype=np.float32).reshape(len(rows), len(cfg.actions)),
            proposed=np.array([r["proposed"] for r in rows], dtype=np.float32).reshape(len(rows), len(cfg.actions)),
            chunk_index=np.array([r["chunk"] for r in rows], dtype=np.int64),
            timestamps=np.array([r["wall"] for r in rows], dtype=np.float64),
            tick_times=np.array([r["tick"] for r in rows], dtype=np.float64),
            success=success, interrupted=interrupted, reason=reason, rerecord=rerecord,
            counters=counters, chunks=self.chunks, events=self.events, notes=self.notes, driver=cfg.driver.target, **flags,
        )
