"""The pieces of an online round: collect, refine and publish, evaluate, and what each reports.

``launch/online.py`` strings them together; each is a few lines over the services
(``launch.services``) and the learners it is given.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from actors.branching import lead_candidates
from actors.dispatch import spread
from actors.env_runner import EpisodeResult
from actors.evaluator import EvalConfig, evaluate
from cosmos_policy.contracts import TableName, Target
from cosmos_policy.episode import episode_seed
from launch.experiment import Experiment
from launch.monitor import Monitor, say
from launch.phases import learner_group
from launch.services import Services
from launch.signals import Stop
from learner.group import LearnerGroup, PublishConfig
from learner.sources import ReplaySource


@dataclass
class OnlineLearner:
    """One model refined online (the planning model; the policy too with ``online.refine_policy``)."""

    target: Target
    group: LearnerGroup
    steps: int  # learner steps per round

    @classmethod
    def start(cls, cfg: Experiment, run_dir: Path, services: Services, target: Target, init: str, source_kwargs: dict[str, Any],
              exported: bool = False) -> OnlineLearner:
        """From ``init``'s weights, or from its own checkpoint under run_dir when the job resumes; publishes ``target``.

        ``exported``: ``init`` is this learner's own latest export, whose step and version it continues
        when its checkpoint is gone (a run moved without ``learner/``)."""
        policy = target is Target.POLICY
        steps = cfg.online.policy_refine_steps if policy else cfg.online.refine_steps
        source = ReplaySource(services.replay, mixture=cfg.mixture("policy_online" if policy else "planning"), **source_kwargs)
        learner_cfg = cfg.learner_config(str(run_dir / "learner" / f"{target.value}_online"), online=True, init_checkpoint=init,
                                         steps=steps * max(1, cfg.online.rounds), lr=cfg.online.policy_lr if policy else None,
                                         init_counts=exported)
        publish = PublishConfig(every=cfg.online.publish_every, target=target.value)
        return cls(target, learner_group(cfg, f"online {target.value}", learner_cfg, source, publish, services.weights), steps)

    def refine(self, round_: int, monitor: Monitor, stopping: Callable[[], bool], rates: Rates | None = None,
               waited_s: float = 0.0) -> int:
        """The round's steps, up to ``round_`` x steps per round in all (publishing every ``publish_every``);
        returns the version the round ends on (published).

        Counting to the round's total step, not ``steps`` more: a round cut by a stop and played again from the
        saved learner trains only what it had left, so a resumed run ends on the same step and versions as one
        never stopped. ``rates`` counts the samples; ``waited_s``: how long the round waited for experience before it
        (``online.min_experience``), for its record."""
        rows: list[dict[str, float]] = []
        start = time.time()
        every = self.group.publish_cfg.every
        todo = max(0, round_ * self.steps - self.group.step())
        if todo:
            batch = self.group.config.micro_batch * self.group.config.grad_accum * self.group.world_size

            def got(new: list[dict[str, float]]) -> None:
                rows.extend(new)
                if rates is not None:
                    rates.add(samples=batch * len(new))
                monitor.progress(f"round {round_}: refining the {self.target.value} model", len(rows), todo)

            self.group.train(todo, chunk=min(10, every or 10), should_stop=stopping, on_metrics=got)
            monitor.learner(f"{self.target.value}_online", rows, round=round_, seconds=time.time() - start,
                            **({"experience_wait_s": waited_s} if waited_s else {}))
        if stopping():  # the round is not recorded: a restart plays it again from the saved learner
            raise Stop()
        if rows and "published_version" in rows[-1]:
            return int(rows[-1]["published_version"])
        # Every round ends on a published version (the last step may fall between publications). With nothing
        # trained now (the round's steps were done before a stop), the weights at a publication step were
        # published then, under the version they have: this job's servers get them again, unchanged.
        return self.group.publish(bump=bool(rows) or not every or self.group.step() % every != 0)

    def export(self, run_dir: Path) -> str:
        return self.group.export(str(run_dir / "checkpoints" / f"{self.target.value}_latest"))


def save_round(services: Services, learners: list[OnlineLearner], monitor: Monitor, round_: int, policy_version: int | None) -> None:
    """A round's end: the learners' checkpoints, the replay's, and the replay's statistics (its ``staleness_versions``:
    how far the episodes it holds lag behind ``policy_version``, the policy served now)."""
    for learner in learners:
        learner.group.save()
    if policy_version is not None:
        services.replay.set_version(policy_version)
    services.replay.checkpoint()
    monitor.log("replay", {"round": round_, **{f"{t}/{k}": v for t, row in services.replay.stats().items() for k, v in row.items()}})


class Rates:
    """Env steps and learner samples per interval: a ``rates`` record every ``every_s`` seconds of the rounds.

    The evidence that the actors and the learner work at once (both rates above zero in the same intervals)
    and that the actors go on while a learner restarts."""

    def __init__(self, monitor: Monitor, every_s: float) -> None:
        self.monitor, self.every_s = monitor, every_s
        self._lock = threading.Lock()
        self._counts = {"env_steps": 0, "learner_samples": 0}
        self._since = time.monotonic()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._tick, name="rates", daemon=True) if every_s > 0 else None
        if self._thread is not None:
            self._thread.start()

    def add(self, env_steps: int = 0, samples: int = 0) -> None:
        with self._lock:
            self._counts["env_steps"] += env_steps
            self._counts["learner_samples"] += samples

    def flush(self) -> None:
        with self._lock:
            counts, self._counts = self._counts, {"env_steps": 0, "learner_samples": 0}
            now = time.monotonic()
            seconds, self._since = max(now - self._since, 1e-9), now
        self.monitor.log("rates", {"interval_s": seconds, **counts, "env_steps_per_s": counts["env_steps"] / seconds,
                                   "learner_samples_per_s": counts["learner_samples"] / seconds})

    def _tick(self) -> None:
        while not self._done.wait(self.every_s):
            self.flush()

    def close(self) -> None:
        if self._thread is not None:
            self._done.set()
            self._thread.join()
            self.flush()


class Collector:
    """The asynchronous loop's collection (``online.loop: asynchronous``): the rounds' episodes in a thread of its
    own, round after round, while the learner refines and the job evaluates.

    Collection may run ``online.collect_ahead`` rounds ahead of the learner: round c starts once the learner has
    finished round c - 1 - collect_ahead, and the learner starts round r once round r - collect_ahead is
    collected. So the experience the learner samples is never more than that many rounds of versions old, and
    neither side waits for the other otherwise. Each round it completes is recorded (``collected`` in the run
    state); a round cut by a stop is played again on resume without the episodes replay already holds.
    """

    def __init__(self, cfg: Experiment, services: Services, monitor: Monitor, first: int, learned: int,
                 stop: Callable[[], bool], rates: Rates | None, done: Callable[[int], None]) -> None:
        self.cfg, self.services, self.monitor, self.stop, self.rates, self.done = cfg, services, monitor, stop, rates, done
        self.collected, self.learned = first - 1, learned  # the last round collected; the last the learner finished
        self._halt = threading.Event()
        self._cond = threading.Condition()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(first,), name="collector", daemon=True)
        self._thread.start()

    def _stopping(self) -> bool:
        return self._halt.is_set() or bool(self.stop())

    def _run(self, first: int) -> None:
        ahead = self.cfg.online.collect_ahead
        try:
            for round_ in range(first, self.cfg.online.rounds + 1):
                with self._cond:
                    while self.learned < round_ - 1 - ahead and not self._stopping():
                        self._cond.wait(0.5)
                if self._stopping():
                    return
                complete = collect(self.cfg, self.services, round_, self.monitor, stop=self._stopping, rates=self.rates)
                self.services.replay.checkpoint()
                if not complete:
                    return  # cut by a stop: not recorded as collected
                self.done(round_)
                with self._cond:
                    self.collected = round_
                    self._cond.notify_all()
        except BaseException as exc:  # handed to the job's thread, which waits on the collector
            self.error = exc
        finally:
            with self._cond:
                self._cond.notify_all()

    def finished_learning(self, round_: int) -> None:
        with self._cond:
            self.learned = max(self.learned, round_)
            self._cond.notify_all()

    def wait_collected(self, round_: int, stopping: Callable[[], bool]) -> None:
        """Until round ``round_`` is collected; raises the collector's error, or ``Stop`` when stopping."""
        with self._cond:
            while self.collected < round_:
                if self.error is not None:
                    raise self.error
                if stopping():
                    raise Stop()
                if not self._thread.is_alive():
                    raise RuntimeError(f"the collector ended before round {round_} was collected")
                self._cond.wait(0.5)

    def wait_experience(self, items: int, round_: int, stopping: Callable[[], bool]) -> float:
        """Until replay holds ``items`` experience items or round ``round_`` is collected (``online.min_experience``);
        returns the seconds waited. Raises the collector's error, or ``Stop`` when stopping."""
        start = time.time()
        said = False
        while items > 0:
            stats = self.services.replay.stats()
            held = sum(int(stats.get(t.value, {}).get("items", 0)) for t in (TableName.EXPERIENCE_SUCCESS, TableName.EXPERIENCE_FAILURE))
            with self._cond:
                if held >= items or self.collected >= round_:
                    break
                if self.error is not None:
                    raise self.error
                if stopping():
                    raise Stop()
                if not said:
                    say(f"round {round_}: the learner waits for {items} experience items in replay (online.min_experience; {held} now)")
                    said = True
                self._cond.wait(0.5)
        return time.time() - start

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def halt(self) -> None:
        """Start no more episodes; returns when the ones being played have ended."""
        self._halt.set()
        with self._cond:
            self._cond.notify_all()
        self._thread.join()


