"""Serving throughput: how many policy queries one GPU answers to many simulators at once (issue 26). No Ray needed.

N clients, each a simulator's EnvRunner in a closed loop (send a raw observation: two 256x256 uint8 camera images,
proprio and the instruction; wait for the chunk; send the next), against the PolicyServer's own batching code
(``actors.policy_server.BatchingServer``: requests gathered for up to ``--max-wait-ms``, padded up to the captured
batch sizes) serving the 2B policy at LIBERO shapes, its network compiled into CUDA graphs (one per batch size,
captured before the clock starts). For N in ``--clients`` it reports queries/s, p50 and p99 latency, the batches
formed (by size, before padding) and the GPU's utilization; with ``--plan-every k`` one query in k is a best-of-8
plan (LIBERO shapes, 10 / 5 / 5 steps) mixed among the action queries.

From the best N (the most queries/s with p99 latency <= 0.5 s) and the simulators' speed, it projects the wall time
of the full LIBERO protocol (4 suites x 10 tasks x 50 trials = 2,000 episodes) on one GPU host: queries per episode
(``--queries-per-episode``: the assumption, stated in the output) x 2,000 over the queries/s, against the env steps
those episodes take over the host's cores (``--host-cores`` x ``--env-steps-per-s-per-core``, bench/env_speed.py's
LIBERO figure by default): the larger of the two, as the two overlap.

    python bench/serving.py                                   # on the GPU host: bench/results/serving.json
    python bench/serving.py --config tiny --clients 1,4 --seconds 3 --no-compile --out /tmp/serving.json   # a CPU smoke run

A run that must be cut short (each captured size compiles for about 100 s) is split by N: the later run names the
earlier one's file with ``--merge`` (same machine and settings), and its rows join that table.

    python bench/serving.py --float8 rowwise --batch-sizes 1,4 --clients 1,4 --out bench/results/serving_1_4.json
    python bench/serving.py --float8 rowwise --batch-sizes 8,16 --clients 8,16,32,64 --merge bench/results/serving_1_4.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from actors.config import ServerConfig  # noqa: E402
from actors.policy_server import BatchingServer, accelerate  # noqa: E402
from cosmos_policy.float8 import resolve_inference_float8  # noqa: E402
from cosmos_policy.planner import Planner, PlannerConfig  # noqa: E402
from cosmos_policy.policy import CosmosPolicy, PolicyConfig  # noqa: E402
from inference_speed import observation, parts  # noqa: E402

LIBERO_EPISODES = 4 * 10 * 50  # suites x tasks x trials
OUT = ROOT / "bench" / "results" / "serving.json"


class Utilization:
    """The GPU's utilization (%) sampled every ``every_s`` by nvidia-smi while the clock runs (None without a GPU)."""

    def __init__(self, device: torch.device, every_s: float = 0.25) -> None:
        self.samples: list[float] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every_s,), daemon=True) if device.type == "cuda" else None
        self.index = device.index if device.index is not None else (torch.cuda.current_device() if device.type == "cuda" else 0)

    def _run(self, every_s: float) -> None:
        while not self._done.wait(every_s):
            try:
                out = subprocess.run(["nvidia-smi", f"--id={self.index}", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=5).stdout
                self.samples.append(float(out.strip().splitlines()[0]))
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                return

    def __enter__(self) -> Utilization:
        if self._thread is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()

    def mean(self) -> float | None:
        return round(statistics.mean(self.samples), 1) if self.samples else None


async def closed_loop(server: BatchingServer, clients: int, seconds: float, plan_every: int, size: int, layout) -> list[tuple[str, float]]:
    """``clients`` callers each sending its next query as soon as the last is answered; (kind, latency s) of each."""
    observations = [observation(layout, size, seed=c) for c in range(clients)]
    done: list[tuple[str, float]] = []
    end = time.perf_counter() + seconds

    async def client(c: int) -> None:
        k = 0
        while time.perf_counter() < end:
            kind = "plan" if plan_every and (c + k) % plan_every == 0 else "act"
            start = time.perf_counter()
            await (server.plan if kind == "plan" else server.act)(observations[c], seed=1000 * c + k)
            done.append((kind, time.perf_counter() - start))
            k += 1

    await asyncio.gather(*[client(c) for c in range(clients)])
    return done


def measure(server: BatchingServer, clients: int, args: argparse.Namespace, layout, device: torch.device) -> dict[str, object]:
    asyncio.run(closed_loop(server, clients, args.warmup_s, args.plan_every, args.image_size, layout))  # the batch sizes it forms
    server.stats.update(requests=0, batches=0, act_batches=0, plan_batches=0, busy_s=0.0, padded_rows=0)
    server.batch_sizes.clear()
    with Utilization(device) as gpu:
        start = time.perf_counter()
        done = asyncio.run(closed_loop(server, clients, args.seconds, args.plan_every, args.image_size, layout))
        wall = time.perf_counter() - start
    act = sorted(t for kind, t in done if kind == "act")
    plan = sorted(t for kind, t in done if kind == "plan")

    def quantile(xs: list[float], q: float) -> float | None:
        return round(float(np.quantile(xs, q)), 4) if xs else None

    formed = dict(sorted(server.batch_sizes.items()))
    return {"clients": clients, "queries": len(done), "queries_per_s": round(len(act) / wall, 2),
            "plans_per_s": round(len(plan) / wall, 3) if plan else 0.0,
            "p50_latency_s": quantile(act, 0.5), "p99_latency_s": quantile(act, 0.99), "plan_p99_latency_s": quantile(plan, 0.99),
            "mean_batch": round(sum(n * k for n, k in formed.items()) / max(1, sum(formed.values())), 2),
            "batches_formed": {str(n): k for n, k in formed.items()}, "padded_rows": server.stats["padded_rows"],
            "gpu_utilization_pct": gpu.mean(), "seconds": round(wall, 1)}


def profile_kernels(server: BatchingServer, clients: int, args: argparse.Namespace, layout, device: torch.device) -> None:
    """Where the device's time goes while serving: the kernels of 2 s of closed-loop serving, by their total time."""
    from torch.profiler import ProfilerActivity, profile

    asyncio.run(closed_loop(server, clients, 1.0, args.plan_every, args.image_size, layout))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        asyncio.run(closed_loop(server, clients, 2.0, args.plan_every, args.image_size, layout))
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=90), flush=True)


