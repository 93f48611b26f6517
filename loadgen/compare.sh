#!/bin/bash
# ringmail side by side with Postfix (SMTP) + Dovecot (POP3), the same loadgen loads against each.
#
#   sudo loadgen/compare.sh [--json FILE] [--messages N] [--skip-build]
#
# On a Debian host (root): installs postfix and dovecot-pop3d from Debian's packages if missing,
# stops any Postfix/Dovecot already running, configures both equivalently to the ringmail config
# it writes (domain bench.test, users u0..u99@bench.test with password "pw" stored as the SAME
# argon2id hash `ringmail hash-password` makes (m=19456, t=2, p=1), Maildir delivery, every
# durability setting at its default, relay.test relayed to a `loadgen sink` on 127.0.0.2:2526),
# builds ringmail and loadgen in release, runs each load against each server, stops everything it
# started, and prints one table (server x load -> msgs/s, MB/s, p99 latency, ringmail's ratio).
#
# Loads (10 KiB messages to u{0..99}@bench.test; everything on loopback):
#   ingest-1      32 connections, 1 message per connection      (N messages)
#   ingest-100    32 connections, 100 messages per connection   (2N messages)
#   ingest-1p, ingest-100p   the same with loadgen --pipelining (RFC 2920), run after POP3
#   pop3-C        C = 1, 4, 16 connections: log in, LIST, RETR everything, for each of the 100 users
#                 (loadgen --login-first: in rounds of C users all log in, then all retrieve, and
#                 the retrieval halves are timed apart from the argon2id logins)
#                 (the 3N messages the ingest loads left; Postfix's queue is drained first)
#   pop3p-C       the same with --pipelining: up to 32 RETRs outstanding per session, as both
#                 servers advertise PIPELINING in CAPA (RFC 2449)
#   relay         8 connections to u{0..99}@relay.test (N messages), relayed to a `loadgen sink`
#                 on 127.0.0.2 (ringmail finds it through a `loadgen dns`); the rate is taken up
#                 to the moment the sink has counted every message (50 ms resolution)
# SHARDS=N sets ringmail's shards (default 0: one per CPU).
# N defaults to 6000 and may be at most 7000 (so no load exceeds 21,000 messages). Every load is also cut off after LOAD_TIMEOUT_SECS (default 120).
# A server that cannot do a load (e.g. a build whose relay is not wired yet) gets "n/a" and why.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${COMPARE_DIR:-/tmp/ringmail-compare}
JSON_OUT=""
MESSAGES=6000
BUILD=1
LOAD_TIMEOUT_SECS=${LOAD_TIMEOUT_SECS:-120}
SIZE_BYTES=10240
NUSERS=100
# Addresses; override through the environment when a port is taken on a shared machine.
# ringmail's `shards` (0: one per CPU). loadgen shares the host's cores with the server it
# measures; on a 2-core host SHARDS=1 leaves loadgen a core rather than making two shards
# and loadgen's threads take turns on both.
SHARDS=${SHARDS:-0}
SMTP_RINGMAIL=${SMTP_RINGMAIL:-127.0.0.1:12525}
POP3_RINGMAIL=${POP3_RINGMAIL:-127.0.0.1:12110}
SMTP_POSTFIX=127.0.0.1:25
POP3_DOVECOT=127.0.0.1:110
SINK=${SINK:-127.0.0.2:12526}
DNS=${DNS:-127.0.0.1:12553}

while [ $# -gt 0 ]; do
  case "$1" in
    --json) JSON_OUT=$(realpath -m "$2"); shift 2 ;;
    --messages) MESSAGES=$2; shift 2 ;;
    --skip-build) BUILD=0; shift ;;
    -h|--help) sed -n '2,29p' "$0"; exit 0 ;;
    *) echo "compare.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
case "$MESSAGES" in ''|*[!0-9]*) echo "--messages takes a number" >&2; exit 2 ;; esac
if [ "$MESSAGES" -lt 32 ] || [ "$MESSAGES" -gt 7000 ]; then
  echo "--messages must be between 32 and 7000 (POP3 then retrieves 3N)" >&2; exit 2