@dataclass
class Budget:
    """``online.budget_s``: whether another round and the last evaluations still fit in the run's wall time.

    The estimates are measured, not configured: a round takes what the one before took, and an
    evaluation takes the round-0 evaluation's seconds per trial (with and without planning), for
    eval.trials_between trials between rounds and eval.trials plus eval.fresh_trials at the end.
    """

    cfg: Experiment
    monitor: Monitor

    def fits_another_round(self, round_s: float) -> bool:
        limit = self.cfg.online.budget_s
        if not limit:
            return True
        first = [e for e in self.monitor.records("eval") if e.get("round") == 0]
        per_trial = float(first[0]["seconds"]) / self.cfg.eval.trials if first else 0.0
        between = per_trial * (self.cfg.eval.trials_between or self.cfg.eval.trials)
        last = per_trial * (self.cfg.eval.trials + self.cfg.eval.fresh_trials)
        need = self.monitor.elapsed() + between + round_s + last
        if need <= limit:
            return True
        say(f"online.budget_s: another round and the last evaluations would end at about {need:.0f} s of {limit:.0f} s: "
            "this round is the last")
        return False


@dataclass(frozen=True)
class Job:
    """One episode of a round: a fresh seeded initial state, played once (``branch`` None) or as one branch."""

    task: str
    seed: int
    branch: tuple[int, ...] | None = None  # the candidates executed at the queries up to the branch point

    def episode_id(self, experiment: str, round_: int) -> str:
        """The id its episode is recorded under: what it plays, so replay tells which of a round's jobs are done."""
        played = "plain" if self.branch is None else "b" + "-".join(map(str, self.branch))
        return f"{experiment}-r{round_}-{self.task}-{self.seed}-{played}"


