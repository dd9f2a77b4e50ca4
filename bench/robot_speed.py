"""The robot side's timing on this machine (issue 24): the gateway's overhead and the control loop's jitter.

Prints and writes bench/results/robot_speed.json:
    gateway_overhead_ms_p50_fixed, _p99_fixed   per ``act`` call on loopback with LIBERO-sized observations (two
                                                256x256x3 uint8 cameras, the libero layout's 9-d proprio, an
                                                instruction): the client's round trip minus the policy's own
                                                time, with a fixed-chunk policy (no model: the round trip is all
                                                gateway); target <= 5 ms
    gateway_overhead_ms_p50_tiny, _p99_tiny     the same with the tiny real CosmosPolicy at the libero layout
                                                (1 denoising step, 1 torch thread), whose own time is measured
                                                around its ``infer`` and subtracted; target <= 5 ms
    control_jitter_ms_p50_20hz, _p99_20hz, _max_20hz
                                                the ControlLoop with the DummyArm (configs/robot/dummy_arm.yaml)
                                                at 20 Hz for ``--seconds``: |tick - scheduled| of every step, the
                                                schedule being the loop's own drift-free one; target p99 <= 5 ms

The round trip is the wall time around ``GatewayClient.act`` (encode, gRPC over 127.0.0.1, the gateway's
token check, decode and field checks, the hand-off to its model thread, the reply); the policy's own
time is taken around ``Policy.infer`` inside the gateway, so the difference is what the gateway adds.

    python bench/robot_speed.py [--calls 1000] [--policy-calls 100] [--seconds 30] [--part all|gateway|control]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

OUT = ROOT / "bench" / "results" / "robot_speed.json"
IMAGE = 256  # LIBERO's camera frames
INSTRUCTION = "put the black bowl on the plate"


def percentiles_ms(seconds: list[float] | np.ndarray) -> dict[str, float]:
    ms = np.asarray(seconds) * 1000.0
    return {"p50": round(float(np.percentile(ms, 50)), 3), "p99": round(float(np.percentile(ms, 99)), 3),
            "max": round(float(ms.max()), 3), "mean": round(float(ms.mean()), 3)}


# ---- (a) the gateway ---------------------------------------------------------------------------------
class Timed:
    """A ``Policy`` that times its inner policy's own ``infer`` (what the gateway's overhead is measured against)."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.last_s = inner, 0.0

    def infer(self, observation: Any, seed: int | None = None) -> Any:
        start = time.perf_counter()
        chunk = self.inner.infer(observation, seed)
        self.last_s = time.perf_counter() - start
        return chunk

    def reset(self) -> None:
        self.inner.reset()


class FixedChunk:
    """A ``Policy`` that answers every query with one precomputed chunk: no model time, so the round trip is all gateway."""

    def __init__(self, chunk: int, action_dim: int) -> None:
        from cosmos_policy.contracts import ActionChunk

        self.chunk = ActionChunk(actions=np.zeros((chunk, action_dim), np.float32), value=0.5)

    def infer(self, observation: Any, seed: int | None = None) -> Any:
        return self.chunk

    def reset(self) -> None:
        pass


def tiny_policy() -> Any:
    """The smallest real policy: the tiny model at the libero layout, random weights (speed does not depend on values)."""
    import torch

    from cosmos_policy.codec import NormalizationStats
    from cosmos_policy.config import PolicyConfig, load_model_config
    from cosmos_policy.layout import load_layout
    from cosmos_policy.model import CosmosPolicyModel
    from cosmos_policy.policy import CosmosPolicy
    from cosmos_policy.text import RandomTextEncoder, TextEmbeddingCache

    torch.set_num_threads(1)  # two cores: the gateway's and the client's threads need the other one
    cfg, layout = load_model_config("tiny"), load_layout("libero")
    rng = np.random.default_rng(0)
    stats = NormalizationStats.compute(rng.uniform(-1, 1, (200, layout.action_dim)), rng.uniform(-1, 1, (200, layout.proprio_dim)))
    return CosmosPolicy(CosmosPolicyModel.build(cfg, layout, seed=0).eval(), stats, TextEmbeddingCache(),
                        PolicyConfig(action_steps=1, future_steps=1, value_steps=1),
                        text_encoder=RandomTextEncoder(cfg.text.embed_dim, cfg.text.max_length))


def gateway_round_trips(policy: Any, calls: int, warmup: int) -> dict[str, Any]:
    """``calls`` act round trips through a RobotGateway on 127.0.0.1 serving ``policy``; per call the round trip,
    the policy's own time and their difference."""
    from actors.robots import tokens, wire
    from actors.robots.client import GatewayClient
    from actors.robots.gateway import GatewayConfig, RobotGateway
    from cosmos_policy.contracts import EnvSpec
    from cosmos_policy.layout import load_layout

    layout = load_layout("libero")
    spec = EnvSpec(cameras=layout.cameras, image_size=(IMAGE, IMAGE), proprio_dim=layout.proprio_dim, action_dim=layout.action_dim)
    timed = Timed(policy)
    with tempfile.TemporaryDirectory() as tmp:
        token_file = Path(tmp) / "tokens.json"
        token = tokens.mint(token_file, "bench-arm")
        config = GatewayConfig(token_file=str(token_file), call_timeout_s=60.0)
        with RobotGateway(config, spec, layout.action_chunk, timed, versions=lambda: {"policy": 0, "planning": None}) as gateway:
            client = GatewayClient(f"127.0.0.1:{gateway.port}", "bench-arm", token, timeout_s=60.0)
            client.hello(list(spec.cameras), spec.proprio_dim, spec.action_dim)
            rng = np.random.default_rng(0)
            images = {cam: rng.integers(0, 256, (IMAGE, IMAGE, 3), dtype=np.uint8) for cam in spec.cameras}
            proprio = rng.uniform(-1, 1, spec.proprio_dim)
            request_bytes = len(wire.encode({"session": client.session, "seed": None, "observed_at": time.time(),
                                             "observation": {"images": images, "proprio": proprio, "instruction": INSTRUCTION}}))
            round_trip, own = [], []
            for i in range(warmup + calls):
                start = time.perf_counter()
                reply = client.act(images, proprio, INSTRUCTION)
                wall = time.perf_counter() - start
                if i >= warmup:
                    round_trip.append(wall)
                    own.append(timed.last_s)
            assert reply["actions"].shape == (layout.action_chunk, layout.action_dim)
            client.close()
    overhead = np.asarray(round_trip) - np.asarray(own)
    return {"calls": calls, "warmup": warmup, "request_bytes": request_bytes, "round_trip_ms": percentiles_ms(round_trip),
            "policy_ms": percentiles_ms(own), "overhead_ms": percentiles_ms(overhead)}


