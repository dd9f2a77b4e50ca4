"""Attach a robot to a running job, play episodes through its PolicyServer into its replay, and leave.

    python launch/robot.py --job runs/quickstart --robot dummy_lift --instruction "lift the red cube" --episodes 5
    python launch/robot.py --job /shared/runs/x --robot so101 --id arm-2 --instruction "..." --episodes continuous

Run it on a node of the job's Ray cluster (the robot's host, joined with ``ray start --address=<head>
--resources='{"robot:<id>": 1}'``, or any node when the robot's host is another). It reads the job's
``<run_dir>/job.json`` (its Ray address, namespace and robot hub; there once the job's cluster is up),
waits for the job's services when the job is still training offline, checks the robot's config against
the served model, places a ``RobotActor`` on the node that offers ``robot:<id>`` and plays episodes: each
one's result is printed as a JSON line and reported to the job, whose next round's ``robot`` record
counts it (``robot/<id>/success_rate``...). After ``--episodes`` (or Ctrl-C: the first lets the episode
running end, a second stops the robot at once), the robot stops and disconnects and this program
leaves; the job goes on. A keyboard operator types into this terminal (the actor reads it: run this on
the robot's host; the keys are in actors/robots/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import termios
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from actors.robots.config import RobotConfigError, as_robot_config  # noqa: E402
from actors.robots.station import OperatorSpec  # noqa: E402
from cosmos_policy.errors import ConfigError  # noqa: E402
from launch.cli import add_debug_flag, run_command  # noqa: E402
from launch.monitor import say  # noqa: E402
from launch.signals import StopRequest  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--job", required=True, help="the running job's run_dir (it holds job.json)")
    p.add_argument("--robot", required=True, help="configs/robot/<name>.yaml or a YAML path")
    p.add_argument("--id", default=None, help="the robot's id (default: the config's); its host offers the resource robot:<id>")
    p.add_argument("--instruction", required=True, help="what the robot is told to do (the policy's instruction)")
    p.add_argument("--task", default="", help="the task name recorded with its episodes")
    p.add_argument("--episodes", default="1", help="episodes to play, or 'continuous' (until Ctrl-C)")
    p.add_argument("--operator", choices=("keyboard", "scripted"), default="keyboard",
                   help="keyboard: this terminal's keys (s success, f failure, r re-record, space intervene, n reset done, "
                        "e stop, c clear); scripted: --script")
    p.add_argument("--script", action="append", default=[], metavar="STEP=EVENT", help="scripted operator: an event at a control step "
                   "of every episode (e.g. 40=success)")
    p.add_argument("--tty", default=None, help="keyboard: the terminal to read on the robot's host (default: this one)")
    p.add_argument("--max-steps", type=int, default=400, help="control steps an episode may last (then it ends, a failure)")
    p.add_argument("--no-plan", action="store_true", help="chunks from the policy alone (default: best-of-N planning)")
    p.add_argument("--reset-timeout-s", type=float, default=600.0, help="how long to wait for the operator's reset before asking again")
    p.add_argument("--wait-s", type=float, default=3600.0, help="how long to wait for a starting job's services (its offline phases)")
    add_debug_flag(p)
    return p


def attach(args: argparse.Namespace) -> int:
    import ray
    from ray.exceptions import RayActorError

    from actors.robots.actor import RobotActor
    from actors.robots.control import ResetCancelled, ResetTimeout
    from actors.robots.remote import episodes_arg, script_events
    from launch import names
    from launch.robots import place, read_job_file

    job = read_job_file(args.job)
    try:
        config = as_robot_config(args.robot, args.id)
    except RobotConfigError as exc:
        raise ConfigError(f"--robot {args.robot}: {exc}") from None
    count = episodes_arg(args.episodes)
    spec: dict[str, Any] = {"kind": args.operator}
    if args.script:
        spec["script"] = script_events(args.script)
    if args.operator == "keyboard":
        tty = args.tty or (os.ttyname(0) if os.isatty(0) else None)
        if tty is None:
            raise ConfigError("--operator keyboard: this program's input is not a terminal; give --tty <path> of one on the robot's "
                              "host, or --operator scripted with --script")
        spec["tty"] = tty
    try:
        operator = OperatorSpec.parse(spec)
    except RobotConfigError as exc:
        raise ConfigError(f"--{str(exc).split('.', 1)[-1]}") from None
    saved = termios.tcgetattr(0) if os.isatty(0) else None  # the actor's keyboard sets this terminal to cbreak

    ray.init(address=job["ray_address"], namespace=job["namespace"], log_to_driver=True)
    hub = wait_for_hub(args.job, job, args.wait_s)
    resources = place(config.id, f"--robot {args.robot} (id {config.id})")
    where = {"host": os.uname().nodename, "pid": os.getpid(), "from": "launch/robot.py"}
    parts = ray.get(hub.attach.remote(config.id, where))
    try:
        config.check_layout(parts["layout"]["cameras"], parts["layout"]["proprio_dim"], parts["layout"]["action_dim"])
    except RobotConfigError as exc:
        hub.detach.remote(config.id, "its config does not match the served model")
        raise ConfigError(f"--robot {args.robot}: {exc}") from None
    name = names.robot_actor(job["experiment"], config.id)
    try:
        actor = RobotActor.options(name=name, resources=resources).remote(
            config, parts["policy"], parts["planner"], parts["replay"], operator, layout=parts["layout"], plan=not args.no_plan)
    except ValueError as exc:  # the name is taken: this robot is attached already
        raise ConfigError(f"robot {config.id} is attached to job {job['experiment']} already (its actor {name!r} lives): "
                          f"stop the other launch/robot.py first ({exc})") from None
    try:
        placed = ray.get(actor.describe.remote())
    except RayActorError as exc:  # its constructor failed on the robot's host: the driver did not connect, the terminal...
        hub.detach.remote(config.id, "its RobotActor did not start")
        raise ConfigError(f"robot {config.id}: its RobotActor did not start on its host: {' '.join(str(exc).split())[-600:]}") from None
    say(f"robot {config.id}: on host {placed['host']} (node {placed['node_id'][:8]}), attached to job {job['experiment']}")
    if operator.kind == "keyboard" and placed["node_id"] != ray.get_runtime_context().get_node_id() and not args.tty:
        ray.kill(actor)
        hub.detach.remote(config.id, "keyboard on another host")
        raise ConfigError(f"--operator keyboard: the robot runs on host {placed['host']}, not this one: run launch/robot.py there, "
                          "or give --tty <a terminal of that host>")

    played, why = 0, "done"
    with StopRequest("finishing the current episode, then leaving") as stop:
        stop.install()  # over Ray's handlers
        try:
            while count is None or played < count:
                if stop:
                    why = "Ctrl-C"
                    break
                ref = actor.play.remote(args.instruction, args.task, args.max_steps, {"joined": True}, args.reset_timeout_s)
                try:
                    while not ray.wait([ref], timeout=0.5)[0]:
                        pass
                    result = ray.get(ref)
                except (ResetTimeout, ResetCancelled) as exc:
                    say(f"robot {config.id}: {' '.join(str(exc).split())[-300:]}")
                    if isinstance(exc, ResetCancelled):
                        break
                    continue
                except RayActorError as exc:  # the robot's process or host died: nothing is left to stop from here
                    why = f"its actor died ({' '.join(str(exc).split())[:200]})"
                    break
                played += 1
                print(json.dumps(result), flush=True)
                try:
                    ray.get(hub.report.remote(result))
                except RayActorError:
                    why = "the job ended"
                    break
        except KeyboardInterrupt:  # a second Ctrl-C: stop the robot now (the episode running is interrupted)
            why = "Ctrl-C twice"
        finally:
            left = {"episodes": played}
            try:
                left = ray.get(actor.leave.remote(f"launch/robot.py: {why}"))
            except RayActorError:
                pass
            try:
                ray.get(hub.detach.remote(config.id, why))
            except RayActorError:
                pass
            ray.kill(actor)
            if saved is not None:
                termios.tcsetattr(0, termios.TCSADRAIN, saved)
    say(f"robot {config.id}: left job {job['experiment']} ({why}) after {left['episodes']} episode(s); the job goes on")
    ray.shutdown()
    return 0


def wait_for_hub(run_dir: str, job: dict[str, Any], wait_s: float) -> Any:
    """The job's robot hub, once its services are up (a job in its offline phases has its cluster, not yet its hub)."""
    import ray

    from launch.robots import JOB_FILE

    deadline, said = time.monotonic() + wait_s, False
    while True:
        try:
            return ray.get_actor(job["hub"])
        except ValueError:
            pass
        if not (Path(run_dir) / JOB_FILE).is_file():
            raise ConfigError(f"--job {run_dir}: the job ended (its {JOB_FILE} is gone) before its services started")
        if time.monotonic() > deadline:
            raise ConfigError(f"--job {run_dir}: no robot hub {job['hub']!r} in the job's cluster at {job['ray_address']} after "
                              f"{wait_s:.0f} s: the job is still before its online rounds, or job.json is left from a job that ended")
        if not said:
            say(f"waiting for job {job['experiment']}'s services (it is still training offline; up to --wait-s {wait_s:.0f} s)")
            said = True
        time.sleep(2.0)


def main(argv: list[str] | None = None) -> None:
    sys.exit(run_command(build_parser(), attach, argv) or 0)


if __name__ == "__main__":
    main()
