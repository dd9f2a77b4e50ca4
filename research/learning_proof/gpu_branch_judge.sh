#!/bin/bash
# A Q(s, a) judge for planning on the built-in task, made and evaluated on a GPU host without Ray, in
# device calls of under 10 minutes each: branching collection on the host's CPUs, training on its
# GPUs, evaluation on its CPUs. bench/RESULTS.md ("sixth session", "seventh session") has what this
# made. PHASE may list several phases for one call ("train evaluate").
#
#   PHASE=collect: branching collections side by side (launch/collect.py --branch-query K
#     --branch-point-only), the cores divided among them, stopped after COLLECT_S seconds. JOBS lists
#     them as TRIALS:SEED:QUERY words (default "300-1799:0:0 1800-3299:1:0": first-query branching
#     with episode seeds 0 and 1, the evaluation's two seeds, so the judge sees the candidate offsets
#     it will rank there; QUERY 1 branches at the second query after a drawn first candidate). The
#     episode files (frames at the branch point only) come back as $OUT/branches.tar.xz.* pieces of 15 MB.
#   PHASE=train: the judge (JUDGE_SIZE, from JUDGE_INIT if given) is trained with launch/train.py
#     --branch-point-only on the episode files under BRANCHES (default: BRANCH_TARS, the collect
#     phase's pieces, unpacked, or this call's collection; without JUDGE_INIT, BRANCHES must also
#     hold demonstrations, whose statistics normalize the judge's inputs), Q(s, a) and world-model
#     samples 50/50 from the success and failure pools, STEPS steps or TRAIN_S seconds of training,
#     whichever ends first, on GPUS GPUs (EXPORT_EVERY: snapshots every that many steps come back too,
#     as judge_step<N>.tar.xz.* pieces, to be chosen among on held-out labels), from scratch (a warm host's earlier /tmp/judge is removed,
#     not resumed), and comes back as $OUT/judge.tar.xz.* pieces.
#   PHASE=evaluate: see its block below; the success counts are printed, the episodes' rows come back.
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
mkdir -p /tmp/logs
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 MUJOCO_GL=egl PYOPENGL_PLATFORM=egl

for P in $PHASE; do  # PHASE="train evaluate": one call, one after the other
if [ "$P" = collect ]; then
  if [ -d "${GL_DEBS:-.gl}" ]; then for f in "${GL_DEBS:-.gl}"/*.deb; do dpkg -x "$f" /; done; ldconfig; fi
  if [ -f "${SITE:-.carry/site_noray.tar.xz}" ]; then tar -xJf "${SITE:-.carry/site_noray.tar.xz}" -C /tmp/site || exit 1; fi
  python3 -c "from actors.envs.lift import LiftEnv; LiftEnv(image_size=64, num_initial_states=1)" > /tmp/logs/check.log 2>&1 \
    || { tail -5 /tmp/logs/check.log; exit 1; }
  read -ra jobs <<< "${JOBS:-300-1799:0:0 1800-3299:1:0}"
  cores=${CORES:-$(nproc)}  # CORES: fewer than the host has, when a training shares it
  workers=$(( cores / ${#jobs[@]} > 0 ? cores / ${#jobs[@]} : 1 ))
  judge="planner.candidate_noise=0.1 planner.common_judge_seeds=true planner.value_kind=q_value planner.value_steps=[1]"
  judge="$judge planner.future_steps=[1] online.plan=false logging.wandb=disabled"  # the judge's values are not used when branching
  args=(--config learning_curve --policy "$(realpath "${POLICY:?the policy checkpoint}")" --planning "$(realpath "${PLANNING:?a planning checkpoint}")"
        --branch-point-only --workers "$workers" --threads 1)  # the collections share the cores
  for job in "${jobs[@]}"; do
    IFS=: read -r trials seed query <<< "$job"
    timeout "${COLLECT_S:-440}" python3 launch/collect.py "${args[@]}" --trials "$trials" --seed "$seed" --branch-query "${query:-0}" \
      --out "/tmp/branches/q${query:-0}s$seed" $judge > "/tmp/logs/collect_q${query:-0}s$seed.log" 2>&1 &
  done
  wait
  tail -n 4 /tmp/logs/*.log > "$OUT/collect.log"  # the run tool returns at most 8 files
  cat /tmp/branches/*/collect.jsonl > "$OUT/collect.jsonl"
  echo "collected $(wc -l < "$OUT/collect.jsonl") episodes in $SECONDS s"
  tar -cf - -C /tmp branches | xz -6 -T0 | split -b 15M - "$OUT/branches.tar.xz."
