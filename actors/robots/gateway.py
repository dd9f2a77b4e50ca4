"""The robot gateway: a gRPC server in the job for robots that cannot join the Ray cluster.

A robot host runs the thin client (``actors.robots.client``) with its own control loop and safety
envelope; through the gateway it says hello (its layout against the served one), asks for action
chunks (``act``: the policy, ``plan``: best-of-N), sends its episodes to replay in parts
(``put_episode``) and keeps a heartbeat. Every method is unary-unary with ``wire`` msgpack bodies,
served by ``grpc.method_handlers_generic_handler`` (no codegen). No streams: LeRobot's async
inference sized its pool by its long-lived streams, so one more robot starved (issue #3979); a
unary call holds a worker only while it is answered, and ``maximum_concurrent_rpcs`` refuses
(RESOURCE_EXHAUSTED) rather than queueing without end.

Every call, in this order: the robot's token (``authorization: Bearer <token>``, ``x-robot-id``)
before anything else (UNAUTHENTICATED / PERMISSION_DENIED: the policy is never reached); the size
(RESOURCE_EXHAUSTED); the decode and every field checked (INVALID_ARGUMENT naming the field);
the robot's current session (FAILED_PRECONDITION after a newer hello); then the work, within the
client's deadline capped by ``call_timeout_s`` (DEADLINE_EXCEEDED). A bad call fails alone; the
gateway serves the other robots on.

The policy backends are handed in as contract objects (``Policy`` for act and plan,
``ReplayClient`` for episodes, a ``versions()`` callable), so the gateway never names Ray or a
backend. Policy calls run one at a time on one thread: a model is not safe to call from several
threads, and a call whose deadline passes while it waits is cancelled before the model sees it.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import threading
import time
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor, TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import grpc
import numpy as np

from actors.robots import wire
from actors.robots.tokens import TokenStore, Verdict
from cosmos_policy.contracts import EnvSpec, Observation, Policy, ReplayClient, Source, TableName
from cosmos_policy.episode import EpisodeRecorder
from cosmos_policy.errors import ConfigError, InputError, existing_file

log = logging.getLogger(__name__)

Code = grpc.StatusCode


@dataclass
class GatewayConfig:
    """Where the gateway listens, who may call it, and how much one call may take."""

    host: str = "127.0.0.1"
    """Address to listen on; loopback unless robots reach the job over a network (then use TLS)."""
    port: int = 0
    """TCP port; 0 picks a free one (``RobotGateway.start`` returns it)."""
    token_file: str = ""
    """The per-robot token file (``python -m actors.robots.tokens add``); re-read when it changes."""
    max_message_bytes: int = 8 * 1024 * 1024
    """Largest request or reply; larger is RESOURCE_EXHAUSTED (the client splits episodes under it)."""
    call_timeout_s: float = 10.0
    """Longest a call may take at the gateway, whatever deadline the client sent (also with none)."""
    max_workers: int = 8
    """Threads answering calls; each call holds one only while it is answered (unary calls only)."""
    max_concurrent_rpcs: int = 32
    """Calls in progress or waiting beyond which new ones are refused (RESOURCE_EXHAUSTED), not queued."""
    tls_cert: str | None = None
    """PEM server certificate; with ``tls_key`` the gateway speaks only TLS."""
    tls_key: str | None = None
    """PEM private key of ``tls_cert``."""
    tls_ca: str | None = None
    """PEM CA of the robots' client certificates; set, every robot must present one (mutual TLS)."""
    token_check_every_s: float = 0.5
    """How often at most the token file is looked at for changes (a revocation takes effect within this)."""
    max_episode_steps: int = 10_000
    """Most steps one episode may send (its parts are held, JPEG-encoded, until it ends)."""
    max_open_episodes: int = 2
    """Unfinished episodes one session may hold at once."""

    def validate(self) -> None:
        if not self.token_file:
            raise ConfigError("gateway.token_file: required (make one with `python -m actors.robots.tokens add`)")
        existing_file(self.token_file, "token file", ConfigError)
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("gateway.tls_cert / gateway.tls_key: give both or neither")
        if self.tls_ca is not None and self.tls_cert is None:
            raise ConfigError("gateway.tls_ca: client certificates need TLS (set tls_cert and tls_key)")
        for name in ("tls_cert", "tls_key", "tls_ca"):
            if getattr(self, name) is not None:
                existing_file(getattr(self, name), f"gateway.{name}", ConfigError)
        for name in ("max_message_bytes", "call_timeout_s", "max_workers", "max_concurrent_rpcs", "max_episode_steps",
                     "max_open_episodes"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"gateway.{name}: expected a positive number, got {getattr(self, name)}")
        if not 0 <= self.port < 65536:
            raise ConfigError(f"gateway.port: expected 0-65535, got {self.port}")