def collection_jobs(cfg: Experiment, tasks: list[str], round_: int) -> list[Job]:
    """A round's episodes: ``episodes_per_round`` ordinary ones, then ``branch_states`` new states played once per
    branched candidate (``online.branch_candidates``) at ``branch_query``; fresh seeds every round, tasks in turn."""
    seeds = [(tasks[i % len(tasks)], episode_seed(cfg.seed * 7919 + round_, i))
             for i in range(cfg.online.episodes_per_round + cfg.online.branch_states)]
    jobs = [Job(task, seed) for task, seed in seeds[: cfg.online.episodes_per_round]]
    n = cfg.planner.num_candidates
    for task, seed in seeds[cfg.online.episodes_per_round:]:
        lead = lead_candidates(seed, cfg.seed, cfg.online.branch_query, n)
        jobs += [Job(task, seed, (*lead, c)) for c in range(cfg.online.branch_candidates or n)]
    return jobs


def collect(cfg: Experiment, services: Services, round_: int, monitor: Monitor, stop: Callable[[], bool] | None = None,
            rates: Rates | None = None) -> bool:
    """The round's episodes (``collection_jobs``), spread over the EnvRunners as they come free; logs the collection.

    A round played again after a stop plays only the episodes replay does not hold (``Job.episode_id``): what was
    acknowledged before the stop is kept once. ``stop``: start no more episodes (the record says ``stopped``).
    Returns whether every episode of the round was played."""
    start = time.time()

    def progress(done: int, total: int) -> None:
        if done % len(services.runners) == 0 or done == total:
            monitor.progress(f"round {round_}: collecting", done, total)

    def play(runner: Any, job: Job) -> Any:
        meta = {"round": round_} if job.branch is None else {"round": round_, "branch_of": job.seed, "candidate": job.branch[-1]}
        return runner.run.remote(job.task, job.seed, None, meta, None, None, job.branch, job.episode_id(cfg.name, round_))

    held = {eid for table in services.replay.stats() for eid in services.replay.episode_ids(table)}
    every = collection_jobs(cfg, services.tasks, round_)
    jobs = [job for job in every if job.episode_id(cfg.name, round_) not in held]
    monitor.progress(f"round {round_}: collecting", 0, len(jobs))
    lost = LostEpisodes(f"round {round_}: collecting")

    def done(job: Job, result: EpisodeResult) -> None:
        if rates is not None:
            rates.add(env_steps=result.steps)
        if services.promotion is not None and job.branch is None:  # the served version's live record (a branch plays forced candidates)
            services.promotion.observe([result])
        if result.interrupted:  # its simulator died: the EnvRunner restarted it; the episode is no label
            say(f"warning: round {round_}: collecting: an episode's simulator died ({result.error.strip()[:160]}); the EnvRunner "
                "restarted it and the episode is counted as interrupted, not used")

    played = spread(services.runners, jobs, play, progress, lost, stop=stop, on_done=done)
    results = [r for _, r in played]
    seconds = max(time.time() - start, 1e-9)
    ok = [r for r in results if not r.interrupted]
    plain = [r for job, r in played if job.branch is None and not r.interrupted]
    steps = sum(r.steps for r in results)
    monitor.log("collect", {"round": round_, "episodes": len(results), "interrupted": len(results) - len(ok), "episodes_lost": len(lost.jobs),
                            "episodes_kept": len(every) - len(jobs), "stopped": len(results) < len(jobs),
                            **({"success_rate": float(np.mean([r.success for r in plain]))} if plain else {}),
                            **branching_figures([(job, r) for job, r in played if job.branch is not None and not r.interrupted]),
                            "env_steps": steps, "env_steps_per_s": steps / seconds, "episodes_per_s": len(results) / seconds,
                            "inference_s_per_query": services.seconds_per_batch(),
                            **{f"replay_items/{t}": s.get("items", 0) for t, s in services.replay.stats().items()},
                            **{f"calibration/{k}": v for k, v in calibration(ok).items()}})
    return len(results) == len(jobs)


