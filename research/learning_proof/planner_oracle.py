"""How much best-of-N could gain at all: candidates judged by their real outcome in the simulator.

Best-of-N planning can only beat the policy if, where the policy fails, some other candidate
chunk would have led to success. This script measures that headroom on the built-in task with
an oracle instead of the learned world model and value: at the first ``--queries`` query
points of an episode it restores the simulator state, executes each candidate's chunk, lets the
plain policy finish the episode, and keeps the first candidate that succeeds (the policy's own
sample, candidate 0, first). Candidates are made exactly as the planner makes them (the
policy's samples for seeds seed+c, with ``planner.candidate_noise`` offsets when set).

It is a diagnostic, not a planner: it uses privileged simulator access (state restore and
rollouts) that the system's planner never has. Figures (printed; written to --out):
    policy_success        the plain policy from the same states and seeds (candidate 0 always)
    oracle_success        success when the oracle may switch candidates at the first --queries queries
    headroom_points       100 x (oracle_success - policy_success): the most best-of-N could add there
    rollouts              simulated candidate rollouts spent

Restoring a mid-episode state re-anchors robosuite's controller and clears the gripper's
command ramp (``LiftEnv.reset(initial_state=...)``), so a restored rollout of candidate 0 can
differ slightly from the uninterrupted episode; both figures use the same restored rollouts.

With ``--label-first-query`` it grades the learned judge instead: at the first query of each
episode every candidate is rolled out (its real outcome is its label) and the planner scores the
same candidates with the planning model of ``--planning``; figures:
    policy_success        candidate 0's outcome (the plain policy)
    judge_success         the outcome of the candidate the learned judge picks (best-of-N at the first query)
    oracle_success        some candidate succeeds
    candidate_success     the mean outcome over all candidates
    judge_pair_accuracy   over candidate pairs of one state with different outcomes: how often the
                          judge scores the succeeding one higher (0.5: no better than chance)
A judge can then be compared with another on the same labels without running online rounds:
``--grade-stored KEY`` reads the rows that such a run stored under KEY in --out (the candidates'
outcomes, the majority over streams where there are several) and grades the judge of --planning on
them, with no rollouts (the policy must be the labelling run's, so that the candidates are the same);
figures printed: judge_pair_accuracy, pairs, judge_success, policy_success, oracle_success.

With ``--continuations K`` (K >= 2) each candidate is rolled out K times, the policy that finishes
the episode drawing its samples from K different seed streams; this asks whether the outcome is
decided by the first chunk at all (only then can any judge of that chunk pick well):
    outcome_agreement     fraction of candidates whose K outcomes all agree
    perfect_judge_success  a judge that knew each candidate's success rate over streams 1..K-1
                          (ties to the policy's own candidate) picks; scored on stream 0, which
                          it never saw: the most a judge of the first chunk could reach
    policy_success        as above, on stream 0

    python bench/planner_oracle.py [--trials 0-19] [--queries 2] [override ...]   # e.g. planner.candidate_noise=0.1
    python bench/planner_oracle.py --label-first-query --planning checkpoints/planning_latest [override ...]
    python bench/planner_oracle.py --label-first-query --continuations 3 planner.candidate_noise=0.1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from lift_planning import add_run_args, load, write_figures  # noqa: E402

from cosmos_policy.layout import SampleKind  # noqa: E402
from cosmos_policy.planner import Planner  # noqa: E402

QUERY_SEED = 7919  # the EnvRunner's per-query seed stride: query q of an episode seeded s uses s + 7919 q


def candidates(planner: Planner, obs, seed: int) -> list[np.ndarray]:
    """The planner's N candidate chunks for ``obs`` (dataset units), before any judging."""
    policy, n = planner.policy, planner.config.num_candidates
    batch = policy.batch([obs])
    cond = planner._conditioning(policy.model, batch)
    rep = torch.zeros(n, dtype=torch.long)
    seeds = [seed + c for c in range(n)]
    cands = planner._sample(policy.model, SampleKind.POLICY, batch.text[rep], cond[rep], [policy.config.action_steps] * n, seeds)
    if planner.config.candidate_noise > 0:
        cands = planner._explore(cands, seeds, n)
    return [o.actions for o in policy.outputs(policy.model.read_outputs(cands), batch=None)]


