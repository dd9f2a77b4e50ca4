"""The main job's configuration: one typed, frozen schema, named experiments in ``configs/experiment/``.

Every field has a one-line docstring (``launch/online.py --help`` lists them). The sections that
configure a component are that component's own config (``PolicyConfig``, ``PlannerConfig``,
``ServerConfig``, ``ReplayConfig``, ``LearnerConfig``), so its validation and field names apply
unchanged. ``launch.config.load_experiment`` fills this schema from YAML and overrides.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from actors.config import ServerConfig
from actors.env_process import ENV_REGISTRY, EnvConfig, known_env
from cosmos_policy.config import PlannerConfig, PolicyConfig, config_names
from cosmos_policy.data.mixture import MixtureConfig, mixture_preset
from cosmos_policy.errors import ConfigError
from launch.monitor import WANDB_MODES
from learner.config import LearnerConfig
from replay.config import ReplayConfig

SEEDS = 2**63  # seeds are torch and numpy generators' seeds: integers in [0, 2**63)


@dataclass(frozen=True)
class RaySection:
    """Where the job's Ray cluster is."""

    address: str | None = None
    """None: start a local cluster on 127.0.0.1; "auto" or host:port: join one (``ray job submit`` sets RAY_ADDRESS)."""
    num_cpus: int | None = None
    """Logical CPUs of a local cluster (None: enough for every actor asked for)."""
    namespace: str = "cosmos-policy-online"
    """The Ray namespace of the job's actors."""
    object_store_gb: float | None = None
    """A local cluster's object store in GB (None: Ray's default, 30 % of RAM)."""


@dataclass(frozen=True)
class ModelSection:
    """The model: its size and layout, or the checkpoints to start from."""

    size: str = "tiny"
    """configs/model/<size>.yaml (tiny, small, medium, 2b), when no checkpoint is given."""
    layout: str = "libero"
    """configs/layout/<layout>.yaml: the latent frame sequence (libero, robocasa, aloha, or a YAML path)."""
    checkpoint: str | None = None
    """A policy checkpoint (our format): offline policy training is skipped."""
    planning_checkpoint: str | None = None
    """A planning-model checkpoint: offline planning training is skipped too."""
    planning_size: str | None = None
    """The planning model's own size (configs/model/), built fresh and trained on the demonstrations;
    None: it starts from the policy's weights. A value that must rank candidates may need more capacity
    than the policy (the learning proof's judge: medium beside a small policy)."""
    text_encoder: str | None = "random"
    """Instruction embeddings: "random" (tiny models), a local T5 encoder directory, or None (the cache only)."""
    device: str = "auto"
    """Where PolicyServers run: auto (a GPU when the cluster has one), cpu or cuda."""
    latent_cache: int = 50_000
    """Clips whose VAE latents the learner keeps when augmentation is off (the VAE is frozen)."""


@dataclass(frozen=True)
class EnvSection:
    """The simulator the EnvRunners play."""

    name: str = "lift"
    """actors.env_process.ENV_REGISTRY: lift (the built-in task) or libero; or package.module:Class, an environment of
    your own behind the ``Env`` contract (``cosmos_policy.contracts``), importable on every node."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """The environment's own settings (lift: image_size, max_steps, num_initial_states; libero: suite, image_size)."""
    tasks: list[str] | None = None
    """Tasks to collect and evaluate on (None: every task of the environment)."""
    execute: int = 16
    """Actions executed per query (LIBERO and ALOHA: the whole chunk; RoboCasa: 16 of 32)."""
    max_steps: int | None = None
    """Overrides the task's step limit (None: the task's own)."""
    plan_queries: int | None = None
    """With planning: plan at the first N queries of an episode only, where the outcome is decided (None: every query)."""


@dataclass(frozen=True)
class DemoSection:
    """Where the demonstrations come from."""

    source: str = "expert"
    """expert: the built-in task's scripted expert; dataset: files on disk (demos.dataset); none: checkpoints only."""
    episodes: int = 40
    """Scripted-expert demonstrations to make."""
    expert_success_rate: float = 1.0
    """Share of expert demonstrations that succeed.

    The expert fails the rest in real-looking ways (it grasps beside the cube, or drops it), so
    the value function sees failures that look like the policy's own."""
    seed: int = 0
    """Seed of the expert's demonstrations."""
    dataset: str | None = None
    """With source=dataset: a directory of episode files, or an official release (LIBERO-Cosmos-Policy)."""
    dataset_format: str = "episodes"
    """episodes (our HDF5 files) or libero (LIBERO-Cosmos-Policy's files)."""
    max_episodes: int | None = None
    """Read at most this many demonstrations from the dataset."""
    validation_fraction: float = 0.1
    """Share of successful demonstrations held out for the offline early stopping."""


