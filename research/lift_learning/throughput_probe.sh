#!/bin/bash
# Collection throughput of the lift_learning loop against the number of EnvRunners, on a GPU host (one call of the
# device tool): the same job twice with a briefly trained policy (its episodes mostly fail and run their 100 steps),
# one round of branching collection each; env steps/s and episodes/s from each run's `collect` record.
#
#   bash research/lift_learning/throughput_probe.sh "14 22"     # .carry, .whl and .gl beside the tree (README.md)
set -u
out=${OUT:-/tmp/out}
mkdir -p "$out" runs
for f in .gl/*.deb; do dpkg -x "$f" /; done; ldconfig
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
tar -xJf .carry/site.tar.xz -C /tmp/site
export PYTHONPATH=/tmp/site MUJOCO_GL=egl PYOPENGL_PLATFORM=egl RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader; nproc
for n in ${1:-14 22}; do
  start=$SECONDS
  python3 launch/online.py --config lift_learning logging.wandb=disabled run_dir=runs/probe_$n online.runners=$n \
    offline.policy_steps=100 offline.planning_steps=20 offline.validate_every=100 online.rounds=1 online.budget_s=null \
    online.branch_states=32 online.refine_steps=50 online.publish_every=50 eval.at_start=false eval.trials=2 \
    eval.fresh_trials=0 > runs/probe_$n.log 2>&1
  echo "runners $n: job $((SECONDS - start)) s, rc $?"
  grep '"kind": "collect"' runs/probe_$n/metrics.jsonl | python3 -c "import json,sys; r=json.loads(sys.stdin.readline()); print({k: r[k] for k in ('episodes','episodes_per_s','env_steps_per_s','inference_s_per_query','branch_success_rate')})"
  cp runs/probe_$n/metrics.jsonl "$out"/probe_$n.jsonl
  grep -v "^\[" runs/probe_$n.log | tail -5
done
