#!/usr/bin/env bash
# Submit a two-phase pretraining: phase 1, then phase 2 from phase 1's final checkpoint.
#
#   launch/slurm/submit_pretraining.sh [SBATCH_OPTION ...] [-- section.key=value ...]
#   launch/slurm/submit_pretraining.sh --nodes=4 --account=myproj -- zero.stage=2
#
# SBATCH_OPTIONs go to both sbatch calls (they override launch/slurm/pretrain.sbatch's #SBATCH
# lines); with more than one node (--nodes / -N) they start with --exclusive (pass --oversubscribe
# to share the nodes).  The key=value overrides after `--` go to both phases.  Environment:
#   PHASE1_CONFIG   default configs/bert-large-phase1.yaml
#   PHASE2_CONFIG   default configs/bert-large-phase2.yaml
#   RUN_DIR         phase 1 runs in $RUN_DIR/phase1, phase 2 in $RUN_DIR/phase2 (default: the
#                   configs' logging.run_dir)
#   PHASE1_ARGS, PHASE2_ARGS   extra key=value overrides for one phase (space-separated)
#   PYTHON          the interpreter (default: python on PATH)
# Phase 2 gets --dependency=afterok:<phase 1> (it starts only once phase 1 has exited 0, after
# as many requeues as it took) and checkpoint.init_from=<phase 1 run_dir>/checkpoints; if phase 1
# fails, SLURM cancels phase 2 (--kill-on-invalid-dep=yes).  Prints both job ids and the
# TensorBoard command.  Both configs are validated before anything is submitted.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
PYTHON=${PYTHON:-python}
PHASE1_CONFIG=${PHASE1_CONFIG:-configs/bert-large-phase1.yaml}
PHASE2_CONFIG=${PHASE2_CONFIG:-configs/bert-large-phase2.yaml}

sbatch_args=()
while (( $# )) && [[ $1 != -- ]]; do sbatch_args+=("$1"); shift; done
(( $# )) && shift  # the --
nodes=1  # the most nodes the options ask for (--nodes=N, --nodes=MIN-MAX, -N N)
for i in "${!sbatch_args[@]}"; do
  case ${sbatch_args[i]} in
    --nodes=*) spec=${sbatch_args[i]#--nodes=} ;;
    -N?*) spec=${sbatch_args[i]#-N} ;;
    --nodes|-N) spec=${sbatch_args[i + 1]:-1} ;;
    *) continue ;;
  esac
  spec=${spec##*-}; [[ $spec =~ ^[0-9]+$ ]] && nodes=$spec
done
# Multi-node jobs get their nodes to themselves: first, so that a later --oversubscribe among the
# options wins (sbatch takes the last of the two).
(( nodes > 1 )) && sbatch_args=(--exclusive "${sbatch_args[@]}")
read -r -a phase1_args <<<"${PHASE1_ARGS:-}"
read -r -a phase2_args <<<"${PHASE2_ARGS:-}"
if [[ -n ${RUN_DIR:-} ]]; then
  phase1_args+=("logging.run_dir=$RUN_DIR/phase1"); phase2_args+=("logging.run_dir=$RUN_DIR/phase2")
fi

run_dir() {  # CONFIG OVERRIDE...: validate the config, print its logging.run_dir
  local resolved
  resolved=$("$PYTHON" -m pretrain config --config "$@") || { echo "invalid config: $1" >&2; exit 2; }
  sed -n 's/^  run_dir: //p' <<<"$resolved"
}
run1=$(run_dir "$PHASE1_CONFIG" "$@" "${phase1_args[@]}")
phase2_args+=("checkpoint.init_from=$run1/checkpoints")
run2=$(run_dir "$PHASE2_CONFIG" "$@" "${phase2_args[@]}")

job1=$(sbatch --parsable --job-name=bert-phase1 "${sbatch_args[@]}" \
  "$HERE/pretrain.sbatch" --config "$PHASE1_CONFIG" "$@" "${phase1_args[@]}")
job1=${job1%%;*}
job2=$(sbatch --parsable --job-name=bert-phase2 --dependency="afterok:$job1" --kill-on-invalid-dep=yes \
  "${sbatch_args[@]}" "$HERE/pretrain.sbatch" --config "$PHASE2_CONFIG" "$@" "${phase2_args[@]}")
job2=${job2%%;*}

echo "phase 1: job $job1  config $PHASE1_CONFIG  run $run1"
echo "phase 2: job $job2  config $PHASE2_CONFIG  run $run2  (after job $job1 succeeds; from $run1/checkpoints)"
echo "watch:   squeue -j $job1,$job2    cancel both: scancel $job1 $job2"
echo "TensorBoard: tensorboard --logdir_spec phase1:$run1/tensorboard,phase2:$run2/tensorboard"
