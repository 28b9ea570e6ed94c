# Sourced by launch/slurm/*.sbatch (from $SLURM_SUBMIT_DIR/launch/slurm/): the environment hook, and
# what every task of the job runs under (docs/launching.md, "Environment hook and containers").
#
#   BERTFORGE_ENV_HOOK=/path/setup.sh   sourced here, in the batch script (module load, conda
#       activate, source venv/bin/activate, exports), and again in every task just before python,
#       inside the container when there is one
#   BERTFORGE_CONTAINER_IMAGE=IMAGE     the tasks run in IMAGE through pyxis: srun gets
#       --container-image=IMAGE --container-workdir=<submit dir> (--container-mounts below)
#   BERTFORGE_APPTAINER_IMAGE=IMAGE.sif the tasks run as `apptainer exec --nv --pwd <submit dir>
#       [--bind MOUNTS] IMAGE ...` instead (one of the two images at most)
#   BERTFORGE_CONTAINER_MOUNTS=src:dst[,src:dst...]   --container-mounts (pyxis) or --bind (apptainer)
#
# Sets two arrays: `container` (srun options) and `wrap` (the command a task's program runs under):
#   srun ... "${container[@]}" "${wrap[@]}" "$PYTHON" -m ...
# Returns 2 with a one-line error when the hook cannot be sourced or both images are set.
if [[ -n ${BERTFORGE_ENV_HOOK:-} ]] && ! source "$BERTFORGE_ENV_HOOK"; then
  echo "launch/slurm: BERTFORGE_ENV_HOOK=$BERTFORGE_ENV_HOOK: sourcing it failed" >&2; return 2
fi
if [[ -n ${BERTFORGE_CONTAINER_IMAGE:-} && -n ${BERTFORGE_APPTAINER_IMAGE:-} ]]; then
  echo "launch/slurm: BERTFORGE_CONTAINER_IMAGE (pyxis) and BERTFORGE_APPTAINER_IMAGE (apptainer)" \
       "are both set: set one" >&2
  return 2
fi
container=() wrap=()
if [[ -n ${BERTFORGE_CONTAINER_IMAGE:-} ]]; then
  container=(--container-image="$BERTFORGE_CONTAINER_IMAGE" --container-workdir="$PWD")
  [[ -n ${BERTFORGE_CONTAINER_MOUNTS:-} ]] \
    && container+=(--container-mounts="$BERTFORGE_CONTAINER_MOUNTS")
elif [[ -n ${BERTFORGE_APPTAINER_IMAGE:-} ]]; then
  wrap=(apptainer exec --nv --pwd "$PWD")
  [[ -n ${BERTFORGE_CONTAINER_MOUNTS:-} ]] && wrap+=(--bind "$BERTFORGE_CONTAINER_MOUNTS")
  wrap+=("$BERTFORGE_APPTAINER_IMAGE")
fi
if [[ -n ${BERTFORGE_ENV_HOOK:-} ]]; then  # exec: the program keeps the task's pid and gets srun's signals
  wrap+=(bash -c 'source "$0" >&2 || { echo "$0: sourcing it failed on $(hostname)" >&2; exit 2; }; exec "$@"'
         "$BERTFORGE_ENV_HOOK")
fi
return 0
