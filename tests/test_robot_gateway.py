"""The robot gateway with the tiny real policy behind it: tokens, sessions, observations checked before the model,
episodes into a real LocalReplay, deadlines through a faulty network (a loopback TCP proxy run here), TLS, and
the thin client's imports.

Everything listens on 127.0.0.1 with free ports; every loop is bounded in time and count.
"""

from __future__ import annotations

import json
import re
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import msgpack
import numpy as np
import pytest
import yaml

from actors.robots import tokens, wire
from actors.robots.client import GatewayClient, GatewayError
from actors.robots.gateway import GatewayConfig, RobotGateway, is_loopback
from cosmos_policy.codec import NormalizationStats
from cosmos_policy.config import PlannerConfig, load_model_config
from cosmos_policy.contracts import ActionChunk, EnvSpec, Observation, Source
from cosmos_policy.data.episode_file import read_episode
from cosmos_policy.episode import jpeg_round_trip
from cosmos_policy.layout import load_layout
from cosmos_policy.model import CosmosPolicyModel
from cosmos_policy.planner import Planner
from cosmos_policy.policy import CosmosPolicy, PolicyConfig
from cosmos_policy.text import RandomTextEncoder, TextEmbeddingCache
from replay.config import ReplayConfig, default_tables
from replay.local import LocalReplay

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32  # served image size: the tiny model resizes whatever it gets, small frames keep each call well under a second
ROBOTS = [f"arm-{i}" for i in range(1, 9)]
MAX_BYTES = 1024 * 1024


class Counting:
    """A ``Policy`` that forwards to a real one and counts the calls that reach it (not a mock: it answers with the model)."""

    def __init__(self, inner, delay_s: float = 0.0) -> None:
        self.inner, self.delay_s, self.calls = inner, delay_s, 0

    def infer(self, observation: Observation, seed: int | None = None) -> ActionChunk:
        self.calls += 1
        if self.delay_s:
            time.sleep(self.delay_s)
        return self.inner.infer(observation, seed)

    def reset(self) -> None:
        self.inner.reset()


@pytest.fixture(scope="module")
def models():
    cfg, layout = load_model_config("tiny"), load_layout("libero")
    rng = np.random.default_rng(0)
    stats = NormalizationStats.compute(rng.uniform(-1, 1, (200, 7)), rng.uniform(-1, 1, (200, 9)))
    policy = CosmosPolicy(CosmosPolicyModel.build(cfg, layout, seed=0), stats, TextEmbeddingCache(),
                          PolicyConfig(action_steps=1, future_steps=1, value_steps=1),
                          text_encoder=RandomTextEncoder(cfg.text.embed_dim, cfg.text.max_length))
    policy.version = 4  # as PolicySpec.build sets it from the checkpoint's metadata
    planner = Planner(policy, CosmosPolicyModel.build(cfg, layout, seed=1), PlannerConfig(num_candidates=2, future_steps=[1], value_steps=[1]))
    planner.version = 2
    spec = EnvSpec(cameras=layout.cameras, image_size=(SIZE, SIZE), proprio_dim=layout.proprio_dim, action_dim=layout.action_dim)
    return Counting(policy), Counting(planner), spec, layout.action_chunk


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokens") / "tokens.json"
    return path, {r: tokens.mint(path, r) for r in ROBOTS}


@pytest.fixture(scope="module")
def replay(tmp_path_factory):
    return LocalReplay(ReplayConfig(root=str(tmp_path_factory.mktemp("replay")), tables=default_tables(window=16)))


@pytest.fixture(scope="module")
def gateway(models, keys, replay):
    policy, planner, spec, chunk = models
    config = GatewayConfig(token_file=str(keys[0]), max_message_bytes=MAX_BYTES, call_timeout_s=20.0, token_check_every_s=0.2)
    gw = RobotGateway(config, spec, chunk, policy, planner=planner, replay=replay, versions=lambda: {"policy": 4, "planning": 2})
    gw.start()
    yield gw
    gw.stop()


def client(gateway, keys, robot: str, address: str | None = None, **kw) -> GatewayClient:
    return GatewayClient(address or f"127.0.0.1:{gateway.port}", robot, keys[1][robot], timeout_s=kw.pop("timeout_s", 20.0), **kw)


