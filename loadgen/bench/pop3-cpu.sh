#!/bin/bash
# CPU per retrieved message of a POP3 server that runs on this host: the whole machine's busy
# time (user, nice, system, irq, softirq from /proc/stat) less loadgen's own CPU, divided by the
# messages retrieved. Run it on a quiet host; the server must hold the mailboxes already. Use
# cheap passwords (e.g. {PLAIN} for Dovecot) so that password hashing does not count.
#   loadgen/bench/pop3-cpu.sh HOST:PORT 'u{0..99}@bench.test' PASSWORD [more loadgen pop3 flags]
# e.g. ... 127.0.0.1:110 'u{0..99}@bench.test' pw --connections 16 --login-first --pipelining
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
LOADGEN=${LOADGEN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/loadgen}
[ $# -ge 3 ] || { sed -n '2,7p' "$0"; exit 2; }
target=$1 users=$2 password=$3; shift 3
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
busy() { awk '/^cpu / {print $2 + $3 + $4 + $7 + $8}' /proc/stat; }
before=$(busy)
/usr/bin/time -f "%U %S" -o "$work/time" "$LOADGEN" pop3 --quiet --target "$target" \
  --user "$users" --password "$password" --json "$work/run.json" "$@" > /dev/null
after=$(busy)
python3 - "$work/run.json" "$work/time" "$before" "$after" "$(getconf CLK_TCK)" <<'PY'
import json, sys
run = json.load(open(sys.argv[1]))
user, system = map(float, open(sys.argv[2]).read().split())
busy = (int(sys.argv[4]) - int(sys.argv[3])) / int(sys.argv[5])
n = max(run["messages"], 1)
print(f"{run['messages']} messages, {run['msgs_per_sec']:,.0f} msgs/s; CPU per message: "
      f"server and kernel {(busy - user - system) / n * 1e6:.1f} us, loadgen {(user + system) / n * 1e6:.1f} us")
PY
