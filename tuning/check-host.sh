#!/usr/bin/env bash
# Prints this host's values beside what ringmail recommends (tuning/README.md) and exits 1 if
# any falls short. Usage: tuning/check-host.sh [DATA_DIR] [MAX_CONNECTIONS]
set -u
data_dir=${1:-./ringmail-data}
max_connections=${2:-10000}
short=0

row() { # name current recommended verdict
  printf '%-32s %-22s %-22s %s\n' "$1" "$2" "$3" "$4"
}
check_min() { # name current minimum (numbers; "unlimited" passes)
  local verdict=ok
  if [ "$2" != unlimited ] && [ "$2" -lt "$3" ] 2>/dev/null; then verdict="SHORT: raise it"; short=1; fi
  row "$1" "$2" ">= $3" "$verdict"
}
sysctl_value() { cat "/proc/sys/${1//.//}" 2>/dev/null | tr -s '\t ' ' '; }

row item current recommended verdict
memlock=$(ulimit -l)
[ "$memlock" = unlimited ] || memlock=$((memlock * 1024))
shards=$(nproc)
if [ "$(id -u)" = 0 ]; then
  row "memlock (bytes)" "$memlock" "(root: exempt)" "ok, but the service user is not root: check it as that user"
else
  check_min "memlock (bytes)" "$memlock" $((shards * 10 * 1048576 * 2))
fi
check_min "open files" "$(ulimit -n)" $((max_connections * 2 + 1024))
check_min net.core.somaxconn "$(sysctl_value net.core.somaxconn)" 4096
check_min net.ipv4.tcp_max_syn_backlog "$(sysctl_value net.ipv4.tcp_max_syn_backlog)" 8192
range=$(sysctl_value net.ipv4.ip_local_port_range)
low=${range%% *}
if [ "${low:-99999}" -le 1024 ]; then verdict=ok; else verdict="SHORT: widen to 1024 65535"; short=1; fi
row net.ipv4.ip_local_port_range "$range" "1024 65535" "$verdict"
check_min net.core.rmem_max "$(sysctl_value net.core.rmem_max)" 4194304
check_min net.core.wmem_max "$(sysctl_value net.core.wmem_max)" 4194304
if [ -r /proc/sys/kernel/io_uring_disabled ] && [ "$(cat /proc/sys/kernel/io_uring_disabled)" != 0 ]; then
  row kernel.io_uring_disabled "$(cat /proc/sys/kernel/io_uring_disabled)" 0 "SHORT: io_uring is off"; short=1
else
  row kernel.io_uring_disabled 0 0 ok
fi
probe=$data_dir
while [ ! -e "$probe" ] && [ "$probe" != / ] && [ "$probe" != . ]; do probe=$(dirname "$probe"); done
fstype=$(stat -f -c %T "$probe" 2>/dev/null || echo unknown)
case "$fstype" in
  tmpfs|nfs*|ramfs) row "data_dir filesystem" "$fstype" "ext4/xfs on SSD" "SHORT: not durable/local"; short=1 ;;
  *) row "data_dir filesystem" "$fstype" "ext4/xfs on SSD" ok ;;
esac
if command -v irqbalance >/dev/null 2>&1 || pgrep -x irqbalance >/dev/null 2>&1; then
  row "interrupt balancing" present irqbalance ok
else
  row "interrupt balancing" absent "irqbalance or RPS" "advice: spread NIC interrupts over the shard cores"
fi
exit $short