# ---- (b) the control loop -----------------------------------------------------------------------------
def control_jitter(seconds: float) -> dict[str, Any]:
    """One ControlLoop episode of ``seconds`` with the DummyArm at its config's 20 Hz and an instant chunk source."""
    from actors.robots.config import load_robot_config
    from actors.robots.control import Chunk, ControlLoop, RobotObservation
    from actors.robots.driver import make_driver
    from actors.robots.operator import OperatorKey, ScriptedOperator
    from actors.robots.safety import SafetyEnvelope

    config = load_robot_config("dummy_arm")
    arm = make_driver(config.driver.target, config.driver.kwargs)
    arm.connect()
    k = 16  # the libero layout's chunk

    def sway(obs: RobotObservation) -> Chunk:
        """The observed joints with the wrist swaying slowly: the arm moves, every chunk answers at once."""
        actions = np.repeat(obs.proprio[None, :5].astype(np.float64), k, axis=0)
        actions[:, 3] = 0.3 * np.sin(obs.timestamp + np.arange(k) * config.period_s)
        return Chunk(actions=actions, observed_at=obs.timestamp)

    loop = ControlLoop(arm, config, SafetyEnvelope(config, OperatorKey.create()), ScriptedOperator(), sway)
    rec = loop.run("sway", max_steps=int(round(seconds * config.control_hz)))
    ticks, period = rec.tick_times, config.period_s
    # The loop's schedule: tick 0, then one period a step; after an overrun (more than a period late) it starts
    # again from the late tick, as ControlLoop does.
    lateness, scheduled = [], ticks[0]
    for tick in ticks:
        if tick - scheduled > period:
            scheduled = tick
        lateness.append(abs(tick - scheduled))
        scheduled += period
    return {"control_hz": config.control_hz, "steps": rec.steps, "reason": rec.reason, "overruns": rec.counters["overruns"],
            "jitter_ms": percentiles_ms(lateness), "period_p99_jitter_ms": round(rec.timing()["p99_jitter_s"] * 1000, 3),
            "mean_period_ms": round(rec.timing()["mean_period_s"] * 1000, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1000, help="act calls with the fixed-chunk policy")
    parser.add_argument("--policy-calls", type=int, default=100, help="act calls with the tiny real policy (0: skip)")
    parser.add_argument("--seconds", type=float, default=30.0, help="length of the 20 Hz control loop run")
    parser.add_argument("--part", choices=("all", "gateway", "control"), default="all")
    args = parser.parse_args()
    res: dict[str, Any] = {"machine": f"{os.cpu_count()} CPU cores, no GPU", "date": time.strftime("%Y-%m-%d"),
                           "command": " ".join(["python bench/robot_speed.py", *sys.argv[1:]])}
    load_start = os.getloadavg()[0]
    if args.part in ("all", "gateway"):
        from cosmos_policy.layout import load_layout

        layout = load_layout("libero")
        fixed = gateway_round_trips(FixedChunk(layout.action_chunk, layout.action_dim), args.calls, warmup=20)
        res["gateway_fixed_policy"] = fixed
        res["gateway_overhead_ms_p50_fixed"], res["gateway_overhead_ms_p99_fixed"] = fixed["overhead_ms"]["p50"], fixed["overhead_ms"]["p99"]
        print(json.dumps({"gateway_fixed_policy": fixed}), flush=True)
        if args.policy_calls > 0:
            tiny = gateway_round_trips(tiny_policy(), args.policy_calls, warmup=3)
            tiny["policy"] = "tiny CosmosPolicy, libero layout, random weights, action_steps 1, 1 torch thread"
            res["gateway_tiny_policy"] = tiny
            res["gateway_overhead_ms_p50_tiny"], res["gateway_overhead_ms_p99_tiny"] = tiny["overhead_ms"]["p50"], tiny["overhead_ms"]["p99"]
            print(json.dumps({"gateway_tiny_policy": tiny}), flush=True)
    if args.part in ("all", "control"):
        loop = control_jitter(args.seconds)
        res["control_loop_dummy_arm"] = loop
        for q in ("p50", "p99", "max"):
            res[f"control_jitter_ms_{q}_20hz"] = loop["jitter_ms"][q]
        print(json.dumps({"control_loop_dummy_arm": loop}), flush=True)
    res["load_average_1min"] = [round(load_start, 2), round(os.getloadavg()[0], 2)]  # at the start and the end
    OUT.parent.mkdir(parents=True, exist_ok=True)
    merged = json.loads(OUT.read_text()) if OUT.exists() else {}
    merged.update(res)  # a part left out keeps its last measured figures
    OUT.write_text(json.dumps(merged, indent=1))
    for key, value in res.items():
        if not isinstance(value, dict):
            print(f"{key:34s} {value}")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
