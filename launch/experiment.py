"""The main job's configuration: one OmegaConf schema, filled by ``configs/experiment/<name>.yaml``.

``load_experiment("quickstart", ["online.rounds=5"])`` merges the YAML and command-line overrides
onto ``Experiment``; an unknown key or a value of the wrong type fails here, naming the key. The
sections that configure a component (``planner``, ``policy``, ``replay``, ``learner``) are kept as
mappings and turned into that component's own dataclass by the ``*_config`` helpers, so the
component's own validation (and its own field names) apply unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from actors.env_process import EnvConfig
from actors.policy_server import ServerConfig
from cosmos_policy.config import resolve_config_path
from cosmos_policy.data.augment import AugmentConfig
from cosmos_policy.data.mixture import MixtureConfig, mixture_preset
from cosmos_policy.errors import ConfigError
from cosmos_policy.layout import load_layout
from cosmos_policy.planner import PlannerConfig
from cosmos_policy.policy import PolicyConfig
from learner.engine import LearnerConfig
from learner.schedule import ScheduleConfig
from replay.config import RateLimiterConfig, ReplayConfig, Signature, TableConfig, default_tables


@dataclass
class RaySection:
    address: str | None = None  # None: start a local cluster on 127.0.0.1; "auto" or host:port: join one
    num_cpus: int | None = None  # logical CPUs of a local cluster (None: enough for every actor asked for)
    namespace: str = "cosmos-policy-online"
    object_store_gb: float | None = None  # a local cluster's object store (None: Ray's default, 30 % of RAM)


@dataclass
class ModelSection:
    size: str = "tiny"  # configs/model/<size>.yaml, when no checkpoint is given
    layout: str = "libero"
    checkpoint: str | None = None  # a policy checkpoint (our format): skip offline policy training
    planning_checkpoint: str | None = None  # a planning-model checkpoint: skip offline planning training
    text_encoder: str | None = "random"  # "random" (tiny models), a local T5 directory, or None (cache only)
    device: str = "auto"  # where PolicyServers run: auto (a GPU when the cluster has one), cpu, cuda
    latent_cache: int = 50_000  # clips whose VAE latents the learner keeps when augmentation is off


@dataclass
class EnvSection:
    name: str = "lift"  # actors.env_process.ENV_REGISTRY: lift (built in), libero
    kwargs: dict[str, Any] = field(default_factory=dict)
    tasks: list[str] | None = None  # None: every task of the environment
    execute: int = 16  # actions executed per query
    max_steps: int | None = None  # overrides the task's step limit
    plan_queries: int | None = None  # with planning: plan at the first N queries of an episode only (None: every query)


@dataclass
class DemoSection:
    source: str = "expert"  # expert: the built-in task's scripted expert; dataset: files on disk; none
    episodes: int = 40  # expert demonstrations to make
    expert_success_rate: float = 1.0  # the expert fails the rest in real-looking ways
    seed: int = 0
    dataset: str | None = None  # source=dataset: a directory of episode files or an official release
    dataset_format: str = "episodes"  # episodes (our HDF5 files), libero (LIBERO-Cosmos-Policy)
    max_episodes: int | None = None
    validation_fraction: float = 0.1  # demonstrations held out for the offline early stopping


@dataclass
class DataSection:
    gamma: float = 0.99
    augmentation: bool = False  # the official recipes augment; the quickstart's fixed cameras need not
    # A preset name (cosmos_policy.data.mixture.PRESETS: base, planning, planning_q) or a mapping
    # {pools: {demo, success, failure}, kinds: {pool: {sample kind: probability}}}.
    policy_mixture: Any = "base"  # offline policy training (demonstrations alone)
    # The policy's refinement during online rounds (online.refine_policy): demonstrations and the
    # system's successful episodes, action samples only.
    policy_online_mixture: Any = "policy_experience"
    planning_mixture: Any = "planning"  # the planning model: 10 / 45 / 45 with V(s') samples
    demos_as_rollouts: bool = True  # the planning model also learns value and dynamics from the demonstrations


@dataclass
class OfflineSection:
    policy_steps: int = 2000  # at most; early stopping on the held-out demonstrations' loss
    planning_steps: int = 600
    batch: int = 32
    lr: float = 1e-3
    warmup_steps: int = 100
    validate_every: int = 200
    patience: int = 2  # validations without improvement before the policy's training stops


@dataclass
class OnlineSection:
    rounds: int = 3
    episodes_per_round: int = 40
    runners: int = 2
    # PolicyServers, each holding the policy and the planning model (one GPU each where the cluster
    # has GPUs, e.g. a learner GPU plus N server GPUs on one host); EnvRunners are dealt to them in turn.
    servers: int = 1
    plan: bool = True  # collect with best-of-N planning
    # Collect in branches: each initial state is played once per planner candidate, episode c
    # executing candidate c at the first query (planner.candidate_noise widens them), so the replay
    # holds what each first chunk leads to from the same state. episodes_per_round counts episodes
    # and must be a multiple of planner.num_candidates.
    branch_first_query: bool = False
    refine_steps: int = 300  # learner steps per round
    publish_every: int = 100  # learner steps between weight publications
    # Also refine the acting policy each round (after the planning model), on demonstrations plus the
    # system's own successful episodes (data.policy_online_mixture), and publish it to the
    # PolicyServers. Off by default: the paper keeps the acting policy fixed (dual deployment).
    refine_policy: bool = False
    policy_refine_steps: int = 300  # policy learner steps per round, with refine_policy
    policy_lr: float | None = None  # the policy's refinement learning rate (None: online.lr)
    budget_s: float | None = None  # stop after this much wall time (the current round finishes)
    lr: float = 5e-4
    batch: int = 32


@dataclass
class EvalSection:
    trials: int = 20  # per task and seed, from the task's fixed initial states
    seeds: list[int] = field(default_factory=lambda: [0])
    plan: bool = True
    also_without_planning: bool = True  # the policy alone too, on the same initial states
    at_start: bool = True  # evaluate before the first online round


@dataclass
class LoggingSection:
    wandb: str = "auto"  # auto: online with WANDB_API_KEY, else offline; online, offline, disabled
    project: str = "cosmos-policy-online"
    entity: str | None = None


@dataclass
class Experiment:
    name: str = "quickstart"
    run_dir: str = "runs/quickstart"
    seed: int = 0
    ray: RaySection = field(default_factory=RaySection)
    model: ModelSection = field(default_factory=ModelSection)
    env: EnvSection = field(default_factory=EnvSection)
    demos: DemoSection = field(default_factory=DemoSection)
    data: DataSection = field(default_factory=DataSection)
    offline: OfflineSection = field(default_factory=OfflineSection)
    online: OnlineSection = field(default_factory=OnlineSection)
    eval: EvalSection = field(default_factory=EvalSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    policy: dict[str, Any] = field(default_factory=dict)  # cosmos_policy.policy.PolicyConfig fields
    planner: dict[str, Any] = field(default_factory=dict)  # cosmos_policy.planner.PlannerConfig fields
    server: dict[str, Any] = field(default_factory=dict)  # actors.policy_server.ServerConfig fields
    replay: dict[str, Any] = field(default_factory=dict)  # replay.config.ReplayConfig fields (tables: a list)
    learner: dict[str, Any] = field(default_factory=dict)  # learner.engine.LearnerConfig fields, plus world_size, gpus_per_worker, cpus_per_worker

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        checks = [
            (self.demos.source in ("expert", "dataset", "none"), "demos.source", "expert, dataset or none", self.demos.source),
            (self.demos.dataset_format in ("episodes", "libero"), "demos.dataset_format", "episodes or libero", self.demos.dataset_format),
            (0 <= self.demos.expert_success_rate <= 1, "demos.expert_success_rate", "a value in [0, 1]", self.demos.expert_success_rate),
            (0 <= self.demos.validation_fraction < 1, "demos.validation_fraction", "a value in [0, 1)", self.demos.validation_fraction),
            (self.env.plan_queries is None or (isinstance(self.env.plan_queries, int) and not isinstance(self.env.plan_queries, bool)
                                               and self.env.plan_queries >= 1),
             "env.plan_queries", "an integer >= 1 or null (plan at every query)", self.env.plan_queries),
            (self.online.rounds >= 0, "online.rounds", ">= 0", self.online.rounds),
            (self.online.runners >= 1, "online.runners", ">= 1", self.online.runners),
            (isinstance(self.online.servers, int) and 1 <= self.online.servers <= max(1, self.online.runners), "online.servers",
             "an integer from 1 to online.runners (a server without EnvRunners would idle)", self.online.servers),
            (self.online.episodes_per_round >= 1, "online.episodes_per_round", ">= 1", self.online.episodes_per_round),
            (not self.online.branch_first_query or self.online.episodes_per_round % int(self.planner.get("num_candidates", 8)) == 0,
             "online.episodes_per_round", "a multiple of planner.num_candidates with online.branch_first_query", self.online.episodes_per_round),
            (self.online.refine_steps >= 0, "online.refine_steps", ">= 0", self.online.refine_steps),
            (self.online.policy_lr is None or self.online.policy_lr > 0, "online.policy_lr", "a learning rate > 0 or null", self.online.policy_lr),
            (self.online.policy_refine_steps >= 1, "online.policy_refine_steps", ">= 1 (with online.refine_policy)", self.online.policy_refine_steps),
            (self.online.publish_every >= 1, "online.publish_every", ">= 1", self.online.publish_every),
            (self.eval.trials >= 1, "eval.trials", ">= 1", self.eval.trials),
            (bool(self.eval.seeds), "eval.seeds", "at least one seed", self.eval.seeds),
            (self.offline.batch >= 1 and self.online.batch >= 1, "offline.batch / online.batch", ">= 1", (self.offline.batch, self.online.batch)),
            (self.offline.validate_every >= 1, "offline.validate_every", ">= 1", self.offline.validate_every),
            (self.model.device in ("auto", "cpu", "cuda"), "model.device", "auto, cpu or cuda", self.model.device),
            (isinstance(self.learner.get("cpus_per_worker", 1), (int, float)) and self.learner.get("cpus_per_worker", 1) > 0,
             "learner.cpus_per_worker", "a number > 0", self.learner.get("cpus_per_worker")),
        ]
        for ok, name, expected, got in checks:
            if not ok:
                raise ConfigError(f"{name}: expected {expected}, got {got!r}")
        if self.demos.source == "dataset" and not self.demos.dataset:
            raise ConfigError("demos.dataset: source 'dataset' needs a path to the demonstrations")
        if self.demos.source == "expert" and self.env.name != "lift":
            raise ConfigError(f"demos.source: the scripted expert exists for the built-in task 'lift' only, env is {self.env.name!r}")
        if self.demos.source == "none" and not (self.model.checkpoint and self.model.planning_checkpoint):
            raise ConfigError("demos.source: 'none' needs model.checkpoint and model.planning_checkpoint (nothing to train from)")
        # Build every component config once, so their own errors surface at load time.
        self.policy_config(), self.planner_config(), self.server_config(), self.replay_config("replay")
        self.learner_config("x", False), self.learner_config("x", True)
        self.mixture("policy"), self.mixture("planning"), self.mixture("policy_online")
        self.env_config()

    # ---- component configs -------------------------------------------------------------
    def env_config(self) -> EnvConfig:
        return EnvConfig(self.env.name, dict(self.env.kwargs))

    def policy_config(self) -> PolicyConfig:
        defaults = {"center_crop": self.data.augmentation, "execute": None}
        return _build(PolicyConfig, {**defaults, **self.policy}, "policy")

    def planner_config(self) -> PlannerConfig:
        return _build(PlannerConfig, self.planner, "planner")

    def server_config(self) -> ServerConfig:
        return _build(ServerConfig, {"max_batch": max(8, self.online.runners), "poll_weights_s": 0.5, **self.server}, "server")

    def augment_config(self) -> AugmentConfig | None:
        return AugmentConfig() if self.data.augmentation else None

    def mixture(self, which: str) -> MixtureConfig:
        field_name = {"policy": "policy_mixture", "planning": "planning_mixture", "policy_online": "policy_online_mixture"}[which]
        name = getattr(self.data, field_name)
        if not isinstance(name, str):
            name = OmegaConf.to_container(name, resolve=True) if OmegaConf.is_config(name) else name
        overrides = {"demos_as_success_rollouts": True} if which == "planning" and self.data.demos_as_rollouts else {}
        try:
            return mixture_preset(name, **overrides)
        except (ConfigError, TypeError) as exc:
            raise ConfigError(f"data.{field_name}: {exc}") from exc

    def replay_config(self, root: str) -> ReplayConfig:
        data = {"root": root, **{k: v for k, v in self.replay.items() if k != "root"}}
        tables = data.pop("tables", None)
        # Replay hands out step windows the sample builder turns into training samples: their length is
        # the layout's action chunk (the future frame sits one chunk ahead), whatever env.execute is.
        window = load_layout(self.model.layout).action_chunk
        if tables is None:
            built = default_tables(window=window)
        else:
            built = []
            for i, t in enumerate(tables):
                t = dict(t)
                limiter = _build(RateLimiterConfig, t.pop("rate_limiter", {}), f"replay.tables[{i}].rate_limiter")
                signature = _build(Signature, t.pop("signature", {}), f"replay.tables[{i}].signature")
                built.append(_build(TableConfig, {"window": window, **t, "rate_limiter": limiter, "signature": signature}, f"replay.tables[{i}]"))
        return _build(ReplayConfig, {**data, "tables": built}, "replay")

    def learner_config(self, checkpoint_dir: str, online: bool, init_checkpoint: str | None = None, steps: int | None = None,
                       lr: float | None = None) -> LearnerConfig:
        section = self.online if online else self.offline
        extra = {k: v for k, v in self.learner.items() if k not in ("world_size", "gpus_per_worker", "cpus_per_worker", "schedule")}
        total = steps or (self.online.refine_steps * max(1, self.online.rounds) if online else self.offline.policy_steps)
        warmup = min(self.offline.warmup_steps, max(0, total - 1))
        schedule = _build(ScheduleConfig, {"warmup_steps": 0 if online else warmup, "cycle_steps": max(total, warmup + 1),
                                           "end_of_cycle": 0.3, **self.learner.get("schedule", {})}, "learner.schedule")
        # The batch of a step is split into learner.grad_accum micro-batches (memory: the 2b model on one GPU).
        accum = self.learner.get("grad_accum", 1)
        if not isinstance(accum, int) or isinstance(accum, bool) or accum < 1 or section.batch % accum:
            raise ConfigError(f"learner.grad_accum: expected a divisor of {'online' if online else 'offline'}.batch "
                              f"({section.batch}), got {accum}")
        values = {"model": self.model.size, "layout": self.model.layout, "init_checkpoint": init_checkpoint, "lr": lr or section.lr,
                  "micro_batch": section.batch // accum, "checkpoint_dir": checkpoint_dir, "checkpoint_every": 0, "seed": self.seed,
                  **extra, "schedule": schedule}
        return _build(LearnerConfig, values, "learner")

    @property
    def world_size(self) -> int:
        return int(self.learner.get("world_size", 1))

    @property
    def gpus_per_worker(self) -> float:
        return float(self.learner.get("gpus_per_worker", 0))

    @property
    def cpus_per_worker(self) -> float:
        """CPUs (and so torch threads) each learner process gets: more than 1 speeds CPU-only training."""
        return float(self.learner.get("cpus_per_worker", 1))

    def to_dict(self) -> dict[str, Any]:
        return OmegaConf.to_container(OmegaConf.structured(self), resolve=True)  # type: ignore[return-value]


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    """``cls(**values)`` with unknown keys reported by name instead of a bare TypeError."""
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; expected some of {sorted(names)}")
    values = dict(values)
    for f in fields(cls):  # YAML gives lists where a dataclass wants tuples
        if f.name in values and isinstance(values[f.name], list) and "tuple" in str(f.type):
            values[f.name] = tuple(values[f.name])
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def load_experiment(name_or_path: str | Path = "quickstart", overrides: list[str] | None = None) -> Experiment:
    """``configs/experiment/<name>.yaml`` (or a YAML path) with dotlist overrides (``online.rounds=5``)."""
    path = resolve_config_path("experiment", name_or_path)
    try:
        schema = OmegaConf.structured(_Unvalidated)
        merged = OmegaConf.merge(schema, OmegaConf.load(path), OmegaConf.from_dotlist(list(overrides or [])))
        data = OmegaConf.to_container(merged, resolve=True)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    return experiment_from_dict(data)  # type: ignore[arg-type]


def experiment_from_dict(data: dict[str, Any]) -> Experiment:
    sections = {"ray": RaySection, "model": ModelSection, "env": EnvSection, "demos": DemoSection, "data": DataSection,
                "offline": OfflineSection, "online": OnlineSection, "eval": EvalSection, "logging": LoggingSection}
    values = dict(data)
    for key, cls in sections.items():
        values[key] = _build(cls, dict(values.get(key) or {}), key)
    return _build(Experiment, values, "experiment")


@dataclass
class _Unvalidated(Experiment):
    """The schema OmegaConf type-checks against (validation runs once, on the merged result)."""

    def __post_init__(self) -> None:
        pass


def experiment_names() -> list[str]:
    return sorted(p.stem for p in (Path(__file__).resolve().parent.parent / "configs" / "experiment").glob("*.yaml"))
