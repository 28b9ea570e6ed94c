#!/usr/bin/env bash
# Submit data_prep over NODES nodes: a job array of NODES `data_prep run` tasks (one slice of
# the work each), then a merge job that runs when every task has succeeded.
#
#   launch/slurm/submit_data_prep.sh NODES OUT_DIR --config configs/data/X.yaml [data_prep run flags ...]
#   launch/slurm/submit_data_prep.sh 8 data/wiki --config configs/data/wiki.yaml --workers 31
#
# OUT_DIR (shared by all nodes) receives tokenizer/ and shards/.  sbatch options go in
# SBATCH_ARGS (e.g. SBATCH_ARGS="--account=x --cpus-per-task=64").  Prints both job ids.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
NODES=${1:?usage: $0 NODES OUT_DIR --config FILE [flags ...]}
OUT=${2:?usage: $0 NODES OUT_DIR --config FILE [flags ...]}
shift 2
read -r -a sbatch_args <<<"${SBATCH_ARGS:-}"

if (( NODES == 1 )); then  # one node writes manifest.json itself: nothing to merge
  job=$(sbatch --parsable "${sbatch_args[@]}" "$HERE/data_prep.sbatch" run --out "$OUT" "$@")
  echo "data_prep: job ${job%%;*} -> $OUT"
  echo "then:      python -m data_prep verify $OUT/shards"
  exit 0
fi
array=$(sbatch --parsable --array="0-$((NODES - 1))" "${sbatch_args[@]}" \
  "$HERE/data_prep.sbatch" run --out "$OUT" "$@")
array=${array%%;*}
merge=$(sbatch --parsable --job-name=bert-data-prep-merge --dependency="afterok:$array" \
  --kill-on-invalid-dep=yes "${sbatch_args[@]}" --cpus-per-task=1 --time=1:00:00 \
  "$HERE/data_prep.sbatch" merge "$OUT/shards")
merge=${merge%%;*}
echo "data_prep: array job $array ($NODES tasks) -> $OUT"
echo "merge:     job $merge (after every task of $array succeeds)"
echo "then:      python -m data_prep verify $OUT/shards"
