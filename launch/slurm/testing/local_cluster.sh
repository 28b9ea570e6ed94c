#!/usr/bin/env bash
# A one-node SLURM cluster on localhost, for the tests of launch/slurm (tests/launch/).
#
#   launch/slurm/testing/local_cluster.sh start   install slurm-wlm + munge if missing, write
#                                                 slurm.conf, start munged/slurmctld/slurmd,
#                                                 wait until the node is idle; prints SLURM_CONF=...
#   launch/slurm/testing/local_cluster.sh stop    cancel every job, stop the daemons
#   launch/slurm/testing/local_cluster.sh wipe    stop, then delete the state directory
#
# Idempotent: `start` reuses a running cluster and only (re)starts what is down (a changed
# config restarts the daemons).  Needs root (apt-get, daemons).  No systemd, no cgroups:
# proctrack/linuxproc, task/none.  Exit status 3 = cannot be started here (not root, no
# packages and apt unreachable): the tests skip with the message; anything else is an error.
#
# Environment: BERTFORGE_SLURM_DIR (state, logs, conf; default /tmp/bertforge-slurm),
# BERTFORGE_SLURM_CPUS (CPUs of the node; default nproc).  Settings that make tests fast:
#   AuthInfo=cred_expire=5   a requeued job may start again after 5 s (default 120 s)
#   sched_interval=1         the scheduler looks at the queue every second (default 60 s)
set -euo pipefail

ACTION=${1:-start}
D=${BERTFORGE_SLURM_DIR:-/tmp/bertforge-slurm}
CPUS=${BERTFORGE_SLURM_CPUS:-$(nproc)}
CONF=$D/etc/slurm.conf
export SLURM_CONF=$CONF
log() { echo "[local_cluster] $*" >&2; }
cannot() { log "cannot start SLURM here: $*"; exit 3; }

alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }
stop_pidfile() {  # TERM, up to 10 s, then KILL
  alive "$1" || { rm -f "$1"; return 0; }
  local pid; pid=$(cat "$1"); kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true; rm -f "$1"
}
stop_all() {
  if command -v scancel >/dev/null && alive "$D/run/slurmctld.pid"; then
    scancel --full --user="$(id -un)" 2>/dev/null || true; sleep 1
  fi
  stop_pidfile "$D/run/slurmd.pid"; stop_pidfile "$D/run/slurmctld.pid"
}

case $ACTION in
  stop) stop_all; log "stopped"; exit 0 ;;
  wipe) stop_all; rm -rf "$D"; log "wiped $D"; exit 0 ;;
  start) ;;
  *) echo "usage: $0 start|stop|wipe" >&2; exit 2 ;;
esac
t0=$SECONDS

# ---- packages (only what is missing) ---------------------------------------------------------
[[ $(id -u) == 0 ]] || cannot "not root (apt-get and the daemons need it)"
PKGS=(slurmctld slurmd slurm-client munge)
missing=()
installed() { [[ $(dpkg-query -W -f='${Status}' "$1" 2>/dev/null) == "install ok installed" ]]; }
for p in "${PKGS[@]}"; do installed "$p" || missing+=("$p"); done
if (( ${#missing[@]} )); then
  command -v apt-get >/dev/null || cannot "${missing[*]} missing and no apt-get"
  log "installing ${missing[*]} (Debian)"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -q --no-install-recommends "${missing[@]}" >"$D.apt.log" 2>&1; then
    apt-get update -q >>"$D.apt.log" 2>&1 || cannot "apt-get update failed (see $D.apt.log)"
    apt-get install -y -q --no-install-recommends "${missing[@]}" >>"$D.apt.log" 2>&1 \
      || cannot "apt-get install ${missing[*]} failed (see $D.apt.log)"
  fi
fi

# ---- munge ---------------------------------------------------------------------------------------
if [[ ! -s /etc/munge/munge.key ]]; then
  install -d -o munge -g munge -m 0700 /etc/munge
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key
fi
install -d -o munge -g munge -m 0755 /run/munge
munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
if ! munge_ok; then
  log "starting munged"
  rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 50); do munge_ok && break; sleep 0.1; done
  munge_ok || { log "munged did not start: /var/log/munge/munged.log"; exit 1; }
fi

# ---- slurm.conf ----------------------------------------------------------------------------------
mkdir -p "$D"/{etc,run,log,spool/ctld,spool/d}
cat >"$CONF.new" <<EOF
# written by launch/slurm/testing/local_cluster.sh: one node (this machine) for tests
ClusterName=bertforge-test
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# how long a requeued job waits before it may run again (default 120 s)
AuthInfo=cred_expire=5
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$D/spool/ctld
SlurmdSpoolDir=$D/spool/d
SlurmctldPidFile=$D/run/slurmctld.pid
SlurmdPidFile=$D/run/slurmd.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobRequeue=1
MinJobAge=600
KillWait=10
InactiveLimit=0
SlurmdTimeout=60
SlurmctldTimeout=30
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
changed=0
cmp -s "$CONF.new" "$CONF" 2>/dev/null && rm -f "$CONF.new" || { mv "$CONF.new" "$CONF"; changed=1; }

# ---- daemons -------------------------------------------------------------------------------------
if (( changed )) && { alive "$D/run/slurmctld.pid" || alive "$D/run/slurmd.pid"; }; then
  log "slurm.conf changed: restarting the daemons"; stop_all
fi
ctld_up() { [[ $(scontrol ping 2>/dev/null) == *"is UP"* ]]; }
if ! alive "$D/run/slurmctld.pid"; then
  log "starting slurmctld"; slurmctld -f "$CONF" -i
fi
for _ in $(seq 150); do alive "$D/run/slurmctld.pid" && ctld_up && break; sleep 0.1; done
# (another cluster on port 6817 would answer the ping: require our own slurmctld to be alive)
{ alive "$D/run/slurmctld.pid" && ctld_up; } || { log "slurmctld is not up: $D/log/slurmctld.log"; exit 1; }
if ! alive "$D/run/slurmd.pid"; then
  log "starting slurmd"; slurmd -f "$CONF" -N localhost
fi
state=""
for _ in $(seq 300); do
  state=$(sinfo -h -n localhost -o %t 2>/dev/null || true)
  [[ $state == idle || $state == mix || $state == alloc ]] && break
  [[ $state == drain* || $state == down* ]] && scontrol update NodeName=localhost State=RESUME 2>/dev/null || true
  sleep 0.2
done
[[ $state == idle || $state == mix || $state == alloc ]] \
  || { log "node localhost is '$state', not idle: $D/log/slurmd.log"; exit 1; }
log "ready in $(( SECONDS - t0 )) s: node localhost $state, $CPUS CPUs"
echo "SLURM_CONF=$CONF"