class Refused(Exception):
    """A call answered with a gRPC status other than OK (the message names the field or the reason)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


@dataclass
class _OpenEpisode:
    """An episode whose parts are arriving: frames JPEG-encoded as they come, so it holds bytes, not arrays."""

    begin: dict[str, Any]
    recorder: EpisodeRecorder
    versions: dict[str, int | None]
    parts: int = 0
    done: dict | None = None  # end's reply, once in replay
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class _Session:
    id: str
    robot_id: str
    client_version: str
    started: float
    episodes: dict[str, _OpenEpisode] = field(default_factory=dict)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class RobotGateway:
    """The gRPC service; ``start()`` returns the port, ``stop()`` ends it for good (also a context manager)."""

    def __init__(self, config: GatewayConfig, spec: EnvSpec, chunk: int, policy: Policy, *, planner: Policy | None = None,
                 replay: ReplayClient | None = None, versions: Callable[[], dict[str, int | None]],
                 on_episode: Callable[[dict[str, Any]], None] | None = None) -> None:
        """``on_episode``: told of every episode inserted into replay ({robot_id, episode_id, table, success, steps,
        policy_version, planning_version, metadata}), e.g. for the job's metrics; its errors are logged, not raised."""
        config.validate()
        self.config, self.spec, self.chunk = config, spec, int(chunk)
        self.policy, self.planner, self.replay, self.versions = policy, planner, replay, versions
        self.on_episode = on_episode
        self.tokens = TokenStore(config.token_file, config.token_check_every_s)
        self._sessions: dict[str, _Session] = {}
        # Per robot, across its sessions: the replies of its last ended episodes, so an episode sent again
        # (its end's reply was lost, the robot reconnected and retries) lands in replay once.
        self._finished: dict[str, OrderedDict[str, dict]] = {}
        self._lock = threading.Lock()
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix="robot-gateway-model")
        self._server: grpc.Server | None = None
        self.port: int | None = None

    # ---- the server --------------------------------------------------------------------------
    def start(self) -> int:
        cfg = self.config
        handlers = {m: grpc.unary_unary_rpc_method_handler(self._wrap(m, getattr(self, f"_{m}"))) for m in wire.METHODS}
        self._server = grpc.server(
            ThreadPoolExecutor(cfg.max_workers, thread_name_prefix="robot-gateway"),
            handlers=[grpc.method_handlers_generic_handler(wire.SERVICE, handlers)],
            options=[("grpc.max_receive_message_length", cfg.max_message_bytes),
                     ("grpc.max_send_message_length", cfg.max_message_bytes)],
            maximum_concurrent_rpcs=cfg.max_concurrent_rpcs,
        )
        address = f"[{cfg.host}]:{cfg.port}" if ":" in cfg.host else f"{cfg.host}:{cfg.port}"
        if cfg.tls_cert is not None:
            creds = grpc.ssl_server_credentials(
                [(Path(cfg.tls_key).read_bytes(), Path(cfg.tls_cert).read_bytes())],  # type: ignore[arg-type]
                root_certificates=Path(cfg.tls_ca).read_bytes() if cfg.tls_ca else None,
                require_client_auth=cfg.tls_ca is not None,
            )
            self.port = self._server.add_secure_port(address, creds)
        else:
            if not is_loopback(cfg.host):
                log.warning("robot gateway on %s WITHOUT TLS: tokens and observations cross the network in clear; set "
                            "gateway.tls_cert and gateway.tls_key", address)
            self.port = self._server.add_insecure_port(address)
        if not self.port:
            raise ConfigError(f"gateway: cannot listen on {address}")
        self._server.start()
        log.info("robot gateway listening on %s:%d (%s)", cfg.host, self.port, "TLS" if cfg.tls_cert else "plaintext")
        return self.port

    def stop(self, grace_s: float | None = 1.0) -> None:
        if self._server is not None:
            self._server.stop(grace_s).wait()
            self._server = None
        self._model_thread.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> RobotGateway:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- every call --------------------------------------------------------------------------
    def _wrap(self, name: str, method: Callable[[str, dict, float], dict]) -> Callable[[bytes, grpc.ServicerContext], bytes]:
        def call(request: bytes, context: grpc.ServicerContext) -> bytes:
            robot = next((v for k, v in context.invocation_metadata() if k == wire.ROBOT_HEADER), "?")  # claimed: for the log
            try:
                robot = self._authenticate(context)
                deadline = self._deadline(context)
                msg = wire.expect_map(wire.decode(request, self.config.max_message_bytes), "")
                reply = wire.encode(method(robot, msg, deadline), self.config.max_message_bytes)
                return reply
            except Refused as exc:
                code, message = exc.code, exc.message
            except wire.WireTooLarge as exc:
                code, message = Code.RESOURCE_EXHAUSTED, str(exc)
            except (wire.WireError, InputError) as exc:
                code, message = Code.INVALID_ARGUMENT, str(exc)
            except Exception as exc:  # a bug or a backend failure: this call fails, the gateway serves on
                log.exception("robot gateway: %s from robot %r failed", name, robot)
                code, message = Code.INTERNAL, f"{name}: {type(exc).__name__}: {exc}"
            log.warning("robot gateway: %s from robot %r (%s): %s %s", name, robot, context.peer(), code.name, message)
            context.abort(code, message)
            raise AssertionError("unreachable")  # context.abort raises

        return call

    def _authenticate(self, context: grpc.ServicerContext) -> str:
        """The calling robot's id, proven by its token; before anything else of the call is looked at."""
        meta = {k.lower(): v for k, v in context.invocation_metadata() if isinstance(v, str)}
        robot, auth = meta.get(wire.ROBOT_HEADER), meta.get(wire.AUTH_HEADER, "")
        scheme, _, token = auth.partition(" ")
        if not robot or scheme.lower() != "bearer" or not token.strip():
            raise Refused(Code.UNAUTHENTICATED,
                          f"expected metadata '{wire.AUTH_HEADER}: Bearer <token>' and '{wire.ROBOT_HEADER}: <robot id>'")
        verdict = self.tokens.verify(robot, token.strip())
        if verdict is Verdict.WRONG_ROBOT:
            raise Refused(Code.PERMISSION_DENIED, f"robot {robot!r}: this token belongs to another robot")
        if verdict is not Verdict.OK:
            raise Refused(Code.UNAUTHENTICATED, f"robot {robot!r}: unknown or revoked token")
        return robot

    def _deadline(self, context: grpc.ServicerContext) -> float:
        """A monotonic deadline: the client's, capped by ``call_timeout_s`` (a client without one gets the cap)."""
        left = context.time_remaining()
        budget = self.config.call_timeout_s if left is None else min(left, self.config.call_timeout_s)
        if budget <= 0:
            raise Refused(Code.DEADLINE_EXCEEDED, "the call's deadline passed before it was read")
        return time.monotonic() + budget

    def _session(self, robot: str, msg: dict) -> _Session:
        sid = wire.expect_str(wire.field(msg, "session", ""), "session")
        with self._lock:
            session = self._sessions.get(robot)
        if session is None or session.id != sid:
            raise Refused(Code.FAILED_PRECONDITION, f"session {sid!r} is not the current session of robot {robot!r} (a newer "
                                                    f"hello replaced it, or the gateway restarted): call hello again")
        return session

    # ---- hello and heartbeat ----------------------------------------------------------------
    def _hello(self, robot: str, msg: dict, deadline: float) -> dict:
        protocol = wire.expect_int(wire.field(msg, "protocol", ""), "protocol")
        if protocol != wire.PROTOCOL:
            raise Refused(Code.FAILED_PRECONDITION, f"protocol: the gateway speaks protocol {wire.PROTOCOL}, the client "
                                                    f"{protocol}")
        claimed = wire.expect_str(wire.field(msg, "robot_id", ""), "robot_id")
        if claimed != robot:
            raise Refused(Code.PERMISSION_DENIED, f"robot_id: {claimed!r} is not the authenticated robot {robot!r}")
        client_version = wire.expect_str(wire.field(msg, "client_version", "", ""), "client_version")
        cameras = wire.field(msg, "cameras", "")
        if not isinstance(cameras, list) or not all(isinstance(c, str) for c in cameras):
            raise wire.WireError(f"cameras: expected a list of str, got {wire.describe(cameras)}")
        missing = [c for c in self.spec.cameras if c not in cameras]
        if missing:
            raise Refused(Code.FAILED_PRECONDITION, f"cameras: robot {robot!r} has {cameras}, the served model needs "
                                                    f"{list(self.spec.cameras)}")
        for key, served in (("proprio_dim", self.spec.proprio_dim), ("action_dim", self.spec.action_dim)):
            got = wire.expect_int(wire.field(msg, key, ""), f"{key}")
            if got != served:
                raise Refused(Code.FAILED_PRECONDITION, f"{key}: robot {robot!r} has {got}, the served model {served}")
        session = _Session(uuid.uuid4().hex, robot, client_version, time.time())
        with self._lock:
            old = self._sessions.get(robot)
            self._sessions[robot] = session
        if old is not None:
            log.info("robot gateway: robot %s said hello again: session %s replaces %s%s", robot, session.id, old.id,
                     f" (dropping {len(old.episodes)} unfinished episodes)" if old.episodes else "")
        else:
            log.info("robot gateway: robot %s (client %s) joined: session %s", robot, client_version, session.id)
        spec = self.spec
        return {"session": session.id, "protocol": wire.PROTOCOL, "cameras": list(spec.cameras),
                "image_size": list(spec.image_size), "proprio_dim": spec.proprio_dim, "action_dim": spec.action_dim,
                "chunk": self.chunk, "control_hz": float(spec.control_hz), "versions": self.versions(),
                "planner": self.planner is not None, "max_message_bytes": self.config.max_message_bytes,
                "call_timeout_s": self.config.call_timeout_s, "server_time": time.time()}

    def _heartbeat(self, robot: str, msg: dict, deadline: float) -> dict:
        session = self._session(robot, msg)
        return {"session": session.id, "server_time": time.time(), "versions": self.versions()}

    # ---- act and plan ------------------------------------------------------------------------
    def _act(self, robot: str, msg: dict, deadline: float) -> dict:
        return self._infer(robot, msg, deadline, self.policy, "act")

    def _plan(self, robot: str, msg: dict, deadline: float) -> dict:
        if self.planner is None:
            raise Refused(Code.UNIMPLEMENTED, "plan: this gateway serves no planner (hello's reply says planner=False); use act")
        return self._infer(robot, msg, deadline, self.planner, "plan")

    def _infer(self, robot: str, msg: dict, deadline: float, model: Policy, what: str) -> dict:
        self._session(robot, msg)
        obs = self.observation(wire.field(msg, "observation", ""))
        seed = wire.expect_int(wire.field(msg, "seed", "", None), "seed", optional=True)
        observed_at = wire.expect_float(wire.field(msg, "observed_at", "", None), "observed_at", optional=True)
        started = time.monotonic()
        future = self._model_thread.submit(model.infer, obs, seed)
        try:
            chunk = future.result(timeout=max(0.0, deadline - started))
        except FutureTimeout:
            future.cancel()  # never reaches the model if it was still waiting for its turn
            raise Refused(Code.DEADLINE_EXCEEDED, f"{what}: the model did not answer within the call's deadline "
                                                  f"({deadline - started:.2f} s)") from None
        actions = np.asarray(chunk.actions, dtype=np.float32)
        finite = bool(np.all(np.isfinite(actions))) and math.isfinite(chunk.value)
        if actions.shape != (self.chunk, self.spec.action_dim) or not finite:
            # Never hand a robot a malformed or NaN chunk (its own envelope would refuse it too).
            raise Refused(Code.INTERNAL, f"{what}: the model returned actions {actions.dtype.name} {actions.shape} and value "
                                         f"{chunk.value}; expected finite float32 ({self.chunk}, {self.spec.action_dim}) "
                                         f"and a finite value")
        reply = {"actions": actions, "value": float(chunk.value),
                 "versions": {"policy": chunk.policy_version, "planning": chunk.planning_version},
                 "observed_at": observed_at, "served_at": time.time(), "inference_s": time.monotonic() - started}
        if chunk.planner is not None:
            query = chunk.planner
            reply["planner"] = {"candidate_values": np.asarray(query.candidate_values, np.float32), "chosen": int(query.chosen)}
        return reply

    def observation(self, msg: Any, path: str = "observation") -> Observation:
        """A decoded observation checked against the served layout, field by field, before any model sees it."""
        msg = wire.expect_map(msg, path)
        images = wire.expect_map(wire.field(msg, "images", path), f"{path}.images")
        extra = sorted(set(images) - set(self.spec.cameras))
        if extra:
            raise wire.WireError(f"{path}.images: cameras {extra} are not served (served: {list(self.spec.cameras)})")
        h, w = self.spec.image_size
        checked = {cam: wire.expect_array(wire.field(images, cam, f"{path}.images"), f"{path}.images.{cam}", "uint8", (h, w, 3))
                   for cam in self.spec.cameras}
        proprio = wire.expect_array(wire.field(msg, "proprio", path), f"{path}.proprio", ("float32", "float64"),
                                    (self.spec.proprio_dim,), finite=True)
        instruction = wire.expect_str(wire.field(msg, "instruction", path), f"{path}.instruction", non_empty=True)
        return Observation(images=checked, proprio=proprio, instruction=instruction)

    # ---- episodes ----------------------------------------------------------------------------
    def _put_episode(self, robot: str, msg: dict, deadline: float) -> dict:
        if self.replay is None:
            raise Refused(Code.UNIMPLEMENTED, "put_episode: this gateway has no replay")
        session = self._session(robot, msg)
        key = wire.expect_str(wire.field(msg, "episode", ""), "episode", non_empty=True)
        part = wire.field(msg, "part", "")
        if part == "begin":
            return self._begin(session, key, msg)
        if part == "steps":
            return self._steps(session, key, msg)
        if part == "end":
            return self._end(session, key, msg, deadline)
        raise wire.WireError(f"part: expected 'begin', 'steps' or 'end', got {wire.describe(part)}")

    def _begin(self, session: _Session, key: str, msg: dict) -> dict:
        instruction = wire.expect_str(wire.field(msg, "instruction", ""), "instruction", non_empty=True)
        task = wire.expect_str(wire.field(msg, "task", "", ""), "task")
        seed = wire.expect_int(wire.field(msg, "seed", "", None), "seed", optional=True)
        extra = wire.expect_map(wire.field(msg, "metadata", "", {}), "metadata")
        for k, v in extra.items():
            if not (v is None or isinstance(v, (str, int, float, bool))):
                raise wire.WireError(f"metadata.{k}: expected a str, number, bool or None, got {wire.describe(v)}")
        opened = _OpenEpisode({"instruction": instruction, "task": task, "seed": seed, "metadata": extra},
                              EpisodeRecorder(self.spec.cameras), dict(self.versions()))
        with self._lock:
            done = self._finished.get(session.robot_id, {}).get(key)
            if done is not None:  # already in replay (its end's reply was lost): say so, do not take it twice
                return {"episode": key, "next_index": 0, "done": done}
            if key not in session.episodes and len(session.episodes) >= self.config.max_open_episodes:
                raise Refused(Code.RESOURCE_EXHAUSTED, f"episode {key!r}: the session already holds unfinished episodes "
                                                       f"{sorted(session.episodes)} (end them first)")
            session.episodes[key] = opened  # a begin sent again (a retry) starts the episode over
        return {"episode": key, "next_index": 0}

    def _open(self, session: _Session, key: str) -> _OpenEpisode:
        with self._lock:
            episode = session.episodes.get(key)
        if episode is None:
            raise Refused(Code.FAILED_PRECONDITION, f"episode {key!r}: not begun in session {session.id!r} (the parts of an "
                                                    f"unfinished episode are dropped when its robot says hello again)")
        return episode

    def _steps(self, session: _Session, key: str, msg: dict) -> dict:
        episode = self._open(session, key)
        index = wire.expect_int(wire.field(msg, "index", ""), "index")
        with episode.lock:
            if index == episode.parts - 1:  # sent again after a lost reply: already recorded
                return {"episode": key, "next_index": episode.parts, "steps": episode.recorder.steps, "duplicate": True}
            if index != episode.parts:
                raise Refused(Code.FAILED_PRECONDITION, f"index: episode {key!r} expects part {episode.parts}, got {index}")
            proprio = wire.expect_array(wire.field(msg, "proprio", ""), "proprio", ("float32", "float64"),
                                        ("n", self.spec.proprio_dim), finite=True)
            n = len(proprio)
            actions = wire.expect_array(wire.field(msg, "actions", ""), "actions", ("float32", "float64"),
                                        (n, self.spec.action_dim), finite=True)
            stamps = wire.field(msg, "timestamps", "", None)
            if stamps is not None:
                stamps = wire.expect_array(stamps, "timestamps", "float64", (n,), finite=True)
            images = wire.expect_map(wire.field(msg, "images", ""), "images")
            extra = sorted(set(images) - set(self.spec.cameras))
            if extra:
                raise wire.WireError(f"images: cameras {extra} are not served (served: {list(self.spec.cameras)})")
            h, w = self.spec.image_size
            frames = {cam: wire.expect_array(wire.field(images, cam, "images"), f"images.{cam}", "uint8", (n, h, w, 3))
                      for cam in self.spec.cameras}
            if episode.recorder.steps + n > self.config.max_episode_steps:
                raise Refused(Code.RESOURCE_EXHAUSTED, f"episode {key!r}: more than gateway.max_episode_steps "
                                                       f"({self.config.max_episode_steps}) steps")
            for t in range(n):
                episode.recorder.add({c: f[t] for c, f in frames.items()}, proprio[t], actions[t],
                                     None if stamps is None else float(stamps[t]))
            episode.parts += 1
            return {"episode": key, "next_index": episode.parts, "steps": episode.recorder.steps, "duplicate": False}

    def _end(self, session: _Session, key: str, msg: dict, deadline: float) -> dict:
        with self._lock:
            done = self._finished.get(session.robot_id, {}).get(key)
        if done is not None:  # an end sent again after a lost reply: the episode is in replay once
            return done
        episode = self._open(session, key)
        parts = wire.expect_int(wire.field(msg, "index", ""), "index")
        success = wire.expect_bool(wire.field(msg, "success", ""), "success")
        score = wire.expect_float(wire.field(msg, "score", "", None), "score", optional=True)
        interrupted = wire.expect_bool(wire.field(msg, "interrupted", "", False), "interrupted")
        versions = {}
        for t in ("policy", "planning"):  # the versions that acted, as the robot saw them; else those served at its begin
            v = wire.expect_int(wire.field(msg, f"{t}_version", "", None), f"{t}_version", optional=True)
            versions[t] = v if v is not None else episode.versions.get(t)
        with episode.lock:
            if episode.done is not None:  # an end sent twice at once: the second waited for the first
                return episode.done
            if parts != episode.parts:
                raise Refused(Code.FAILED_PRECONDITION, f"index: episode {key!r} received {episode.parts} parts, the end says "
                                                        f"{parts}")
            begin = episode.begin
            metadata = {**begin["metadata"], "robot_id": session.robot_id, "session": session.id,
                        "client_version": session.client_version, "robot_episode": key}
            record = episode.recorder.episode(instruction=begin["instruction"], task=begin["task"], seed=begin["seed"],
                                              success=success, score=score, interrupted=interrupted, source=Source.ROBOT,
                                              metadata=metadata, policy_version=versions["policy"],
                                              planning_version=versions["planning"])
            if record is None:
                raise wire.WireError(f"episode {key!r}: no steps were sent")
            reply: dict[str, Any] = {"episode": key, "steps": record.num_steps, "episode_id": record.episode_id,
                                     "inserted": False, "table": None}
            if interrupted:  # as with simulators: an interrupted episode's outcome is no label, so it is not learned from
                log.info("robot gateway: robot %s's episode %s was interrupted; not inserted", session.robot_id, key)
            else:
                table = TableName.of(record)
                left = deadline - time.monotonic()
                try:
                    reply["episode_id"] = self.replay.insert(table.value, record, timeout=max(left, 0.0))
                except ValueError as exc:  # the table's signature refuses it: sending it again cannot help
                    with self._lock:
                        session.episodes.pop(key, None)
                    raise Refused(Code.FAILED_PRECONDITION, f"put_episode: replay refused episode {key!r}: {exc}") from exc
                except Exception as exc:  # full, timed out, or down: the episode stays open, its end may be sent again
                    raise Refused(Code.UNAVAILABLE, f"put_episode: replay did not take episode {key!r} "
                                                    f"({type(exc).__name__}: {exc}); send its end again") from exc
                reply.update(inserted=True, table=table.value)
                if self.on_episode is not None:
                    try:
                        self.on_episode({"robot_id": session.robot_id, "episode_id": reply["episode_id"], "table": table.value,
                                         "success": success, "steps": record.num_steps, "policy_version": versions["policy"],
                                         "planning_version": versions["planning"], "metadata": dict(metadata)})
                    except Exception:  # the episode is in replay: a listener's failure must not fail the call
                        log.exception("robot gateway: on_episode failed for robot %s's episode %s", session.robot_id, key)
            episode.done = reply
        with self._lock:
            session.episodes.pop(key, None)
            finished = self._finished.setdefault(session.robot_id, OrderedDict())
            finished[key] = reply
            while len(finished) > 64:
                finished.popitem(last=False)
        return reply
