"""Best-of-N planning with a world model and a value function (method section 5).

Dual deployment: the *policy* model proposes N action chunks, each from its own seed (the
official parallel mode reuses seeds when N exceeds the GPU count; here every candidate has its
own); the *planning* model, fine-tuned on rollouts, judges them:
1. for each candidate it predicts the future state F times, autoregressively (the generated
   action frame is conditioning; nothing is re-encoded), with the step schedule 1, 3, 5;
2. for each future state it predicts the value V times with the V(s') input masking (current
   state and action masked out), steps 1, 2, 3, 4, 5, giving F x V values per candidate;
3. the values are aggregated (majority mean by default: if at least half exceed the success
   threshold 0.05, the mean of those, else 0) and the best candidate is executed; the first
   candidate keeps ties (another replaces it only when strictly better).
All candidates, ensemble members and observations of a call share batched passes: rows with
different step counts run in one sampler loop, at most ``max_batch`` rows per forward pass,
and the observation's conditioning frames are VAE-encoded once per model.
Depth > 1 re-plans from an imagined future: the first predicted future state is moved into the
current-state frames and one more action, future and value round is predicted.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from cosmos_policy.codec import tile_into_frame, untile_from_frame
from cosmos_policy.errors import ConfigError, InputError
from cosmos_policy.layout import SampleKind, SlotKind, SlotTime
from cosmos_policy.model import CosmosPolicyModel, ModelBatch
from cosmos_policy.config import AGGREGATIONS, PlannerConfig
from cosmos_policy.contracts import ActionChunk, Observation
from cosmos_policy.episode import PlannerQuery
from cosmos_policy.policy import CosmosPolicy, PreparedBatch
from cosmos_policy.weights import check_state, version_number



def aggregate(values: np.ndarray, scheme: str, threshold: float = 0.05, lcb_k: float = 1.0) -> np.ndarray:
    """Aggregate value predictions over the last axis (method 5.1 step 4).

    majority_mean: mean of the predictions above ``threshold`` if they are at least half, else 0;
    mean: the mean; lcb: mean - k * std (population std); success_vote: the fraction above
    ``threshold``. Results of majority_mean are clipped to [0, 1].
    """
    v = np.asarray(values, dtype=np.float64)
    if scheme == "mean":
        return v.mean(-1)
    if scheme == "lcb":
        return v.mean(-1) - lcb_k * v.std(-1)
    above = v > threshold
    if scheme == "success_vote":
        return above.mean(-1)
    if scheme == "majority_mean":
        count = above.sum(-1)
        total = np.where(above, v, 0.0).sum(-1)
        mean_above = np.divide(total, count, out=np.zeros_like(total), where=count > 0)
        return np.clip(np.where(count >= 0.5 * v.shape[-1], mean_above, 0.0), 0.0, 1.0)
    raise ConfigError(f"planner.aggregation: expected one of {AGGREGATIONS}, got {scheme!r}")


class Planner:
    """Proposes with ``policy``'s model, judges with ``planning_model``: a ``Policy`` whose chunks carry the planner's record.

    ``infer`` returns the chosen candidate as an ``ActionChunk`` whose ``planner`` is a
    ``PlannerQuery`` (every candidate's chunk and aggregated value, the raw member values, the
    seeds, the choice) and whose versions are the policy's and the planning model's.
    """

    def __init__(self, policy: CosmosPolicy, planning_model: CosmosPolicyModel, config: PlannerConfig | None = None) -> None:
        if planning_model.layout != policy.model.layout:
            raise ConfigError(f"planning model layout {planning_model.layout.name!r} differs from the policy's {policy.model.layout.name!r}")
        self.policy = policy
        self.planning = planning_model.eval()
        if policy.config.prefix_encode and planning_model._prefix_encoder is None:
            planning_model.enable_prefix_encoder()
        self.config = config or PlannerConfig()
        self.forward_rows = 0  # network evaluations x rows, for cost accounting
        self.version: int | None = None  # the planning model's weight version

    def check_weights(self, state: dict[str, torch.Tensor], version: Any, finite: bool = True) -> int:
        """``CosmosPolicy.check_weights`` for the planning model's network; returns the version as an int."""
        where = f"planning weights (version {version!r})"
        number = version_number(version, where)
        check_state(state, self.planning.denoiser.net.state_dict(), where, finite)
        return number

    def load_weights(self, state: dict[str, torch.Tensor], version: int) -> None:
        """A published version of the planning model's network (the policy's own loads through ``policy``).

        Checked whole first: a refused version raises ``CheckpointError`` and leaves the model as it was."""
        number = self.check_weights(state, version)
        self.planning.denoiser.net.load_state_dict(state)
        self.version = number

    def reset(self) -> None:
        self.policy.reset()

    # ---- sampling helpers ----------------------------------------------------------------
    def _sample(self, model: CosmosPolicyModel, kind: SampleKind, text: torch.Tensor, clean: torch.Tensor,
                steps: list[int], seeds: list[int]) -> torch.Tensor:
        """Latents for rows of one kind, at most ``max_batch`` rows per batched loop."""
        out = []
        m = self.config.max_batch
        for i in range(0, len(seeds), m):
            sl = slice(i, i + m)
            batch = ModelBatch(kinds=[kind] * len(seeds[sl]), text=text[sl])
            out.append(model.sample(batch, steps=steps[sl], seed=seeds[sl], clean_latents=clean[sl]).latents)
            self.forward_rows += sum(steps[sl])
        return torch.cat(out)

    # ---- planning ------------------------------------------------------------------------
    @torch.no_grad()
    def infer(self, observation: Observation, seed: int | None = None) -> ActionChunk:
        return self.plan_batch([observation], [0 if seed is None else seed])[0]

    @torch.no_grad()
    def plan_batch(self, observations: Sequence[Observation], seeds: Sequence[int],
                   prepared: PreparedBatch | None = None) -> list[ActionChunk]:
        """One plan per observation; ``prepared``: their inputs made ahead by ``CosmosPolicy.prepare`` (else here)."""
        cfg = self.config
        n, obs_count = cfg.num_candidates, len(observations)
        if prepared is None:
            prepared = self.policy.prepare(observations)
        elif prepared.batch.batch_size != obs_count:
            raise InputError(f"prepared: expected a batch of {obs_count} observations, got {prepared.batch.batch_size}")
        prepared.use()
        batch, cond = prepared.batch, prepared.conditioning
        shared_vae = self.planning.tokenizer.vae is self.policy.model.tokenizer.vae
        plan_cond = cond if shared_vae else self.planning.conditioning(batch)

        rep = torch.arange(obs_count).repeat_interleave(n)  # row -> observation
        cand_seeds = [int(seeds[o]) + c for o in range(obs_count) for c in range(n)]
        text = batch.text[rep]
        candidates = self._sample(self.policy.model, SampleKind.POLICY, text, cond[rep],
                                  [self.policy.config.action_steps] * len(cand_seeds), cand_seeds)
        if cfg.candidate_noise > 0:
            candidates = self._explore(candidates, cand_seeds, n)
        candidates = self._as_executed(candidates)
        judge_seeds = [int(seeds[o]) for o in range(obs_count) for _ in range(n)] if cfg.common_judge_seeds else cand_seeds
        values, futures = self._judge(plan_cond[rep], candidates, text, judge_seeds)
        depth_values = [values]
        for _ in range(cfg.depth - 1):
            imagined = self._imagine(plan_cond[rep], futures)
            nxt = self._sample(self.policy.model, SampleKind.POLICY, text, imagined,
                               [self.policy.config.action_steps] * len(cand_seeds), [s + 7919 for s in cand_seeds])
            values, futures = self._judge(imagined, nxt, text, [s + 7919 for s in judge_seeds])
            depth_values.append(values)
        members = depth_values[-1]  # (rows, members)
        scores = aggregate(members, cfg.aggregation, cfg.success_threshold, cfg.lcb_k)
        if cfg.depth > 1 and cfg.depth_value == "mean":
            scores = np.mean([aggregate(v, cfg.aggregation, cfg.success_threshold, cfg.lcb_k) for v in depth_values], axis=0)

        policy_outputs = self.policy.outputs(self.policy.model.read_outputs(candidates), batch=None)
        plans = []
        for o in range(obs_count):
            rows = slice(o * n, (o + 1) * n)
            cand_scores = scores[rows]
            chosen = int(np.argmax(cand_scores))  # argmax keeps the first of equal values
            out = policy_outputs[o * n + chosen]
            wm = self.planning.read_outputs(futures[o * n + chosen : o * n + chosen + 1])
            if wm.future_proprio is not None and self.policy.model.layout.has_proprio:
                out.future_proprio = self.policy.stats.unnormalize_proprio(wm.future_proprio.double().cpu()).float().numpy()[0]
            out.value = float(cand_scores[chosen])
            out.planner = PlannerQuery(step=0, candidate_values=cand_scores.astype(np.float32), chosen=chosen,
                                       candidate_actions=np.stack([p.actions for p in policy_outputs[rows]]),
                                       member_values=members[rows].astype(np.float32), seeds=cand_seeds[rows])
            out.planning_version = self.version
            plans.append(out)
        self.policy.queries += obs_count
        return plans

    def _explore(self, candidates: torch.Tensor, cand_seeds: list[int], n: int) -> torch.Tensor:
        """Offset the action chunks of all but each observation's first candidate (``candidate_noise``)."""
        layout, frame = self.policy.model.layout, self.policy.model.frame_shape
        a = layout.action_index
        out = candidates.clone()
        rows = [r for r in range(len(cand_seeds)) if r % n]
        if not rows:
            return out
        actions = untile_from_frame(candidates[rows, :, a].float(), layout.action_size).view(len(rows), layout.action_chunk, layout.action_dim)
        offsets = torch.stack([torch.randn(layout.action_dim, generator=torch.Generator().manual_seed(cand_seeds[r] + 30_000)) for r in rows])
        moved = (actions + self.config.candidate_noise * offsets.to(actions.device)[:, None, :]).clamp(-1.0, 1.0)
        out[rows, :, a] = tile_into_frame(moved.reshape(len(rows), -1), frame).to(out.dtype)
        return out

    def _as_executed(self, candidates: torch.Tensor) -> torch.Tensor:
        """Candidates as they will be executed, for the judge: action dimensions the demonstrations never
        varied are executed as their constant (``NormalizationStats.unnormalize_actions``), so the judge
        sees that constant there, as in every training sample, not the policy's sampling noise or an
        exploration offset that the robot will never perform."""
        stats = self.policy.stats
        held = stats.held_action_dims()
        if not held.any():
            return candidates
        layout, frame = self.policy.model.layout, self.policy.model.frame_shape
        a = layout.action_index
        actions = untile_from_frame(candidates[:, :, a].float(), layout.action_size).view(len(candidates), layout.action_chunk, layout.action_dim)
        constant = stats.normalize_actions(torch.tensor(np.asarray(stats.actions_mean, dtype=np.float64)[None])).float()[0]
        mask = torch.from_numpy(held).to(actions.device)
        actions[:, :, mask] = constant.to(actions.device)[mask]
        out = candidates.clone()
        out[:, :, a] = tile_into_frame(actions.reshape(len(candidates), -1), frame).to(out.dtype)
        return out

    def _judge(self, cond: torch.Tensor, candidates: torch.Tensor, text: torch.Tensor, cand_seeds: list[int]) -> tuple[np.ndarray, torch.Tensor]:
        """Member values (rows, F x V) of each candidate, and each candidate's first future state."""
        cfg, layout = self.config, self.planning.layout
        rows = len(cand_seeds)
        # The candidate's generated action frame becomes conditioning; its state frames are the observation's.
        with_action = cond.clone()
        a = layout.action_index
        with_action[:, :, a] = candidates[:, :, a]
        f_count, v_count = len(cfg.future_steps), len(cfg.value_steps)
        if cfg.value_kind == "q_value":  # model-free: value from (s, a), no world model
            rep = torch.arange(rows).repeat_interleave(v_count)
            seeds = [s + 20_000 + v for s in cand_seeds for v in range(v_count)]
            latents = self._sample(self.planning, SampleKind.Q_VALUE, text[rep], with_action[rep], list(cfg.value_steps) * rows, seeds)
            values = self.planning.read_outputs(latents).value.cpu().numpy().reshape(rows, v_count)
            return values, with_action
        rep_f = torch.arange(rows).repeat_interleave(f_count)
        f_seeds = [s + 10_000 + f for s in cand_seeds for f in range(f_count)]
        futures = self._sample(self.planning, SampleKind.WORLD_MODEL, text[rep_f], with_action[rep_f], list(cfg.future_steps) * rows, f_seeds)
        rep_v = torch.arange(rows * f_count).repeat_interleave(v_count)
        v_seeds = [s + 20_000 + v for s in f_seeds for v in range(v_count)]
        kind = SampleKind(cfg.value_kind)
        latents = self._sample(self.planning, kind, text[rep_f][rep_v], futures[rep_v], list(cfg.value_steps) * rows * f_count, v_seeds)
        values = self.planning.read_outputs(latents).value.cpu().numpy().reshape(rows, f_count * v_count)
        return values, futures[::f_count]

    def _imagine(self, cond: torch.Tensor, futures: torch.Tensor) -> torch.Tensor:
        """Conditioning whose current state is a predicted future state (for depth > 1)."""
        layout = self.planning.layout
        out = cond.clone()
        for i, slot in enumerate(layout.slots):
            if slot.time is not SlotTime.CURRENT:
                continue
            name = f"future_image.{slot.camera}" if slot.kind is SlotKind.IMAGE else "future_proprio"
            out[:, :, i] = futures[:, :, layout.index(name)]
        return out