@dataclass(frozen=True)
class DataSection:
    """How training samples are made; its defaults per benchmark come from configs/data/<benchmark>.yaml."""

    benchmark: str | None = None
    """configs/data/<benchmark>.yaml gives this section's defaults (None: model.layout's name, where such a file exists)."""
    gamma: float = 0.99
    """Monte Carlo discount of the value labels: 0.99 LIBERO and RoboCasa, 0.998 ALOHA (method 6.1)."""
    augmentation: bool = False
    """The official recipes' image augmentation; fixed simulator cameras need none."""
    policy_mixture: Any = "base"
    """Offline policy training: a preset (cosmos_policy.data.mixture.PRESETS) or a mapping {pools, kinds}."""
    policy_online_mixture: Any = "policy_experience"
    """The policy's own refinement (online.refine_policy): demonstrations and successful experience, action samples."""
    planning_mixture: Any = "planning"
    """The planning model: 10 / 45 / 45 with V(s') samples (planning_q: Q(s, a) samples), or a mapping."""
    demos_as_rollouts: bool = True
    """The planning model also learns values and dynamics from the demonstrations (as successful or failed rollouts)."""
    policy_demos_as_rollouts: bool = False
    """Offline policy training does too (the official ALOHA recipe, whose demonstrations never fail)."""

    def __post_init__(self) -> None:
        if not 0.0 < self.gamma <= 1.0:
            raise ConfigError(f"data.gamma: expected a discount in (0, 1], got {self.gamma}")


@dataclass(frozen=True)
class OfflineSection:
    """Training before any experience: the policy on demonstrations, then the planning model."""

    policy_steps: int = 2000
    """At most this many policy steps; early stopping on the held-out demonstrations' loss."""
    planning_steps: int = 600
    """Planning-model steps, from the policy's weights."""
    batch: int = 32
    """Samples per learner step (all ranks together: per rank with world_size 1)."""
    lr: float = 1e-3
    """Peak learning rate of offline training."""
    warmup_steps: int = 100
    """Linear warm-up steps of the learning-rate schedule."""
    validate_every: int = 200
    """Policy steps between held-out validations."""
    patience: int = 2
    """Validations without improvement before the policy's training stops.

    The best weights seen are what the policy's checkpoint holds (exported at every improvement)."""


@dataclass(frozen=True)
class OnlineSection:
    """The rounds: collect with planning, refine on demonstrations plus experience, publish, evaluate."""

    rounds: int = 3
    """Online rounds after the offline phase (0: offline only, then the round-0 evaluation)."""
    episodes_per_round: int = 40
    """Episodes collected per round, each from a fresh seed."""
    runners: int = 2
    """EnvRunners (one simulator process each, one CPU each)."""
    servers: int = 1
    """PolicyServers (one GPU each where the cluster has GPUs); runners are dealt to them in turn."""
    server_gpus: float = 1.0
    """The GPU share each PolicyServer takes where the cluster has GPUs: below 1 it shares a GPU with the
    learner (learner.gpus_per_worker), the layout of a one-GPU host."""
    plan: bool = True
    """Collect with best-of-N planning (else the policy alone)."""
    branch_states: int = 0
    """Branching collection: new initial states per round, each played once per planner candidate at
    online.branch_query (actors/branching.py), besides the round's ordinary episodes; 0: none.

    Branches of one state differ only by the chunk executed there: the contrast the value learns to rank."""
    branch_query: int = 0
    """The query where branching episodes branch (0: the first); the queries before it execute candidates drawn per state."""
    branch_candidates: int | None = None
    """Candidates played per branched state: the first ones of the planner's best-of-N (None: all
    planner.num_candidates). Fewer per state spread the same episodes over more states, which the value needs most."""
    branch_point_only: bool = True
    """Branching episodes are recorded with camera frames at their branch point only (their samples start there)."""
    refine_steps: int = 300
    """Planning-model learner steps per round."""
    publish_every: int = 100
    """Learner steps between weight publications (every round also ends on one)."""
    refine_policy: bool = False
    """Also refine the acting policy each round, on demonstrations plus successful experience (the paper keeps it fixed)."""
    policy_refine_steps: int = 300
    """Policy learner steps per round, with refine_policy."""
    policy_lr: float | None = None
    """The policy's refinement learning rate (None: online.lr)."""
    loop: str = "asynchronous"
    """asynchronous: the EnvRunners collect round after round in a thread of their own while the learner refines
    on what replay holds (publishing every publish_every steps, the runners acting on the newest version) and
    the job evaluates each round's last version (the PolicyServers keep serving it until that evaluation ends; the
    learner trains and publishes on); rounds are the reporting unit. synchronous: each round collects, then refines, then evaluates."""
    collect_ahead: int = 1
    """asynchronous loop: rounds the collection may run ahead of the learner (round c starts once the learner
    finished round c - 1 - collect_ahead; the learner starts round r once round r - collect_ahead is collected): the
    bound on how many rounds of versions the newest experience the learner samples lags (the oldest is bounded by
    the replay tables' max_items or max_age_s). The learner records' staleness_versions measure it; loop.png plots it."""
    min_experience: int = 0
    """asynchronous loop: a round's refinement starts only once replay holds this many experience items (steps of the
    system's own episodes) or the round itself is collected, whichever comes first. A learner whose mixture has no
    demonstrations, started beside the first collection, would otherwise take its first steps, at the schedule's
    peak learning rate, on the first handful of episodes (research/lift_learning, run 4). 0: no wait."""
    budget_s: float | None = None
    """The run's wall time, its last evaluations included (None: no limit). A round is started only if it
    and the last evaluations fit, as estimated from the previous round and the round-0 evaluation; the
    round before the budget runs out is the last (eval.trials, eval.fresh_trials)."""
    lr: float = 5e-4
    """Peak learning rate of online refinement."""
    batch: int = 32
    """Samples per online learner step."""