def obs(seed: int = 0, spec: EnvSpec | None = None) -> dict:
    rng = np.random.default_rng(seed)
    cams = spec.cameras if spec else ("wrist", "primary")
    return {"images": {c: rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8) for c in cams},
            "proprio": rng.uniform(-1, 1, 9), "instruction": "lift the cube"}


def joined(gateway, keys, robot: str, **kw) -> GatewayClient:
    c = client(gateway, keys, robot, **kw)
    c.hello(list(gateway.spec.cameras), gateway.spec.proprio_dim, gateway.spec.action_dim)
    return c


def raw(port: int, method: str, body: bytes, metadata=(), timeout: float = 20.0) -> tuple[grpc.StatusCode, str]:
    """One call below the client: any bytes, any metadata; the status and its details."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        try:
            ch.unary_unary(wire.method_path(method))(body, timeout=timeout, metadata=metadata)
            return grpc.StatusCode.OK, ""
        except grpc.RpcError as exc:
            return exc.code(), exc.details()


def auth(keys, robot: str, token_of: str | None = None) -> tuple:
    return (("authorization", f"Bearer {keys[1][token_of or robot]}"), ("x-robot-id", robot))


# ---- tokens -----------------------------------------------------------------------------------------
def test_token_file_keeps_no_token_in_clear_and_binds_each_to_its_robot(tmp_path):
    path = tmp_path / "t.json"
    a, b = tokens.mint(path, "arm-a"), tokens.mint(path, "arm-b")
    text = path.read_text()
    assert a not in text and b not in text and oct(path.stat().st_mode & 0o777) == "0o600"
    entry = json.loads(text)["robots"]["arm-a"]
    assert set(entry) == {"salt", "sha256", "created"} and entry["sha256"] == tokens.digest(entry["salt"], a)
    store = tokens.TokenStore(path, check_every_s=0.0)
    assert store.verify("arm-a", a) is tokens.Verdict.OK
    assert store.verify("arm-b", a) is tokens.Verdict.WRONG_ROBOT
    assert store.verify("arm-a", a + "x") is tokens.Verdict.UNKNOWN and store.verify("nobody", "x") is tokens.Verdict.UNKNOWN
    rotated = tokens.mint(path, "arm-a")  # a new token replaces the old one
    assert store.verify("arm-a", a) is tokens.Verdict.UNKNOWN and store.verify("arm-a", rotated) is tokens.Verdict.OK
    path.write_text("{ half written")  # fail closed: a broken file admits nobody
    assert store.verify("arm-b", b) is tokens.Verdict.UNKNOWN
    with pytest.raises(tokens.TokenError, match="robot id 'bad id'"):
        tokens.mint(tmp_path / "u.json", "bad id")


def test_token_cli_prints_the_token_once_and_revokes(tmp_path):
    path = tmp_path / "t.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cli = [sys.executable, "-m", "actors.robots.tokens"]
    out = subprocess.run([*cli, "add", "--file", str(path), "--robot", "arm-x"], capture_output=True, text=True, env=env, timeout=30)
    assert out.returncode == 0, out.stderr
    token = out.stdout.strip()
    assert token.startswith("cpr_") and token not in path.read_text()
    assert tokens.TokenStore(path).verify("arm-x", token) is tokens.Verdict.OK
    out = subprocess.run([*cli, "revoke", "--file", str(path), "--robot", "arm-x"], capture_output=True, text=True, env=env, timeout=30)
    assert out.returncode == 0 and tokens.read_file(path) == {}


# ---- the happy path -------------------------------------------------------------------------------------
def test_act_and_plan_answer_with_the_real_model(gateway, keys, models):
    policy, planner, spec, chunk = models
    c = joined(gateway, keys, "arm-1")
    assert c.served["cameras"] == list(spec.cameras) and c.served["image_size"] == [SIZE, SIZE] and c.served["chunk"] == chunk
    assert c.served["versions"] == {"policy": 4, "planning": 2} and c.served["planner"] is True
    before = policy.calls
    o = obs(0, spec)
    reply = c.act(o["images"], o["proprio"], o["instruction"], seed=3, observed_at=123.5)
    assert policy.calls == before + 1
    assert reply["actions"].dtype == np.float32 and reply["actions"].shape == (chunk, spec.action_dim) and np.all(np.isfinite(reply["actions"]))
    assert 0.0 <= reply["value"] <= 1.0 and reply["observed_at"] == 123.5 and reply["versions"] == {"policy": 4, "planning": None}
    local = policy.inner.infer(Observation(o["images"], o["proprio"], o["instruction"]), 3)
    assert np.array_equal(local.actions, reply["actions"])  # what the gateway served is the model's own answer
    planned = c.plan(o["images"], o["proprio"], o["instruction"], seed=3)
    assert planned["versions"] == {"policy": 4, "planning": 2} and planned["planner"]["candidate_values"].shape == (2,)
    assert c.heartbeat()["versions"] == {"policy": 4, "planning": 2}
    c.close()


# ---- refusals ------------------------------------------------------------------------------------------------
def test_missing_wrong_or_borrowed_tokens_never_reach_the_policy(gateway, keys, models):
    policy, _, spec, _ = models
    c = joined(gateway, keys, "arm-2")
    body = wire.encode({"session": c.session, "observation": obs(1, spec), "seed": None})
    before = policy.calls
    cases = [
        ((), grpc.StatusCode.UNAUTHENTICATED),
        ((("x-robot-id", "arm-2"),), grpc.StatusCode.UNAUTHENTICATED),
        ((("authorization", f"Bearer {keys[1]['arm-2']}"),), grpc.StatusCode.UNAUTHENTICATED),  # no robot id
        ((("authorization", "Bearer cpr_not-a-token"), ("x-robot-id", "arm-2")), grpc.StatusCode.UNAUTHENTICATED),
        ((("authorization", f"Basic {keys[1]['arm-2']}"), ("x-robot-id", "arm-2")), grpc.StatusCode.UNAUTHENTICATED),
        (auth(keys, "arm-2", token_of="arm-3"), grpc.StatusCode.PERMISSION_DENIED),  # robot 3's token for robot 2
    ]
    for metadata, code in cases:
        for method in ("act", "plan", "heartbeat", "put_episode"):
            got, details = raw(gateway.port, method, body, metadata)
            assert got == code, (metadata, method, details)
    assert policy.calls == before
    with pytest.raises(GatewayError, match="hello: PERMISSION_DENIED: robot 'arm-3': this token belongs to another robot") as err:
        GatewayClient(f"127.0.0.1:{gateway.port}", "arm-3", keys[1]["arm-2"]).hello(list(spec.cameras), 9, 7)
    assert err.value.code == "PERMISSION_DENIED"
    assert raw(gateway.port, "act", body, auth(keys, "arm-2"))[0] == grpc.StatusCode.OK and policy.calls == before + 1


def bad_act_bodies(session: str, spec: EnvSpec) -> list[tuple[str, bytes, grpc.StatusCode, str]]:
    def act(**change) -> bytes:
        o = obs(2, spec)
        o.update(change.pop("observation", {}))
        images = change.pop("images", None)
        if images:
            o["images"] = {**o["images"], **images}
        return wire.encode({"session": session, "observation": o, **change})

    good = wire.encode({"session": session, "observation": obs(2, spec)})
    object_dtype = msgpack.packb({"session": session, "observation": {**msgpack.unpackb(good)["observation"], "proprio": {
        "__nd__": True, "data": b"\x00" * 72, "dtype": "|O", "shape": [9]}}}, use_bin_type=True)
    short = msgpack.packb({"session": session, "observation": {**msgpack.unpackb(good)["observation"], "proprio": {
        "__nd__": True, "data": b"\x00" * 8, "dtype": "<f8", "shape": [9]}}}, use_bin_type=True)
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    return [
        ("malformed msgpack", b"\x93\x01\xc1garbage", invalid, "message: not a valid msgpack message"),
        ("not a map", wire.encode([1, 2]), invalid, "message: expected a map"),
        ("object dtype", object_dtype, invalid, "observation.proprio: dtype '|O' cannot travel"),
        ("data shorter than its shape", short, invalid, r"observation.proprio: 8 data bytes, expected 72 for float64 \(9,\)"),
        ("wrong image shape", act(images={"primary": np.zeros((2, 2))}), invalid,
         rf"observation.images.primary: expected uint8 \({SIZE}, {SIZE}, 3\), got float64 \(2, 2\)"),
        ("image of another size", act(images={"wrist": np.zeros((SIZE * 2, SIZE, 3), np.uint8)}), invalid,
         rf"observation.images.wrist: expected uint8 \({SIZE}, {SIZE}, 3\), got uint8 \({SIZE * 2}, {SIZE}, 3\)"),
        ("missing camera", act(observation={"images": {"primary": np.zeros((SIZE, SIZE, 3), np.uint8)}}), invalid,
         "observation.images.wrist: missing"),
        ("unknown camera", act(images={"belly": np.zeros((SIZE, SIZE, 3), np.uint8)}), invalid, r"cameras \['belly'\] are not served"),
        ("NaN proprio", act(observation={"proprio": np.array([0.0] * 4 + [np.nan] + [0.0] * 4)}), invalid,
         r"observation.proprio: expected finite values, got nan at index \[4\]"),
        ("short proprio", act(observation={"proprio": np.zeros(3)}), invalid, r"observation.proprio: expected float32/float64 \(9,\)"),
        ("instruction not a str", act(observation={"instruction": 7}), invalid, "observation.instruction: expected a non-empty str, got int 7"),
        ("seed not an int", act(seed="x"), invalid, "seed: expected an int or None"),
        ("no session", wire.encode({"observation": obs(2, spec)}), invalid, "session: missing"),
        ("oversize", act(images={"primary": np.zeros((1024, 1024, 3), np.uint8)}), grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
    ]


def test_bad_observations_fail_alone_before_the_policy_and_other_robots_are_served_right_after(gateway, keys, models):
    policy, _, spec, _ = models
    bad = joined(gateway, keys, "arm-4")
    other = joined(gateway, keys, "arm-5")
    o = obs(5, spec)
    for name, body, code, details in bad_act_bodies(bad.session, spec):
        before = policy.calls
        got, text = raw(gateway.port, "act", body, auth(keys, "arm-4"))
        assert got == code and policy.calls == before, (name, got, text)
        assert re.search(details, text), (name, text)
        if name in ("malformed msgpack", "NaN proprio", "oversize"):  # the gateway serves on (each act costs the model's time)
            assert other.act(o["images"], o["proprio"], o["instruction"])["actions"].shape[1] == spec.action_dim
    # The bad robot's own session survives its bad calls; the client refuses an oversize message before sending it.
    assert bad.heartbeat()["session"] == bad.session
    with pytest.raises(GatewayError, match="act: RESOURCE_EXHAUSTED: .*exceeds the limit of 1048576"):
        bad.act({**o["images"], "primary": np.zeros((1024, 1024, 3), np.uint8)}, o["proprio"], o["instruction"])


def test_a_revoked_token_is_refused_at_the_next_call_without_restart(gateway, keys):
    path, _ = keys
    token = tokens.mint(path, "arm-late")
    time.sleep(gateway.config.token_check_every_s + 0.1)
    c = GatewayClient(f"127.0.0.1:{gateway.port}", "arm-late", token, timeout_s=10)
    c.hello(list(gateway.spec.cameras), 9, 7)
    assert tokens.revoke(path, "arm-late")
    time.sleep(gateway.config.token_check_every_s + 0.1)  # the gateway looks at the file at most this often
    with pytest.raises(GatewayError, match="heartbeat: UNAUTHENTICATED: robot 'arm-late': unknown or revoked token"):
        c.heartbeat()
    c.close()


def test_a_second_hello_replaces_the_session_and_drops_unfinished_episodes(gateway, keys, models):
    _, _, spec, _ = models
    first = joined(gateway, keys, "arm-6")
    old = first.session
    body = {"session": old, "episode": "ep-1", "part": "begin", "instruction": "lift the cube"}
    assert raw(gateway.port, "put_episode", wire.encode(body), auth(keys, "arm-6"))[0] == grpc.StatusCode.OK
    second = joined(gateway, keys, "arm-6")
    assert second.session != old
    with pytest.raises(GatewayError, match=f"heartbeat: FAILED_PRECONDITION: session '{old}' is not the current session of robot 'arm-6'"):
        first.heartbeat()
    with pytest.raises(GatewayError, match="FAILED_PRECONDITION"):
        first.act(**obs(6, spec))
    # The unfinished episode of the old session is gone: its parts cannot continue in the new one.
    steps = {"session": second.session, "episode": "ep-1", "part": "steps", "index": 0}
    code, details = raw(gateway.port, "put_episode", wire.encode(steps), auth(keys, "arm-6"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "episode 'ep-1': not begun" in details
    assert second.heartbeat()["session"] == second.session
    first.reconnect()  # and back: now the second one is stale
    with pytest.raises(GatewayError, match="FAILED_PRECONDITION"):
        second.heartbeat()


def test_hello_refuses_a_robot_whose_layout_does_not_match(gateway, keys):
    c = client(gateway, keys, "arm-7")
    with pytest.raises(GatewayError, match=r"hello: FAILED_PRECONDITION: cameras: robot 'arm-7' has \['primary'\], the served model needs"):
        c.hello(["primary"], 9, 7)
    with pytest.raises(GatewayError, match="hello: FAILED_PRECONDITION: proprio_dim: robot 'arm-7' has 8, the served model 9"):
        c.hello(["primary", "wrist"], 8, 7)
    code, details = raw(gateway.port, "hello", wire.encode({"protocol": 99, "robot_id": "arm-7", "cameras": [], "proprio_dim": 9,
                                                            "action_dim": 7}), auth(keys, "arm-7"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "protocol 1, the client 99" in details
    code, details = raw(gateway.port, "hello", wire.encode({"protocol": 1, "robot_id": "arm-8", "cameras": [], "proprio_dim": 9,
                                                            "action_dim": 7}), auth(keys, "arm-7"))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "'arm-8' is not the authenticated robot 'arm-7'" in details


# ---- episodes --------------------------------------------------------------------------------------------------
def test_put_episode_lands_one_robot_episode_in_a_real_replay(gateway, keys, replay, models):
    _, _, spec, _ = models
    c = joined(gateway, keys, "arm-8")
    steps, rng = 23, np.random.default_rng(8)
    frames = {cam: rng.integers(0, 256, (steps, SIZE, SIZE, 3), dtype=np.uint8) for cam in spec.cameras}
    proprio, actions = rng.uniform(-1, 1, (steps, 9)), rng.uniform(-1, 1, (steps, 7)).astype(np.float32)
    c.served["max_message_bytes"] = 96 * 1024  # the client splits under whatever limit it is told: here ~5 steps a part
    reply = c.put_episode(frames, proprio, actions, "lift the cube", True, task="lift", seed=11, policy_version=3,
                          metadata={"operator": "ada"}, episode="run-1/ep-0", timestamps=np.arange(steps) + 1e9)
    assert reply["inserted"] and reply["table"] == "experience_success" and reply["steps"] == steps
    assert replay.episode_ids("experience_success").count(reply["episode_id"]) == 1
    ep = read_episode(replay.store.files.path("experience_success", reply["episode_id"]))
    assert ep.source is Source.ROBOT and ep.metadata["robot_id"] == "arm-8" and ep.metadata["operator"] == "ada"
    assert ep.metadata["robot_episode"] == "run-1/ep-0" and ep.policy_version == 3 and ep.planning_version == 2  # acted / served
    assert ep.task == "lift" and ep.seed == 11 and ep.num_steps == steps and np.allclose(ep.proprio, proprio) and np.array_equal(ep.actions, actions)
    assert np.array_equal(ep.frame("primary", 7), jpeg_round_trip(frames["primary"][7]))  # the frame sent, JPEG at rest
    # Sent again (its reply was lost, say): in replay once, even from a new session.
    c.reconnect()
    again = c.put_episode(frames, proprio, actions, "lift the cube", True, episode="run-1/ep-0")
    assert again == reply and replay.episode_ids("experience_success").count(reply["episode_id"]) == 1
    # A failure goes to its own table; parts out of order and a short end are refused.
    failed = c.put_episode({k: f[:3] for k, f in frames.items()}, proprio[:3], actions[:3], "lift the cube", False)
    assert failed["table"] == "experience_failure" and failed["episode_id"] in replay.episode_ids("experience_failure")
    cut = c.put_episode({k: f[:2] for k, f in frames.items()}, proprio[:2], actions[:2], "lift the cube", False, interrupted=True)
    assert not cut["inserted"] and cut["episode_id"] not in replay.episode_ids("experience_failure")  # no label: not learned from
    session, md = c.session, auth(keys, "arm-8")
    assert raw(gateway.port, "put_episode", wire.encode({"session": session, "episode": "e", "part": "begin", "instruction": "x"}), md)[0] == grpc.StatusCode.OK
    code, details = raw(gateway.port, "put_episode", wire.encode({"session": session, "episode": "e", "part": "steps", "index": 2}), md)
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "expects part 0, got 2" in details
    code, details = raw(gateway.port, "put_episode", wire.encode({"session": session, "episode": "e", "part": "steps", "index": 0,
                                                                  "proprio": np.zeros((2, 9)), "actions": np.zeros((2, 7)),
                                                                  "images": {cam: np.zeros((3, SIZE, SIZE, 3), np.uint8) for cam in spec.cameras}}), md)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and rf"images.wrist: expected uint8 (2, {SIZE}, {SIZE}, 3)" in details
    code, details = raw(gateway.port, "put_episode", wire.encode({"session": session, "episode": "e", "part": "end", "index": 1, "success": True}), md)
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "received 0 parts, the end says 1" in details


# ---- deadlines and a faulty network -------------------------------------------------------------------------------
class Proxy:
    """A loopback TCP proxy this test runs: ``pass``, ``delay`` (each chunk held ``delay_s``), ``blackhole`` (bytes
    swallowed), ``cut`` (connections closed, new ones refused). Threads stop within ``TICK`` of ``close``."""

    TICK = 0.05

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.mode, self.delay_s = "pass", 0.0
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(self.TICK)
        self.port = self.server.getsockname()[1]
        self.stopped = threading.Event()
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                down, _ = self.server.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            if self.mode == "cut":
                down.close()
                continue
            try:
                up = socket.create_connection(("127.0.0.1", self.target), timeout=1.0)
            except OSError:
                down.close()
                continue
            with self.lock:
                self.sockets += [down, up]
            for a, b in ((down, up), (up, down)):
                t = threading.Thread(target=self._pump, args=(a, b), daemon=True)
                t.start()
                self.threads.append(t)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        src.settimeout(self.TICK)
        while not self.stopped.is_set():
            try:
                data = src.recv(65536)
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                break
            if not data:
                break
            if self.mode == "blackhole":
                continue
            if self.mode == "delay":
                time.sleep(self.delay_s)
            try:
                dst.sendall(data)
            except OSError:
                break
        for s in (src, dst):
            s.close()

    def cut(self) -> None:
        self.mode = "cut"
        with self.lock:
            for s in self.sockets:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
            self.sockets.clear()

    def close(self) -> None:
        self.stopped.set()
        self.cut()
        self.server.close()
        for t in self.threads:
            t.join(timeout=2.0)


def timed_failure(call) -> tuple[GatewayError, float]:
    started = time.monotonic()
    with pytest.raises(GatewayError) as err:
        call()
    return err.value, time.monotonic() - started


def test_calls_through_a_faulty_network_fail_within_their_deadline_and_reconnect_after_it_heals(gateway, keys, models):
    _, _, spec, _ = models
    proxy = Proxy(gateway.port)
    try:
        c = joined(gateway, keys, "arm-3", address=f"127.0.0.1:{proxy.port}", timeout_s=10.0)
        o = obs(3, spec)
        assert c.act(**o)["actions"].shape[1] == spec.action_dim
        slack = 0.75  # grpc's own timer and thread wake-ups on a busy 2-core machine

        proxy.mode, proxy.delay_s = "delay", 1.0
        err, took = timed_failure(lambda: c.heartbeat(timeout_s=0.3))
        assert err.code == "DEADLINE_EXCEEDED" and took < 0.3 + slack, (err, took)
        assert "heartbeat: DEADLINE_EXCEEDED" in str(err)

        proxy.mode = "blackhole"
        err, took = timed_failure(lambda: c.act(**o, timeout_s=0.5))
        assert err.code == "DEADLINE_EXCEEDED" and took < 0.5 + slack, (err, took)

        proxy.cut()
        err, took = timed_failure(lambda: c.heartbeat(timeout_s=1.0))
        assert err.code in ("UNAVAILABLE", "DEADLINE_EXCEEDED") and took < 1.0 + slack, (err, took)
        err, took = timed_failure(lambda: c.reconnect(timeout_s=1.0))
        assert err.code in ("UNAVAILABLE", "DEADLINE_EXCEEDED") and took < 1.0 + slack, (err, took)

        proxy.mode = "pass"
        old = c.session
        c.reconnect(timeout_s=5.0)
        assert c.session != old and c.act(**o)["actions"].shape[1] == spec.action_dim
        c.close()
    finally:
        proxy.close()


def test_a_robot_behind_a_failing_network_holds_then_stops_and_plays_on_after_a_reconnect(gateway, keys, models, replay):
    """The thin client's own control loop, envelope and watchdog (actors.robots.remote): the network goes silent mid-episode,
    each chunk request times out, the robot holds its measured pose, then stops after hold_s; the episode is interrupted
    and never sent. The network back, a new hello replaces the session and the next episode lands in replay."""
    from actors.robots.config import robot_config_from_dict
    from actors.robots.remote import run_robot_over_gateway
    from actors.robots.station import OperatorSpec

    _, _, spec, chunk = models
    proxy = Proxy(gateway.port)
    c = client(gateway, keys, "arm-4", address=f"127.0.0.1:{proxy.port}", timeout_s=5.0)
    try:
        # The test's clocks follow this machine's time for one chunk (0.5 s on a quiet 2-core machine, several seconds on
        # a loaded one): a chunk lasts at least 4 answers, a request may take 3, so only the silence makes the robot hold.
        c.hello(list(spec.cameras), 9, 7)
        started = time.monotonic()
        c.plan(**obs(0, spec), timeout_s=60.0)
        answer_s = time.monotonic() - started
        control_hz = min(10.0, chunk / (4 * answer_s))
        data = yaml.safe_load((ROOT / "configs" / "robot" / "dummy_lift.yaml").read_text())
        data.update(id="arm-4", control_hz=control_hz, image_size=[SIZE, SIZE])
        data["driver"]["kwargs"]["image_size"] = [SIZE, SIZE]
        deadline_s = max(1.5, 3 * answer_s)
        data["chunking"] = {"request_threshold": 0.5, "deadline_s": deadline_s, "stale_s": 2 * deadline_s,
                            "hold_s": deadline_s + 1.0, "watchdog_s": max(2.0, 3.0 / control_hz)}
        config = robot_config_from_dict(data)
        plan = c.plan

        def plan_then_go_silent(*args, **kwargs):  # the robot's first chunk that arrives in time to act on; then silence
            reply = plan(*args, **kwargs)
            if time.monotonic() - kwargs["observed_at"] < chunk / control_hz / 2:
                proxy.mode = "blackhole"
            return reply

        c.plan = plan_then_go_silent  # the client the robot's loop calls
        (cut,) = run_robot_over_gateway(c, config, OperatorSpec(kind="scripted"), "lift the cube", 1, max_steps=300)
        c.plan = plan
        first_session = c.session
        assert cut["interrupted"] and cut["success"] is None and not cut["inserted"], cut
        assert cut["reason"].startswith("late chunk: nothing to execute"), cut
        assert cut["versions"] == [{"policy": 4, "planning": 2}] and cut["held_steps"] > 0, cut  # acted on a chunk, then held
        assert cut["late_chunks"] + cut["failed_requests"] >= 1 and cut["steps"] < 300, cut

        proxy.cut()
        proxy.mode = "pass"
        c.reconnect(timeout_s=10.0)  # a fresh channel: the cut one would wait out gRPC's reconnect backoff
        before = len(replay.episode_ids("experience_success"))
        (ok,) = run_robot_over_gateway(c, config, OperatorSpec(kind="scripted", script={5: ("success",)}), "lift the cube", 1,
                                       max_steps=300)
        assert c.session != first_session and (ok["inserted"], ok["success"], ok["steps"]) == (True, True, 5), ok
        assert len(replay.episode_ids("experience_success")) == before + 1
    finally:
        c.close()
        proxy.close()


def test_the_gateway_caps_every_call_at_its_own_deadline(models, keys):
    policy, _, spec, chunk = models
    slow = Counting(policy, delay_s=1.5)
    config = GatewayConfig(token_file=str(keys[0]), call_timeout_s=0.3)
    with RobotGateway(config, spec, chunk, slow, versions=dict) as gw:
        c = GatewayClient(f"127.0.0.1:{gw.port}", "arm-1", keys[1]["arm-1"], timeout_s=10.0)
        c.hello(list(spec.cameras), 9, 7)
        started = time.monotonic()
        code, details = raw(gw.port, "act", wire.encode({"session": c.session, "observation": obs(0, spec)}), auth(keys, "arm-1"), timeout=None)
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - started < 1.2, details  # no client deadline: the cap
        assert "act: the model did not answer within the call's deadline" in details
        with pytest.raises(GatewayError, match="plan: UNIMPLEMENTED: plan: this gateway serves no planner"):
            c.plan(**obs(0, spec), timeout_s=60.0)
        with pytest.raises(GatewayError, match="put_episode: UNIMPLEMENTED: put_episode: this gateway has no replay"):
            c.put_episode({cam: np.zeros((1, SIZE, SIZE, 3), np.uint8) for cam in spec.cameras}, np.zeros((1, 9)), np.zeros((1, 7)), "x", True)
        c.close()


# ---- TLS ----------------------------------------------------------------------------------------------------------
def self_signed(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", f"/CN={name}", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True, timeout=30)
    return cert, key


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make test certificates")
def test_tls_with_per_call_token_credentials_and_client_certificates(models, keys, tmp_path):
    policy, _, spec, chunk = models
    server_cert, server_key = self_signed(tmp_path, "gateway")
    robot_cert, robot_key = self_signed(tmp_path, "robot")
    config = GatewayConfig(token_file=str(keys[0]), tls_cert=str(server_cert), tls_key=str(server_key), tls_ca=str(robot_cert))
    with RobotGateway(config, spec, chunk, policy, versions=dict) as gw:
        address = f"127.0.0.1:{gw.port}"
        c = GatewayClient(address, "arm-1", keys[1]["arm-1"], tls_ca=str(server_cert), tls_cert=str(robot_cert), tls_key=str(robot_key), timeout_s=10)
        assert c.hello(list(spec.cameras), 9, 7)["session"] and c.heartbeat()["session"] == c.session
        c.close()
        wrong = GatewayClient(address, "arm-1", keys[1]["arm-2"], tls_ca=str(server_cert), tls_cert=str(robot_cert), tls_key=str(robot_key), timeout_s=10)
        with pytest.raises(GatewayError, match="PERMISSION_DENIED"):
            wrong.hello(list(spec.cameras), 9, 7)  # TLS does not replace the token
        wrong.close()
        for kw in ({}, {"tls_ca": str(server_cert)}):  # plaintext, or TLS without a client certificate
            bare = GatewayClient(address, "arm-1", keys[1]["arm-1"], timeout_s=3, **kw)
            with pytest.raises(GatewayError, match="hello: UNAVAILABLE"):
                bare.hello(list(spec.cameras), 9, 7)
            bare.close()
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and not is_loopback("0.0.0.0")
    with pytest.warns(UserWarning, match="without TLS: the token and observations cross the network in clear"):
        GatewayClient("192.0.2.1:50051", "arm-1", "t").close()  # a channel connects lazily: nothing is sent
    with pytest.raises(Exception, match="tls_cert / gateway.tls_key: give both or neither"):
        GatewayConfig(token_file=str(keys[0]), tls_cert=str(server_cert)).validate()


# ---- the thin client ------------------------------------------------------------------------------------------------
def test_the_client_imports_no_training_stack():
    code = ("import sys, actors.robots.client, actors.robots.wire; "
            "print(','.join(m for m in ('torch', 'ray', 'PIL', 'cosmos_policy', 'replay', 'learner') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"the robot client pulled in {out.stdout.strip()}"
