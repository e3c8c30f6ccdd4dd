#!/usr/bin/env bash
# A two-node Slurm cluster on this one machine, for the tests (and for trying the sbatch script).
#
#   scripts/slurm/local_cluster.sh start DIR    # writes DIR/slurm.conf, starts slurmctld + slurmd n1, n2
#   export SLURM_CONF=DIR/slurm.conf            # then sbatch / squeue / scontrol talk to it
#   scripts/slurm/local_cluster.sh stop DIR     # stops exactly the daemons it started (by PID)
#
# Needs Debian's slurmctld, slurmd and slurm-client (22.05 tested) and root. No munge: auth/none
# with cred/none. Both nodes listen on 127.0.0.1 with their own ports; node names don't resolve
# as hosts, so jobs read a node's address from `scontrol show node`.
set -euo pipefail
cmd=${1:?usage: local_cluster.sh start|stop DIR}
dir=$(mkdir -p "${2:?usage: local_cluster.sh start|stop DIR}" && cd "$2" && pwd)
conf=$dir/slurm.conf
cpus=${SLURM_LOCAL_CPUS:-$(nproc)}

stop() {
  for pidfile in "$dir"/slurmd-n1.pid "$dir"/slurmd-n2.pid "$dir"/slurmctld.pid; do
    if [ -f "$pidfile" ]; then
      pid=$(cat "$pidfile")
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
      rm -f "$pidfile"
    fi
  done
}

if [ "$cmd" = stop ]; then stop; exit 0; fi
[ "$cmd" = start ] || { echo "usage: local_cluster.sh start|stop DIR" >&2; exit 2; }
stop  # a stale cluster in the same folder
mkdir -p "$dir/state" "$dir/spool/n1" "$dir/spool/n2"
cat > "$conf" <<CONF
ClusterName=local
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=${SLURM_LOCAL_CTLD_PORT:-16817}
AuthType=auth/none
CredType=cred/none
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=30
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd-%n.log
NodeName=n1 NodeAddr=127.0.0.1 Port=${SLURM_LOCAL_PORT1:-17001} CPUs=$cpus State=UNKNOWN
NodeName=n2 NodeAddr=127.0.0.1 Port=${SLURM_LOCAL_PORT2:-17002} CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
export SLURM_CONF=$conf
slurmctld -f "$conf"
slurmd -f "$conf" -N n1
slurmd -f "$conf" -N n2
for _ in $(seq 100); do
  if [ "$(sinfo -h -o '%T' 2>/dev/null | sort -u | tr -d '\n')" = idle ]; then
    echo "slurm up: SLURM_CONF=$conf"; exit 0
  fi
  sleep 0.2
done
echo "slurm did not come up; logs in $dir" >&2
sinfo >&2 || true
exit 1