fi
[ "$(id -u)" -eq 0 ] || { echo "compare.sh must run as root (it installs and starts Postfix and Dovecot)" >&2; exit 2; }

say() { printf '\n== %s\n' "$*"; }

# ---------------------------------------------------------------------------------------------
say "packages"
missing=()
for pkg in postfix dovecot-pop3d python3 curl; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]}"
  echo "postfix postfix/main_mailer_type select Local only" | debconf-set-selections
  echo "postfix postfix/mailname string mx.bench.test" | debconf-set-selections
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi
echo "postfix $(dpkg-query -W -f='${Version}' postfix), dovecot $(dpkg-query -W -f='${Version}' dovecot-core)"

# ---------------------------------------------------------------------------------------------
STARTED_PIDS=()
POSTFIX_STARTED=0
DOVECOT_CONF="$WORK/dovecot/dovecot.conf"
DOVECOT_STARTED=0

stop_everything() {
  set +e
  for pid in "${STARTED_PIDS[@]}"; do
    kill -TERM "$pid" 2>/dev/null
  done
  for pid in "${STARTED_PIDS[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null
  done
  STARTED_PIDS=()
  [ "$POSTFIX_STARTED" = 1 ] && postfix stop >/dev/null 2>&1 && POSTFIX_STARTED=0
  [ "$DOVECOT_STARTED" = 1 ] && doveadm -c "$DOVECOT_CONF" stop >/dev/null 2>&1 && DOVECOT_STARTED=0
  set -e
}
trap stop_everything EXIT
trap 'exit 130' INT TERM

say "stopping Postfix/Dovecot left running"
if postfix status >/dev/null 2>&1; then echo "postfix stop"; postfix stop || true; fi
for pid in $(pgrep -x dovecot || true); do
  conf=$(tr '\0' ' ' < "/proc/$pid/cmdline" | sed -n 's/.* -c \([^ ]*\).*/\1/p')
  echo "stopping dovecot (pid $pid${conf:+, config $conf})"
  if [ -n "$conf" ]; then doveadm -c "$conf" stop 2>/dev/null || kill -TERM "$pid"; else doveadm stop 2>/dev/null || kill -TERM "$pid"; fi
done
for _ in $(seq 50); do pgrep -x dovecot >/dev/null || pgrep -f /usr/lib/postfix/sbin/master >/dev/null || break; sleep 0.2; done
for addr in $SMTP_RINGMAIL $POP3_RINGMAIL $SMTP_POSTFIX $POP3_DOVECOT $SINK $DNS; do
  if ss -Hltn src "$addr" 2>/dev/null | grep -q .; then
    echo "compare.sh: $addr is in use by another process:" >&2; ss -ltnp src "$addr" >&2; exit 1
  fi
done

# ---------------------------------------------------------------------------------------------
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
if [ "$BUILD" = 1 ]; then
  say "building ringmail and loadgen (release)"
  (cd "$ROOT" && cargo build --release --locked -q -p ringmail -p loadgen)
fi
RINGMAIL="$TARGET_DIR/release/ringmail"
LOADGEN="$TARGET_DIR/release/loadgen"
[ -x "$RINGMAIL" ] && [ -x "$LOADGEN" ] || { echo "no release binaries in $TARGET_DIR/release" >&2; exit 1; }

# ---------------------------------------------------------------------------------------------
say "configuring (work dir $WORK)"
rm -rf "$WORK"
mkdir -p "$WORK/results" "$WORK/dovecot/run"
chmod 755 "$WORK" "$WORK/dovecot"
VMAIL="$WORK/vmail"
HASH=$(printf 'pw' | "$RINGMAIL" hash-password)
case "$HASH" in '$argon2id$v=19$m=19456,t=2,p=1$'*) ;; *) echo "unexpected hash: $HASH" >&2; exit 1 ;; esac

