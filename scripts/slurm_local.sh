#!/usr/bin/env bash
# A real single-host Slurm cluster from the distribution's packages (slurm-wlm, munge), for trying
# `shardrec submit -s slurm` on a laptop and for the tests marked `slurm`.
#
#   scripts/slurm_local.sh install    apt-get install slurm-wlm munge, and slurmdbd mariadb-server
#                                     for accounting (root)
#   scripts/slurm_local.sh start      munge key, slurm.conf for this host, slurmctld + slurmd
#                                     (two nodes, n1 and n2, where slurmd runs several per host),
#                                     waits until every node is idle; prints the SLURM_CONF to export
#   scripts/slurm_local.sh start --accounting
#                                     the same with accounting on: a MariaDB server and slurmdbd
#                                     (accounting_storage/slurmdbd), so sacct answers
#   scripts/slurm_local.sh stop       stops what start started (by pid)
#   scripts/slurm_local.sh status     sinfo of the running cluster
#   scripts/slurm_local.sh env        the line to eval: export SLURM_CONF=...
#
# Everything lives under $SHARDREC_SLURM_DIR (default /tmp/shardrec-slurm): config, spool, state,
# logs and pid files; nothing is written under /etc/slurm, so an installed cluster stays untouched.
# Accounting is off (accounting_storage/none) unless --accounting, as on many small clusters: sacct
# then fails, and shardrec reads job states from scontrol instead. With --accounting the controller
# also forgets finished jobs after MinJobAge=$SHARDREC_SLURM_MIN_JOB_AGE s (default 10), so their
# states come from sacct; the MariaDB data live under $DIR/mysql. The daemons run as root, so start
# and stop need root (or sudo).
set -euo pipefail

DIR=${SHARDREC_SLURM_DIR:-/tmp/shardrec-slurm}
CONF=$DIR/etc/slurm.conf
HOST=$(hostname -s)
CTLD_PORT=${SHARDREC_SLURM_PORT:-16817}
DBD_PORT=$((CTLD_PORT + 10))
DB_PORT=$((CTLD_PORT + 11))
DB_SOCKET=$DIR/mysql/mysqld.sock
DB_PASS=shardrec-local
NODES=(n1 n2)

die() { echo "slurm_local.sh: $*" >&2; exit 1; }

need_root() { [ "$(id -u)" = 0 ] || die "$1 needs root (the Slurm and munge daemons run as root): run it with sudo"; }

need_packages() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null ||
        die "Slurm is not installed: run 'sudo $0 install' (apt-get install slurm-wlm munge)"
}

cmd_install() {
    need_root install
    command -v apt-get >/dev/null || die "install uses apt-get (Debian, Ubuntu); install slurm-wlm and munge with your distribution's tool"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null
    echo "installed: $(slurmd -V)"
    # Accounting's packages are optional: without them start --accounting says so, the rest works.
    if DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurmdbd mariadb-server >/dev/null; then
        echo "installed: $(slurmdbd -V), $(mariadbd --version | cut -d' ' -f2-4)"
    else
        echo "slurmdbd or mariadb-server did not install: start --accounting will not work" >&2
    fi
}

# Whether this slurmd was built with --enable-multiple-slurmd: it then serves a node named by -N
# without that name resolving to this host.
multiple_slurmd() { [ "${SHARDREC_SLURM_NODES:-2}" = 2 ]; }

