#!/usr/bin/env bash
# mpirun's "ssh" for test hosts that are network namespaces on this machine (tests/launch/test_mpi.py):
#   mpirun --mca plm_rsh_agent launch/mpi/testing/netns_rsh.sh -H 10.77.0.1,10.77.0.2 ...
# OpenMPI runs `AGENT HOST COMMAND...` to start its daemon on HOST; this runs COMMAND in the
# namespace that owns HOST's address (NETNS_HOSTS="ADDR=NAMESPACE ...").
set -euo pipefail
host=$1; shift
for pair in ${NETNS_HOSTS:?NETNS_HOSTS=\"ADDR=NAMESPACE ...\" is not set}; do
  if [[ ${pair%%=*} == "$host" ]]; then exec ip netns exec "${pair#*=}" /bin/sh -c "$*"; fi
done
echo "netns_rsh.sh: no namespace for host $host in NETNS_HOSTS=$NETNS_HOSTS" >&2
exit 255
