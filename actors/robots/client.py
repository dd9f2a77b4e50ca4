"""The robot side of the gateway: a thin client (grpcio, msgpack, numpy; no torch, Ray, PIL or cosmos_policy).

openpi's lesson: the robot depends on a tiny client, not on the training stack. This module and
``wire`` are all a robot host needs to reach the job's policy and replay; the control loop and the
safety envelope run beside it on the robot, so safety never waits on the network.

Every call carries a deadline (``timeout_s``), so a dead network or gateway is a ``GatewayError``
within that time, never a hang (LeRobot's first call had none: issue #3979); the error names the
method and the gRPC status (``DEADLINE_EXCEEDED``, ``UNAVAILABLE``, ``UNAUTHENTICATED``...). The
client never retries on its own: the robot's loop decides (hold, stop, ``reconnect()``).

The token travels as ``authorization: Bearer <token>`` with ``x-robot-id`` on every call: as
per-call credentials composed with TLS (``tls_ca``), or as plain metadata on an unencrypted channel
(meant for loopback; elsewhere a warning says the token crosses the network in clear).
"""

from __future__ import annotations

import ipaddress
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from actors.robots import wire

CLIENT_VERSION = f"cosmos-policy-robot-client/{wire.PROTOCOL}"
HEADROOM = 64 * 1024  # bytes of a message left for its keys and small fields when episodes are split


class GatewayError(Exception):
    """A gateway call that failed; ``code`` is the gRPC status name (or BAD_REPLY / RESOURCE_EXHAUSTED found here)."""

    def __init__(self, method: str, code: str, details: str) -> None:
        super().__init__(f"{method}: {code}: {details}")
        self.method, self.code, self.details = method, code, details


class _TokenAuth(grpc.AuthMetadataPlugin):
    """Per-call credentials: the robot's token and id on every call of a TLS channel."""

    def __init__(self, robot_id: str, token: str) -> None:
        self.metadata = ((wire.AUTH_HEADER, f"Bearer {token}"), (wire.ROBOT_HEADER, robot_id))

    def __call__(self, context: grpc.AuthMetadataContext, callback: grpc.AuthMetadataPluginCallback) -> None:
        callback(self.metadata, None)


