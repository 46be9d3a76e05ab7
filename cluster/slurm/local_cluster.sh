#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine, for tests and CI (and for trying `embedforge
# submit slurm` on a laptop): installs Debian's slurm-wlm + munge if missing, writes a slurm.conf for
# this host (proctrack/linuxproc, task/none: no cgroups needed; requeue allowed), starts munged,
# slurmctld and slurmd as root, and waits until the node is idle.
#
#   cluster/slurm/local_cluster.sh start|stop|status
#
# State, logs and the config live under $EMBEDFORGE_SLURM_DIR (default /var/lib/embedforge-slurm,
# root-owned, writable by root only: the root daemons read their config there); the
# config is linked to /etc/slurm/slurm.conf so the ordinary clients (sbatch, squeue, scontrol) find
# it. An /etc/slurm/slurm.conf that this script did not write is never replaced.
set -euo pipefail

ACTION=${1:-start}
STATE=${EMBEDFORGE_SLURM_DIR:-/var/lib/embedforge-slurm}
CPUS=${EMBEDFORGE_SLURM_CPUS:-4}          # declared CPUs (may exceed the real ones: config_overrides)
KILL_WAIT=${EMBEDFORGE_SLURM_KILL_WAIT:-30}  # seconds between SIGTERM and SIGKILL on requeue / cancel
CONF=/etc/slurm/slurm.conf
MARK="# written by embedforge cluster/slurm/local_cluster.sh"
HOST=$(hostname -s)

die() { echo "local_cluster.sh: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root (it starts munged, slurmctld and slurmd)"

install_packages() {
  command -v slurmctld >/dev/null && command -v munged >/dev/null && return
  echo "[slurm] apt-get install slurm-wlm munge"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
}

write_config() {
  if [ -e "$STATE" ] && [ "$(stat -c %u "$STATE")" != 0 ]; then
    die "$STATE is not owned by root; the root daemons would read a config someone else controls"
  fi
  install -d -m 755 -o root "$STATE"  # others may read the config (clients), never write it
  mkdir -p "$STATE/ctld" "$STATE/spool" "$STATE/log" /etc/slurm
  if [ -e "$CONF" ] && ! grep -qF "$MARK" "$CONF" && [ "$(readlink -f "$CONF")" != "$STATE/slurm.conf" ]; then
    die "$CONF exists and was not written by this script; refusing to replace it"
  fi
  local mem
  mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)
  cat > "$STATE/slurm.conf" <<CONFEOF
$MARK
ClusterName=embedforge-local
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
KillWait=$KILL_WAIT
MinJobAge=300
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONFEOF
  ln -sfn "$STATE/slurm.conf" "$CONF"
}

start_munge() {
  if pgrep -x munged >/dev/null; then return; fi
  mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
  if [ ! -s /etc/munge/munge.key ]; then
    if command -v mungekey >/dev/null; then mungekey --create --keyfile /etc/munge/munge.key
    else dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none; fi
  fi
  chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
  chmod 0700 /etc/munge; chmod 0400 /etc/munge/munge.key; chmod 0755 /run/munge
  if id munge >/dev/null 2>&1; then
    runuser -u munge -- munged
  else
    munged --force
  fi
  for _ in $(seq 50); do munge -n >/dev/null 2>&1 && return; sleep 0.1; done
  die "munged did not come up (see /var/log/munge/munged.log)"
}

wait_idle() {
  for _ in $(seq 100); do
    state=$(sinfo -h -n "$HOST" -o %T 2>/dev/null || true)
    case "$state" in
      idle*|mix*|alloc*) echo "[slurm] node $HOST is $state; partition debug is up"; return ;;
      down*|drain*) scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true ;;
    esac
    sleep 0.2
  done
  die "node $HOST did not become idle (state '${state:-?}'); see $STATE/log/"
}

case "$ACTION" in
  start)
    install_packages
    write_config
    start_munge
    pgrep -x slurmctld >/dev/null || slurmctld -i
    pgrep -x slurmd >/dev/null || slurmd
    wait_idle
    ;;
  stop)
    scancel --full --quiet -u root 2>/dev/null || true
    pkill -x slurmd 2>/dev/null || true
    pkill -x slurmctld 2>/dev/null || true
    for _ in $(seq 50); do pgrep -x 'slurmd|slurmctld' >/dev/null || break; sleep 0.1; done
    echo "[slurm] stopped (munged left running; state kept in $STATE)"
    ;;
  status)
    sinfo && squeue
    ;;
  *) die "usage: $0 start|stop|status" ;;
esac
