#!/bin/bash
# Issue 4's end-to-end matrix with Postfix's own driver: smtp-source against ringmail, against
# Postfix delivering to Maildirs (default fsyncs), and against Postfix's no-disk smtp-sink;
# 10 KiB messages to one mailbox (u7@bench.test), 8 and 32 sessions, a connection per message
# and with -d (reuse). Run loadgen/compare.sh once first: it installs and configures Postfix
# (domain bench.test, users u0..u99). Usage: [SHARDS=N] [ROUNDS=R] loadgen/bench/smtp-source.sh
# [MESSAGES]. SHARDS sets ringmail's `shards` (default: one per CPU). smtp-source and smtp-sink
# are single processes; on a 2-core host SHARDS=1 leaves the driver a core of its own. ROUNDS
# (default 1) repeats each ringmail/smtp-sink pair and prints every ratio and their median:
# on a shared VM one pair can be off by 10 % either way. POSTFIX=0 leaves Postfix out, for a host
# that has smtp-source and smtp-sink but no configured Postfix.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
M=${1:-4000}
WORK=$(mktemp -d)
RINGMAIL=127.0.0.1:13525
SINK=127.0.0.1:13526
POSTFIX_ADDR=127.0.0.1:25
trap 'kill $(jobs -p) 2>/dev/null || true; { [ "${POSTFIX:-1}" = 0 ] || postfix stop >/dev/null 2>&1 || true; }; rm -rf "$WORK"' EXIT

hash=$(echo pw | "$ROOT/target/release/ringmail" hash-password)
{
  [ -n "${SHARDS:-}" ] && echo "shards = $SHARDS"
  echo 'hostname = "mx.bench.test"'
  echo "data_dir = \"$WORK/data\""
  echo 'local_domains = ["bench.test"]'
  for i in $(seq 0 99); do printf '[[users]]\naddress = "u%d@bench.test"\npassword_hash = "%s"\n' "$i" "$hash"; done
  printf '[smtp]\nlisten = ["%s"]\n[pop3]\nlisten = ["127.0.0.1:0"]\n[relay]\nresolver = "127.0.0.1:53535"\n' "$RINGMAIL"
} > "$WORK/ringmail.toml"
"$ROOT/target/release/ringmail" serve --config "$WORK/ringmail.toml" > "$WORK/ringmail.out" 2> /dev/null &
smtp-sink -u nobody "$SINK" 1000 &
[ "${POSTFIX:-1}" = 0 ] || postfix start >/dev/null 2>&1 || true
sleep 2

run() { # label target sessions reuse
  local flags=(-s "$3" -m "$M" -l 10240 -f from@x.test -t u7@bench.test)
  [ "$4" = reuse ] && flags+=(-d)
  local start end
  start=$(date +%s.%N)
  smtp-source "${flags[@]}" "$2"
  end=$(date +%s.%N)
  RATE=$(python3 -c "print(round($M/($end-$start)))")
  printf '%-10s sessions=%-3s %-7s %8s msgs/s\n' "$1" "$3" "$4" "$RATE"
}
drain_postfix() { # Postfix delivers what it accepted after the 250s: let it finish first
  for _ in $(seq 1 600); do
    postqueue -p 2>/dev/null | grep -q "Mail queue is empty" && return
    sleep 0.5
  done
}
# ringmail and smtp-sink alternate; Postfix runs last, its queue drained before each run and
# after the last, so that its deliveries never run beside another server's load.
for sessions in 8 32; do
  for mode in per-msg reuse; do
    ratios=()
    for _ in $(seq 1 "${ROUNDS:-1}"); do
      run ringmail "$RINGMAIL" "$sessions" "$mode"
      ours=$RATE
      run smtp-sink "$SINK" "$sessions" "$mode"
      ratios+=("$(python3 -c "print(round(100 * $ours / $RATE, 1))")")
    done
    python3 -c "import statistics; r = [${ratios[*]/%/,}]; print(f'ringmail / smtp-sink sessions=$sessions $mode: ' + ' '.join(f'{x} %' for x in r) + f', median {statistics.median(r)} %')"
  done
done
[ "${POSTFIX:-1}" = 0 ] && exit 0
for sessions in 8 32; do
  for mode in per-msg reuse; do
    drain_postfix
    run postfix "$POSTFIX_ADDR" "$sessions" "$mode"
  done
done
drain_postfix
