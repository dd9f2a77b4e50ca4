"""The Ray cluster a job runs on: join the configured one, or start one of this machine's own.

Apart from ``launch.services`` so that the driver can start the cluster (seconds: its processes start on the
other cores) while it loads the job's heavy modules (torch, the model, DeepSpeed) beside it.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import ray

from actors.robots.actor import resource as robot_resource
from launch.experiment import Experiment


def connect(cfg: Experiment) -> None:
    """Join the configured cluster, or start a local one on 127.0.0.1 sized for every actor the job asks for."""
    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")  # set for drivers of `ray job submit`
    if address:
        ray.init(address=address, namespace=cfg.ray.namespace, log_to_driver=True)
        return
    learners = 2 if cfg.online.refine_policy else 1  # the planning model's learner, and the policy's
    gate = cfg.promotion.runners + 1 if cfg.promotion.enabled else 0  # the promotion gate's runners and server
    need = cfg.online.runners + cfg.eval.runners + gate + cfg.online.servers + learners * int(np.ceil(cfg.learner.world_size * cfg.learner.cpus_per_worker)) + 1
    extra: dict[str, Any] = {}
    if cfg.ray.object_store_gb:
        extra["object_store_memory"] = int(cfg.ray.object_store_gb * 1e9)
    if cfg.robots:  # a cluster of this machine alone: the robots: entries' robots are attached to it
        extra["resources"] = {robot_resource(cfg.robot_config(i).id): 1 for i in range(len(cfg.robots))}
    # address="local": a new cluster of our own, even where `ray start` or another job runs one on this
    # machine (a bare ray.init() would join that one and then refuse num_cpus).
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, cfg.ray.num_cpus or need), include_dashboard=False,
             _node_ip_address="127.0.0.1", namespace=cfg.ray.namespace, log_to_driver=True, **extra)


def cluster_gpus() -> float:
    """The GPUs of the cluster the job runs on (what its GPU-minutes are counted in)."""
    return float(ray.cluster_resources().get("GPU", 0))