class LostEpisodes:
    """``spread``'s ``on_lost``: one warning line per episode whose actor died (it is played again), and their count."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.jobs: list[Any] = []

    def __call__(self, job: Any, exc: BaseException) -> None:
        self.jobs.append(job)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        say(f"warning: {self.what}: an actor died during an episode ({type(exc).__name__}: {first[:160]}); "
            "Ray restarts it and the episode is played again")


def branching_figures(played: list[tuple[Job, EpisodeResult]]) -> dict[str, float]:
    """What a round's branching gave: its episodes, their success, the share of states whose branches
    disagree on the outcome (the states that teach the value to rank candidates), and how the serving
    judge ranked the candidates of those new states before learning from them (``judge_figures``)."""
    if not played:
        return {}
    outcomes: dict[tuple[str, int], set[bool]] = {}
    for job, r in played:
        outcomes.setdefault((job.task, job.seed), set()).add(r.success)
    return {"branch_episodes": len(played), "branch_success_rate": float(np.mean([r.success for _, r in played])),
            "branch_states_contrasting": float(np.mean([len(o) == 2 for o in outcomes.values()])), **judge_figures(played)}


def judge_figures(played: list[tuple[Job, EpisodeResult]]) -> dict[str, float]:
    """The judge graded on the round's branching episodes, states it has not trained on, at no extra cost.

    Every branch of a state makes the same planning query at its branch point, so each knows the judge's
    score of the candidate it then played, and how that candidate ended. Per state (and judge version):
    over pairs of a succeeding and a failing candidate, how often the judge scores the succeeding one
    higher (``branch_judge_pair_accuracy``; 0.5 is chance, ties count half), and how often the played
    candidate the judge scores highest succeeds (``branch_judge_pick_success``; against
    ``branch_success_rate``, what a random pick gives).
    """
    states: dict[tuple[str, int, int | None], list[tuple[float, bool]]] = {}
    for job, r in played:
        k = len(job.branch or ()) - 1  # the branch point's query: its value is the played candidate's score
        if 0 <= k < len(r.predicted_values):
            states.setdefault((job.task, job.seed, r.planning_version), []).append((r.predicted_values[k], r.success))
    wins = pairs = 0.0
    picks = []
    for branches in states.values():
        if len(branches) < 2:
            continue
        picks.append(max(branches, key=lambda b: b[0])[1])
        for v_s, ok_s in branches:
            for v_f, ok_f in branches:
                if ok_s and not ok_f:
                    pairs += 1
                    wins += 1.0 if v_s > v_f else 0.5 if v_s == v_f else 0.0
    out = {"branch_judge_pick_success": float(np.mean(picks))} if picks else {}
    return {**out, "branch_judge_pair_accuracy": wins / pairs} if pairs else out


def calibration(results: list[EpisodeResult]) -> dict[str, float]:
    """How the planner's predicted values relate to what happened (value in [0, 1] vs success)."""
    rows = [(float(np.mean(r.predicted_values)), float(r.success)) for r in results if r.predicted_values and not r.interrupted]
    if not rows:
        return {}
    pred, real = np.array(rows).T
    out = {"value_mean": float(pred.mean()), "value_brier": float(np.mean((pred - real) ** 2))}
    if real.min() != real.max():
        out["value_if_success"] = float(pred[real == 1].mean())
        out["value_if_failure"] = float(pred[real == 0].mean())
        if pred.std() > 0:
            out["value_success_corr"] = float(np.corrcoef(pred, real)[0, 1])
    return out