write_conf() {
    local cpus mem_mb node_mem nodes_line=() n port=$((CTLD_PORT + 1)) accounting=$2
    cpus=$(nproc)
    mem_mb=$(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo)
    mkdir -p "$DIR"/{etc,state,log,run}
    if [ "$1" = 2 ]; then
        node_mem=$((mem_mb / 2 - 512))
        for n in "${NODES[@]}"; do
            mkdir -p "$DIR/spool/$n"
            nodes_line+=("NodeName=$n NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$port CPUs=$cpus RealMemory=$node_mem State=UNKNOWN")
            port=$((port + 1))
        done
    else
        node_mem=$((mem_mb - 1024))
        mkdir -p "$DIR/spool/$HOST"
        nodes_line+=("NodeName=$HOST NodeAddr=127.0.0.1 Port=$port CPUs=$cpus RealMemory=$node_mem State=UNKNOWN")
    fi
    cat >"$CONF" <<EOF
# Written by scripts/slurm_local.sh start for $HOST ($cpus CPUs, $mem_mb MB).
ClusterName=shardrec
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# Each virtual node claims the host's CPUs: slurmd must not drain them for having fewer.
SlurmdParameters=config_overrides
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SlurmdTimeout=60
InactiveLimit=0
KillWait=10
EOF
    if [ "$accounting" = 1 ]; then
        cat >>"$CONF" <<EOF
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
MinJobAge=${SHARDREC_SLURM_MIN_JOB_AGE:-10}
EOF
        # slurmdbd reads slurmdbd.conf beside slurm.conf; it holds the database password: 600.
        (umask 077; cat >"$DIR/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$DIR/run/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
        )
    else
        printf '%s\n' "AccountingStorageType=accounting_storage/none" "MinJobAge=300" >>"$CONF"
    fi
    printf '%s\n' "${nodes_line[@]}" >>"$CONF"
    echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP" >>"$CONF"
}

start_munge() {
    if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
        return  # a munged is already running with a key
    fi
    if [ ! -s /etc/munge/munge.key ]; then
        mkdir -p /etc/munge
        dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
    fi
    chown munge:munge /etc/munge/munge.key 2>/dev/null || true
    chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
    if id munge >/dev/null 2>&1; then
        runuser -u munge -- munged
    else
        munged --force
    fi
    pgrep -x munged >"$DIR/run/munged.pid"
    munge -n </dev/null | unmunge >/dev/null || die "munged does not answer; see /var/log/munge/munged.log"
}

# Jobs reach their first node by its name (torchx exports it as the rendezvous host): the virtual
# nodes' names must resolve, to this host.
HOSTS_TAG="# shardrec slurm_local.sh"
add_hosts() {
    local n
    for n in "${NODES[@]}"; do
        getent hosts "$n" >/dev/null || echo "127.0.0.1 $n $HOSTS_TAG" >>/etc/hosts
    done
}

remove_hosts() {
    if grep -q "$HOSTS_TAG" /etc/hosts 2>/dev/null; then
        # /etc/hosts is often a bind mount (containers): rewrite it in place, do not replace it.
        local kept
        kept=$(grep -v "$HOSTS_TAG" /etc/hosts)
        printf '%s\n' "$kept" >/etc/hosts
    fi
}

# A MariaDB server of our own (its data under $DIR/mysql, TCP on 127.0.0.1:$DB_PORT) with the
# database and user slurmdbd needs; it runs as root, so a private temporary $DIR works.
start_db() {
    command -v mariadbd >/dev/null && command -v mariadb-install-db >/dev/null ||
        die "start --accounting needs MariaDB: run 'sudo $0 install' (apt-get install mariadb-server slurmdbd)"
    mkdir -p "$DIR/mysql"
    if [ ! -d "$DIR/mysql/data/mysql" ]; then
        mariadb-install-db --user=root --datadir="$DIR/mysql/data" --skip-test-db >"$DIR/log/mariadb-install.log" 2>&1 ||
            die "mariadb-install-db failed; see $DIR/log/mariadb-install.log"
    fi
    mariadbd --user=root --datadir="$DIR/mysql/data" --socket="$DB_SOCKET" --port="$DB_PORT" --bind-address=127.0.0.1 \
        --pid-file="$DIR/run/mariadb.pid" --log-error="$DIR/log/mariadb.log" --skip-name-resolve >/dev/null 2>&1 &
    local deadline=$((SECONDS + 60))
    until mariadb-admin --socket="$DB_SOCKET" -uroot ping >/dev/null 2>&1; do
        [ $SECONDS -lt $deadline ] || die "MariaDB did not answer within 60 s; see $DIR/log/mariadb.log"
        sleep 0.5
    done
    mariadb --socket="$DB_SOCKET" -uroot <<EOF
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
EOF
}