def finish(env, policy, obs, chunk: np.ndarray, execute: int, seed: int, query: int) -> bool:
    """Execute ``chunk`` from the current state, then the plain policy until the episode ends; success?"""
    q = query
    while True:
        acts = chunk[:execute]
        for i, a in enumerate(acts):
            r = env.step(a, render=i == len(acts) - 1)
            if r.done:
                return bool(r.success)
        obs = r.observation
        q += 1
        chunk = policy.act(obs, seed=seed + QUERY_SEED * q).actions


def _weights_digest(checkpoint: str) -> str | None:
    """The denoiser's SHA-256 from a checkpoint's manifest (None where the checkpoint is not on this machine)."""
    manifest = Path(checkpoint) / "manifest.json"
    if not manifest.is_file():
        return None
    return json.loads(manifest.read_text()).get("files", {}).get("denoiser.safetensors")


CONTINUATION_SEED = 100003  # seed stream k of the finishing policy: episode seed + k * CONTINUATION_SEED


def label_first_query(env, policy, planner: Planner, states: list, trials: list[int], execute: int, seed: int,
                      continuations: int = 1) -> tuple[dict, list[dict]]:
    """Every candidate of the first query rolled out (labels) beside the learned judge's scores of them.

    ``outcomes`` (stream 0) are the labels; with ``continuations`` > 1 each candidate is also
    finished from the same restored state with other seed streams (``streams``: candidate x stream).
    """
    rows = []
    for trial in trials:
        obs = env.reset("lift", seed, states[trial])
        here = env.get_state()
        cands = candidates(planner, obs, seed)
        plan = planner.plan(obs, seed=seed)  # the same candidates (same seeds and offsets), judged
        if not np.allclose(plan.candidate_actions, np.stack(cands), atol=1e-4):
            raise RuntimeError("the planner's candidates differ from the ones rolled out; the labels would not match")
        streams = []
        for chunk in cands:
            row = []
            for k in range(continuations):
                env.reset("lift", seed, here)
                row.append(finish(env, policy, obs, chunk, execute, seed + k * CONTINUATION_SEED, 0))
            streams.append(row)
        outcomes = [row[0] for row in streams]
        values = [float(v) for v in plan.candidate_values]
        pairs = [(values[i] > values[j]) + 0.5 * (values[i] == values[j])
                 for i in range(len(cands)) for j in range(len(cands)) if outcomes[i] and not outcomes[j]]
        rows.append({"trial": trial, "outcomes": outcomes, "values": [round(v, 4) for v in values], "chosen": plan.chosen,
                     "pair_wins": float(np.sum(pairs)) if pairs else None, "pairs": len(pairs)})
        if continuations > 1:
            rows[-1]["streams"] = streams
        print(json.dumps(rows[-1]), flush=True)
    n_pairs = sum(r["pairs"] for r in rows)
    figures = {
        "policy_success": float(np.mean([r["outcomes"][0] for r in rows])),
        "judge_success": float(np.mean([r["outcomes"][r["chosen"]] for r in rows])),
        "oracle_success": float(np.mean([any(r["outcomes"]) for r in rows])),
        "candidate_success": float(np.mean([np.mean(r["outcomes"]) for r in rows])),
        "judge_pair_accuracy": (sum(r["pair_wins"] or 0.0 for r in rows) / n_pairs) if n_pairs else None,
        "pairs": n_pairs,
        "rollouts": sum(len(r["outcomes"]) for r in rows) * continuations,
    }
    if continuations > 1:
        figures.update(continuation_figures([r["streams"] for r in rows]))
    return figures, rows


