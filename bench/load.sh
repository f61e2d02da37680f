#!/usr/bin/env bash
# The load harness in one command (`make bench-load`, or `bench/load.sh --quick`): builds the
# release binaries, starts fresh gateways (and PostgreSQL databases and a private Redis where a
# scenario needs them), runs sensorwire-loadgen against them and prints one JSON line per
# scenario on stdout. Progress goes to stderr. See bench/README.md and README "Performance".
#
#   bench/load.sh [--quick] [--scenarios idle,fanout,ingest,two-node] [--out FILE]
#                 [--servers sensorwire,node,floor] [--no-build] [-- extra sensorwire-loadgen flags]
#
# idle and fanout also run, with the same loadgen flags, against the reference servers in
# --servers (default all): `node` (bench/ref-node, socket.io on Node; `npm ci` there on first
# use) and `floor` (bench/ref-floor, a minimal Rust WebSocket fan-out). A last
# {"scenario":"compare",...} line gives sensorwire's figures as ratios to theirs.
#
# Needs: cargo, PostgreSQL at $BENCH_POSTGRES_URL (default postgres://root@127.0.0.1:5432/test;
# used only to CREATE and DROP a database per run) for ingest/postgres and two-node,
# redis-server on PATH for two-node, sqlite3 and psql to check stored counts.
# SENSORWIRE_BIN / LOADGEN_BIN (with --no-build) run other binaries, e.g. a profiling build.
# FLUSH_INTERVAL_MS sets the gateways' flush interval (default 1000); GATEWAY_ENV="K=V ..." adds
# settings to every gateway (e.g. GATEWAY_ENV="SOCKET_BUFFER_SIZE=64").
# PROFILE_DIR=dir records every single-gateway run with `perf record --call-graph dwarf` into
# dir/NAME.perf.data (PERF_FREQ samples per second, default 199).
set -euo pipefail
cd "$(dirname "$0")/.."

QUICK=()
SCENARIOS="idle,fanout,ingest,two-node"
SERVERS="sensorwire,node,floor"
OUT=""
BUILD=1
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=(--quick) ;;
    --scenarios|--scenario) SCENARIOS="$2"; shift ;;
    --out) OUT="$2"; shift ;;
    --no-build) BUILD=0 ;;
    --) shift; EXTRA=("$@"); break ;;
    --servers) SERVERS="$2"; shift ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "load.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

log() { echo "load.sh: $*" >&2; }

TARGET_DIR="${CARGO_TARGET_DIR:-target}"
if [ "$BUILD" = 1 ]; then
  log "building release binaries (cargo build --release)"
  cargo build --release --workspace --bins >&2
fi
BIN="${SENSORWIRE_BIN:-$TARGET_DIR/release/sensorwire}"
LOADGEN="${LOADGEN_BIN:-$TARGET_DIR/release/sensorwire-loadgen}"
FLOOR="${FLOOR_BIN:-$TARGET_DIR/release/sensorwire-ref-floor}"
[ -x "$BIN" ] && [ -x "$LOADGEN" ] || { log "missing $BIN or $LOADGEN"; exit 1; }

# The servers measured in idle and fanout: sensorwire and the references that can run here.
wants_server() { case ",$SERVERS," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
for s in ${SERVERS//,/ }; do
  case "$s" in
    sensorwire|node|floor) ;;
    *) log "unknown server $s (sensorwire, node, floor)"; exit 2 ;;
  esac
done
REFS=()
if wants_server node; then
  if [ ! -f bench/ref-node/server.mjs ] || ! command -v node >/dev/null; then
    log "no node or bench/ref-node/server.mjs: node skipped"
  elif [ -d bench/ref-node/node_modules ] || (cd bench/ref-node && npm ci --no-audit --no-fund --loglevel=error >&2); then
    REFS+=(node)
  else
    log "npm ci in bench/ref-node failed: node skipped"
  fi
fi
if wants_server floor; then
  if [ -x "$FLOOR" ]; then REFS+=(floor); else log "missing $FLOOR: floor skipped"; fi
fi

# 10,000 sockets need 10,000 descriptors in the gateway and as many in the load generator.
HARD=$(ulimit -Hn)
if [ "$HARD" != unlimited ] && [ "$HARD" -lt 24000 ]; then
  ulimit -n "$HARD"
  log "open files limited to $HARD (hard limit); large --clients values may fail"
else
  ulimit -n 24000
fi