# ringmail
{
  cat <<EOF
hostname = "mx.bench.test"
data_dir = "$WORK/ringmail-data"
shards = $SHARDS
shutdown_grace_secs = 5
local_domains = ["bench.test"]
EOF
  for i in $(seq 0 $((NUSERS - 1))); do
    printf '[[users]]\naddress = "u%d@bench.test"\npassword_hash = "%s"\n' "$i" "$HASH"
  done
  cat <<EOF
[smtp]
listen = ["$SMTP_RINGMAIL"]
[pop3]
listen = ["$POP3_RINGMAIL"]
[relay]
resolver = "$DNS"
port = ${SINK##*:}
EOF
} > "$WORK/ringmail.toml"
"$RINGMAIL" check-config --config "$WORK/ringmail.toml" >/dev/null

# Postfix: virtual(8) Maildir delivery for bench.test, relay.test to the sink; durability at
# its defaults (each queue file and each Maildir file is fsync'ed).
getent group vmail >/dev/null || groupadd -g 5000 vmail
getent passwd vmail >/dev/null || useradd -u 5000 -g 5000 -d "$VMAIL" -M -s /usr/sbin/nologin vmail
: > /etc/postfix/compare-vmailbox
for i in $(seq 0 $((NUSERS - 1))); do
  mkdir -p "$VMAIL/bench.test/u$i"/{new,cur,tmp}
  echo "u$i@bench.test bench.test/u$i/" >> /etc/postfix/compare-vmailbox
done
chown -R vmail:vmail "$VMAIL"
postconf -e \
  "myhostname = mx.bench.test" \
  "mydomain = bench.test" \
  "myorigin = \$myhostname" \
  "mydestination = localhost" \
  "inet_interfaces = loopback-only" \
  "inet_protocols = ipv4" \
  "mynetworks = 127.0.0.0/8" \
  "default_process_limit = 200" \
  "smtpd_peername_lookup = no" \
  "virtual_mailbox_domains = bench.test" \
  "virtual_mailbox_base = $VMAIL" \
  "virtual_mailbox_maps = texthash:/etc/postfix/compare-vmailbox" \
  "virtual_alias_maps =" \
  "virtual_uid_maps = static:5000" \
  "virtual_gid_maps = static:5000" \
  "relay_domains = relay.test" \
  "transport_maps = inline:{ relay.test=smtp:[${SINK%%:*}]:${SINK##*:} }" \
  "maillog_file_prefixes = /var, /dev/stdout, $WORK" \
  "maillog_file = $WORK/postfix-maillog" \
  "relayhost =" \
  "append_dot_mydomain = no"
grep -q '^postlog' /etc/postfix/master.cf ||
  postconf -M 'postlog/unix-dgram=postlog   unix-dgram n  -       n       -       1       postlogd'
newaliases
/usr/lib/postfix/configure-instance.sh - >/dev/null 2>&1 || true
postfix check

# Dovecot: POP3 over the same Maildirs; the same argon2id hash; defaults otherwise
# (mail_fsync=optimized, high-security login processes, no auth cache).
: > "$WORK/dovecot/users"
for i in $(seq 0 $((NUSERS - 1))); do
  echo "u$i@bench.test:{ARGON2ID}$HASH:5000:5000::$VMAIL/bench.test/u$i::userdb_mail=maildir:$VMAIL/bench.test/u$i" >> "$WORK/dovecot/users"
done
chown root:dovecot "$WORK/dovecot/users"; chmod 640 "$WORK/dovecot/users"
cat > "$DOVECOT_CONF" <<EOF
protocols = pop3
listen = ${POP3_DOVECOT%%:*}
base_dir = $WORK/dovecot/run
instance_name = compare-dovecot
log_path = $WORK/dovecot/dovecot.log
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
first_valid_uid = 5000
last_valid_uid = 5000
mail_location = maildir:~
passdb {
  driver = passwd-file
  args = username_format=%u $WORK/dovecot/users
}
userdb {
  driver = passwd-file
  args = username_format=%u $WORK/dovecot/users
}
service pop3-login {
  inet_listener pop3 {
    address = ${POP3_DOVECOT%%:*}
    port = ${POP3_DOVECOT##*:}
  }
  inet_listener pop3s {
    port = 0
  }
}
protocol pop3 {
  pop3_uidl_format = %08Xu%08Xv
}
EOF
doveadm -c "$DOVECOT_CONF" pw -t "{ARGON2ID}$HASH" -p pw >/dev/null ||
  { echo "dovecot cannot verify ringmail's argon2id hash" >&2; exit 1; }

# ---------------------------------------------------------------------------------------------
wait_listening() { # ADDR SECONDS
  for _ in $(seq $(($2 * 10))); do
    ss -Hltn src "$1" | grep -q . && return 0
    sleep 0.1
  done
  echo "nothing listens on $1 after $2 s" >&2; return 1
}

start_bg() { # LOGFILE CMD...
  local log=$1; shift
  "$@" > "$log" 2>&1 &
  STARTED_PIDS+=($!)
}

sink_count() { # accepted count from the sink's last status line
  sed -n 's/.* accepted \([0-9]*\) .*/\1/p' "$1" | tail -n 1
}

load() { # SERVER LOAD CMD...  -> results/SERVER-LOAD.json (+ .txt); never fails the script
  local server=$1 name=$2; shift 2
  echo "-- $server $name"
  if ! timeout "$LOAD_TIMEOUT_SECS" "$@" --quiet --json "$WORK/results/$server-$name.json" \
      > "$WORK/results/$server-$name.txt" 2>&1; then
    echo "   (loadgen reported failures or ran out of time; see $WORK/results/$server-$name.txt)"
  fi
  tail -n 12 "$WORK/results/$server-$name.txt" | sed 's/^/   /'
}

relay_load() { # SERVER SMTP_ADDR SINK_LOG
  local server=$1 smtp=$2 sink_log=$3 total=$MESSAGES started finished count=0
  started=$(date +%s.%N)
  load "$server" relay-submit "$LOADGEN" smtp --target "$smtp" --connections 8 \
    --messages "$total" --size "$SIZE_BYTES" --to "u{0..$((NUSERS - 1))}@relay.test"
  local deadline=$(( $(date +%s) + 30 ))
  while [ "$(date +%s)" -lt "$deadline" ]; do
    count=$(sink_count "$sink_log"); count=${count:-0}
    [ "$count" -ge "$total" ] && break
    sleep 0.1
  done
  finished=$(date +%s.%N)
  python3 -c "import json,sys; json.dump({'sink_accepted': $count, 'expected': $total, 'secs': $finished - $started}, sys.stdout)" \
    > "$WORK/results/$server-relay-sink.json"
  echo "   sink counted $count of $total"
}

drain_queue() { # SERVER: waits until Postfix has delivered everything it accepted
  [ "$1" = postfix ] || return 0
  for _ in $(seq "$LOAD_TIMEOUT_SECS"); do
    postqueue -p 2>/dev/null | grep -q "Mail queue is empty" && break
    sleep 1
  done
  echo "   postfix queue: $(postqueue -p | tail -n 1)"
}

run_loads() { # SERVER SMTP_ADDR POP3_ADDR
  local server=$1 smtp=$2 pop3=$3
  load "$server" ingest-1 "$LOADGEN" smtp --target "$smtp" --connections 32 --per-connection 1 \
    --messages "$MESSAGES" --size "$SIZE_BYTES" --to "u{0..$((NUSERS - 1))}@bench.test"
  load "$server" ingest-100 "$LOADGEN" smtp --target "$smtp" --connections 32 --per-connection 100 \
    --messages $((MESSAGES * 2)) --size "$SIZE_BYTES" --to "u{0..$((NUSERS - 1))}@bench.test"
  # POP3 must see what was accepted: Postfix delivers its queue to Maildir first.
  drain_queue "$server"
  for connections in 1 4 16; do
    load "$server" "pop3-$connections" "$LOADGEN" pop3 --target "$pop3" --connections "$connections" \
      --login-first --user "u{0..$((NUSERS - 1))}@bench.test" --password pw
  done
  for connections in 1 4 16; do
    load "$server" "pop3p-$connections" "$LOADGEN" pop3 --target "$pop3" --connections "$connections" \
      --login-first --pipelining --user "u{0..$((NUSERS - 1))}@bench.test" --password pw
  done
  # The same ingest loads with the commands pipelined (RFC 2920), after POP3 so that the
  # mailboxes it reads hold the same 3N messages either way.
  load "$server" ingest-1p "$LOADGEN" smtp --target "$smtp" --connections 32 --per-connection 1 \
    --pipelining --messages "$MESSAGES" --size "$SIZE_BYTES" --to "u{0..$((NUSERS - 1))}@bench.test"
  load "$server" ingest-100p "$LOADGEN" smtp --target "$smtp" --connections 32 --per-connection 100 \
    --pipelining --messages $((MESSAGES * 2)) --size "$SIZE_BYTES" --to "u{0..$((NUSERS - 1))}@bench.test"
  # A backlog of local deliveries would slow Postfix's relay load.
  drain_queue "$server"
  relay_load "$server" "$smtp" "$WORK/$server-sink.log"
}

# ---------------------------------------------------------------------------------------------
say "ringmail"
start_bg "$WORK/ringmail-dns.log" "$LOADGEN" dns --listen "$DNS" --mx "relay.test=${SINK%%:*}"
start_bg "$WORK/ringmail-sink.log" "$LOADGEN" sink --listen "$SINK" --print-every-secs 0.05
start_bg "$WORK/ringmail.log" "$RINGMAIL" serve --config "$WORK/ringmail.toml"
wait_listening "$POP3_RINGMAIL" 60
wait_listening "$SINK" 10
run_loads ringmail "$SMTP_RINGMAIL" "$POP3_RINGMAIL"
stop_everything

say "postfix + dovecot"
start_bg "$WORK/postfix-sink.log" "$LOADGEN" sink --listen "$SINK" --print-every-secs 0.05
postfix start >/dev/null; POSTFIX_STARTED=1
dovecot -c "$DOVECOT_CONF"; DOVECOT_STARTED=1
wait_listening "$SMTP_POSTFIX" 30
wait_listening "$POP3_DOVECOT" 30
wait_listening "$SINK" 10
run_loads postfix "$SMTP_POSTFIX" "$POP3_DOVECOT"
stop_everything

# ---------------------------------------------------------------------------------------------
say "results"
python3 - "$WORK/results" "$JSON_OUT" "$MESSAGES" <<'EOF'
import json, os, sys
results, json_out, messages = sys.argv[1], sys.argv[2], int(sys.argv[3])
loads = [
    ("ingest-1", "ingest 10 KiB, 32 conn, 1 msg/conn", "transaction"),
    ("ingest-100", "ingest 10 KiB, 32 conn, 100 msg/conn", "transaction"),
    ("ingest-1p", "ingest 10 KiB, 32 conn, 1 msg/conn, pipelined", "transaction"),
    ("ingest-100p", "ingest 10 KiB, 32 conn, 100 msg/conn, pipelined", "transaction"),
    ("pop3-1", "POP3 LIST+RETR all, 1 conn", "retr"),
    ("pop3-4", "POP3 LIST+RETR all, 4 conn", "retr"),
    ("pop3-16", "POP3 LIST+RETR all, 16 conn", "retr"),
    ("pop3p-1", "POP3 LIST+RETR all, 1 conn, pipelined", "retr"),
    ("pop3p-4", "POP3 LIST+RETR all, 4 conn, pipelined", "retr"),
    ("pop3p-16", "POP3 LIST+RETR all, 16 conn, pipelined", "retr"),
    ("relay", "relay to sink, 10 KiB, 8 conn", "transaction"),
]
servers = [("ringmail", "ringmail"), ("postfix", "Postfix/Dovecot")]
expected = {"ingest-1": messages, "ingest-100": 2 * messages, "relay": messages,
            "ingest-1p": messages, "ingest-100p": 2 * messages,
            **{f"pop3{p}-{c}": 3 * messages for c in (1, 4, 16) for p in ("", "p")}}

def read(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None

def figures(server, load, phase):
    if load == "relay":
        submit = read(f"{results}/{server}-relay-submit.json")
        sink = read(f"{results}/{server}-relay-sink.json")
        if not submit or not sink:
            return {"na": "the relay load did not run"}
        if sink["sink_accepted"] < sink["expected"]:
            why = f"sink counted {sink['sink_accepted']} of {sink['expected']} within 30 s after the load"
            if sink["sink_accepted"] == 0 and server == "ringmail":
                why += " (relay delivery is not wired in this build)"
            return {"na": why}
        secs = max(sink["secs"], 1e-9)
        p99 = submit.get("latency", {}).get(phase, {}).get("p99_us")
        return {"msgs_per_sec": sink["expected"] / secs,
                "mb_per_sec": submit["bytes"] / secs / 1e6,
                "p99_ms": p99 / 1000 if p99 is not None else None,
                "messages": sink["expected"], "secs": secs,
                "note": "time until the sink counted every message; p99 of submission"}
    run = read(f"{results}/{server}-{load}.json")
    if not run:
        return {"na": "loadgen wrote no result"}
    p99 = run.get("latency", {}).get(phase, {}).get("p99_us")
    if load.startswith("pop3") and run.get("retrieval"):
        # Retrieval apart from login (both servers verify the same argon2id hash): loadgen
        # --login-first logs each round's sessions in, then times their retrieval alone.
        login = run.get("latency", {}).get("login", {})
        secs = run["retrieval"]["secs"]
        return {"msgs_per_sec": run["retrieval"]["msgs_per_sec"],
                "mb_per_sec": run["retrieval"]["mb_per_sec"],
                "p99_ms": p99 / 1000 if p99 is not None else None,
                "messages": run["messages"], "secs": secs,
                "login_p50_ms": login.get("p50_us", 0) / 1000,
                "msgs_per_sec_with_logins": run["msgs_per_sec"],
                "failures": run.get("failures", 0),
                "note": f"retrieval with no login running; {run['msgs_per_sec']:,.0f} msgs/s counting the 100 logins (login p50 {login.get('p50_us', 0) / 1000:.0f} ms)"}
    out = {"msgs_per_sec": run["msgs_per_sec"], "mb_per_sec": run["mb_per_sec"],
           "p99_ms": p99 / 1000 if p99 is not None else None,
           "messages": run["messages"], "secs": run["elapsed_secs"],
           "failures": run.get("failures", 0)}
    if run["messages"] < expected[load]:
        out["note"] = f"only {run['messages']} of {expected[load]} messages"
    return out

table = {load: {s: figures(s, load, phase) for s, _ in servers} for load, _, phase in loads}
for load, _, _ in loads:
    r, p = table[load]["ringmail"], table[load]["postfix"]
    if "na" not in r and "na" not in p and p["msgs_per_sec"] > 0:
        table[load]["ringmail_ratio"] = r["msgs_per_sec"] / p["msgs_per_sec"]

def cell(f, key, fmt):
    if "na" in f:
        return "n/a"
    v = f.get(key)
    return "-" if v is None else fmt.format(v)

header = f"| load | server | msgs/s | MB/s | p99 ms | ringmail ÷ peer |"
print(header)
print("|---|---|---:|---:|---:|---:|")
notes = []
for load, title, _ in loads:
    for s, label in servers:
        f = table[load][s]
        ratio = ""
        if s == "ringmail":
            ratio = f"{table[load]['ringmail_ratio']:.2f}×" if "ringmail_ratio" in table[load] else "n/a"
        print(f"| {title} | {label} | {cell(f, 'msgs_per_sec', '{:,.0f}')} | {cell(f, 'mb_per_sec', '{:.1f}')} | {cell(f, 'p99_ms', '{:.1f}')} | {ratio} |")
        if "na" in f:
            notes.append(f"{label}, {title}: n/a: {f['na']}")
        elif f.get("note"):
            notes.append(f"{label}, {title}: {f['note']}")
        if f.get("failures"):
            notes.append(f"{label}, {title}: loadgen counted {f['failures']} failures")
for n in notes:
    print(f"- {n}")
if json_out:
    with open(json_out, "w") as f:
        json.dump({"messages": messages, "size_bytes": 10240, "loads": table}, f, indent=2)
    print(f"(written to {json_out})")
EOF
