"""Eval-gated promotion (``launch.promotion``): the registry's statuses, a damaged version rejected and never served,
and a promoted version that fails live rolled back, with the actors served the version before it again.

Real parts throughout: a local Ray cluster, the weight registry, two PolicyServers (the actors' and the gate's) serving
the tiny model from a checkpoint on disk, and EnvRunners playing an environment of the tests' own (``hold_env``: the
built-in Lift task is never solved by a tiny model, so every version would tie there).
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import torch

from actors.env_process import EnvConfig
from actors.env_runner import EnvRunner, RunnerConfig
from actors.policies import PolicySpec, ServerPolicy
from actors.policy_server import PolicyServer, ServerConfig
from cosmos_policy.checkpoint import save_checkpoint
from cosmos_policy.codec import NormalizationStats
from cosmos_policy.model import CosmosPolicyModel
from cosmos_policy.policy import PolicyConfig
from cosmos_policy.text import RandomTextEncoder, TextEmbeddingCache
from cosmos_policy.weights import pack
from hold_env import INSTRUCTION, TASK
from launch.promotion import Promotion, PromotionConfig, gate_states, paired_difference
from learner.publish import RegistryWeights, WeightRegistry


# hold_env is this directory's: the runners' simulator processes import it from here (an environment of a user's own is
# importable on every node the same way, by PYTHONPATH or an installed package).
HERE_IMPORTABLE = {"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))}}


def _packed(value: float) -> dict:
    return pack({"w": torch.full((4,), value)})


def test_the_registry_serves_promoted_versions_only_and_rolls_back_to_the_one_before(ray_local) -> None:
    weights = RegistryWeights(WeightRegistry.remote(gated=True), verify_threads=1)
    weights.publish(_packed(0.0), 0, 0, "policy", "promoted")  # the job's starting weights
    weights.publish(_packed(1.0), 1, 10, "policy")  # the learner's publication: a candidate
    assert weights.latest("policy")[0].version == 0 and weights.latest("policy", have=0) is None
    assert float(weights.version("policy", 1)[1]["w"][0]) == 1.0  # the gate can play it
    assert weights.decide("policy", 1, "rejected", {"success": 0.1}) == 0
    with pytest.raises(ray.exceptions.RayTaskError, match="not a candidate"):
        weights.decide("policy", 1, "promoted", {})
    weights.publish(_packed(2.0), 2, 20, "policy")
    weights.pin("policy", 2)  # the round's last version: the gate plays it after the learner published more
    for v in (3, 4, 5):
        weights.publish(_packed(float(v)), v, 10 * v, "policy")
    assert weights.version("policy", 5) and weights.version("policy", 2)
    with pytest.raises(KeyError, match="policy version 3: not published, or its weights were let go"):
        weights.version("policy", 3)  # neither pinned nor among the newest two candidates
    assert weights.decide("policy", 2, "promoted", {"success": 0.9}) == 2
    assert weights.latest("policy", have=0)[0].version == 2
    assert weights.roll_back("policy", 2, {"live_success": 0.0}) == 0
    got = weights.latest("policy", have=2)  # an older version is served again: readers that hold 2 take it
    assert got[0].version == 0 and float(got[1]["w"][0]) == 0.0
    with pytest.raises(ray.exceptions.RayTaskError, match="no policy version promoted before 0"):
        weights.roll_back("policy", 0, {})
    table = {row["version"]: row for row in weights.table("policy")}
    assert {v: r["status"] for v, r in table.items()} == {0: "promoted", 1: "rejected", 2: "rolled_back", 3: "candidate", 4: "candidate",
                                                          5: "candidate"}
    assert table[1]["evaluation"] == {"success": 0.1} and table[2]["evaluation"] == {"success": 0.9, "live_success": 0.0}
    ungated = RegistryWeights(WeightRegistry.remote(), verify_threads=1)  # promotion.enabled false: served as published
    ungated.publish(_packed(3.0), 3, 30, "policy")
    assert ungated.latest("policy")[0].version == 3 and ungated.table()[0]["status"] == "promoted"


def test_the_paired_difference_counts_each_state_once_on_both_sides() -> None:
    served = {("t", 1): True, ("t", 2): True, ("t", 3): False, ("t", 4): True}
    candidate = {("t", 1): False, ("t", 2): True, ("t", 3): True, ("t", 5): True}  # state 4 and 5 were played by one side only
    d = paired_difference(candidate, served)
    assert d["episodes"] == 3 and d["only_candidate"] == 1 and d["only_served"] == 1 and d["difference"] == 0.0
    states = gate_states(["a", "b"], 5, seed=0)  # the same every gate, five placements per task
    assert len(set(states)) == 10 and states == gate_states(["a", "b"], 5, seed=0) and states != gate_states(["a", "b"], 5, seed=1)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_config, libero) -> Path:
    """The tiny model, untrained: its actions are small, so it holds the puck in."""
    rng = np.random.default_rng(0)
    stats = NormalizationStats.compute(rng.uniform(-1, 1, (200, 7)), rng.uniform(-0.5, 0.5, (200, 9)))
    text = TextEmbeddingCache()
    text.fill(RandomTextEncoder(tiny_config.text.embed_dim, tiny_config.text.max_length), [INSTRUCTION])
    path = tmp_path_factory.mktemp("promotion") / "policy"
    save_checkpoint(path, CosmosPolicyModel.build(tiny_config, libero, seed=0), stats=stats, text=text, metadata={"version": 0})
    return path


def test_a_damaged_version_is_rejected_and_a_promoted_one_that_fails_live_is_rolled_back(ray_local, checkpoint: Path, tiny_config,
                                                                                          libero) -> None:
    weights = RegistryWeights(WeightRegistry.remote(gated=True), verify_threads=1)
    spec = PolicySpec(checkpoint=str(checkpoint), policy=PolicyConfig(action_steps=2))
    served_to_actors = PolicyServer.remote(spec, ServerConfig(poll_weights_s=0.05), weights)
    gate_server = PolicyServer.remote(spec, ServerConfig(poll_weights_s=0), weights)  # the gate's own: it never polls
    config = RunnerConfig(env=EnvConfig("hold_env:HoldEnv", {"max_steps": 16}), execute=16, record=False)
    runner = EnvRunner.options(runtime_env=HERE_IMPORTABLE)
    actor = runner.remote(config, ServerPolicy(served_to_actors), None, None)
    gate_runners = [runner.remote(config, ServerPolicy(gate_server), None, None) for _ in range(2)]
    records: list[dict] = []
    strict = PromotionConfig(states=8, tolerance=0.1, live_window=6, live_tolerance=0.2, plan=False)
    promotion = Promotion(strict, weights, gate_server, gate_runners, [TASK], log=lambda kind, r: records.append(r), say=lambda _: None)
    assert promotion.begin(["policy"]) == {"policy": 0}  # the starting weights are the first promoted version

    seen: set[int] = set()  # every version the actors' server serves, sampled throughout
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            seen.add(ray.get(served_to_actors.versions.remote())["policy"])
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()

    def live(episodes: int, first_seed: int) -> list:
        return ray.get([actor.run.remote(TASK, first_seed + i, None, None, False, False) for i in range(episodes)])

    assert all(r.success and r.policy_version == 0 for r in live(3, 100))
    net = CosmosPolicyModel.build(tiny_config, libero, seed=0).denoiser.net.state_dict()  # the checkpoint's weights
    damaged = {k: v * (1000.0 if k == "proj_out.weight" else 1.0) for k, v in net.items()}  # wild actions: the puck is pushed out
    weights.publish(pack(damaged), 1, 50, "policy")  # as the learner publishes: a candidate

    record = promotion.gate({"policy": 1}, round_=1)
    assert record["status"] == "rejected" and record["episodes"] == 8, record
    assert record["success"] <= 0.25 and record["served_success"] >= 0.75, record
    assert all(r.policy_version == 0 for r in live(3, 200))

    # The same damage through a gate that lets everything pass (tolerance 1): promoted and served, it fails live.
    lenient = Promotion(dataclasses.replace(strict, tolerance=1.0), weights, gate_server, gate_runners, [TASK],
                        log=lambda kind, r: records.append(r), say=lambda _: None)
    lenient.begin(["policy"])
    weights.publish(pack(damaged), 2, 100, "policy")
    assert lenient.gate({"policy": 2}, round_=2)["status"] == "promoted"
    _until(lambda: ray.get(served_to_actors.versions.remote())["policy"] == 2)
    failing = live(6, 300)
    assert all(r.policy_version == 2 and not r.success for r in failing)
    rollback = lenient.observe(failing)
    assert rollback is not None and rollback["status"] == "rolled_back" and rollback["serving_again"] == {"policy": 0}, rollback
    _until(lambda: ray.get(served_to_actors.versions.remote())["policy"] == 0)  # the actors are served version 0 again
    assert all(r.success and r.policy_version == 0 for r in live(3, 400))
    done.set()
    watcher.join()

    assert 1 not in seen and {0, 2} <= seen  # the rejected version never reached the actors
    table = {row["version"]: row for row in weights.table("policy")}
    assert {v: r["status"] for v, r in table.items()} == {0: "promoted", 1: "rejected", 2: "rolled_back"}
    assert table[1]["evaluation"]["difference"] < -0.1 and table[2]["evaluation"]["live_success"] == 0.0
    assert [r["status"] for r in records] == ["rejected", "promoted", "rolled_back"]


def _until(condition, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
