#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for tests and trying the sbatch recipes (Debian/Ubuntu, root).
#   usage: tools/slurm_local.sh start|stop|status|env
# start: apt-get install slurmctld/slurmd/munge when missing, write $SLURM_LOCAL_DIR/slurm.conf, start munged,
#        slurmctld and slurmd (no systemd, no cgroups), wait until the node is idle. Idempotent: a running
#        cluster is left alone. Then `export SLURM_CONF=$SLURM_LOCAL_DIR/slurm.conf` (printed by `env`).
# Partitions: `debug` (default, low priority, preempted with REQUEUE after GraceTime, preemption sends the
# job's --signal first) and `high` (preempts `debug`). State lives in $SLURM_LOCAL_DIR; delete it to reset.
set -euo pipefail
S=${SLURM_LOCAL_DIR:-/tmp/flexitrain-slurm}
export SLURM_CONF=$S/slurm.conf
GRACE=${SLURM_LOCAL_GRACE:-10}   # seconds between the preemption signal and SIGTERM

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

install() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
    && command -v munged >/dev/null && return 0
  [ "$(id -u)" -eq 0 ] || { echo "slurm_local.sh: installing SLURM needs root" >&2; exit 1; }
  local apt=(apt-get -o DPkg::Lock::Timeout=600 -qq)
  local pkgs=(slurmctld slurmd slurm-client munge)
  DEBIAN_FRONTEND=noninteractive "${apt[@]}" install -y --no-install-recommends "${pkgs[@]}" >/dev/null 2>&1 || {
    "${apt[@]}" update
    DEBIAN_FRONTEND=noninteractive "${apt[@]}" install -y --no-install-recommends "${pkgs[@]}" >/dev/null
  }
}

write_conf() {
  local host cpus mem
  host=$(hostname -s)
  cpus=$(nproc)
  mem=$(( $(free -m | awk '/Mem:/{print $2}') * 8 / 10 ))
  cat > "$SLURM_CONF" <<EOC
# Written by tools/slurm_local.sh: one node, no accounting, no cgroups, fast scheduling and requeue.
ClusterName=localcluster
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
# A requeued job waits cred_expire before it may start again (default 120 s).
AuthInfo=cred_expire=10
CredType=cred/munge
MailProg=/bin/true
StateSaveLocation=$S/state
SlurmdSpoolDir=$S/spool
SlurmctldPidFile=$S/slurmctld.pid
SlurmdPidFile=$S/slurmd.pid
SlurmctldLogFile=$S/log/slurmctld.log
SlurmdLogFile=$S/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2
ReturnToService=2
KillWait=5
InactiveLimit=0
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
# Preemption sends the job's --signal (USR1 for our recipes) at once, SIGTERM after GraceTime.
SlurmctldParameters=preempt_send_user_signal
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=$GRACE
PartitionName=high Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF
EOC
}

start() {
  if alive "$S/slurmctld.pid" && alive "$S/slurmd.pid"; then
    echo "slurm_local: already running (SLURM_CONF=$SLURM_CONF)"; return 0
  fi
  local other
  other=$(ps -C slurmctld,slurmd -o pid=,stat= | awk '$2 !~ /Z/ {printf "%s ", $1}' || true)
  if [ -n "$other" ]; then  # another state dir's daemons hold the ports: ours would die at once
    echo "slurm_local: SLURM daemons already running (pids $other) from another config; stop them first" >&2
    return 1
  fi
  install
  mkdir -p "$S/state" "$S/spool" "$S/log" /run/munge
  chown munge:munge /run/munge
  [ -s /etc/munge/munge.key ] || { mungekey -c; chown munge:munge /etc/munge/munge.key; }
  pgrep -u munge -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged
  write_conf
  alive "$S/slurmctld.pid" || slurmctld -f "$SLURM_CONF"
  alive "$S/slurmd.pid" || slurmd -f "$SLURM_CONF"
  for _ in $(seq 120); do
    sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)' && {
      echo "slurm_local: up (SLURM_CONF=$SLURM_CONF)"; sinfo; return 0; }
    sleep 0.25
  done
  echo "slurm_local: the node did not come up" >&2; tail -n 20 "$S"/log/*.log >&2; return 1
}

stop() {
  # Only the daemons this script started (by their pid files); munged is left for other users of munge.
  for f in "$S/slurmd.pid" "$S/slurmctld.pid"; do alive "$f" && kill "$(cat "$f")" || true; done
  for _ in $(seq 40); do alive "$S/slurmd.pid" || alive "$S/slurmctld.pid" || { echo "slurm_local: stopped"; return 0; }; sleep 0.25; done
  echo "slurm_local: daemons still running" >&2; return 1
}

status() { alive "$S/slurmctld.pid" && alive "$S/slurmd.pid" && sinfo && squeue; }

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  env) echo "export SLURM_CONF=$SLURM_CONF" ;;
  *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
