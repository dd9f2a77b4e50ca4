"""The built-in Lift task on real robosuite physics: expert success rate, exact replay, observations, demos.

No mocks: every test steps MuJoCo. The 100-episode success-rate test runs in two simulator
processes (``EnvProcess``) at once so that the file stays well under a minute and a half on two
cores; it also shows the environment working from a child process.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("robosuite")
os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering; EnvProcess children inherit it

from actors.env import check_observation  # noqa: E402
from actors.env_process import EnvConfig, EnvProcess  # noqa: E402
from actors.envs.lift import INSTRUCTION, TASK, LiftEnv, upright  # noqa: E402
from actors.envs.lift_expert import expert_outcomes, make_demonstrations  # noqa: E402
from cosmos_policy.episode import Episode, Source  # noqa: E402
from cosmos_policy.errors import InputError  # noqa: E402

# A successful expert lifts the cube within 30 control steps on average and 37 at most (600
# episodes); 50 leaves room and keeps failing episodes, which run to the limit, short.
MAX_STEPS = 50


@pytest.fixture(scope="module")
def env():
    e = LiftEnv(max_steps=MAX_STEPS)
    yield e
    e.close()


@pytest.fixture(scope="module")
def workers():
    config = EnvConfig("lift", {"max_steps": MAX_STEPS})
    with ThreadPoolExecutor(2) as pool:  # each child takes seconds to import torch and build the model
        procs = list(pool.map(lambda _: EnvProcess(config, timeout_s=120), range(2)))
    yield procs
    for p in procs:
        p.close()


def test_spec_and_tasks(env):
    assert env.tasks() == ["lift"]
    assert env.instruction(TASK) == "lift the red cube"
    assert env.max_steps(TASK) == MAX_STEPS
    spec = env.spec
    assert spec.cameras == ("primary", "wrist") and spec.image_size == (64, 64)
    assert (spec.proprio_dim, spec.action_dim) == (9, 7)
    assert spec.action_low == (-1.0,) * 7 and spec.action_high == (1.0,) * 7
    with pytest.raises(InputError, match="task"):
        env.reset("stack", 0)


def test_expert_reaches_its_success_rate(workers):
    """60 of 100 episodes are meant to succeed; the physics must agree within 5 points."""
    n, p = 100, 0.6
    intended = expert_outcomes(n, p, seed=0)
    assert intended.sum() == 60 and np.array_equal(intended, expert_outcomes(n, p, seed=0))

    def play(k: int) -> list[tuple[int, bool, str]]:
        out = []
        for i in range(k, n, len(workers)):
            r = workers[k].call("expert_rollout", TASK, i, bool(intended[i]), None, False)
            out.append((i, r.success, r.mode))
        return out

    with ThreadPoolExecutor(len(workers)) as pool:
        results = sorted(x for part in pool.map(play, range(len(workers))) for x in part)
    observed = np.array([s for _, s, _ in results])
    modes = {m for _, _, m in results}
    assert modes == {"succeed", "miss", "drop"}  # both kinds of failure were tried
    assert abs(observed.mean() - p) <= 0.05, f"observed success rate {observed.mean():.2f}, configured {p}"
    assert (observed != intended).sum() <= 5


def test_recorded_episode_replays_exactly(env):
    """(seed, initial_state, actions) -> the same final simulator state and outcome, bit for bit."""
    start = env.initial_states(TASK)[3]
    for success in (True, False):
        rec = env.expert_rollout(TASK, 11, success, initial_state=start)
        assert np.array_equal(rec.initial_state, start)
        assert rec.success == success
        for seed in (11, 12345):  # once the initial state is given, the seed no longer matters
            env.reset(TASK, seed, initial_state=rec.initial_state)
            for a in rec.actions:
                result = env.step(a, render=False)
            assert result.done
            assert result.success == rec.success
            assert np.array_equal(env.get_state(), rec.final_state)


def test_initial_states_are_seeded_resets(env):
    states = env.initial_states(TASK)
    assert len(states) == 50 and all(s.shape == states[0].shape and s.dtype == np.float64 for s in states)
    env.reset(TASK, 7)
    assert np.array_equal(env.get_state(), states[7])
    assert not np.array_equal(states[0], states[1])
    # A restored state is what the observation shows, not the seed's own placement.
    own = env.reset(TASK, 2)
    restored = env.reset(TASK, 1, initial_state=states[2])
    assert np.array_equal(own.proprio, restored.proprio)
    for cam in own.images:
        assert np.array_equal(own.images[cam], restored.images[cam])


def test_observations_and_actions(env):
    obs = env.reset(TASK, 0)
    check_observation(obs, env.spec, rendered=True)
    assert obs.instruction == INSTRUCTION
    for cam in ("primary", "wrist"):
        assert obs.images[cam].dtype == np.uint8 and obs.images[cam].shape == (64, 64, 3)
    assert obs.proprio.shape == (9,) and np.isclose(np.linalg.norm(obs.proprio[5:]), 1.0)
    assert np.allclose(obs.proprio[2:5], env.gripper_position())
    # Upright, as LIBERO's frames: the wrist camera's fingers are at the bottom, the table above them.
    wrist = obs.images["wrist"].astype(float)
    assert wrist[-6:].mean() < wrist[:6].mean() - 40
    raw = env._env.sim.render(width=64, height=64, camera_name="robot0_eye_in_hand")
    assert np.array_equal(upright(raw), obs.images["wrist"])

    quiet = env.step(np.zeros(7), render=False)
    assert quiet.observation.images == {}
    check_observation(quiet.observation, env.spec, rendered=False)
    loud = env.step(np.zeros(7), render=True)
    check_observation(loud.observation, env.spec, rendered=True)
    assert loud.info["steps"] == 2 and not loud.done

    before = env.get_state()
    bad = np.zeros(7)
    bad[2] = np.nan
    with pytest.raises(InputError, match="non-finite"):
        env.step(bad)
    with pytest.raises(InputError, match="shape"):
        env.step(np.zeros(6))
    assert np.array_equal(env.get_state(), before)
    env.step(np.zeros(7), render=False)  # the episode goes on after a refused action
    with pytest.raises(InputError, match="initial_state"):
        env.reset(TASK, 0, initial_state=np.zeros(5))


def test_episode_ends_at_the_step_limit(env):
    env.reset(TASK, 0)
    for t in range(MAX_STEPS):
        result = env.step(np.zeros(7), render=False)
        assert result.done == (t == MAX_STEPS - 1) and not result.success
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.zeros(7))


def test_make_demonstrations(env):
    episodes = make_demonstrations(4, 0.5, seed=0, env=env)
    assert len(episodes) == 4
    assert sum(ep.success for ep in episodes) == 2
    for ep in episodes:
        assert isinstance(ep, Episode) and ep.source == Source.DEMO and ep.task == TASK
        assert ep.instruction == INSTRUCTION and ep.seed is not None and ep.initial_state is not None
        assert ep.success == ep.metadata["intended_success"]
        assert ep.actions.shape[1] == 7 and ep.proprio.shape[1] == 9
        assert ep.success or ep.num_steps == MAX_STEPS
        for cam in ("primary", "wrist"):
            assert len(ep.images[cam]) == ep.num_steps  # a frame at every step
            assert ep.frame(cam, ep.num_steps - 1).shape == (64, 64, 3)
    # The stored (float32) actions replay the demonstration exactly.
    ep = episodes[0]
    env.reset(TASK, ep.seed, initial_state=ep.initial_state)
    for a in ep.actions:
        result = env.step(a, render=False)
    assert result.done and result.success == ep.success
    # Shares made apart (the main job's parallel makers) are the same episodes as one call's.
    shares = make_demonstrations(4, 0.5, seed=0, env=env, indices=range(1, 3)) + make_demonstrations(4, 0.5, seed=0, env=env, indices=range(3, 4))
    for mine, whole in zip(shares, episodes[1:], strict=True):
        assert mine.seed == whole.seed and mine.success == whole.success and np.array_equal(mine.actions, whole.actions)


def test_env_process(workers):
    proc = workers[0]
    assert proc.spec.cameras == ("primary", "wrist")
    assert proc.tasks() == ["lift"]
    obs = proc.reset(TASK, 3)
    check_observation(obs, proc.spec, rendered=True)
    for _ in range(3):
        action = proc.call("expert_action")
        assert action.shape == (7,) and np.all(np.abs(action) <= 1.0)
        result = proc.step(action, render=False)
        assert not result.done and result.observation.images == {}
    assert proc.get_state().shape == proc.initial_states(TASK)[0].shape
    with pytest.raises(InputError):
        proc.step(np.full(7, np.nan))
    proc.close()
    assert not proc.alive()
