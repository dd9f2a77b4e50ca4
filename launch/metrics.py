"""Every metric the main job writes, in one place: its name, unit and meaning, and when each kind of record is written.

Each line of ``<run_dir>/metrics.jsonl`` is one record: ``kind`` (below), ``time`` (seconds since
the epoch) and ``wall_s`` (seconds since the run began, continued across resumes), then the
kind's metrics. W&B gets the same numbers as ``<kind>/<name>``. Weight versions are integers:
the number of publications of the model's learner (0: trained offline only). A test checks every
name a run writes against this list.
"""

from __future__ import annotations

import re

COMMON = {"kind": "what the record is", "time": "s since the epoch", "wall_s": "s since the run began (continued across resumes)"}

WHEN = {
    "start": "each time the job starts (the first run and every resume)",
    "demos": "once, after the demonstrations are made or read",
    "learner": "after each chunk of learner steps (offline: every validation interval; online: every publication)",
    "validation": "after each held-out validation of the offline policy",
    "collect": "after each round's collection",
    "replay": "at each round's end",
    "eval": "after each evaluation (round 0 before any online training, then every round)",
    "eval_fresh": "after the last round's evaluation, on initial states used for nothing else (eval.fresh_trials)",
    "round": "at each round's end",
    "rates": "every logging.rates_every_s during the online rounds (the actors' and the learner's work per interval)",
    "robot": "at each round's end where robots reported episodes since the last (the robots: entries' and robots that joined "
             "with launch/robot.py); launch/robots.py",
    "promotion": "with promotion.enabled: at each round's end, the gate's decision on the round's versions; and once per promoted "
                 "version, after its first promotion.live_window live episodes (kept or rolled back); launch/promotion.py",
}

CALIBRATION = {
    "calibration/value_mean": "mean predicted value of the episodes' planned queries (of every query where none was planned), [0, 1]",
    "calibration/value_brier": "mean squared error of that prediction against the outcome (0 or 1)",
    "calibration/value_if_success": "mean predicted value of the episodes that succeeded",
    "calibration/value_if_failure": "mean predicted value of the episodes that failed",
    "calibration/value_success_corr": "correlation of predicted value and outcome",
}

EVALUATION = {
    "round": "the round (0: before online training)", "weight_version": "planning model's version evaluated (an integer)",
    "policy_version": "acting policy's version evaluated (an integer)", "success_rate": "share of the episodes that succeed",
    "success_rate_no_plan": "the same, the policy alone on the same initial states", "episodes": "episodes per evaluation",
    "planning": "whether success_rate was measured with planning", "seconds": "s for the evaluation",
    "episodes_lost": "episodes whose EnvRunner (or the actor it called) died mid-episode; each was played again (both evaluations)",
    "runners": "EnvRunners it played on (eval.runners between the asynchronous loop's rounds, else every runner)",
    "forgetting": "mean over the tasks evaluated before of their best earlier success less their success now (0 where none "
                  "dropped): what later versions forgot",
    "forgetting_max": "the largest of those per-task drops",
    **CALIBRATION,
}

METRICS: dict[str, dict[str, str]] = {
    "start": {"command": "the command line", "resuming": "whether it resumed a run directory", "gpus": "GPUs in the Ray cluster"},
    "demos": {"episodes": "demonstrations", "success_rate": "share that succeed", "steps": "steps in all", "seconds": "s to make or read them"},
    "learner": {
        "phase": "policy_offline, planning_offline, planning_online, policy_online (or <target>_train in launch/train.py)",
        "learner/step": "optimizer steps of this learner so far",
        "loss": "training loss, mean over the chunk",
        "lr": "learning rate at the chunk's last step",
        "grad_norm": "gradient norm before clipping, mean over the chunk",
        "samples_per_s": "training samples per second",
        "staleness_versions": "mean lag of the experience in the chunk's batches behind this learner's version, in versions of the "
                              "model it trains (the planning model's learner: the planning versions that played it; a fraction)",
        "staleness_max_versions": "the largest such lag in the chunk's batches",
        "replay_wait_s": "s spent waiting for replay samples",
        "published_version": "the weight version published in the chunk (an integer)",
        "publish_s": "s to publish that version",
        "seconds": "online: s the round's refinement took (it began seconds before the record)",
        "round": "online: the round whose refinement this was",
        "experience_wait_s": "online: s the round waited for online.min_experience experience items before its first step",
    },
    "validation": {"phase": "policy_offline (or policy_train)", "learner/step": "the policy learner's step", "val_loss": "held-out loss",
                   "best": "lowest held-out loss so far"},
    "collect": {
        "round": "the round", "episodes": "episodes collected", "interrupted": "episodes cut short (not inserted)",
        "episodes_lost": "episodes whose EnvRunner (or the actor it called) died mid-episode; each was played again",
        "success_rate": "share of the uninterrupted ordinary (not branching) episodes that succeed", "env_steps": "simulator steps",
        "branch_episodes": "branching episodes collected (online.branch_states x planner.num_candidates, uninterrupted)",
        "branch_success_rate": "share of the branching episodes that succeed",
        "branch_states_contrasting": "share of the branched states whose branches disagree on the outcome (what the value learns from)",
        "branch_judge_pair_accuracy": "the serving judge on the round's new branched states: share of (succeeding, failing) candidate "
                                      "pairs of a state it scored in the right order (0.5: chance)",
        "branch_judge_pick_success": "share of the branched states where the played candidate the judge scored highest succeeded",
        "env_steps_per_s": "simulator steps per second of collection", "episodes_per_s": "episodes per second of collection",
        "episodes_kept": "the round's episodes replay held already (played before a stop; not played again)",
        "stopped": "whether a stop cut the collection (the round is played again, without the episodes kept, on resume)",
        "inference_s_per_query": "s per batch the PolicyServers served, since they started", **CALIBRATION,
    },
    "eval": EVALUATION,
    "eval_fresh": {**EVALUATION, "round": "the round (the last)", "first_trial": "the first fresh initial state (trial index)",
                   "success_rate": "share of the episodes that succeed, with planning", "success_rate_no_plan": "the same, the policy alone"},
    "round": {"round": "the round", "weight_version": "planning model's version at the round's end (an integer)",
              "policy_version": "acting policy's version at the round's end (an integer)", "seconds": "s for the round"},
    "replay": {"round": "the round"},
    "robot": {"round": "the round at whose end the robots' episodes were counted (those reported since the round before)"},
    "promotion": {
        "round": "the round whose versions the gate played", "planning_version": "the planning model's version decided on (an integer)",
        "policy_version": "the policy's version decided on (an integer; with online.refine_policy)",
        "status": "promoted, rejected (never served), served (nothing new to decide), kept (live) or rolled_back (live)",
        "promoted": "1: promoted, 0: rejected", "reason": "why, in words",
        "episodes": "gate episodes both versions played (the same task, initial state and seed)",
        "success": "the candidate's success on the gate's episodes", "served_success": "the served version's on the same episodes",
        "difference": "mean paired difference, candidate minus served (rejected below -promotion.tolerance)",
        "difference_se": "its standard error", "only_candidate": "gate episodes only the candidate succeeded on",
        "only_served": "gate episodes only the served version succeeded on",
        "rolled_back": "1: the served version failed live and was rolled back, 0: kept",
        "live_success": "the promoted version's success over its first promotion.live_window ordinary collection episodes",
        "live_reference": "what the version before it showed (its last live window, or its gate success)",
        "live_episodes": "live episodes judged", "serving_again": "the versions served after the rollback (target -> version)",
    },
    "rates": {"interval_s": "s the record covers", "env_steps": "simulator steps of collection episodes that ended in the interval",
              "learner_samples": "training samples of the online learners' steps in the interval",
              "env_steps_per_s": "env_steps / interval_s", "learner_samples_per_s": "learner_samples / interval_s"},
}

