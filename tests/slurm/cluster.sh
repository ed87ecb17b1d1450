#!/usr/bin/env bash
# A throw-away SLURM cluster on this one Debian machine for tests/slurm/ (adapted from the team's
# slurm-test-cluster scripts): slurmctld plus one slurmd per virtual node n1..nN, all on this host,
# without systemd, cgroups or an accounting database. Needs root; installs the Debian packages
# slurmctld, slurmd, slurm-client and munge when they are missing (about 15 s).
#
#   tests/slurm/cluster.sh up      start it (reuses daemons it started before); prints sinfo
#   tests/slurm/cluster.sh down    cancel its jobs, stop the daemons it started (by PID file only)
#
# Exit code 77: this machine cannot host it (not root, no apt-get, packages not installable, or a SLURM
# controller that this script did not start is running); the tests skip with the printed reason.
#
# Environment (defaults in brackets):
#   GFW_SLURM_BASE [/tmp/gfw-slurm]  state, spool, logs and PID files
#   GFW_SLURM_NODES [2]              virtual nodes (one slurmd each, ports 17001...)
#   GFW_SLURM_MEM_MB [90% of RAM]    RealMemory of each node (bookkeeping only: no cgroups)
#   GFW_SLURM_FAKE_GPUS [0]          fake GPUs per node (gres gpu:fake:N on /dev/null & co.): --gres is
#                                    accepted and CUDA_VISIBLE_DEVICES set, no real GPU involved
# The config is /etc/slurm/slurm.conf (marked as ours; a foreign one is moved aside and put back by
# `down`): SLURM_CONF cannot point elsewhere, because Snakemake's job-step executor drops SLURM_*
# variables before the jobs' own srun calls.
set -euo pipefail
BASE=${GFW_SLURM_BASE:-/tmp/gfw-slurm}
NODES=${GFW_SLURM_NODES:-2}
FAKE_GPUS=${GFW_SLURM_FAKE_GPUS:-0}
MARK="# written by geneformer-workflow tests/slurm/cluster.sh"
CONF=/etc/slurm/slurm.conf

skip() { echo "SKIP: $*" >&2; exit 77; }
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop_pid() {  # $1 = PID file: TERM, up to 10 s, then KILL
  [ -f "$1" ] || return 0
  local pid
  pid=$(cat "$1")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
  fi
  rm -f "$1"
}

up() {
  local t0 t_apt t_end
  t0=$(date +%s.%N)
  [ "$(id -u)" = 0 ] || skip "the SLURM test cluster needs root (it starts slurmctld/slurmd and writes $CONF)"
  local pkgs="slurmctld slurmd slurm-client munge" missing
  missing=$(for p in $pkgs; do dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done)
  if [ -n "$missing" ]; then
    command -v apt-get >/dev/null || skip "Debian packages missing ($missing) and no apt-get"
    export DEBIAN_FRONTEND=noninteractive
    # plain `slurm-wlm` pulls ~40 plugin and -dev packages; these four are enough
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends $missing; } >"/tmp/gfw-slurm-apt.log" 2>&1 \
      || skip "could not install $missing (apt-get failed, see /tmp/gfw-slurm-apt.log)"
  fi
  t_apt=$(date +%s.%N)
  mkdir -p "$BASE"/{state,log,run}
  if ! alive "$BASE/run/slurmctld.pid" && pgrep -x slurmctld >/dev/null; then
    skip "a slurmctld not started by tests/slurm/cluster.sh is running; not touching it"
  fi

  # munge authenticates daemons and clients; reuse a running munged, else start (and later stop) ours
  if [ ! -s /etc/munge/munge.key ]; then  # Debian's postinst normally creates it
    mungekey --create --keyfile=/etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
  fi
  install -d -o munge -g munge -m 755 /run/munge
  install -d -o munge -g munge -m 700 /var/log/munge /var/lib/munge
  if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged  # daemonizes; PID in /run/munge/munged.pid
    cp /run/munge/munged.pid "$BASE/run/munged.pid"
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
  fi

  # slurm.conf: the real topology of this machine for every virtual node
  local topo mem host node_names
  topo=$(slurmd -C | head -1 | sed -E 's/^NodeName=[^ ]+ //; s/ RealMemory=[0-9]+//; s/ UpTime=.*//')
  mem=${GFW_SLURM_MEM_MB:-$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)}
  host=$(hostname -s)
  node_names=$(seq -f 'n%g' 1 "$NODES")
  mkdir -p /etc/slurm
  if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF" && [ ! -f "$BASE/slurm.conf.orig" ]; then
    mv "$CONF" "$BASE/slurm.conf.orig"
  fi
  local gres_types="" gres_node=""
  if [ "$FAKE_GPUS" -gt 0 ]; then
    # gres File= must be a character device: point nvidiaN at harmless ones
    local devs=(null zero full urandom random tty ptmx kmsg)
    mkdir -p "$BASE/fakegpu"
    for i in $(seq 0 $((FAKE_GPUS - 1))); do ln -sfn "/dev/${devs[$i]}" "$BASE/fakegpu/nvidia$i"; done
    gres_types="GresTypes=gpu"
    gres_node=" Gres=gpu:fake:$FAKE_GPUS"
    printf '%s\nAutoDetect=off\nName=gpu Type=fake File=%s/fakegpu/nvidia[0-%d]\n' \
      "$MARK" "$BASE" $((FAKE_GPUS - 1)) >/etc/slurm/gres.conf
  else
    rm -f /etc/slurm/gres.conf
  fi
  cat >"$CONF" <<EOF
