#!/bin/bash
# A Q(s, a) judge for first-query planning on the built-in task, made on a GPU host without Ray, in
# two device calls (each under 10 minutes): branching collection on the host's CPUs, then training
# on its GPUs. bench/RESULTS.md ("sixth session") has what this made and how it was graded.
#
#   PHASE=collect: every initial state of TRIALS0 (episode seed 0) and TRIALS1 (seed 1, the
#     evaluation's other seed) is played once per planner candidate (launch/collect.py
#     --branch-first-query --first-query-only), half the cores each, stopped after COLLECT_S
#     seconds; the episode files (frames at the branch point only) come back as
#     $OUT/branches.tar.xz.* pieces of 15 MB.
#   PHASE=train: the judge (JUDGE_SIZE, from JUDGE_INIT if given) is trained with launch/train.py
#     on the episode files under BRANCHES (default: BRANCH_TARS, the collect phase's pieces,
#     unpacked; without JUDGE_INIT, BRANCHES must also hold demonstrations, whose statistics
#     normalize the judge's inputs), Q(s, a) and world-model
#     samples 50/50 from the success and failure pools, STEPS steps, and comes back as
#     $OUT/judge.tar.xz.* pieces.
#
# Carry (run tool): the wheels in .whl/ (diffusers, deepspeed, omegaconf, hjson, pydantic(-core),
# annotated-types, typing-inspection, importlib_metadata), the EGL packages in .gl/ (collect only),
# the site bundle made by `RAY=0 bash bench/device_site.sh $SITE` (collect only), the policy and
# planning checkpoints (collect) or the branch files (train). All paths below are overridable.
set -uo pipefail
PHASE=${PHASE:?PHASE=collect or PHASE=train}
OUT=${OUT:?the run tool sets OUT}
WHEELS=${WHEELS:-.whl}
if [ -d "$WHEELS" ]; then  # absent where the packages are installed already (a checkout with .venv)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 MUJOCO_GL=egl PYOPENGL_PLATFORM=egl

if [ "$PHASE" = collect ]; then
  if [ -d "${GL_DEBS:-.gl}" ]; then for f in "${GL_DEBS:-.gl}"/*.deb; do dpkg -x "$f" /; done; ldconfig; fi
  if [ -f "${SITE:-.carry/site_noray.tar.xz}" ]; then tar -xJf "${SITE:-.carry/site_noray.tar.xz}" -C /tmp/site || exit 1; fi
  python3 -c "from actors.envs.lift import LiftEnv; LiftEnv(image_size=64, num_initial_states=1)" > "$OUT/check.log" 2>&1 \
    || { tail -5 "$OUT/check.log"; exit 1; }
  workers=$(( $(nproc) / 2 > 0 ? $(nproc) / 2 : 1 ))
  judge="planner.candidate_noise=0.1 planner.common_judge_seeds=true planner.value_kind=q_value planner.value_steps=[1]"
  judge="$judge planner.future_steps=[1] online.plan=false logging.wandb=disabled"  # the judge's values are not used when branching
  args=(--config learning_curve --policy "$(realpath "${POLICY:?the policy checkpoint}")" --planning "$(realpath "${PLANNING:?a planning checkpoint}")"
        --branch-first-query --first-query-only --workers "$workers" --threads 1)  # two collections share the cores
  timeout "${COLLECT_S:-440}" python3 launch/collect.py "${args[@]}" --trials "${TRIALS0:-300-1799}" --seed 0 --out /tmp/branches/s0 $judge \
    > "$OUT/collect_s0.log" 2>&1 &
  timeout "${COLLECT_S:-440}" python3 launch/collect.py "${args[@]}" --trials "${TRIALS1:-1800-3299}" --seed 1 --out /tmp/branches/s1 $judge \
    > "$OUT/collect_s1.log" 2>&1 &
  wait
  cat /tmp/branches/s*/collect.jsonl > "$OUT/collect.jsonl"
  echo "collected $(wc -l < "$OUT/collect.jsonl") episodes in $SECONDS s"
  tar -cf - -C /tmp branches | xz -6 -T0 | split -b 15M - "$OUT/branches.tar.xz."
elif [ "$PHASE" = train ]; then
  mkdir -p /tmp/branches
  if [ -n "${BRANCH_TARS:-}" ]; then cat $BRANCH_TARS | xz -dc | tar -xf - -C /tmp/branches || exit 1; fi  # the pieces, in order
  kinds="{q_value: 0.5, world_model: 0.5}"
  init=${JUDGE_INIT:+--init $(realpath "$JUDGE_INIT")}
  # Options first: --episodes takes every word up to the next option.
  timeout "${TRAIN_S:-480}" python3 launch/train.py --config learning_curve --target planning --episodes ${BRANCHES:-/tmp/branches} \
    --out /tmp/judge --steps "${STEPS:-1400}" --lr "${LR:-3e-4}" --first-query-only $init \
    model.size="${JUDGE_SIZE:-medium}" data.demos_as_rollouts=false learner.compile=false learner.vae_compile=false learner.float8=off \
    offline.warmup_steps=50 learner.data_workers="${DATA_WORKERS:-6}" logging.wandb=disabled \
    "data.planning_mixture={pools: {success: 0.5, failure: 0.5}, kinds: {success: $kinds, failure: $kinds}}" > "$OUT/train.log" 2>&1
  echo "train rc=$? in $SECONDS s"; grep -v WARN "$OUT/train.log" | tail -3
  cp /tmp/judge/metrics.jsonl "$OUT/" 2>/dev/null
  tar -cf - -C /tmp/judge/checkpoints planning | xz -1 -T0 | split -b 15M - "$OUT/judge.tar.xz."
else
  echo "PHASE: expected collect or train, got $PHASE" >&2; exit 2
fi