# Families of names: per task, per replay table, per sample kind and output.
REPLAY_STATS = ("items", "episodes", "bytes", "episodes_demo", "episodes_sim", "episodes_robot", "episodes_success", "episodes_failure",
                "inserted_items", "inserted_episodes", "sampled_items", "insert_items_per_s", "sample_items_per_s", "blocked_insert_s",
                "blocked_sample_s", "rejected", "evicted_episodes", "staleness_versions", "reverb_items", "discarded_draws")
ROBOT_ID = r"[A-Za-z0-9][A-Za-z0-9_.-]*"  # actors.robots.config.ID
PAIRED = (r"paired/(only_planned|only_alone|both|neither)",
          "paired/<outcome>: episodes (same state and seed) that succeed only with planning, only alone, both or neither")
PATTERNS: dict[str, list[tuple[str, str]]] = {
    "learner": [(r"(policy|world_model|value|value_sprime|q_value)/(action|future_image|future_proprio|value)_l1",
                 "<sample kind>/<output>_l1: mean absolute error of that output in that kind's samples (normalized units)")],
    "collect": [(r"replay_items/\w+", "replay_items/<table>: items (episode steps) in the table")],
    "eval": [(r"task/.+", "task/<task>: share of that task's episodes that succeed"), PAIRED],
    "eval_fresh": [(r"task/.+", "task/<task>: share of that task's episodes that succeed"), PAIRED],
    "replay": [(rf"\w+/({'|'.join(REPLAY_STATS)})", "<table>/<statistic>: the replay table's statistics (replay/book.py)")],
    "robot": [
        (rf"robot/{ROBOT_ID}/episodes", "robot/<id>/episodes: episodes the robot played (interrupted and re-recorded ones included)"),
        (rf"robot/{ROBOT_ID}/inserted", "robot/<id>/inserted: of them, the episodes that went to replay (the labelled ones)"),
        (rf"robot/{ROBOT_ID}/interrupted", "robot/<id>/interrupted: episodes cut short (late chunk, stop, fault, leaving): no label, "
                                           "not in replay"),
        (rf"robot/{ROBOT_ID}/rerecorded", "robot/<id>/rerecorded: episodes the operator discarded (not in replay)"),
        (rf"robot/{ROBOT_ID}/steps", "robot/<id>/steps: control steps of those episodes"),
        (rf"robot/{ROBOT_ID}/success_rate", "robot/<id>/success_rate: share of the labelled episodes labelled success (the "
                                            "operator's label; max_steps without one is a failure); absent with none labelled"),
        (rf"robot/{ROBOT_ID}/intervention_rate", "robot/<id>/intervention_rate: share of the control steps the teleop drove "
                                                 "(an operator's intervention)"),
        (rf"robot/{ROBOT_ID}/clipped_step_rate", "robot/<id>/clipped_step_rate: share of the control steps whose action the "
                                                 "safety envelope clipped to the limits or the workspace box"),
    ],
}


def documented(kind: str, name: str) -> bool:
    """Whether ``name`` in a record of ``kind`` is one of the metrics above."""
    if name in COMMON or name in METRICS.get(kind, {}):
        return True
    return any(re.fullmatch(pattern, name) for pattern, _ in PATTERNS.get(kind, []))
