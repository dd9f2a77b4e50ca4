#!/bin/bash
# The main job (launch/online.py, quickstart recipe scaled down) on one host with 2 or more GPUs:
# Ray gives the learner one GPU (learner.gpus_per_worker=1) and each PolicyServer another (one
# server per remaining GPU, online.servers, at most the 4 EnvRunners; servers take a GPU whenever
# the cluster has one), EnvRunners run on the host's cores. Each round ends by waiting until every
# PolicyServer serves the newly published planning weights, so a finished run shows every weight
# version reaching every server. Writes <name>.log, <name>_metrics.jsonl and
# <name>_gpu.csv (per-GPU memory and utilisation every 5 s) to $OUT (default runs/multi_gpu_online).
#
#   bash bench/multi_gpu_online.sh small [timeout_s]   # the small model (1.1 M parameters)
#   bash bench/multi_gpu_online.sh 2b [timeout_s]      # the 2b model, random weights, no compilation
#
# On a host without the packages: .whl/*.whl are installed and .carry/site.tar.xz (made by
# research/tools/device_site.sh: Ray, robosuite, MuJoCo) is unpacked into /tmp/site first; .gl/*.deb
# (EGL/GL loaders for MuJoCo's rendering) are unpacked into / when present. A killed run resumes
# from its run directory (/tmp/<name>) when called again on the same host.
set -u
name=${1:-small}
limit=${2:-470}
out=${OUT:-runs/multi_gpu_online}
mkdir -p "$out"
if compgen -G ".gl/*.deb" >/dev/null; then for f in .gl/*.deb; do dpkg -x "$f" /; done; ldconfig; fi
if compgen -G ".whl/*.whl" >/dev/null || [ -f .carry/site.tar.xz ]; then
  mkdir -p /tmp/site
  if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  fi
  if [ -f .carry/site.tar.xz ]; then tar -xJf .carry/site.tar.xz -C /tmp/site || exit 1; fi
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 MUJOCO_GL=${MUJOCO_GL:-egl} PYOPENGL_PLATFORM=${PYOPENGL_PLATFORM:-egl} RAY_USAGE_STATS_ENABLED=0
gpus=$(nvidia-smi -L | wc -l)
if [ "$gpus" -lt 2 ]; then echo "multi_gpu_online: needs a host with 2 or more GPUs, found $gpus" >&2; exit 2; fi
servers=$(( gpus - 1 < 4 ? gpus - 1 : 4 ))
common="online.servers=$servers demos.episodes=8 offline.validate_every=1000 online.rounds=2 online.episodes_per_round=8 online.runners=4 eval.trials=4
  eval.also_without_planning=false learner.gpus_per_worker=1 logging.wandb=disabled"
case "$name" in
  small) model="model.size=small offline.policy_steps=40 offline.planning_steps=20 online.refine_steps=20 online.publish_every=10" ;;
  # Eager blocks (compiling takes minutes per learner start) with every block checkpointed: the
  # uncompiled 2b model at micro-batch 8 without checkpointing runs out of the H200's 140 GB.
  2b) model="online.episodes_per_round=4 eval.trials=2 model.size=2b offline.policy_steps=4 offline.planning_steps=4
        online.refine_steps=4 online.publish_every=2 online.batch=16 offline.batch=16 learner.grad_accum=2
        learner.checkpoint_blocks=28 learner.float8=off learner.compile=false learner.vae_compile=false" ;;
  *) echo "multi_gpu_online: expected small or 2b, got $name" >&2; exit 2 ;;
esac
nvidia-smi --query-gpu=index,memory.used,utilization.gpu --format=csv,noheader -l 5 > "$out/${name}_gpu.csv" &
smi=$!
# shellcheck disable=SC2086
timeout "$limit" python3 launch/online.py --config quickstart run_dir=/tmp/$name name=$name $common $model > "$out/$name.log" 2>&1
rc=$?
kill $smi
cp /tmp/$name/metrics.jsonl "$out/${name}_metrics.jsonl" 2>/dev/null
grep -E "round [0-9]+: success|rc=|Error" "$out/$name.log" | tail -8
echo "rc=$rc"
exit $rc