def check_mergeable(earlier: dict, settings: dict, path: str) -> None:
    """An earlier call's result (``--merge``) must share the machine and the settings that change a row's meaning."""
    for field, value in settings.items():
        if earlier.get(field) != value:
            raise SystemExit(f"--merge {path}: its {field} is {earlier.get(field)!r}, this run's is {value!r}: "
                             "rows of different machines or settings do not form one table")
    if not isinstance(earlier.get("table"), list):
        raise SystemExit(f"--merge {path}: expected a 'table' list of rows (a bench/serving.py result), got {type(earlier.get('table')).__name__}")


def merged_table(earlier: dict, table: list[dict], calls: list[dict]) -> tuple[list[dict], list[dict]]:
    """This call's rows joined to an earlier call's (``--merge``, checked by ``check_mergeable``); this call's row of an N
    replaces the earlier one. Returns the table by N and the calls that made it."""
    before = earlier.get("calls") or [{"command": earlier.get("command"), "batch_sizes": earlier.get("batch_sizes"),
                                       "warm_up_s": earlier.get("warm_up_s"), "date": earlier.get("date")}]
    rows = {r["clients"]: {"batch_sizes": before[-1]["batch_sizes"], **r} for r in earlier["table"]}
    rows.update({r["clients"]: r for r in table})
    return [rows[n] for n in sorted(rows)], before + calls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="2b", help="configs/model/<config>.yaml (2b on the GPU host; tiny for a CPU smoke run)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--clients", default="1,4,8,16,32,64", help="the N of concurrent clients to measure, comma-separated")
    parser.add_argument("--seconds", type=float, default=20.0, help="the clock per N")
    parser.add_argument("--warmup-s", type=float, default=3.0, help="unclocked queries per N first")
    parser.add_argument("--batch-sizes", default="1,2,4,8,16,32,64", help="server.batch_sizes: the padded (captured) sizes")
    parser.add_argument("--max-wait-ms", type=float, default=2.0, help="server.max_wait_ms")
    parser.add_argument("--plan-every", type=int, default=0, help="one query in k is a best-of-8 plan (0: none)")
    parser.add_argument("--image-size", type=int, default=256, help="the cameras' raw images (LIBERO: 256)")
    parser.add_argument("--float8", default="off", help="server.float8: off, auto, rowwise, tensorwise")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--queries-per-episode", type=float, default=20.0,
                        help="the projection's assumption: LIBERO episodes of about 320 steps at 16 actions per chunk (the paper's "
                             "0.61 s per chunk served one at a time is 6.8 hours for 2,000 episodes: 20 queries each)")
    parser.add_argument("--host-cores", type=int, default=16, help="the GPU host's cores for simulators")
    parser.add_argument("--env-steps-per-s-per-core", type=float, default=None,
                        help="LIBERO env steps/s per core (default: bench/results/env_speed.json's)")
    parser.add_argument("--profile", action="store_true", help="print the GPU kernels of 2 s of serving at N = the largest batch size")
    parser.add_argument("--merge", default=None, help="an earlier call's serving.json (same machine and settings): its rows join "
                        "this run's table, this run's replacing those of the same N")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})"
    recipe = resolve_inference_float8(args.float8, device, "--float8")
    settings = {"machine": machine, "model": args.config, "compiled": args.compile, "max_wait_ms": args.max_wait_ms,
                "plan_every": args.plan_every, "float8": args.float8,
                "float8_blocks": "fused" if recipe == "rowwise" else "plain"}  # cosmos_policy.fused_float8, rowwise's default
    if args.merge and not Path(args.merge).is_file():
        parser.error(f"--merge: expected an earlier run's result file, {args.merge!r} does not exist")
    earlier = json.loads(Path(args.merge).read_text()) if args.merge else None
    if earlier is not None:  # before the minutes of compiling
        check_mergeable(earlier, settings, args.merge)
    sizes = [int(s) for s in args.batch_sizes.split(",") if s]
    model, stats, text = parts("libero", args.config, device)
    policy = CosmosPolicy(model, stats, text, PolicyConfig(action_steps=5, prefix_encode=True))
    planner = Planner(policy, model, PlannerConfig(num_candidates=8, future_steps=[1, 3, 5], value_steps=[1, 2, 3, 4, 5])) \
        if args.plan_every else None
    config = ServerConfig(max_batch=sizes[-1], max_wait_ms=args.max_wait_ms, batch_sizes=sizes, compile=args.compile, float8=args.float8)
    server = BatchingServer(policy, planner, config)
    start = time.perf_counter()
    print(f"serving with {accelerate(policy, planner, config)}", flush=True)  # the PolicyServer's own: CUDA graphs, float8
    server.warm_up(observation(model.layout, args.image_size), ("act", "plan") if planner is not None else ("act",))
    warm_s = time.perf_counter() - start
    if args.profile:
        profile_kernels(server, sizes[-1], args, model.layout, device)
    table = []
    for n in [int(c) for c in args.clients.split(",") if c]:
        row = {**measure(server, n, args, model.layout, device), "batch_sizes": sizes}
        table.append(row)
        print(json.dumps(row), flush=True)
    command = " ".join(["python bench/serving.py", *(argv if argv is not None else sys.argv[1:])])
    calls = [{"command": command, "batch_sizes": sizes, "warm_up_s": round(warm_s, 1), "date": time.strftime("%Y-%m-%d")}]
    if earlier is not None:
        table, calls = merged_table(earlier, table, calls)
    fits = [r for r in table if r["p99_latency_s"] is not None and r["p99_latency_s"] <= 0.5] or table
    best = max(fits, key=lambda r: r["queries_per_s"])
    per_core = args.env_steps_per_s_per_core
    if per_core is None:
        speed = ROOT / "bench" / "results" / "env_speed.json"
        per_core = float(json.loads(speed.read_text())["libero_env_steps_per_s_per_core"]) if speed.exists() else 45.0
    queries = LIBERO_EPISODES * args.queries_per_episode
    serving_min = queries / max(best["queries_per_s"], 1e-9) / 60
    env_min = queries * 16 / (args.host_cores * per_core) / 60  # 16 actions executed per query
    report = {
        "what": "policy queries served by one GPU to N closed-loop clients (raw LIBERO observations), through the PolicyServer's "
                "batching; the LIBERO protocol's wall time projected from it",
        "command": " && ".join(c["command"] for c in calls), **settings, "date": time.strftime("%Y-%m-%d"),
        "batch_sizes": sorted({b for c in calls for b in c["batch_sizes"]}), "warm_up_s": round(warm_s, 1), "calls": calls,
        "queries_per_s_libero": best["queries_per_s"], "p99_latency_s": best["p99_latency_s"], "best_clients": best["clients"],
        "table": table,
        "full_libero_protocol_min_projected": round(max(serving_min, env_min), 1),
        "projection": {"episodes": LIBERO_EPISODES, "queries_per_episode": args.queries_per_episode, "serving_min": round(serving_min, 1),
                       "env_min": round(env_min, 1), "host_cores": args.host_cores, "env_steps_per_s_per_core": per_core,
                       "assumes": "clients >= best_clients simulators in a closed loop; serving and simulation overlap, so the slower "
                                  "of the two sets the time"},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "table"}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
