"""A robot outside the Ray cluster, attached to a job through its gateway: the station fed by the thin client.

    python -m actors.robots.remote --address job-host:50051 --robot dummy_lift --token-file ~/.arm-1-token \\
        --instruction "lift the red cube" --episodes 10 [--tls-ca gateway-ca.pem]

The control loop and the safety envelope run here, on the robot (``RobotStation``); chunks come from
the gateway (``act``, or ``plan`` where the gateway serves a planner), each call with the robot
config's ``chunking.deadline_s`` as its deadline, so a slow or dead network makes the robot hold, then
stop, never wait. At each episode's end a label goes to the job's replay (``put_episode``: the same
episode key again after a failure, so it lands once); an interrupted or re-recorded one is not sent.
Thin: the standard library, numpy, msgpack and grpcio (``client.py``), and yaml to read the config.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import uuid
from pathlib import Path
from typing import Any, Callable

import numpy as np

from actors.robots.chunks import Chunk, Infer
from actors.robots.client import GatewayClient, GatewayError
from actors.robots.config import RobotConfig, load_robot_config
from actors.robots.control import ResetTimeout
from actors.robots.observation import RobotObservation
from actors.robots.station import OperatorSpec, RobotStation, acted_versions, episode_metadata, label, summary

log = logging.getLogger(__name__)
PUT_TRIES = 3  # an episode's parts sent again (same key) after UNAVAILABLE or a replaced session, then given up


def gateway_infer(client: GatewayClient, plan: bool, timeout_s: float) -> Infer:
    """The control loop's chunk source: the gateway's ``plan`` (when asked and served) or ``act``, each call within ``timeout_s``."""
    cameras = list(client.served["cameras"])
    call = client.plan if plan and client.served.get("planner") else client.act

    def infer(obs: RobotObservation) -> Chunk:
        reply = call({c: obs.images[c] for c in cameras}, obs.proprio, obs.instruction, observed_at=obs.timestamp, timeout_s=timeout_s)
        return Chunk(actions=np.asarray(reply["actions"], dtype=np.float64), observed_at=obs.timestamp, value=reply.get("value"),
                     versions=dict(reply.get("versions") or {}), extra={"inference_s": reply.get("inference_s"),
                                                                        "latency_s": reply.get("latency_s")})

    return infer


def run_robot_over_gateway(client: GatewayClient, config: RobotConfig, operator: OperatorSpec | str, instruction: str,
                           episodes: int | None = 1, *, task: str = "", max_steps: int = 400, plan: bool = True,
                           reset_timeout_s: float = 600.0, stop: threading.Event | None = None,
                           on_result: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Say hello, then play ``episodes`` episodes (None: until ``stop`` is set), each put into the job's replay when it
    is a label; returns each episode's ``station.summary`` with where it went. The driver is stopped at the end."""
    client.hello(list(config.cameras), len(config.proprio), len(config.actions))
    cameras = list(client.served["cameras"])
    spec = OperatorSpec.parse(operator)
    station = RobotStation(config, spec, gateway_infer(client, plan, config.chunking.deadline_s))
    results: list[dict[str, Any]] = []
    try:
        while (episodes is None or len(results) < episodes) and not (stop is not None and stop.is_set()):
            try:
                record = station.play(instruction, max_steps, reset_timeout_s)
            except ResetTimeout as exc:
                log.warning("%s", exc)
                continue
            result = summary(record)
            if label(record) is not None:
                result.update(put(client, record, cameras, spec.kind, task))
            results.append(result)
            if on_result is not None:
                on_result(result)
    finally:
        station.close()
    return results


def put(client: GatewayClient, record: Any, cameras: list[str], operator: str, task: str) -> dict[str, Any]:
    """One labelled episode into the job's replay through the gateway: {inserted, table, episode_id} (or error)."""
    versions = acted_versions(record)
    key = f"{record.robot_id}-{uuid.uuid4().hex}"
    error = ""
    for attempt in range(PUT_TRIES):
        try:
            reply = client.put_episode({c: record.images[c] for c in cameras}, record.proprio, record.actions, record.instruction,
                                       bool(label(record)), task=task, timestamps=record.timestamps, episode=key,
                                       policy_version=versions.get("policy"), planning_version=versions.get("planning"),
                                       metadata=episode_metadata(record, operator))
            return {"inserted": bool(reply["inserted"]), "table": reply.get("table"), "episode_id": reply.get("episode_id")}
        except GatewayError as exc:
            error = str(exc)
            log.warning("put_episode %s (try %d of %d): %s", key, attempt + 1, PUT_TRIES, exc)
            if exc.code not in ("UNAVAILABLE", "FAILED_PRECONDITION", "DEADLINE_EXCEEDED"):
                break
            if exc.code == "FAILED_PRECONDITION":
                try:
                    client.reconnect()
                except GatewayError as again:
                    error = str(again)
    return {"inserted": False, "table": None, "episode_id": None, "error": error}


