#!/bin/bash
# One call of the device tool for the learning run: the job runs in its own session (setsid), so it goes on
# between calls while the machine stays warm; each call waits for it up to its limit and hands back what
# the run has written so far. (A machine given back ends the job: the run directory then resumes elsewhere.)
#
#   bash research/lift_learning/gpu_call.sh start 565 <device budget left, s> [overrides]   # the first call
#     (install, start, wait): the job's online.budget_s is the device budget left (the device tool's status,
#     just before this call) less 210 s (the machine's start, the install, the offline phases' Ray start-up
#     and the last call's return): the job's budget counts from its first demonstration, the device's from
#     the machine's start, and a failed start spends the device's alone (run 5 ended 81 s inside it)
#   bash research/lift_learning/gpu_call.sh wait 590                # every later call: wait, hand back
#
# Needs .carry/site.tar.xz, .whl/ and .gl/ beside the tree (research/lift_learning/README.md says how).
set -u
what=$1; limit=$2; shift 2
if [ "$what" = start ]; then
  case "${1:-}" in
    ''|*[!0-9]*) echo "gpu_call.sh start: expected the device budget left (seconds, from the device tool's status) after the wait's seconds, got '${1:-}'" >&2; exit 2;;
  esac
  budget=$(( $1 - 210 )); shift
  # Run 6 (944 s, three rounds) stopped where every run's judge was still at chance: a shorter run tells nothing.
  [ "$budget" -ge 1200 ] || { echo "gpu_call.sh start: the device budget leaves $budget s for the job (1200 needed: a shorter run stops before the judge learns, research/lift_learning run 6); run it in a session with the device budget whole" >&2; exit 2; }
fi
run=runs/lift_learning
out=${OUT:-/tmp/out}
mkdir -p "$out" runs
if [ "$what" = start ]; then
  for f in .gl/*.deb; do dpkg -x "$f" /; done; ldconfig
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  tar -xJf .carry/site.tar.xz -C /tmp/site
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  nproc
  export PYTHONPATH=/tmp/site MUJOCO_GL=egl PYOPENGL_PLATFORM=egl RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
  setsid nohup nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 5 > runs/gpu.csv 2>&1 < /dev/null &
  setsid nohup bash -c 'while sleep 5; do echo "$(date +%s) $(cat /proc/loadavg)"; done' > runs/load.txt 2>&1 < /dev/null &
  echo "online.budget_s=$budget"
  setsid nohup python3 launch/online.py --config lift_learning logging.wandb=disabled online.budget_s=$budget "$@" > runs/job.log 2>&1 < /dev/null &
  echo $! > runs/job.pid
fi
pid=$(cat runs/job.pid)
while [ "$SECONDS" -lt "$limit" ] && kill -0 "$pid" 2>/dev/null; do sleep 5; done
kill -0 "$pid" 2>/dev/null && echo "job running (pid $pid)" || echo "job ended"
cp -f runs/job.log runs/gpu.csv runs/load.txt "$out"/ 2>/dev/null
cp -f "$run"/metrics.jsonl "$run"/success_rate.png "$run"/state.json "$out"/ 2>/dev/null
for d in "$run" "$run"/* "$run"/learner/* "$run"/replay/*; do du -sh "$d"; done 2>/dev/null > "$out"/sizes.txt  # what a resume needs
grep -v "^\[" runs/job.log | tail -40
tail -5 runs/job.log
