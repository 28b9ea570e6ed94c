#!/usr/bin/env bash
# Install Debian's OpenMPI (mpirun, libmpi) for the tests of launch/mpi, if mpirun is missing.
#   launch/mpi/testing/install_openmpi.sh     prints the mpirun version when ready
# Exit status 3 = cannot here (mpirun missing and not root, or apt-get failed): tests skip.
# mpi4py comes from PyPI (pip install 'bertforge[mpi]'); its wheel loads this libmpi at run time.
set -euo pipefail
if ! command -v mpirun >/dev/null; then
  [[ $(id -u) == 0 ]] || { echo "mpirun missing and not root: cannot apt-get install openmpi-bin" >&2; exit 3; }
  log=/tmp/bertforge-openmpi.apt.log
  export DEBIAN_FRONTEND=noninteractive
  echo "[install_openmpi] installing openmpi-bin (Debian)" >&2
  if ! apt-get install -y -q --no-install-recommends openmpi-bin >"$log" 2>&1; then
    apt-get update -q >>"$log" 2>&1 || { echo "apt-get update failed: $log" >&2; exit 3; }
    apt-get install -y -q --no-install-recommends openmpi-bin >>"$log" 2>&1 \
      || { echo "apt-get install openmpi-bin failed: $log" >&2; exit 3; }
  fi
fi
mpirun --version | head -1
