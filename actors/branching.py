"""Branching collection: one initial state played once per planner candidate at a chosen query.

Episodes with the same seed and initial state that execute the same candidates at the queries
before the branch point, and candidate c at it, show what each chunk leads to from one state:
the contrast a value function needs to rank candidates (the learning proof's judge was trained on
these). ``Branching`` is a ``Policy`` wrapping the planner: a runner asked for a branching
episode (``EpisodeRunner.run(..., branch=[...])``: the main job's ``online.branch_states``,
``launch/collect.py --branch-query``) plans through it at the branched queries.
``branch_point_only`` keeps an episode's frames at its branch point alone, the frames such a
judge trains on.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from cosmos_policy.contracts import ActionChunk, Episode, Observation, Policy
from cosmos_policy.episode import ImageSequence
from cosmos_policy.errors import ConfigError


class Branching:
    """Executes candidate ``candidates[k]`` of ``planner``'s best-of-N at the k-th query of an episode.

    The last index is the branch point; the ones before it lead every branch of a state there.
    Later queries (if the runner asks) are ``planner``'s own choice.
    """

    def __init__(self, planner: Policy, candidates: Sequence[int]) -> None:
        seq = list(candidates)
        if not seq or any(isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c < 0 for c in seq):
            raise ConfigError(f"branch: expected a non-empty sequence of candidate indices (one per leading query), got {candidates!r}")
        self.planner, self.candidates = planner, [int(c) for c in seq]
        self.query = 0

    def infer(self, observation: Observation, seed: int | None = None) -> ActionChunk:
        chunk = self.planner.infer(observation, seed)
        if self.query < len(self.candidates):
            query = chunk.planner
            if query is None or query.candidate_actions is None:
                raise ConfigError("branch: the planner returned no candidates; branching needs a planning model")
            c, n = self.candidates[self.query], len(query.candidate_actions)
            if c >= n:
                raise ConfigError(f"branch: expected a candidate index in [0, {n}), got {c}")
            if c != query.chosen:  # the world model's prediction was the planner's choice's, not this candidate's
                chunk.future_proprio, chunk.future_images, chunk.latents = None, None, None
            query.chosen = c
            chunk.actions, chunk.value = query.candidate_actions[c], float(query.candidate_values[c])
        self.query += 1
        return chunk

    def reset(self) -> None:
        self.query = 0
        self.planner.reset()


def lead_candidates(state: int, seed: int, queries: int, candidates: int) -> list[int]:
    """The candidates a state's branching episodes execute at the queries before the branch point:
    drawn from the state and seed alone, so every branch of the state reaches the same branch point."""
    return [int(c) for c in np.random.default_rng([state, seed, 7]).integers(candidates, size=queries)]


def branch_step(episode: Episode) -> int:
    """The step of an episode's branch point: ``metadata["branch_step"]`` where recorded, else the planner's
    record of the last branched query (``metadata["branch_candidates"]``), else 0 (the first query)."""
    meta = episode.metadata
    if meta.get("branch_step") is not None:
        return int(meta["branch_step"])
    branched = len(meta.get("branch_candidates") or [])
    if branched and len(episode.planner) >= branched:
        return int(episode.planner[branched - 1].step)
    return 0


def branch_point_only(episode: Episode, chunk: int) -> Episode:
    """The episode with frames at its branch point and that sample's future step alone, so that every
    training sample it gives starts there: the query where a branching collection's episodes of one
    state differ only by the chunk executed."""
    step = branch_step(episode)
    if not 0 <= step < episode.num_steps:
        raise ConfigError(f"branch_step: expected a step of episode {episode.episode_id} (0..{episode.num_steps - 1}), got {step}")
    keep = {step, min(step + chunk, episode.num_steps - 1)}
    images = {c: ImageSequence([j if t in keep else b"" for t, j in enumerate(seq.jpegs)], origin=seq.origin)
              for c, seq in episode.images.items()}
    return dataclasses.replace(episode, images=images)