# ---- the command line ---------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m actors.robots.remote", description=__doc__.splitlines()[0])
    p.add_argument("--address", required=True, help="the job's gateway, host:port (its log and <run_dir>/job.json say)")
    p.add_argument("--robot", required=True, help="configs/robot/<name>.yaml or a YAML path")
    p.add_argument("--id", default=None, help="the robot's id (default: the config's); its token is minted for it")
    token = p.add_mutually_exclusive_group(required=True)
    token.add_argument("--token-file", help="a file holding this robot's token (as `python -m actors.robots.tokens add` printed it)")
    token.add_argument("--token", help="the token itself (visible to other users in the process list: prefer --token-file)")
    p.add_argument("--instruction", required=True, help="what the robot is told to do (the policy's instruction)")
    p.add_argument("--task", default="", help="the task name recorded with its episodes")
    p.add_argument("--episodes", default="1", help="episodes to play, or 'continuous' (until Ctrl-C)")
    p.add_argument("--operator", choices=("keyboard", "scripted"), default="keyboard",
                   help="keyboard: s success, f failure, r re-record, space intervene, n reset done, e stop, c clear; scripted: --script")
    p.add_argument("--script", action="append", default=[], metavar="STEP=EVENT", help="scripted operator: an event at a control step")
    p.add_argument("--max-steps", type=int, default=400, help="control steps an episode may last (then it ends, a failure)")
    p.add_argument("--no-plan", action="store_true", help="chunks from the policy alone (default: best-of-N where served)")
    p.add_argument("--reset-timeout-s", type=float, default=600.0, help="how long to wait for the operator's reset before asking again")
    p.add_argument("--timeout-s", type=float, default=10.0, help="deadline of the gateway calls other than act and plan")
    p.add_argument("--tls-ca", default=None, help="PEM CA of the gateway's certificate (turns TLS on)")
    p.add_argument("--tls-cert", default=None, help="this robot's client certificate (where the gateway asks for one)")
    p.add_argument("--tls-key", default=None, help="the key of --tls-cert")
    return p


def script_events(items: list[str]) -> dict[str, list[str]]:
    """``STEP=EVENT`` items as a script mapping."""
    out: dict[str, list[str]] = {}
    for item in items:
        step, sep, event = item.partition("=")
        if not sep:
            raise SystemExit(f"--script {item!r}: expected STEP=EVENT, e.g. 40=success")
        out.setdefault(step.strip(), []).append(event.strip())
    return out


def episodes_arg(value: str) -> int | None:
    if value == "continuous":
        return None
    if not value.isdigit() or int(value) < 1:
        raise SystemExit(f"--episodes: expected a count >= 1 or 'continuous', got {value!r}")
    return int(value)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    config = load_robot_config(args.robot)
    if args.id:
        import dataclasses

        config = dataclasses.replace(config, id=args.id)
    token = args.token if args.token is not None else Path(args.token_file).read_text().strip()
    operator: dict[str, Any] = {"kind": args.operator}
    if args.script:
        operator["script"] = script_events(args.script)
    count = episodes_arg(args.episodes)
    stop = threading.Event()
    client = GatewayClient(args.address, config.id, token, tls_ca=args.tls_ca, timeout_s=args.timeout_s, tls_cert=args.tls_cert,
                           tls_key=args.tls_key)
    try:
        run_robot_over_gateway(client, config, OperatorSpec.parse(operator), args.instruction, count, task=args.task,
                               max_steps=args.max_steps, plan=not args.no_plan, reset_timeout_s=args.reset_timeout_s, stop=stop,
                               on_result=lambda r: print(json.dumps(r), flush=True))
    except KeyboardInterrupt:  # the station stopped the robot on the way out (its finally)
        print("stopped by Ctrl-C: the robot is stopped", file=sys.stderr)
        return 130
    except GatewayError as exc:
        print(f"the gateway: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