def continuation_figures(streams: list[list[list[bool]]]) -> dict[str, float]:
    """Is the outcome decided by the first chunk? ``streams[state][candidate][k]``: the outcome with seed stream k.

    The perfect judge ranks candidates by their success rate over streams 1..K-1 (ties go to the
    lowest index, the policy's own candidate first) and is scored on stream 0, held out from it.
    """
    agree, picks = [], []
    for state in streams:
        outcomes = np.asarray(state, dtype=float)  # candidates x streams
        agree.extend(bool(row.min() == row.max()) for row in outcomes)
        picks.append(outcomes[int(np.argmax(outcomes[:, 1:].mean(axis=1))), 0])
    return {"continuations": len(streams[0][0]), "outcome_agreement": float(np.mean(agree)),
            "perfect_judge_success": float(np.mean(picks)),
            "candidate_success_all_streams": float(np.mean([np.mean(s) for s in streams]))}


def grade_stored(env, planner: Planner, states: list, rows: list[dict], seed: int) -> dict:
    """The judge's pair accuracy and pick on labels stored by an earlier ``--label-first-query`` run."""
    wins = pairs = 0.0
    picks, own, oracle = [], [], []
    for row in rows:
        labels = [float(np.mean(s)) > 0.5 for s in row["streams"]] if "streams" in row else [bool(o) for o in row["outcomes"]]
        values = [float(v) for v in planner.plan(env.reset("lift", seed, states[row["trial"]]), seed=seed).candidate_values]
        for i, j in ((i, j) for i in range(len(labels)) for j in range(len(labels)) if labels[i] and not labels[j]):
            pairs += 1
            wins += (values[i] > values[j]) + 0.5 * (values[i] == values[j])
        picks.append(labels[int(np.argmax(values))])
        own.append(labels[0])
        oracle.append(any(labels))
    return {"judge_pair_accuracy": wins / pairs if pairs else None, "pairs": int(pairs), "judge_success": float(np.mean(picks)),
            "policy_success": float(np.mean(own)), "oracle_success": float(np.mean(oracle)), "episodes": len(rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_args(parser, "checkpoints/planning", "the judge graded by --label-first-query; else only its layout is used")
    parser.add_argument("--trials", default="0-19", help="fixed initial states: a range a-b or a comma list")
    parser.add_argument("--seed", type=int, default=0, help="the episode seed (evaluations use 0 and 1)")
    parser.add_argument("--queries", type=int, default=2, help="query points at which the oracle may switch candidates")
    parser.add_argument("--label-first-query", action="store_true", help="grade the learned judge on labelled first-query candidates")
    parser.add_argument("--continuations", type=int, default=1,
                        help="with --label-first-query: finish each candidate with this many seed streams of the policy")
    parser.add_argument("--grade-stored", metavar="KEY", default=None,
                        help="grade the judge of --planning on the labels stored under KEY in --out (no rollouts, nothing written)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "planner_oracle.json"))
    parser.add_argument("overrides", nargs="*", help="experiment overrides, e.g. planner.candidate_noise=0.1")
    args = parser.parse_args()
    cfg, policy, planner, policy_ckpt, planning_ckpt = load(args, args.overrides)
    if args.grade_stored:
        stored = json.loads(Path(args.out).read_text()).get(args.grade_stored)
        if not stored or "rows" not in stored:
            raise SystemExit(f"--grade-stored: {args.out} has no labelled rows under {args.grade_stored!r}")
        mine, theirs = _weights_digest(policy_ckpt), _weights_digest(stored["policy_checkpoint"])
        if mine and theirs and mine != theirs:
            raise SystemExit(f"--policy: {policy_ckpt} is not the labelling run's policy ({stored['policy_checkpoint']}); "
                             "its candidates would differ from the labelled ones")
        from actors.envs.lift import LiftEnv

        kwargs = dict(cfg.env.kwargs)
        env = LiftEnv(image_size=int(kwargs.get("image_size", 64)), max_steps=int(kwargs.get("max_steps", 100)),
                      num_initial_states=max(r["trial"] for r in stored["rows"]) + 1)
        figures = grade_stored(env, planner, env.initial_states("lift"), stored["rows"], args.seed)
        env.close()
        print(json.dumps({"labels": args.grade_stored, "planning_checkpoint": planning_ckpt, **figures}), flush=True)
        return
    if "-" in args.trials:
        a, b = (int(x) for x in args.trials.split("-"))
        trials = list(range(a, b + 1))
    else:
        trials = [int(t) for t in args.trials.split(",")]
    from actors.envs.lift import LiftEnv

    kwargs = dict(cfg.env.kwargs)
    env = LiftEnv(image_size=int(kwargs.get("image_size", 64)), max_steps=int(kwargs.get("max_steps", 100)), num_initial_states=max(trials) + 1)
    states = env.initial_states("lift")
    execute, seed = cfg.env.execute, args.seed
    rows, rollouts, start = [], 0, time.time()
    if args.label_first_query:
        if args.continuations < 1:
            raise SystemExit(f"--continuations: expected an integer >= 1, got {args.continuations}")
        figures, rows = label_first_query(env, policy, planner, states, trials, execute, seed, args.continuations)
        env.close()
        figures.update({"episodes": len(rows), "seconds": round(time.time() - start, 1), "planner": cfg.to_dict()["planner"],
                        "policy_checkpoint": policy_ckpt, "planning_checkpoint": planning_ckpt,
                        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                        "command": "python bench/planner_oracle.py " + " ".join(sys.argv[1:]), "rows": rows})
        write_figures(figures, args.out, "rows")
        return
    for trial in trials:
        obs = env.reset("lift", seed, states[trial])
        policy_ok, oracle_ok, switched_at = None, False, None
        q = 0
        while True:
            qseed = seed + QUERY_SEED * q
            if q < args.queries:
                here = env.get_state()
                cands = candidates(planner, obs, qseed)
                chosen = None
                for c, chunk in enumerate(cands):
                    rollouts += 1
                    env.reset("lift", seed, here)
                    ok = finish(env, policy, obs, chunk, execute, seed, q)
                    if c == 0 and q == 0:
                        policy_ok = ok  # candidate 0 at every query: the plain policy
                    if ok:
                        chosen = c
                        break
                if chosen is not None:
                    oracle_ok, switched_at = True, (q if chosen else None)
                    break
                # No candidate succeeds from here: go on with the policy's own chunk and try again at the next query.
                env.reset("lift", seed, here)
                chunk = cands[0]
            else:
                chunk = policy.act(obs, seed=qseed).actions
            done = False
            for i, a in enumerate(chunk[:execute]):
                r = env.step(a, render=i == execute - 1)
                if r.done:
                    done, oracle_ok = True, bool(r.success)
                    break
            if done:
                break
            obs = r.observation
            q += 1
        rows.append({"trial": trial, "policy": bool(policy_ok), "oracle": bool(oracle_ok), "switched_at_query": switched_at})
        print(json.dumps(rows[-1]), flush=True)
    env.close()
    policy_rate = float(np.mean([r["policy"] for r in rows]))
    oracle_rate = float(np.mean([r["oracle"] for r in rows]))
    figures = {
        "policy_success": policy_rate,
        "oracle_success": oracle_rate,
        "headroom_points": round(100 * (oracle_rate - policy_rate), 1),
        "episodes": len(rows),
        "rollouts": rollouts,
        "seconds": round(time.time() - start, 1),
        "oracle_queries": args.queries,
        "planner": cfg.to_dict()["planner"],
        "policy_checkpoint": policy_ckpt,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "command": "python bench/planner_oracle.py " + " ".join(sys.argv[1:]),
        "rows": rows,
    }
    write_figures(figures, args.out, "rows")


if __name__ == "__main__":
    main()
