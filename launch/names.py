"""The names of a running job's Ray actors: spelled here and nowhere else.

Services are handed to the actors that use them as objects (a replay client, a weight source),
never looked up by name inside the roles; the names let a person or a tool that joins a running
job later find its services (``ray list actors``, a robot attaching to the job).
"""

from __future__ import annotations


def replay_shards(experiment: str, shards: int) -> list[str]:
    """The replay service's shard actors of an experiment."""
    return [f"{experiment}-replay-shard-{i}" for i in range(shards)]


def weight_registry(experiment: str) -> str:
    """The actor that lists an experiment's published weight versions."""
    return f"{experiment}-weights"


def policy_servers(experiment: str, servers: int) -> list[str]:
    """The PolicyServers of an experiment."""
    return [f"{experiment}-policy-server-{i}" for i in range(servers)]


def gate_server(experiment: str) -> str:
    """The promotion gate's own PolicyServer (``launch.promotion``)."""
    return f"{experiment}-policy-server-gate"


def robot_hub(experiment: str) -> str:
    """The actor where robots attach to a running job and report their episodes (``launch.robots.RobotHub``)."""
    return f"{experiment}-robot-hub"


def robot_actor(experiment: str, robot_id: str) -> str:
    """A robot's RobotActor while it is attached to the experiment's job (one per robot id)."""
    return f"{experiment}-robot-{robot_id}"
