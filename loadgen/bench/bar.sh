#!/bin/bash
# The loadgen Bar (issue 5): loadgen smtp -> loadgen sink must reach at least 2x the
# msgs/s of Postfix's smtp-source -d -> smtp-sink, 1 KiB messages, 8 reused connections,
# same machine, same run. Runs the pairs ROUNDS times, alternating, and prints msgs/s: loadgen
# once with pipelined DATA (one transaction in flight per connection: the 354 must come back
# before the content goes out) and once with --chunking (BDAT, 16 transactions in flight).
# loadgen and its sink run one thread each (LG_THREADS, default 1), as smtp-source and smtp-sink
# are one process each: on a 2-core host two threads per side put four busy threads on two
# cores, and each side then spends most of its time switching. LG_THREADS= (empty) gives
# loadgen its default of a thread per CPU.
# Usage: loadgen/bench/bar.sh [path/to/loadgen]   (needs the postfix package)
set -euo pipefail
LOADGEN=${1:-${CARGO_TARGET_DIR:-target}/release/loadgen}
MESSAGES=${MESSAGES:-100000}
ROUNDS=${ROUNDS:-2}
PORT_PF=${PORT_PF:-2601}
PORT_LG=${PORT_LG:-2600}
LG_THREADS=${LG_THREADS-1}
threads_flag=${LG_THREADS:+--threads $LG_THREADS}
sink_pid=
cleanup() { [ -n "$sink_pid" ] && kill "$sink_pid" 2>/dev/null || true; }
trap cleanup EXIT

for round in $(seq 1 "$ROUNDS"); do
  # Fresh ports each round: a stopped io_uring server may hold its port a little longer.
  PORT_PF=$((PORT_PF + 2)); PORT_LG=$((PORT_LG + 2))
  smtp-sink -u nobody "127.0.0.1:$PORT_PF" 1000 & sink_pid=$!
  sleep 0.5
  kill -0 "$sink_pid" || { echo "smtp-sink did not start"; exit 1; }
  start=$(date +%s.%N)
  smtp-source -d -s 8 -m "$MESSAGES" -l 1024 -f from@x.test -t u7@bench.test "127.0.0.1:$PORT_PF"
  end=$(date +%s.%N)
  kill "$sink_pid"; wait "$sink_pid" 2>/dev/null || true; sink_pid=
  echo "round $round smtp-source -> smtp-sink: $(echo "$MESSAGES / ($end - $start)" | bc -l | xargs printf '%.0f') msgs/s"

  # shellcheck disable=SC2086
  "$LOADGEN" sink --listen "127.0.0.1:$PORT_LG" --print-every-secs 0 $threads_flag >/dev/null & sink_pid=$!
  sleep 0.5
  kill -0 "$sink_pid" || { echo "loadgen sink did not start"; exit 1; }
  for mode in --pipelining --chunking; do
    # shellcheck disable=SC2086
    "$LOADGEN" smtp --quiet --target "127.0.0.1:$PORT_LG" --connections 8 --messages "$MESSAGES" \
      --size 1024 --to u7@bench.test --from from@x.test $mode $threads_flag --json /tmp/loadgen-bar.json >/dev/null
    echo "round $round loadgen smtp $mode -> loadgen sink: $(python3 -c 'import json;print(round(json.load(open("/tmp/loadgen-bar.json"))["msgs_per_sec"]))') msgs/s"
  done
  kill -INT "$sink_pid"; wait "$sink_pid" 2>/dev/null || true; sink_pid=
done