elif [ "$P" = train ]; then
  rm -rf /tmp/judge /tmp/branch_tars; mkdir -p /tmp/branches /tmp/branch_tars
  if [ -n "${BRANCH_TARS:-}" ]; then cat $BRANCH_TARS | xz -dc | tar -xf - -C /tmp/branch_tars || exit 1; fi  # the pieces, in order
  branches=${BRANCHES:-$([ -n "${BRANCH_TARS:-}" ] && echo /tmp/branch_tars || echo /tmp/branches)}
  kinds="{q_value: 0.5, world_model: 0.5}"
  init=${JUDGE_INIT:+--init $(realpath "$JUDGE_INIT")}
  # Options first: --episodes takes every word up to the next option. GPUS > 1: one rank per GPU
  # (torchrun; the batch is per rank), and a single-GPU run in what time is left should that fail.
  train() {  # $1: the launcher (python3, or torchrun with its options), $2: the time limit, then overrides
    $1 launch/train.py --config learning_curve --target planning --episodes $branches \
      --out /tmp/judge --steps "${STEPS:-1400}" --lr "${LR:-3e-4}" --branch-point-only --time-limit "$2" $init ${EXPORT_EVERY:+--export-every $EXPORT_EVERY} \
      model.size="${JUDGE_SIZE:-medium}" data.demos_as_rollouts=false learner.compile=false learner.vae_compile=false learner.float8=off \
      offline.warmup_steps=50 learner.data_workers="${DATA_WORKERS:-6}" logging.wandb=disabled "${@:3}" \
      "data.planning_mixture={pools: {success: 0.5, failure: 0.5}, kinds: {success: $kinds, failure: $kinds}}"
  }
  rc=1
  if [ "${GPUS:-1}" -gt 1 ]; then
    train "torchrun --standalone --nproc_per_node=$GPUS" "${TRAIN_S:-420}" learner.world_size="$GPUS" > "$OUT/train.log" 2>&1; rc=$?
    [ $rc = 0 ] || { echo "torchrun rc=$rc:"; grep -v WARN "$OUT/train.log" | tail -5; rm -rf /tmp/judge; }
  fi
  if [ $rc != 0 ]; then
    left=$(( ${TRAIN_S:-420} - SECONDS + 60 ))
    train python3 $(( left > 60 ? left : 60 )) > "$OUT/train1.log" 2>&1; rc=$?
  fi
  echo "train rc=$rc in $SECONDS s"; grep -v WARN "$OUT"/train*.log | tail -3
  cp /tmp/judge/metrics.jsonl "$OUT/" 2>/dev/null
  tar -cf - -C /tmp/judge/checkpoints planning | xz -1 -T0 | split -b 15M - "$OUT/judge.tar.xz."
  for d in /tmp/judge/checkpoints/planning_step*; do  # EXPORT_EVERY's snapshots, one archive each
    [ -d "$d" ] && tar -cf - -C /tmp/judge/checkpoints "${d##*/}" | xz -1 -T0 | split -b 15M - "$OUT/judge_${d##*planning_}.tar.xz."
  done
elif [ "$P" = evaluate ]; then
  # VARIANTS (default "plan1 plan2"): base = the policy alone; planN = planning at the first N queries
  # (planNxM: among M candidates instead of 8)
  # with the judge (JUDGE, the train phase's checkpoint or its pieces JUDGE_TARS), mean of four 2-step
  # value predictions, offsets 0.1, shared judge seeds. Each on the initial states EVAL_TRIALS (0-99)
  # with episode seeds 0 and 1, the cores divided among the collections.
  if [ -d "${GL_DEBS:-.gl}" ]; then for f in "${GL_DEBS:-.gl}"/*.deb; do dpkg -x "$f" /; done; ldconfig; fi
  if [ -f "${SITE:-.carry/site_noray.tar.xz}" ]; then tar -xJf "${SITE:-.carry/site_noray.tar.xz}" -C /tmp/site || exit 1; fi
  if [ -n "${JUDGE_TARS:-}" ]; then mkdir -p /tmp/judge_eval && cat $JUDGE_TARS | xz -dc | tar -xf - -C /tmp/judge_eval || exit 1; fi
  judge=/tmp/judge_eval/planning; [ -d "$judge" ] || judge=/tmp/judge/checkpoints/planning  # JUDGE_TARS', or this call's train phase's
  judge=$(realpath "${JUDGE:-$judge}")
  read -ra variants <<< "${VARIANTS:-plan1 plan2}"
  cores=${CORES:-$(nproc)}
  workers=$(( cores / (2 * ${#variants[@]}) > 0 ? cores / (2 * ${#variants[@]}) : 1 ))
  common="planner.candidate_noise=0.1 planner.common_judge_seeds=true planner.value_kind=q_value planner.aggregation=mean"
  common="$common planner.value_steps=[2,2,2,2] planner.future_steps=[1] logging.wandb=disabled"
  for v in "${variants[@]}"; do
    case $v in
      base) extra="online.plan=false" ;;
      plan*x*) n=${v#plan}; extra="online.plan=true env.plan_queries=${n%x*} planner.num_candidates=${v#*x}" ;;
      plan*) extra="online.plan=true env.plan_queries=${v#plan}" ;;
      *) echo "VARIANTS: expected base or planN, got $v" >&2; exit 2 ;;
    esac
    for seed in 0 1; do
      python3 launch/collect.py --config learning_curve --policy "$(realpath "${POLICY:?the policy checkpoint}")" --planning "$judge" \
        --trials "${EVAL_TRIALS:-0-99}" --seed $seed --workers "$workers" --threads 1 --out "/tmp/eval/$v/s$seed" $common $extra \
        > "/tmp/logs/eval_${v}_s$seed.log" 2>&1 &
    done
  done
  wait
  tail -n 4 /tmp/logs/*.log > "$OUT/eval.log"
  for v in "${variants[@]}"; do cat /tmp/eval/$v/s*/collect.jsonl > "$OUT/eval_$v.jsonl"; done
  python3 - "$OUT"/eval_*.jsonl <<'EOF'
import json, sys
for path in sys.argv[1:]:
    rows = [json.loads(line) for line in open(path)]
    print(f"{path.rsplit('/', 1)[-1]}: {sum(r['success'] for r in rows)}/{len(rows)} succeed")
EOF
  echo "evaluated in $SECONDS s"
else
  echo "PHASE: expected collect, train or evaluate, got $P" >&2; exit 2
fi
done
