#!/usr/bin/env bash
# A single-node Slurm cluster on this machine, for the tests and for trying the
# slurm backend without a cluster: Debian's slurm-wlm and munge.
#   tools/slurm_localhost.sh start   install (apt-get, as root) if needed, write a
#                                    config, start munged, slurmctld and slurmd
#   tools/slurm_localhost.sh stop    stop the daemons this script started
#   tools/slurm_localhost.sh env     print the export line clients need
# The config and state live in ${PQM_SLURM_DIR:-/tmp/pqm-slurm}; clients find
# the config through SLURM_CONF (start prints it). /etc/slurm is not touched.
set -euo pipefail

dir=${PQM_SLURM_DIR:-/tmp/pqm-slurm}
conf=${dir}/slurm.conf

die() { echo "slurm_localhost.sh: $*" >&2; exit 1; }

install_packages() {
    command -v slurmctld > /dev/null && command -v slurmd > /dev/null && command -v munged > /dev/null && return 0
    [ "$(id -u)" -eq 0 ] || die "slurm-wlm and munge are not installed and this is not root: apt-get install slurm-wlm munge"
    echo "installing slurm-wlm and munge with apt-get" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq > /dev/null || true
    apt-get install -y -qq --no-install-recommends slurm-wlm munge > "${dir}/apt.log" 2>&1 \
        || die "apt-get install slurm-wlm munge failed; see ${dir}/apt.log"
}

start_munge() {
    if [ ! -s /etc/munge/munge.key ]; then
        mkdir -p /etc/munge
        dd if=/dev/urandom of=/etc/munge/munge.key bs=128 count=1 status=none
    fi
    chown munge:munge /etc/munge /etc/munge/munge.key
    chmod 700 /etc/munge
    chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    if ! munge -n > /dev/null 2>&1; then
        runuser -u munge -- /usr/sbin/munged
        touch "${dir}/started_munged"
    fi
    munge -n | unmunge > /dev/null || die "munged does not answer; see /var/log/munge/munged.log"
}

write_config() {
    local cpus mem
    cpus=$(nproc)
    mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)
    mkdir -p "${dir}/state" "${dir}/spool" "${dir}/log"
    cat > "${conf}" <<EOF
ClusterName=pqmlocal
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SwitchType=switch/none
MpiDefault=none
StateSaveLocation=${dir}/state
SlurmdSpoolDir=${dir}/spool
SlurmctldPidFile=${dir}/slurmctld.pid
SlurmdPidFile=${dir}/slurmd.pid
SlurmctldLogFile=${dir}/log/slurmctld.log
SlurmdLogFile=${dir}/log/slurmd.log
SchedulerType=sched/backfill
SchedulerParameters=sched_min_interval=0,batch_sched_delay=0,default_queue_depth=10000
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
MaxArraySize=100001
MaxJobCount=200000
MinJobAge=600
KillWait=5
OverTimeLimit=0
NodeName=localhost CPUs=${cpus} RealMemory=${mem} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {
    mkdir -p "${dir}"
    install_packages
    start_munge
    write_config
    export SLURM_CONF=${conf}
    if ! scontrol ping > /dev/null 2>&1; then
        slurmctld -f "${conf}"
        slurmd -f "${conf}" -N localhost
    fi
    local i
    for i in $(seq 60); do
        if sinfo -h -o '%t' 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then
            echo "export SLURM_CONF=${conf}"
            return 0
        fi
        sleep 1
    done
    die "the node did not come up in 60 s; see ${dir}/log/slurmctld.log and ${dir}/log/slurmd.log"
}

stop() {
    local f
    for f in slurmd slurmctld; do
        [ -f "${dir}/${f}.pid" ] && kill "$(cat "${dir}/${f}.pid")" 2>/dev/null || true
    done
    if [ -f "${dir}/started_munged" ]; then
        pkill -x munged || true
        rm -f "${dir}/started_munged"
    fi
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    env) echo "export SLURM_CONF=${conf}" ;;
    *) die "usage: $0 start|stop|env" ;;
esac