def evaluate_round(cfg: Experiment, services: Services, monitor: Monitor, round_: int, versions: dict[str, int | None],
                   last: bool = False, fresh: bool = False, alone: bool = True) -> dict[str, Any]:
    """Success on the fixed initial states, with planning and (``eval.also_without_planning``) the policy alone:
    ``eval.trials`` at round 0 and the ``last`` round, ``eval.trials_between`` at the rounds between; ``fresh``:
    the ``eval.fresh_trials`` states from ``eval.fresh_first_trial`` instead (an ``eval_fresh`` record).
    ``alone``: nothing runs beside it, so it plays on every EnvRunner (else on its own, ``Services.evaluators``)."""
    start = time.time()
    runners = services.evaluators(alone)
    trials = cfg.eval.trials_between if 0 < round_ and not last and cfg.eval.trials_between is not None else cfg.eval.trials
    config = EvalConfig(tasks=services.tasks, trials=cfg.eval.fresh_trials if fresh else trials, seeds=list(cfg.eval.seeds),
                        first_trial=cfg.eval.fresh_first_trial if fresh else 0)
    where = "fresh states" if fresh else "evaluating"

    def progress(what: str) -> Callable[[int, int], None]:
        def report(done: int, total: int) -> None:
            if done % len(runners) == 0 or done == total:
                monitor.progress(f"round {round_}: {where} {what}", done, total)
        return report

    lost = LostEpisodes(f"round {round_}: {where}")
    report = evaluate(runners, config, suite=cfg.env.name, plan=cfg.eval.plan, record=False,
                      on_result=progress("with planning" if cfg.eval.plan else "the policy"), on_lost=lost)
    results = [EpisodeResult(**{k: v for k, v in row.items() if k in EpisodeResult.__dataclass_fields__}) for row in report["episodes_detail"]]
    record: dict[str, Any] = {"round": round_, "weight_version": versions.get("planning"), "policy_version": versions.get("policy"),
                              "success_rate": report["success_rate"], "episodes": report["episodes"], "planning": cfg.eval.plan,
                              **({"first_trial": config.first_trial} if fresh else {}),
                              **{f"task/{t}": row["success_rate"] for t, row in report["tasks"].items()},
                              **{f"calibration/{k}": v for k, v in calibration(results).items()}}
    if cfg.eval.also_without_planning and cfg.eval.plan:
        policy_alone = evaluate(runners, config, suite=cfg.env.name, plan=False, record=False, on_result=progress("the policy alone"),
                                on_lost=lost)
        record["success_rate_no_plan"] = policy_alone["success_rate"]
        record.update({f"paired/{k}": v for k, v in paired_outcomes(report, policy_alone).items()})
    if not fresh:
        record.update(forgetting(monitor.records("eval"), record))
    record["seconds"] = time.time() - start
    record["episodes_lost"] = len(lost.jobs)
    record["runners"] = len(runners)
    monitor.log("eval_fresh" if fresh else "eval", record)
    monitor.plot()
    say(f"round {round_}: {'fresh states: ' if fresh else ''}success {100 * report['success_rate']:.1f} % with planning "
        f"(weight version {versions.get('planning')})"
        + (f", {100 * record['success_rate_no_plan']:.1f} % policy alone" if "success_rate_no_plan" in record else ""))
    return record