def _loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class GatewayClient:
    """One robot's connection to a ``RobotGateway``: ``hello`` first, then ``act``, ``plan``, ``put_episode``, ``heartbeat``."""

    def __init__(self, address: str, robot_id: str, token: str, tls_ca: str | None = None, timeout_s: float = 5.0, *,
                 tls_cert: str | None = None, tls_key: str | None = None, tls_server_name: str | None = None) -> None:
        """``address`` is host:port; ``tls_ca`` (PEM) turns TLS on and verifies the gateway; ``tls_cert``/``tls_key``
        are this robot's client certificate where the gateway asks for one; ``tls_server_name`` overrides the name
        checked in the gateway's certificate. ``timeout_s`` is every call's deadline unless a call gives its own."""
        self.address, self.robot_id, self.timeout_s = address, robot_id, float(timeout_s)
        self._token = token
        self._tls = (tls_ca, tls_cert, tls_key, tls_server_name)
        if tls_ca is None and not _loopback(address):
            warnings.warn(f"GatewayClient to {address} without TLS: the token and observations cross the network in clear "
                          f"(pass tls_ca)", stacklevel=2)
        self.session: str | None = None
        self.served: dict[str, Any] = {}  # hello's reply: the served layout, versions, limits
        self._hello_args: dict[str, Any] | None = None
        self._channel: grpc.Channel | None = None
        self._open()

    # ---- the channel -------------------------------------------------------------------------
    def _open(self) -> None:
        ca, cert, key, name = self._tls
        # A channel of its own subchannels: grpc otherwise shares connections between the channels of a process,
        # and a reconnect would inherit the old connection's backoff (failing at once after the network heals).
        options = [("grpc.max_receive_message_length", 64 * 1024 * 1024), ("grpc.max_send_message_length", 64 * 1024 * 1024),
                   ("grpc.use_local_subchannel_pool", 1)]
        if ca is not None:
            ssl = grpc.ssl_channel_credentials(root_certificates=Path(ca).read_bytes(),
                                               private_key=Path(key).read_bytes() if key else None,
                                               certificate_chain=Path(cert).read_bytes() if cert else None)
            token = grpc.metadata_call_credentials(_TokenAuth(self.robot_id, self._token))
            creds = grpc.composite_channel_credentials(ssl, token)
            if name:
                options.append(("grpc.ssl_target_name_override", name))
            self._channel = grpc.secure_channel(self.address, creds, options=options)
            self._metadata: tuple[tuple[str, str], ...] | None = None
        else:
            self._channel = grpc.insecure_channel(self.address, options=options)
            self._metadata = ((wire.AUTH_HEADER, f"Bearer {self._token}"), (wire.ROBOT_HEADER, self.robot_id))
        self._stubs = {m: self._channel.unary_unary(wire.method_path(m)) for m in wire.METHODS}  # raw bytes in and out

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def __enter__(self) -> GatewayClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, method: str, payload: dict[str, Any], timeout_s: float | None = None) -> dict[str, Any]:
        """One unary call with a deadline: ``payload`` out, the decoded reply back, or ``GatewayError``."""
        if self._channel is None:
            raise GatewayError(method, "CANCELLED", "the client is closed")
        limit = self.served.get("max_message_bytes")
        try:
            body = wire.encode(payload, limit)
        except wire.WireTooLarge as exc:
            raise GatewayError(method, "RESOURCE_EXHAUSTED", f"{exc} (the gateway's max_message_bytes)") from None
        except wire.WireError as exc:
            raise GatewayError(method, "INVALID_ARGUMENT", str(exc)) from None
        try:
            data = self._stubs[method](body, timeout=self.timeout_s if timeout_s is None else timeout_s, metadata=self._metadata)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            raise GatewayError(method, code.name if code is not None else "UNKNOWN",
                               exc.details() if hasattr(exc, "details") else str(exc)) from None
        try:
            return wire.expect_map(wire.decode(data, 64 * 1024 * 1024), "reply")
        except wire.WireError as exc:
            raise GatewayError(method, "BAD_REPLY", str(exc)) from None

    def _sessioned(self) -> str:
        if self.session is None:
            raise GatewayError("session", "FAILED_PRECONDITION", "call hello() first")
        return self.session

    # ---- the methods -------------------------------------------------------------------------
    def hello(self, cameras: list[str], proprio_dim: int, action_dim: int, timeout_s: float | None = None) -> dict[str, Any]:
        """Join: this robot's cameras and dims against the served layout; the reply (also ``self.served``) says
        what is served (cameras, image_size, proprio_dim, action_dim, chunk, versions, planner, max_message_bytes)
        and starts a new session, which ends any earlier one of this robot."""
        self._hello_args = {"cameras": list(cameras), "proprio_dim": int(proprio_dim), "action_dim": int(action_dim)}
        reply = self.call("hello", {"protocol": wire.PROTOCOL, "robot_id": self.robot_id, "client_version": CLIENT_VERSION,
                                    **self._hello_args}, timeout_s)
        self.served, self.session = reply, reply["session"]
        return reply

    def reconnect(self, timeout_s: float | None = None) -> dict[str, Any]:
        """A fresh channel and a new session (hello again with the last hello's facts)."""
        if self._hello_args is None:
            raise GatewayError("reconnect", "FAILED_PRECONDITION", "call hello() first")
        self.close()
        self.session = None
        self._open()
        return self.hello(timeout_s=timeout_s, **self._hello_args)

    def act(self, images: dict[str, np.ndarray], proprio: np.ndarray, instruction: str, seed: int | None = None,
            observed_at: float | None = None, timeout_s: float | None = None) -> dict[str, Any]:
        """An action chunk from the policy: {actions (K, d_a) float32, value, versions, observed_at, served_at,
        inference_s, latency_s}. ``observed_at`` (default now) comes back so the loop can tell a stale chunk."""
        return self._infer("act", images, proprio, instruction, seed, observed_at, timeout_s)

    def plan(self, images: dict[str, np.ndarray], proprio: np.ndarray, instruction: str, seed: int | None = None,
             observed_at: float | None = None, timeout_s: float | None = None) -> dict[str, Any]:
        """As ``act``, chosen by best-of-N planning; the reply adds planner {candidate_values, chosen}."""
        return self._infer("plan", images, proprio, instruction, seed, observed_at, timeout_s)

    def _infer(self, method: str, images: dict[str, np.ndarray], proprio: np.ndarray, instruction: str, seed: int | None,
               observed_at: float | None, timeout_s: float | None) -> dict[str, Any]:
        observed_at = time.time() if observed_at is None else observed_at
        started = time.monotonic()
        observation = {"images": dict(images), "proprio": np.asarray(proprio), "instruction": instruction}
        body = {"session": self._sessioned(), "seed": seed, "observed_at": observed_at, "observation": observation}
        reply = self.call(method, body, timeout_s)
        reply["latency_s"] = time.monotonic() - started
        return reply

    def heartbeat(self, timeout_s: float | None = None) -> dict[str, Any]:
        """{server_time, versions, session}; a FAILED_PRECONDITION here means this session was replaced."""
        return self.call("heartbeat", {"session": self._sessioned()}, timeout_s)

    def put_episode(self, images: dict[str, np.ndarray], proprio: np.ndarray, actions: np.ndarray, instruction: str,
                    success: bool, *, task: str = "", score: float | None = None, seed: int | None = None,
                    timestamps: np.ndarray | None = None, policy_version: int | None = None, planning_version: int | None = None,
                    interrupted: bool = False, metadata: dict[str, Any] | None = None, episode: str | None = None,
                    timeout_s: float | None = None) -> dict[str, Any]:
        """Send one episode (per camera uint8 (T, H, W, 3) frames, proprio (T, d_p), actions (T, d_a)) in parts under the
        gateway's message limit: begin, steps batches, end. Returns the end's reply {episode, episode_id, table, steps,
        inserted}. Sent again with the same ``episode`` key after a failure, it starts over, and one already in replay
        is not taken twice. ``timeout_s`` is each part's deadline."""
        key = episode or uuid.uuid4().hex
        session = self._sessioned()
        proprio, actions = np.asarray(proprio), np.asarray(actions)
        steps = len(actions)
        frames = {cam: np.asarray(f) for cam, f in images.items()}
        head = {"session": session, "episode": key}
        begun = self.call("put_episode", {**head, "part": "begin", "instruction": instruction, "task": task, "seed": seed,
                                          "metadata": dict(metadata or {})}, timeout_s)
        if "done" in begun:
            return begun["done"]
        limit = int(self.served.get("max_message_bytes", wire.DEFAULT_MAX_BYTES)) - HEADROOM
        per_step = sum(f[0].nbytes for f in frames.values() if len(f)) + proprio[:1].nbytes + actions[:1].nbytes + 8 + 64
        if per_step > limit:
            raise GatewayError("put_episode", "RESOURCE_EXHAUSTED", f"one step is {per_step} bytes, over the gateway's limit of "
                                                                     f"{limit + HEADROOM} less {HEADROOM} headroom")
        batch = max(1, limit // per_step)
        index = 0
        for start in range(0, steps, batch):
            part = slice(start, start + batch)
            body: dict[str, Any] = {**head, "part": "steps", "index": index, "proprio": proprio[part], "actions": actions[part],
                                    "images": {cam: f[part] for cam, f in frames.items()}}
            if timestamps is not None:
                body["timestamps"] = np.asarray(timestamps, dtype=np.float64)[part]
            self.call("put_episode", body, timeout_s)
            index += 1
        return self.call("put_episode", {**head, "part": "end", "index": index, "success": bool(success), "score": score,
                                         "interrupted": bool(interrupted), "policy_version": policy_version,
                                         "planning_version": planning_version}, timeout_s)