log "machine: $(nproc) CPU(s), $(lscpu | sed -n 's/^Model name:[[:space:]]*//p'), $(free -g | awk '/Mem:/{print $2}') GiB"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/sensorwire-load.XXXXXX")
RESULTS="$WORK/results.jsonl"
: > "$RESULTS"
PG_ADMIN_URL="${BENCH_POSTGRES_URL:-postgres://root@127.0.0.1:5432/test}"
SECRET=$(head -c 48 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | head -c 32)
FLUSH_MS="${FLUSH_INTERVAL_MS:-1000}"
PIDS=()       # every process this script started (gateways, Redis)
DATABASES=()  # every PostgreSQL database it created
STATUS=0

cleanup() {
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  for db in "${DATABASES[@]}"; do
    psql "$PG_ADMIN_URL" -qXc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
  done
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# new_pg_db: creates a fresh database; sets DB_NAME and DB_URL.
new_pg_db() {
  DB_NAME="swload_$(date +%s)_$RANDOM"
  psql "$PG_ADMIN_URL" -qXc "CREATE DATABASE $DB_NAME" >/dev/null
  DATABASES+=("$DB_NAME")
  DB_URL="${PG_ADMIN_URL%/*}/$DB_NAME"
}

drop_pg_db() {
  psql "$PG_ADMIN_URL" -qXc "DROP DATABASE IF EXISTS $1 WITH (FORCE)" >/dev/null 2>&1 || true
}

free_port() {
  local p
  while :; do
    p=$((20000 + RANDOM % 40000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then echo "$p"; return; fi
  done
}

# wait_listening NAME PID: waits for "listening on http://..." in $WORK/NAME.out; sets GW_URL.
wait_listening() {
  local name=$1 pid=$2 out="$WORK/$1.out"
  GW_URL=""
  for _ in $(seq 1 300); do
    GW_URL=$(sed -n 's/.*listening on \(http:\/\/[0-9.:]*\).*/\1/p' "$out" 2>/dev/null | head -1)
    [ -n "$GW_URL" ] && break
    kill -0 "$pid" 2>/dev/null || { log "server $name died:"; cat "$WORK/$name.err" >&2; return 1; }
    sleep 0.1
  done
  [ -n "$GW_URL" ] || { log "server $name did not start"; return 1; }
}

# start_gateway NAME DATABASE_URL [REDIS_URL]: sets GW_PID and GW_URL.
start_gateway() {
  local name=$1 db=$2 redis=${3:-}
  local out="$WORK/$name.out"
  # Limits raised for load: the harness's devices and dashboards are many per organisation.
  env HOST=127.0.0.1 PORT=0 DATABASE_URL="$db" JWT_SECRET="$SECRET" RUST_LOG=warn \
    FLUSH_INTERVAL_MS=$FLUSH_MS \
    INGEST_PER_SECOND_PER_KEY=100000 INGEST_PER_SECOND_PER_ORG=100000 \
    MAX_CONNECTIONS_PER_USER=1000 HANDSHAKE_TIMEOUT_SECS=60 \
    WEB_DIR="$WORK/no-web" ${redis:+REDIS_URL="$redis"} ${GATEWAY_ENV:-} \
    "$BIN" serve >"$out" 2>"$WORK/$name.err" &
  GW_PID=$!
  PIDS+=("$GW_PID")
  wait_listening "$name" "$GW_PID"
  log "gateway $name pid $GW_PID at $GW_URL ($db)"
}

# start_reference NAME REF (floor or node): the reference server, same secret and flush
# interval as the gateways, no storage; sets GW_PID and GW_URL.
start_reference() {
  local name=$1 ref=$2
  local cmd=("$FLOOR")
  [ "$ref" = node ] && cmd=(node bench/ref-node/server.mjs)
  env HOST=127.0.0.1 PORT=0 JWT_SECRET="$SECRET" FLUSH_INTERVAL_MS=$FLUSH_MS \
    "${cmd[@]}" >"$WORK/$name.out" 2>"$WORK/$name.err" &
  GW_PID=$!
  PIDS+=("$GW_PID")
  wait_listening "$name" "$GW_PID" || return 1
  log "reference $ref pid $GW_PID at $GW_URL"
}

stop_pid() {
  local pid=$1
  kill -TERM "$pid" 2>/dev/null || return 0
  for _ in $(seq 1 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

# Shows the gateway's warnings and errors of a run, if any (stderr, at most 20 lines).
gateway_log() {
  local f="$WORK/$1.err"
  [ -s "$f" ] && { log "gateway $1 stderr (last lines):"; tail -n 20 "$f" >&2; } || true
}

loadgen() {
  local line
  if line=$("$LOADGEN" --jwt-secret "$SECRET" --flush-interval-ms "$FLUSH_MS" "${QUICK[@]}" "$@" "${EXTRA[@]}"); then
    echo "$line"
    echo "$line" >> "$RESULTS"
  else
    log "loadgen failed: $*"
    STATUS=1
  fi
}

# perf_start NAME PID / perf_stop: profile a gateway while the load runs (PROFILE_DIR set).
perf_start() {
  PERF_PID=""
  [ -n "${PROFILE_DIR:-}" ] || return 0
  mkdir -p "$PROFILE_DIR"
  # Release builds have no frame pointers: unwind with DWARF (.eh_frame), at a modest rate.
  perf record -F "${PERF_FREQ:-199}" --call-graph dwarf,16384 -o "$PROFILE_DIR/$1.perf.data" -p "$2" >/dev/null 2>&1 &
  PERF_PID=$!
}
perf_stop() {
  [ -n "${PERF_PID:-}" ] || return 0
  kill -INT "$PERF_PID" 2>/dev/null || true
  wait "$PERF_PID" 2>/dev/null || true
}

run_sqlite() { # SCENARIO
  local db="$WORK/$1.db"
  start_gateway "$1" "sqlite:$db"
  perf_start "$1" "$GW_PID"
  loadgen --scenario "$1" --url "$GW_URL" --server-pid "$GW_PID" --engine sqlite \
    --verify-cmd "sqlite3 $db 'select count(*) from readings'"
  perf_stop
  stop_pid "$GW_PID"
  gateway_log "$1"
}

# run_reference SCENARIO REF: the scenario with the same loadgen flags against a reference
# server (nothing stored: no --verify-cmd).
run_reference() {
  local name="$1-$2" protocol=socketio
  [ "$2" = floor ] && protocol=raw
  start_reference "$name" "$2" || { STATUS=1; return 0; }
  perf_start "$name" "$GW_PID"
  loadgen --scenario "$1" --url "$GW_URL" --server-pid "$GW_PID" --engine memory \
    --server-name "$2" --protocol "$protocol"
  perf_stop
  stop_pid "$GW_PID"
  gateway_log "$name"
  COMPARED=1
}

# run_compared SCENARIO: sensorwire (SQLite), then each reference.
run_compared() {
  if wants_server sensorwire; then run_sqlite "$1"; COMPARED=1; fi
  for ref in "${REFS[@]}"; do run_reference "$1" "$ref"; done
}

run_postgres() { # SCENARIO NAME
  new_pg_db
  start_gateway "$2" "$DB_URL"
  perf_start "$2" "$GW_PID"
  loadgen --scenario "$1" --url "$GW_URL" --server-pid "$GW_PID" --engine postgres \
    --verify-cmd "psql '$DB_URL' -AtXc 'select count(*) from readings'"
  perf_stop
  stop_pid "$GW_PID"
  gateway_log "$2"
  drop_pg_db "$DB_NAME"
}

run_two_node() {
  # The one-node baseline on the same engine first, then two nodes sharing Redis.
  run_postgres fanout fanout-pg
  new_pg_db
  local port
  port=$(free_port)
  redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no >"$WORK/redis.log" 2>&1 &
  local redis_pid=$!
  PIDS+=("$redis_pid")
  for _ in $(seq 1 50); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
  start_gateway node1 "$DB_URL" "redis://127.0.0.1:$port"
  local pid1=$GW_PID url1=$GW_URL
  start_gateway node2 "$DB_URL" "redis://127.0.0.1:$port"
  local pid2=$GW_PID url2=$GW_URL
  loadgen --scenario two-node --url "$url1,$url2" --server-pid "$pid1,$pid2" --redis-pid "$redis_pid" \
    --engine postgres --baseline "$RESULTS" \
    --verify-cmd "psql '$DB_URL' -AtXc 'select count(*) from readings'"
  stop_pid "$pid1"
  stop_pid "$pid2"
  stop_pid "$redis_pid"
  gateway_log node1
  gateway_log node2
  drop_pg_db "$DB_NAME"
}

COMPARED=0
IFS=',' read -ra WANT <<< "$SCENARIOS"
for s in "${WANT[@]}"; do
  case "$s" in
    idle) run_compared idle ;;
    fanout) run_compared fanout ;;
    ingest) run_sqlite ingest; run_postgres ingest ingest-pg ;;
    two-node) run_two_node ;;
    *) log "unknown scenario $s (idle, fanout, ingest, two-node)"; STATUS=2 ;;
  esac
done

# sensorwire's idle and fanout figures as ratios to the references' of this run.
if [ "$COMPARED" = 1 ] && wants_server sensorwire && [ "${#REFS[@]}" -gt 0 ]; then
  loadgen --scenario compare --baseline "$RESULTS"
fi

[ -n "$OUT" ] && cp "$RESULTS" "$OUT"
exit "$STATUS"
