#!/usr/bin/env bash
# Start a real one-node Slurm on this machine for the tests: munged, slurmctld and slurmd on
# loopback, node "localhost", partition "debug". Installs Debian's slurm-wlm and munge when
# missing (needs root, as in CI). Idempotent: a running cluster is left as it is.
# Prints "slurm ready" and exits 0 when `sinfo` reports the node idle; exits 1 otherwise.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
  apt-get update -qq
  apt-get install -y -qq slurm-wlm munge >/dev/null
fi

ready() { sinfo -h -n localhost -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)'; }
if ready; then echo "slurm ready (already running)"; exit 0; fi

# munge: a key, its folders, the daemon
mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
[ -s /etc/munge/munge.key ] || mungekey --create --force
chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
chmod 0700 /etc/munge; chmod 0400 /etc/munge/munge.key
if ! pgrep -x munged >/dev/null; then
  runuser -u munge -- /usr/sbin/munged
fi
for _ in $(seq 50); do munge -n >/dev/null 2>&1 && break; sleep 0.1; done

# slurm.conf for one node on loopback; CPUs and memory as slurmd itself detects them
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
hw=$(slurmd -C | head -1 | sed 's/^NodeName=[^ ]*//; s/UpTime=.*//')
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=resbench-test
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
NodeName=localhost NodeAddr=127.0.0.1 $hw State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
pgrep -x slurmctld >/dev/null || slurmctld
pgrep -x slurmd >/dev/null || slurmd -N localhost
for _ in $(seq 100); do
  if ready; then echo "slurm ready"; exit 0; fi
  state=$(sinfo -h -n localhost -o %t 2>/dev/null || true)
  case "$state" in down*|drain*) scontrol update nodename=localhost state=resume >/dev/null 2>&1 || true ;; esac
  sleep 0.3
done
echo "slurm did not come up; node state: $(sinfo -h -n localhost -o '%t %E' 2>&1)" >&2
tail -5 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
exit 1