@dataclass(frozen=True)
class EvalSection:
    """The evaluation after every round, on fixed initial states."""

    trials: int = 20
    """Trials per task and seed, from the task's fixed initial states."""
    trials_between: int | None = None
    """Trials per task and seed at the rounds between round 0 and the last (the first of the same states;
    None: eval.trials): a cheaper curve between two full measurements."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """Evaluation seeds (LIBERO's protocol: 195, 196, 197)."""
    plan: bool = True
    """Evaluate with best-of-N planning."""
    also_without_planning: bool = True
    """Evaluate the policy alone too, on the same initial states."""
    at_start: bool = True
    """Evaluate before the first online round (version 0)."""
    fresh_trials: int = 0
    """After the last round, and at round 0, an evaluation with planning and the policy alone on these many
    initial states used for nothing else (trials eval.fresh_first_trial on; no evaluation or choice saw
    them), to check the gain free of choices made on the evaluation states; 0: none."""
    fresh_first_trial: int = 100
    """The first of the fresh initial states (the task's fixed initial states from this index on)."""
    runners: int = 0
    """EnvRunners of the evaluation's own: the asynchronous loop's evaluations between rounds play on them while
    the collection goes on, on its online.runners, undisturbed; round 0's, the last round's and the synchronous
    loop's evaluations (nothing beside them) play on every runner. 0: they share the collection's runners."""


@dataclass(frozen=True)
class PromotionSection:
    """Eval-gated promotion (``launch.promotion``): which published versions the actors are served."""

    enabled: bool = True
    """Serve a published version only once the gate has played it and found it no worse than the one served, and roll
    a promoted version back when it fails live; false: every version is served as it is published."""
    states: int = 20
    """Initial states per task the gate plays each version on (seeded placements that neither the collection nor the
    evaluation plays), with planning as eval.plan says."""
    tolerance: float = 0.05
    """A candidate is rejected when its success on the gate's states is below the served version's on the same
    states by more than this (the mean of the paired differences)."""
    live_window: int = 20
    """Ordinary collection episodes a promoted version is judged on live (branching episodes play forced candidates:
    they do not count); 0: no live check."""
    live_tolerance: float = 0.2
    """A promoted version is rolled back when its success over its first live_window episodes is below the version
    before it (that version's last live_window episodes, or its gate success) by more than this."""
    runners: int = 2
    """EnvRunners of the gate's own, with a PolicyServer of its own (it serves candidates, which the actors never see)."""


@dataclass(frozen=True)
class LoggingSection:
    """Where metrics go besides run_dir/metrics.jsonl and the plot."""

    wandb: str = "auto"
    """auto: online with WANDB_API_KEY, else offline; or online, offline, disabled."""
    project: str = "cosmos-policy-online"
    """W&B project."""
    entity: str | None = None
    """W&B entity (None: the API key's default)."""
    rates_every_s: float = 10.0
    """Seconds between ``rates`` records of the online rounds (env steps and learner samples per second); 0: none."""


@dataclass(frozen=True)
class LearnerSection(LearnerConfig):
    """The learners' settings and resources (the fields the job derives from other sections are set by it)."""

    world_size: int = 1
    """Learner processes per learner (one per GPU; gloo ranks on CPUs)."""
    gpus_per_worker: float = 0
    """GPUs per learner process (a fraction shares a GPU with a PolicyServer)."""
    cpus_per_worker: float = 1
    """CPUs (and torch threads) per learner process; more than 1 speeds CPU-only training."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (isinstance(self.cpus_per_worker, (int, float)) and self.cpus_per_worker > 0):
            raise ConfigError(f"learner.cpus_per_worker: expected a number > 0, got {self.cpus_per_worker!r}")
        if self.world_size < 1:
            raise ConfigError(f"learner.world_size: expected >= 1, got {self.world_size}")
        if not self.gpus_per_worker >= 0:
            raise ConfigError(f"learner.gpus_per_worker: expected a number of GPUs >= 0, got {self.gpus_per_worker!r}")


@dataclass(frozen=True)
class RobotEntry:
    """A robot the job attaches when it starts: a RobotActor on the robot's host, playing beside the collection."""

    config: str = ""
    """configs/robot/<name>.yaml or a YAML path: the robot's driver, cameras, proprio, actions, limits and timing."""
    id: str | None = None
    """The robot's id (its host offers the Ray resource robot:<id>); None: the config's own."""
    instruction: str = ""
    """What the robot is told to do: the policy's instruction (e.g. "lift the red cube")."""
    task: str = ""
    """The task name recorded with its episodes."""
    operator: str = "keyboard"
    """keyboard: a person's keys on the robot's host (robots[].tty); scripted: robots[].script plays in every episode."""
    script: Any = None
    """scripted: operator events at control steps of every episode, {step: event or [events]} (success, failure,
    rerecord, intervention_start, intervention_end, estop, clear_estop)."""
    tty: str | None = None
    """keyboard: the terminal on the robot's host whose keys the operator types (`tty` run there prints it)."""
    episodes_per_round: Any = "continuous"
    """An integer: the episodes it plays per round, then it waits for the next round; continuous: one after another."""
    max_steps: int = 400
    """Control steps an episode may last (at the robot's control_hz); one that reaches them unlabelled is a failure."""
    plan: bool = True
    """Every chunk by best-of-N planning (the collection's planner), else by the policy alone."""
    reset_timeout_s: float = 600.0
    """How long the robot waits for the operator's reset (and a stop's clearing) before a warning and another wait."""


@dataclass(frozen=True)
class GatewaySection:
    """The robot gateway: a gRPC server in the job for robots that cannot join the Ray cluster (actors/robots/gateway.py)."""

    enabled: bool = False
    """Start the gateway with the job's services."""
    host: str = "127.0.0.1"
    """Address it listens on; loopback unless robots reach the job over a network (then set tls_cert and tls_key)."""
    port: int = 0
    """TCP port; 0: a free one, printed in the job's log and written to <run_dir>/job.json."""
    token_file: str | None = None
    """The robots' token file (`python -m actors.robots.tokens add --file F --robot ID` mints a robot's token)."""
    tls_cert: str | None = None
    """PEM server certificate; with tls_key the gateway speaks only TLS."""
    tls_key: str | None = None
    """PEM private key of tls_cert."""
    tls_ca: str | None = None
    """PEM CA of the robots' client certificates; set, every robot must present one."""


# Fields of LearnerConfig the job sets from its other sections: naming them in an experiment is an error.
LEARNER_DERIVED = {"model": "model.size", "layout": "model.layout", "init_checkpoint": "model.checkpoint",
                   "init_counts": "the run's latest export", "lr": "offline.lr / online.lr",
                   "micro_batch": "offline.batch / online.batch and learner.grad_accum", "checkpoint_dir": "run_dir", "seed": "seed"}


@dataclass(frozen=True)
class Experiment:
    """A named experiment: everything the main job does, from demonstrations to the last evaluation."""

    name: str = "quickstart"
    """The experiment's name (W&B run name; prefix of its Ray actors)."""
    extends: str | None = None
    """Another experiment whose values this one starts from (configs/experiment/<extends>.yaml)."""
    run_dir: str = "runs/quickstart"
    """Everything the run writes (metrics, plot, replay, checkpoints, state); rerunning resumes from it."""
    seed: int = 0
    """Seed of the model's initialization, the data draws and the collection seeds."""
    ray: RaySection = field(default_factory=RaySection)
    """Where the job's Ray cluster is."""
    model: ModelSection = field(default_factory=ModelSection)
    """The model: its size and layout, or the checkpoints to start from."""
    env: EnvSection = field(default_factory=EnvSection)
    """The simulator the EnvRunners play."""
    demos: DemoSection = field(default_factory=DemoSection)
    """Where the demonstrations come from."""
    data: DataSection = field(default_factory=DataSection)
    """How training samples are made."""
    offline: OfflineSection = field(default_factory=OfflineSection)
    """Training before any experience."""
    online: OnlineSection = field(default_factory=OnlineSection)
    """The online rounds."""
    eval: EvalSection = field(default_factory=EvalSection)
    """The evaluation after every round."""
    promotion: PromotionSection = field(default_factory=PromotionSection)
    """Eval-gated promotion and rollback of published versions."""
    logging: LoggingSection = field(default_factory=LoggingSection)
    """W&B settings."""
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    """How the policy queries the model."""
    planner: PlannerConfig = field(default_factory=PlannerConfig)
    """Best-of-N planning."""
    server: ServerConfig = field(default_factory=ServerConfig)
    """PolicyServer batching."""
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    """The replay service: backend, shards, tables."""
    learner: LearnerSection = field(default_factory=LearnerSection)
    """The learners' settings and resources."""
    robots: list[RobotEntry] = field(default_factory=list)
    """Robots the job attaches when it starts, each a RobotEntry {config, id, instruction, task, operator, script, tty, episodes_per_round, max_steps, plan, reset_timeout_s}."""
    gateway: GatewaySection = field(default_factory=GatewaySection)
    """The robot gateway for robots outside the Ray cluster."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Checks across sections (each section checks its own fields); errors name the key."""
        def integer(x: Any) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        def at_least(x: Any, low: int) -> bool:
            return integer(x) and x >= low

        # Counts, sizes and seeds that nothing else checks: a negative one would be taken and fail (or do
        # nothing) far from the config that said it; ``not x > 0`` style also refuses NaN.
        checks = [
            (0 <= self.seed < SEEDS, "seed", "an integer in [0, 2**63)", self.seed),
            (self.ray.num_cpus is None or at_least(self.ray.num_cpus, 1), "ray.num_cpus", "an integer >= 1 or null", self.ray.num_cpus),
            (self.ray.object_store_gb is None or self.ray.object_store_gb > 0, "ray.object_store_gb", "GB > 0 or null",
             self.ray.object_store_gb),
            (at_least(self.model.latent_cache, 0), "model.latent_cache", "a number of clips >= 0", self.model.latent_cache),
            (known_env(self.env.name), "env.name", f"one of {sorted(ENV_REGISTRY)} or package.module:Class", self.env.name),
            (at_least(self.env.execute, 1), "env.execute", "an integer >= 1", self.env.execute),
            (self.env.max_steps is None or at_least(self.env.max_steps, 1), "env.max_steps", "an integer >= 1 or null (the task's own)",
             self.env.max_steps),
            (at_least(self.demos.episodes, 0), "demos.episodes", "an integer >= 0", self.demos.episodes),
            (0 <= self.demos.seed < SEEDS, "demos.seed", "an integer in [0, 2**63)", self.demos.seed),
            (self.demos.max_episodes is None or at_least(self.demos.max_episodes, 1), "demos.max_episodes", "an integer >= 1 or null",
             self.demos.max_episodes),
            (at_least(self.offline.policy_steps, 0), "offline.policy_steps", "an integer >= 0", self.offline.policy_steps),
            (at_least(self.offline.planning_steps, 0), "offline.planning_steps", "an integer >= 0", self.offline.planning_steps),
            (at_least(self.offline.warmup_steps, 0), "offline.warmup_steps", "an integer >= 0", self.offline.warmup_steps),
            (at_least(self.offline.patience, 0), "offline.patience", "an integer >= 0", self.offline.patience),
            (self.offline.lr > 0, "offline.lr", "a learning rate > 0", self.offline.lr),
            (self.online.lr > 0, "online.lr", "a learning rate > 0", self.online.lr),
            (all(0 <= s < SEEDS for s in self.eval.seeds), "eval.seeds", "integers in [0, 2**63)", self.eval.seeds),
            (self.logging.wandb in WANDB_MODES, "logging.wandb", f"one of {WANDB_MODES}", self.logging.wandb),
            (self.demos.source in ("expert", "dataset", "none"), "demos.source", "expert, dataset or none", self.demos.source),
            (self.demos.dataset_format in ("episodes", "libero"), "demos.dataset_format", "episodes or libero", self.demos.dataset_format),
            (0 <= self.demos.expert_success_rate <= 1, "demos.expert_success_rate", "a value in [0, 1]", self.demos.expert_success_rate),
            (0 <= self.demos.validation_fraction < 1, "demos.validation_fraction", "a value in [0, 1)", self.demos.validation_fraction),
            (self.env.plan_queries is None or (integer(self.env.plan_queries) and self.env.plan_queries >= 1),
             "env.plan_queries", "an integer >= 1 or null (plan at every query)", self.env.plan_queries),
            (self.online.rounds >= 0, "online.rounds", ">= 0", self.online.rounds),
            (self.online.runners >= 1, "online.runners", ">= 1", self.online.runners),
            (integer(self.online.servers) and 1 <= self.online.servers <= max(1, self.online.runners), "online.servers",
             "an integer from 1 to online.runners (a server without EnvRunners would idle)", self.online.servers),
            (0 < self.online.server_gpus <= 1 or (integer(self.online.server_gpus) and self.online.server_gpus >= 1), "online.server_gpus",
             "a share of a GPU in (0, 1] or a whole number of GPUs", self.online.server_gpus),
            (self.online.episodes_per_round >= 0, "online.episodes_per_round", ">= 0", self.online.episodes_per_round),
            (integer(self.online.branch_states) and self.online.branch_states >= 0, "online.branch_states", "an integer >= 0",
             self.online.branch_states),
            (integer(self.online.branch_query) and self.online.branch_query >= 0, "online.branch_query",
             "a query index >= 0 (0: the first query)", self.online.branch_query),
            (self.online.episodes_per_round + self.online.branch_states >= 1, "online.episodes_per_round",
             ">= 1 (or online.branch_states >= 1): a round collects something", self.online.episodes_per_round),
            (self.online.refine_steps >= 0, "online.refine_steps", ">= 0", self.online.refine_steps),
            (self.online.policy_lr is None or self.online.policy_lr > 0, "online.policy_lr", "a learning rate > 0 or null", self.online.policy_lr),
            (self.online.policy_refine_steps >= 1, "online.policy_refine_steps", ">= 1 (with online.refine_policy)", self.online.policy_refine_steps),
            (self.online.publish_every >= 1, "online.publish_every", ">= 1", self.online.publish_every),
            (self.online.loop in ("asynchronous", "synchronous"), "online.loop", "asynchronous or synchronous", self.online.loop),
            (integer(self.online.collect_ahead) and self.online.collect_ahead >= 1, "online.collect_ahead", "an integer >= 1",
             self.online.collect_ahead),
            (integer(self.online.min_experience) and self.online.min_experience >= 0, "online.min_experience",
             "an integer >= 0 (experience items; 0: no wait)", self.online.min_experience),
            (self.logging.rates_every_s >= 0, "logging.rates_every_s", "seconds >= 0 (0: no rates records)", self.logging.rates_every_s),
            (self.eval.trials >= 1, "eval.trials", ">= 1", self.eval.trials),
            (integer(self.eval.runners) and self.eval.runners >= 0, "eval.runners", "an integer >= 0 (0: the collection's runners)",
             self.eval.runners),
            (self.eval.trials_between is None or 1 <= self.eval.trials_between <= self.eval.trials, "eval.trials_between",
             "null or 1 to eval.trials", self.eval.trials_between),
            (bool(self.eval.seeds), "eval.seeds", "at least one seed", self.eval.seeds),
            (integer(self.eval.fresh_trials) and self.eval.fresh_trials >= 0, "eval.fresh_trials", "an integer >= 0", self.eval.fresh_trials),
            (integer(self.eval.fresh_first_trial) and self.eval.fresh_first_trial >= self.eval.trials, "eval.fresh_first_trial",
             f"an integer >= eval.trials ({self.eval.trials}): fresh states are none of the evaluation's", self.eval.fresh_first_trial),
            (self.online.branch_candidates is None or (integer(self.online.branch_candidates)
                                                      and 1 <= self.online.branch_candidates <= self.planner.num_candidates),
             "online.branch_candidates", f"null or an integer from 1 to planner.num_candidates ({self.planner.num_candidates})",
             self.online.branch_candidates),
            (self.online.budget_s is None or self.online.budget_s > 0, "online.budget_s", "null or seconds > 0", self.online.budget_s),
            (self.offline.batch >= 1, "offline.batch", ">= 1", self.offline.batch),
            (self.online.batch >= 1, "online.batch", ">= 1", self.online.batch),
            (self.offline.validate_every >= 1, "offline.validate_every", ">= 1", self.offline.validate_every),
            (self.model.device in ("auto", "cpu", "cuda"), "model.device", "auto, cpu or cuda", self.model.device),
            (at_least(self.promotion.states, 1), "promotion.states", "an integer >= 1", self.promotion.states),
            (0 <= self.promotion.tolerance <= 1, "promotion.tolerance", "a success difference in [0, 1]", self.promotion.tolerance),
            (at_least(self.promotion.live_window, 0), "promotion.live_window", "an integer >= 0 (0: no live check)",
             self.promotion.live_window),
            (0 <= self.promotion.live_tolerance <= 1, "promotion.live_tolerance", "a success difference in [0, 1]",
             self.promotion.live_tolerance),
            (at_least(self.promotion.runners, 1), "promotion.runners", "an integer >= 1", self.promotion.runners),
        ]
        for ok, name, expected, got in checks:
            if not ok:
                raise ConfigError(f"{name}: expected {expected}, got {got!r}")
        if self.demos.source == "dataset" and not self.demos.dataset:
            raise ConfigError("demos.dataset: source 'dataset' needs a path to the demonstrations")
        if self.demos.dataset and self.demos.source != "dataset":
            raise ConfigError(f"demos.dataset: given ({self.demos.dataset}) but demos.source is {self.demos.source!r}; "
                              "add demos.source=dataset to train on it")
        known = config_names("model")
        for key, size in (("model.size", self.model.size), ("model.planning_size", self.model.planning_size)):
            if size is not None and size not in known and not str(size).endswith((".yaml", ".yml")):
                raise ConfigError(f"{key}: expected one of {known} (configs/model/) or a YAML path, got {size!r}")
        if self.demos.source == "expert" and self.env.name != "lift":
            raise ConfigError(f"demos.source: the scripted expert exists for the built-in task 'lift' only, env is {self.env.name!r}")
        if self.demos.source == "none" and not (self.model.checkpoint and self.model.planning_checkpoint):
            raise ConfigError("demos.source: 'none' needs model.checkpoint and model.planning_checkpoint (nothing to train from)")
        self._validate_robots()
        # Build what is derived once, so its errors surface at load time.
        self.learner_config("x", online=False), self.learner_config("x", online=True)
        self.mixture("policy"), self.mixture("planning"), self.mixture("policy_online")
        self.env_config()

    def _validate_robots(self) -> None:
        """The robots: entries (each config read and matched to the model's layout) and the gateway section."""
        from actors.robots.config import RobotConfigError

        ids: list[str] = []
        for i, r in enumerate(self.robots):
            where = f"robots[{i}]"
            if not r.config:
                raise ConfigError(f"{where}.config: expected a robot config's name (configs/robot/) or a YAML path")
            try:
                robot = self.robot_config(i)
            except RobotConfigError as exc:
                raise ConfigError(f"{where}.config: {exc}") from None
            if robot.id in ids:
                raise ConfigError(f"{where}.id: robot {robot.id!r} is listed twice (give each robots: entry its own id)")
            ids.append(robot.id)
            if not r.instruction.strip():
                raise ConfigError(f"{where}.instruction: expected what the robot is told to do, e.g. 'lift the red cube'")
            try:
                self.robot_operator(i)
            except RobotConfigError as exc:  # "operator.kind: ..." / "operator.script.5: ...": the entry's own keys
                message = str(exc).replace("operator.kind", "operator", 1).replace("operator.", "", 1)
                raise ConfigError(f"{where}.{message}") from None
            if r.operator == "keyboard" and not r.tty:
                raise ConfigError(f"{where}.tty: a keyboard operator needs the terminal on the robot's host whose keys "
                                  "it reads (run `tty` there, e.g. /dev/pts/3); or operator: scripted with a script")
            per_round = r.episodes_per_round
            if per_round != "continuous" and (isinstance(per_round, bool) or not isinstance(per_round, int) or per_round < 1):
                raise ConfigError(f"{where}.episodes_per_round: expected an integer >= 1 or 'continuous', got {per_round!r}")
            if r.max_steps < 1:
                raise ConfigError(f"{where}.max_steps: expected >= 1, got {r.max_steps}")
            if not r.reset_timeout_s > 0:
                raise ConfigError(f"{where}.reset_timeout_s: expected seconds > 0, got {r.reset_timeout_s}")
        g = self.gateway
        if g.enabled and not g.token_file:
            raise ConfigError("gateway.token_file: required with gateway.enabled (make one with "
                              "`python -m actors.robots.tokens add --file tokens.json --robot <id>`)")
        if (g.tls_cert is None) != (g.tls_key is None):
            raise ConfigError("gateway.tls_cert / gateway.tls_key: give both or neither")
        if g.tls_ca is not None and g.tls_cert is None:
            raise ConfigError("gateway.tls_ca: client certificates need TLS (set gateway.tls_cert and gateway.tls_key)")
        if not 0 <= g.port < 65536:
            raise ConfigError(f"gateway.port: expected 0-65535 (0: a free one), got {g.port}")

    def robot_config(self, index: int) -> Any:
        """``robots[index]``'s ``RobotConfig`` (its file read, renamed to the entry's id), checked against model.layout."""
        from actors.robots.config import as_robot_config
        from cosmos_policy.layout import load_layout

        entry = self.robots[index]
        config = as_robot_config(entry.config, entry.id)
        layout = load_layout(self.model.layout)
        config.check_layout(layout.cameras, layout.proprio_dim, layout.action_dim)
        return config

    def robot_operator(self, index: int) -> Any:
        """``robots[index]``'s ``OperatorSpec``."""
        from actors.robots.station import OperatorSpec

        r = self.robots[index]
        spec: dict[str, Any] = {"kind": r.operator}
        if r.script is not None:
            spec["script"] = r.script
        if r.tty is not None:
            spec["tty"] = r.tty
        return OperatorSpec.parse(spec, where="operator")

    def gateway_config(self) -> Any:
        """The gateway section as ``actors.robots.gateway.GatewayConfig`` (its own checks: the files exist)."""
        from actors.robots.gateway import GatewayConfig

        g = self.gateway
        return GatewayConfig(host=g.host, port=g.port, token_file=g.token_file or "", tls_cert=g.tls_cert, tls_key=g.tls_key,
                             tls_ca=g.tls_ca)

    # ---- what the job derives from the sections ---------------------------------------
    def env_config(self) -> EnvConfig:
        """The runners' environment; the built-in task's fixed states are its seeded placements, so it
        makes as many as the fresh-state evaluation reaches (other environments have the ones they have)."""
        kwargs = dict(self.env.kwargs)
        if self.env.name == "lift" and self.eval.fresh_trials:
            kwargs["num_initial_states"] = max(int(kwargs.get("num_initial_states", 50)), self.eval.fresh_first_trial + self.eval.fresh_trials)
        return EnvConfig(self.env.name, kwargs)

    def augment_config(self) -> Any:
        """The official augmentation (``cosmos_policy.data.augment.AugmentConfig``) when data.augmentation is on."""
        from cosmos_policy.data.augment import AugmentConfig  # torch: loaded by the learner, not by reading a config

        return AugmentConfig() if self.data.augmentation else None

    def mixture(self, which: str) -> MixtureConfig:
        """The sample mixture of a learner: ``policy`` (offline), ``planning`` or ``policy_online``."""
        field_name = {"policy": "policy_mixture", "planning": "planning_mixture", "policy_online": "policy_online_mixture"}[which]
        value = getattr(self.data, field_name)
        rollouts = {"planning": self.data.demos_as_rollouts, "policy": self.data.policy_demos_as_rollouts}.get(which, False)
        overrides = {"demos_as_success_rollouts": True} if rollouts else {}
        try:
            return mixture_preset(value, **overrides)
        except (ConfigError, TypeError) as exc:
            raise ConfigError(f"data.{field_name}: {exc}") from exc

    def learner_config(self, checkpoint_dir: str, online: bool, init_checkpoint: str | None = None, steps: int | None = None,
                       lr: float | None = None, init_counts: bool = False) -> LearnerConfig:
        """One learner's config: the ``learner`` section plus what the phase sets (model, steps, lr, batch, where to save)."""
        section = self.online if online else self.offline
        total = steps or (self.online.refine_steps * max(1, self.online.rounds) if online else self.offline.policy_steps)
        warmup = 0 if online else min(self.offline.warmup_steps, max(0, total - 1))
        schedule = dataclasses.replace(self.learner.schedule, warmup_steps=warmup, cycle_steps=max(total, warmup + 1))
        accum = self.learner.grad_accum  # the batch of a step is split into micro-batches (memory: the 2b model on one GPU)
        if section.batch % accum:
            raise ConfigError(f"learner.grad_accum: expected a divisor of {'online' if online else 'offline'}.batch ({section.batch}), got {accum}")
        engine = {f.name for f in dataclasses.fields(LearnerConfig)}
        values = {k: v for k, v in dataclasses.asdict(self.learner).items() if k in engine}
        values.update(model=self.model.size, layout=self.model.layout, init_checkpoint=init_checkpoint, init_counts=init_counts,
                      lr=lr or section.lr,
                      micro_batch=section.batch // accum, checkpoint_dir=checkpoint_dir, seed=self.seed,
                      schedule=schedule, betas=tuple(self.learner.betas))
        return LearnerConfig(**values)

    def to_dict(self) -> dict[str, Any]:
        """The experiment as plain data, loadable again (the learner fields the job derives are left out)."""
        data = dataclasses.asdict(self)
        for key in LEARNER_DERIVED:
            del data["learner"][key]
        return data
