"""How an episode becomes Reverb items, and a drawn item a ``StepWindow``.

One Reverb item per step a training sample can start from (``Episode.sample_steps``: frames at t and
at t + K). An episode is appended step by step to a ``TrajectoryWriter`` (per step: the JPEG bytes of
every camera as a ``tf.string`` vector, proprio, the action; at step 0 only: the episode's facts),
then one item per such step is created over slices of that
history: the frames and proprio at t and at min(t + K, T - 1), the actions a[t : t + K] (padded
with the last action when sampled) and the facts. Items of one episode share the chunks; a
sample yields exactly the step's ``StepWindow``. Every table gets a Reverb signature
(``replay.reverb_server.item_signature``; dimensions our ``Signature`` leaves open stay open).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import reverb

from cosmos_policy.episode import Episode, Source, StepWindow
from replay.config import TableConfig

Drawn = tuple[dict[str, Any], dict[str, Any]]  # (key, probability, priority, times_sampled), the item's data


def write_items(client: Any, cfg: TableConfig, episode: Episode, priorities: np.ndarray, seq: int, steps: np.ndarray) -> None:
    """All steps into a TrajectoryWriter, then one item per step of ``steps`` over slices of that history."""
    k, t, cams = cfg.window, episode.num_steps, episode.cameras
    jpegs = [episode.images[c].jpegs for c in cams]
    writer = client.trajectory_writer(num_keep_alive_refs=t)
    try:
        for step in range(t):
            data: dict[str, Any] = {
                "step": np.int32(step),
                "jpeg": np.array([j[step] for j in jpegs], dtype=object),
                "proprio": episode.proprio[step],
                "action": episode.actions[step],
            }
            if step == 0:  # per-episode facts: appended once, referenced by every item
                data["facts"] = {
                    "episode_id": episode.episode_id,
                    "seq": np.int64(seq),
                    "num_steps": np.int32(t),
                    "cameras": np.array(cams, dtype=object),
                    "instruction": episode.instruction,
                    "success": np.bool_(episode.success),
                    "score": np.float64(episode.score),
                    "source": episode.source.value,
                    "policy_version": np.int64(episode.policy_version or 0),
                    "has_policy_version": np.bool_(episode.policy_version is not None),
                    "planning_version": np.int64(episode.planning_version or 0),
                    "has_planning_version": np.bool_(episode.planning_version is not None),
                    "origin": str(episode.metadata.get("file", "")),
                    "dims": np.array([len(cams), episode.proprio.shape[1], episode.actions.shape[1]], dtype=np.int32),
                }
            writer.append(data)
        h, facts = writer.history, writer.history["facts"]
        for step in (int(s) for s in steps):
            future = min(step + k, t - 1)
            stop = step + k if step + k < t else None  # the history's slices need None to reach the end
            item = {name: facts[name][0] for name in facts}
            item.update({
                "step": h["step"][step], "current": h["jpeg"][step], "future": h["jpeg"][future],
                "actions": h["action"][step:stop], "proprio": h["proprio"][step], "future_proprio": h["proprio"][future],
            })
            writer.create_item(cfg.name, float(priorities[step]), item)
        writer.flush()
        writer.end_episode()
    finally:
        writer.close()


def draw(address: str, cfg: TableConfig, signature: dict[str, Any], count: int, timeout_ms: int) -> list[Drawn]:
    """``count`` items from Reverb (fewer when its rate limiter times out).

    Decoded as one padded batch (4x faster than item by item), then each row is cut back to its
    own shape with its ``dims``.
    """
    dataset = reverb.TrajectoryDataset(
        address, cfg.name,
        dtypes={k: s.dtype for k, s in signature.items()}, shapes={k: s.shape for k, s in signature.items()},
        max_in_flight_samples_per_worker=min(count, 256), num_workers_per_iterator=1,  # one worker: FIFO order holds
        rate_limiter_timeout_ms=timeout_ms, max_samples=count,
    )
    rows = []
    for batch in dataset.padded_batch(count).as_numpy_iterator():
        info, data = batch.info, batch.data
        for i in range(len(info.key)):
            (cams, proprio_dim, action_dim), step, t = data["dims"][i], int(data["step"][i]), int(data["num_steps"][i])
            row = {k: v[i] for k, v in data.items()}
            row.update({
                "cameras": data["cameras"][i, :cams],
                "current": data["current"][i, :cams], "future": data["future"][i, :cams],
                "actions": data["actions"][i, : min(cfg.window, t - step), :action_dim],
                "proprio": data["proprio"][i, :proprio_dim], "future_proprio": data["future_proprio"][i, :proprio_dim],
            })
            meta = {"key": int(info.key[i]), "probability": float(info.probability[i]), "priority": float(info.priority[i]),
                    "times_sampled": int(info.times_sampled[i])}
            rows.append((meta, row))
    return rows


def step_window(cfg: TableConfig, data: dict[str, Any]) -> StepWindow:
    """The ``StepWindow`` a drawn item holds."""
    step, t = int(data["step"]), int(data["num_steps"])
    cams = [c.decode() for c in data["cameras"]]
    actions = data["actions"]
    if len(actions) < cfg.window:  # the chunk past the episode's end repeats its last action
        actions = np.concatenate([actions, np.repeat(actions[-1:], cfg.window - len(actions), axis=0)], axis=0)
    return StepWindow(
        episode_id=data["episode_id"].decode(), step=step, future_step=min(step + cfg.window, t - 1), num_steps=t,
        current=dict(zip(cams, (bytes(j) for j in data["current"]), strict=True)),
        future=dict(zip(cams, (bytes(j) for j in data["future"]), strict=True)),
        actions=actions, proprio=data["proprio"], future_proprio=data["future_proprio"],
        instruction=data["instruction"].decode(), success=bool(data["success"]), score=float(data["score"]),
        source=Source(data["source"].decode()),
        policy_version=int(data["policy_version"]) if data["has_policy_version"] else None,
        planning_version=int(data["planning_version"]) if data["has_planning_version"] else None, origin=data["origin"].decode(),
    )