def forgetting(earlier: list[dict[str, Any]], now: dict[str, Any]) -> dict[str, float]:
    """What the versions since each task's best evaluation lost on it (continual learning's forgetting): per task, its best
    success in the earlier evaluations less its success now (0 where it did not drop), averaged over the tasks evaluated
    before; absent at the first evaluation."""
    drops = []
    for key, value in now.items():
        if key.startswith("task/"):
            seen = [e[key] for e in earlier if isinstance(e.get(key), (int, float))]
            if seen:
                drops.append(max(0.0, max(seen) - value))
    return {"forgetting": float(np.mean(drops)), "forgetting_max": float(max(drops))} if drops else {}


def paired_outcomes(planned: dict[str, Any], alone: dict[str, Any]) -> dict[str, int]:
    """The two evaluations episode by episode (same task, trial and seed): how many succeed only with planning,
    only alone, or both; the counts of McNemar's test of the difference."""
    key = lambda row: (row["task"], row["trial"], row["seed"])  # noqa: E731
    alone_by = {key(row): bool(row["success"]) for row in alone["episodes_detail"]}
    pairs = [(bool(row["success"]), alone_by[key(row)]) for row in planned["episodes_detail"] if key(row) in alone_by]
    return {"only_planned": sum(p and not a for p, a in pairs), "only_alone": sum(a and not p for p, a in pairs),
            "both": sum(p and a for p, a in pairs), "neither": sum(not p and not a for p, a in pairs)}
