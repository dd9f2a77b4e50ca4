"""Simulator throughput on this machine (issue 6).

Prints and writes bench/results/env_speed.json:
    builtin_env_steps_per_s_per_core  the built-in Lift task, two 64x64 cameras rendered every 16th step,
                                      one process pinned to one core (target >= 100)
    libero_env_steps_per_s_per_core   LIBERO (libero_spatial task 0) with two cameras rendered every 16th
                                      step, one core (target >= 40); at 256 (what the adapter renders) and 224
    episodes_per_hour_2_runners       two EnvRunner actors on the built-in task with the tiny policy served
                                      by a PolicyServer (100-step episodes, a query every 16 steps)

Steps per second per core are steps per CPU-second of the pinned process (all its threads: Mesa's
llvmpipe rasterizes in threads of its own, pinned to the same core), counted over the steps only
(resets, once per episode, are not). On an idle machine that equals steps per wall-clock second;
on a shared one it does not count the time other processes hold the core. The wall-clock figures
are written too (``*_wall``), with the load average over the run.

    python bench/env_speed.py [--seconds 20] [--skip-libero] [--skip-runners]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

OUT = ROOT / "bench" / "results" / "env_speed.json"


def steps_per_s(name: str, kwargs: dict, seconds: float, every: int = 16) -> dict[str, float]:
    """Env steps per CPU-second (``cpu``) and per wall-clock second (``wall``) in a child process
    pinned to one core, rendering every ``every`` steps."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_measure, args=(name, kwargs, seconds, every, q))
    p.start()
    value = q.get()
    p.join()
    return value


def _measure(name: str, kwargs: dict, seconds: float, every: int, q) -> None:
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    from actors.env_process import EnvConfig, make_env

    env = make_env(EnvConfig(name, kwargs))
    task = env.tasks()[0]
    states = env.initial_states(task)
    rng = np.random.default_rng(0)
    steps, busy, cpu = 0, 0.0, 0.0
    while busy < seconds:
        env.reset(task, 0, states[0] if states else None)  # resets are not counted: once per episode
        busy_start, cpu_start = time.perf_counter(), time.process_time()
        for t in range(env.max_steps(task)):
            result = env.step(rng.uniform(-0.3, 0.3, env.spec.action_dim), render=(t + 1) % every == 0)
            steps += 1
            if result.done:
                break
        busy += time.perf_counter() - busy_start
        cpu += time.process_time() - cpu_start
    env.close()
    q.put({"cpu": steps / cpu, "wall": steps / busy})


def episodes_per_hour(seconds: float) -> float:
    for k, v in (("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0"), ("RAY_AUTH_MODE", "disabled"), ("RAY_USAGE_STATS_ENABLED", "0")):
        os.environ.setdefault(k, v)
    import ray

    from actors.env_process import EnvConfig
    from actors.env_runner import EnvRunner, RunnerConfig
    from actors.policies import PolicySpec, ServerPolicy
    from actors.policy_server import PolicyServer, ServerConfig
    from cosmos_policy.checkpoint import save_checkpoint
    from cosmos_policy.codec import NormalizationStats
    from cosmos_policy.config import load_model_config
    from cosmos_policy.layout import load_layout
    from cosmos_policy.model import CosmosPolicyModel
    from cosmos_policy.policy import PolicyConfig

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    rng = np.random.default_rng(0)
    model = CosmosPolicyModel.build(load_model_config("tiny"), load_layout("libero"))
    stats = NormalizationStats.compute(rng.uniform(-1, 1, (100, 7)), rng.uniform(-1, 1, (100, 9)))
    ckpt = save_checkpoint(Path(tempfile.mkdtemp()) / "tiny", model, stats=stats)
    spec = PolicySpec(checkpoint=str(ckpt), policy=PolicyConfig(action_steps=5), text_encoder="random")
    server = PolicyServer.options(num_cpus=0.5).remote(spec, ServerConfig(max_wait_ms=10))
    config = RunnerConfig(env=EnvConfig("lift", {"max_steps": 100}), execute=16, record=False)
    runners = [EnvRunner.options(num_cpus=0.5).remote(config, ServerPolicy(server)) for _ in range(2)]
    ray.get([r.run.remote("lift", 0) for r in runners])  # warm-up: processes, models, simulators
    done, start = 0, time.perf_counter()
    pending = {r.run.remote("lift", i): r for i, r in enumerate(runners)}
    while time.perf_counter() - start < seconds:
        ready, _ = ray.wait(list(pending), num_returns=1)
        runner = pending.pop(ready[0])
        done += 1
        pending[runner.run.remote("lift", done)] = runner
    elapsed = time.perf_counter() - start
    ray.shutdown()
    return done / elapsed * 3600


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--skip-libero", action="store_true")
    parser.add_argument("--skip-runners", action="store_true", help="leave out episodes_per_hour_2_runners")
    args = parser.parse_args()
    res: dict[str, object] = {"machine": f"{os.cpu_count()} cores, Mesa llvmpipe (EGL)", "date": time.strftime("%Y-%m-%d")}
    load_start = os.getloadavg()[0]
    runs = [("builtin_env_steps_per_s_per_core", "lift", {"max_steps": 100})]
    if not args.skip_libero:
        runs += [
            ("libero_env_steps_per_s_per_core", "libero", {"suite": "libero_spatial"}),
            ("libero_env_steps_per_s_per_core_224", "libero", {"suite": "libero_spatial", "image_size": 224}),
        ]
    for key, name, kwargs in runs:
        rate = steps_per_s(name, kwargs, args.seconds)
        res[key], res[f"{key}_wall"] = rate["cpu"], rate["wall"]
    if not args.skip_runners:
        res["episodes_per_hour_2_runners"] = episodes_per_hour(3 * args.seconds)
    res["load_average_1min"] = [round(load_start, 2), round(os.getloadavg()[0], 2)]  # at the start and the end
    OUT.parent.mkdir(parents=True, exist_ok=True)
    merged = json.loads(OUT.read_text()) if OUT.exists() else {}
    merged.update(res)  # figures left out by --skip-* keep their last measured values
    OUT.write_text(json.dumps(merged, indent=1))
    for k, v in res.items():
        print(f"{k:43s} {round(v, 1) if isinstance(v, float) else v}")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
