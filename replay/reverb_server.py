"""The Reverb server process: standard library, Reverb and TensorFlow only.

Run as a script, ``python -P replay/reverb_server.py SPEC`` (``-P``: the script's folder, with
``config.py`` and friends, must not shadow modules), by ``replay.reverb_process``. ``SPEC`` is the
JSON the service wrote (``replay.reverb_book.table_spec`` per table, and the checkpoint folder).
The server prints ``REVERB_SERVER_READY <port>`` once it listens.

Reverb gotchas handled here: its server binds every interface and its Python API has no host
option (clients connect to 127.0.0.1 only; keep the port firewalled); two servers can hold one
port (gRPC sets SO_REUSEPORT), so the server picks a free port with portpicker and checks in
/proc that no other socket listens on it; ``server.wait()`` blocks Python signal handlers, so
the process sleeps in a loop, stops the server on SIGTERM / SIGINT and also when its parent is
gone (a killed service, or a killed shard actor, leaves no server behind).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

SERVER_READY = "REVERB_SERVER_READY"


def item_signature(tf: Any, cameras: int | None, proprio_dim: int | None, action_dim: int | None) -> dict[str, Any]:
    """The structure of one item (a step window); ``None`` leaves a dimension open."""
    spec, s = tf.TensorSpec, tf.string
    return {
        "episode_id": spec([], s),
        "seq": spec([], tf.int64),  # which insertion of the episode: tells a live item from a tombstone
        "step": spec([], tf.int32),
        "num_steps": spec([], tf.int32),
        "cameras": spec([cameras], s),
        "current": spec([cameras], s),
        "future": spec([cameras], s),
        "actions": spec([None, action_dim], tf.float32),  # a[t : t + K], at most K rows
        "proprio": spec([proprio_dim], tf.float32),
        "future_proprio": spec([proprio_dim], tf.float32),
        "instruction": spec([], s),
        "success": spec([], tf.bool),
        "score": spec([], tf.float64),
        "source": spec([], s),
        "policy_version": spec([], tf.int64),
        "has_policy_version": spec([], tf.bool),
        "planning_version": spec([], tf.int64),
        "has_planning_version": spec([], tf.bool),
        "origin": spec([], s),
        # (cameras, proprio_dim, action_dim): samples are decoded in padded batches, cut back with these
        "dims": spec([3], tf.int32),
    }


def _reverb_table(reverb: Any, tf: Any, spec: dict[str, Any]) -> Any:
    """A ``reverb.Table`` from the plain spec the service wrote (see ``replay.reverb_book.table_spec``)."""
    selectors = {
        "uniform": lambda: reverb.selectors.Uniform(),
        "prioritized": lambda: reverb.selectors.Prioritized(priority_exponent=spec["priority_exponent"]),
        "fifo": lambda: reverb.selectors.Fifo(),
    }
    rl = spec["rate_limiter"]
    if rl["kind"] == "min_size":
        limiter = reverb.rate_limiters.MinSize(rl["min_size"])
    else:
        limiter = reverb.rate_limiters.SampleToInsertRatio(
            samples_per_insert=rl["samples_per_insert"],
            min_size_to_sample=rl["min_size"],
            error_buffer=(rl["min_diff"], rl["max_diff"]),
        )
    sig = spec["signature"]
    return reverb.Table(
        name=spec["name"],
        sampler=selectors[spec["sampler"]](),
        remover=reverb.selectors.Fifo(),
        max_size=spec["max_size"],
        max_times_sampled=spec["max_times_sampled"],
        rate_limiter=limiter,
        signature=item_signature(tf, sig["cameras"], sig["proprio_dim"], sig["action_dim"]),
    )


def _listener_inodes(port: int) -> set[str]:
    """Inodes of the sockets listening on ``port`` (IPv4 and IPv6) in this network namespace."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    return inodes


def _sole_listener(port: int) -> bool:
    """True when every socket listening on ``port`` is this process's (no second server shares it)."""
    mine = set()
    for fd in os.listdir("/proc/self/fd") if os.path.isdir("/proc/self/fd") else []:
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            mine.add(target[len("socket:[") : -1])
    listening = _listener_inodes(port)
    if not os.path.isdir("/proc/net"):
        return True  # nothing to check against (Reverb itself runs on Linux only)
    return bool(listening) and listening <= mine


def serve(spec_path: str) -> int:
    """Run a Reverb server for the spec at ``spec_path`` until SIGTERM / SIGINT or the parent exits."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import portpicker
    import reverb
    import tensorflow as tf

    spec = json.loads(Path(spec_path).read_text())
    parent = os.getppid()
    stop: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.append(signum))
    server = None
    for _ in range(8):
        port = portpicker.pick_unused_port()
        server = reverb.Server(
            tables=[_reverb_table(reverb, tf, t) for t in spec["tables"]],
            port=port,
            checkpointer=reverb.checkpointers.DefaultCheckpointer(path=spec["checkpoints"]),
        )
        if _sole_listener(port):
            break
        print(f"reverb server: another socket listens on port {port} too; picking another", file=sys.stderr, flush=True)
        server.stop()
        server = None
    if server is None:
        print("reverb server: found no port that only this server listens on", file=sys.stderr, flush=True)
        return 1
    print(f"{SERVER_READY} {port}", flush=True)
    # Not server.wait(): it blocks Python's signal handlers. Stop when told or orphaned.
    while not stop and os.getppid() == parent:
        time.sleep(0.1)
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(serve(sys.argv[1]))