start_dbd() {
    command -v slurmdbd >/dev/null || die "start --accounting needs slurmdbd: run 'sudo $0 install'"
    SLURM_CONF=$CONF slurmdbd
    local deadline=$((SECONDS + 60))
    # sacctmgr answers once slurmdbd has its database; the cluster must be known before slurmctld registers.
    until SLURM_CONF=$CONF sacctmgr -n list cluster format=cluster 2>/dev/null | grep -qw shardrec ||
        SLURM_CONF=$CONF sacctmgr -i add cluster shardrec >/dev/null 2>&1; do
        [ $SECONDS -lt $deadline ] || die "slurmdbd did not answer within 60 s; see $DIR/log/slurmdbd.log"
        sleep 0.5
    done
}

wait_idle() {
    local deadline=$((SECONDS + 60)) states
    while [ $SECONDS -lt $deadline ]; do
        states=$(SLURM_CONF=$CONF sinfo -h -N -o '%N %t' 2>/dev/null || true)
        if [ -n "$states" ] && ! grep -vq ' idle$' <<<"$states"; then
            echo "$states"
            return
        fi
        sleep 1
    done
    die "nodes not idle after 60 s: ${states:-no answer from slurmctld}; see $DIR/log/"
}

cmd_start() {
    need_root start
    need_packages
    local accounting=0
    case "${1:-}" in
        --accounting) accounting=1 ;;
        "") ;;
        *) die "unknown start option '$1'; start takes --accounting or nothing" ;;
    esac
    if [ -s "$DIR/run/slurmctld.pid" ] && kill -0 "$(cat "$DIR/run/slurmctld.pid")" 2>/dev/null; then
        echo "already running; stop it first ($0 stop)" >&2
        cmd_env
        return
    fi
    local count=1
    if multiple_slurmd; then count=2; fi
    write_conf $count $accounting
    [ $count = 2 ] && add_hosts
    mkdir -p "$DIR/run"
    start_munge
    if [ $accounting = 1 ]; then
        start_db
        start_dbd
    fi
    slurmctld -f "$CONF" -i  # -i: ignore state left by an earlier start
    if [ $count = 2 ]; then
        for n in "${NODES[@]}"; do slurmd -f "$CONF" -N "$n"; done
    else
        slurmd -f "$CONF"
    fi
    wait_idle
    echo "nodes: $count; accounting: $([ $accounting = 1 ] && echo "slurmdbd on 127.0.0.1:$DBD_PORT" || echo off); config: $CONF"
    cmd_env
}

stop_pid() {
    local file=$1 pid
    [ -s "$file" ] || return 0
    pid=$(cat "$file")
    if kill "$pid" 2>/dev/null; then
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$file"
}

cmd_stop() {
    need_root stop
    if [ -s "$DIR/run/slurmctld.pid" ]; then
        SLURM_CONF=$CONF scancel --state=RUNNING --state=PENDING --full 2>/dev/null || true
    fi
    for f in "$DIR"/run/slurmd-*.pid "$DIR/run/slurmctld.pid" "$DIR/run/slurmdbd.pid" "$DIR/run/mariadb.pid" "$DIR/run/munged.pid"; do
        [ -e "$f" ] && stop_pid "$f"
    done
    remove_hosts
    echo "stopped"
}

cmd_status() {
    [ -f "$CONF" ] || die "not started: $0 start"
    SLURM_CONF=$CONF sinfo -N -o '%N %P %t %c %m'
}

cmd_env() { echo "export SLURM_CONF=$CONF"; }

case "${1:-}" in
    install) cmd_install ;;
    start) cmd_start "${2:-}" ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) cmd_env ;;
    *) echo "usage: $0 install|start [--accounting]|stop|status|env" >&2; exit 2 ;;
esac