$MARK
ClusterName=gfwci
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool/%n
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmdPidFile=$BASE/run/slurmd-%n.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd-%n.log
# no cgroups and no systemd here
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
MailProg=/bin/true
# no accounting database: sacct cannot answer, so the tests query squeue, and finished jobs stay
# visible to squeue/scontrol for an hour (the plugin needs >= 120 s; the tests read job records)
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge=3600
$gres_types
# several slurmd on one host (Debian's build allows it): own ports and %n in their paths
NodeName=n[1-$NODES] NodeHostname=$host NodeAddr=127.0.0.1 Port=[17001-$((17000 + NODES))] $topo RealMemory=$mem$gres_node State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF

  # daemons daemonize themselves and write their PID files
  alive "$BASE/run/slurmctld.pid" || /usr/sbin/slurmctld
  for n in $node_names; do
    mkdir -p "$BASE/spool/$n"
    alive "$BASE/run/slurmd-$n.pid" || /usr/sbin/slurmd -N "$n"
  done
  local idle=0
  for _ in $(seq 300); do
    idle=$(sinfo -h -t idle -o '%D' 2>/dev/null | awk '{s += $1} END {print s + 0}')
    [ "$idle" = "$NODES" ] && break
    sleep 0.2
  done
  sinfo
  if [ "$idle" != "$NODES" ]; then
    echo "cluster.sh: only $idle of $NODES nodes idle" >&2
    tail -n 20 "$BASE"/log/*.log >&2
    exit 1
  fi
  t_end=$(date +%s.%N)
  awk -v a="$t0" -v b="$t_apt" -v c="$t_end" \
    'BEGIN {printf "cluster.sh: up (packages %.1f s, daemons %.1f s)\n", b - a, c - b}'
}

down() {
  # jobs first: with proctrack/linuxproc their processes would outlive slurmd
  if alive "$BASE/run/slurmctld.pid"; then
    local jobs
    jobs=$(squeue -h -o '%i' 2>/dev/null || true)
    if [ -n "$jobs" ]; then
      # shellcheck disable=SC2086
      scancel $jobs 2>/dev/null || true
      for _ in $(seq 100); do [ -z "$(squeue -h -t R,CG -o '%i' 2>/dev/null)" ] && break; sleep 0.2; done
    fi
  fi
  for f in "$BASE"/run/slurmd-*.pid; do [ -e "$f" ] && stop_pid "$f"; done
  stop_pid "$BASE/run/slurmctld.pid"
  stop_pid "$BASE/run/munged.pid"
  if [ -f "$CONF" ] && grep -qF "$MARK" "$CONF"; then
    rm -f "$CONF"
    [ -f /etc/slurm/gres.conf ] && grep -qF "$MARK" /etc/slurm/gres.conf && rm -f /etc/slurm/gres.conf
  fi
  [ -f "$BASE/slurm.conf.orig" ] && mv "$BASE/slurm.conf.orig" "$CONF"
  # state and spool only: a fresh `up` then starts with an empty queue
  rm -rf "$BASE/state" "$BASE/spool"
  echo "cluster.sh: down"
}

case ${1:-} in
  up) up ;;
  down) down ;;
  *)
    echo "usage: $0 up|down" >&2
    exit 2
    ;;
esac
