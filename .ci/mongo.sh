#!/usr/bin/env bash
# Starts/stops a throwaway MongoDB-wire-protocol server for Pigeon's MongoDB tests.
#
# No real mongod can be installed on the project's machines, so the tests run against
# nx-27017 (PyPI), a MongoDB wire-protocol server in Python that reports MongoDB 7.0.
#
#   eval "$(bash .ci/mongo.sh start)"   # exports PIGEON_TEST_MONGODB_URI
#   cargo test --test store_conformance --test mongo_server
#   bash .ci/mongo.sh stop
#
# Everything but the final `export ...` line goes to stderr, so `eval` is safe.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv-mongo"
STATE="${PIGEON_MONGO_STATE_DIR:-$ROOT/.venv-mongo/run}"
PID_FILE="$STATE/nx-27017.pid"
LOG_FILE="$STATE/nx-27017.log"
NX_VERSION="0.8.1"

log() { echo "mongo.sh: $*" >&2; }

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

wait_port() {
    local port=$1 tries=100
    while ! python3 -c "import socket,sys; s=socket.socket(); s.settimeout(0.2); sys.exit(s.connect_ex(('127.0.0.1',$port)))" 2>/dev/null; do
        tries=$((tries - 1))
        if [ "$tries" -le 0 ]; then
            return 1
        fi
        sleep 0.1
    done
}

start() {
    local installed=""
    if [ -x "$VENV/bin/pip" ]; then
        installed=$("$VENV/bin/pip" show nx-27017 2>/dev/null | sed -n 's/^Version: //p' || true)
    fi
    if [ ! -x "$VENV/bin/nx-27017" ] || [ "$installed" != "$NX_VERSION" ]; then
        log "installing nx-27017==$NX_VERSION into $VENV"
        python3 -m venv "$VENV" >&2
        "$VENV/bin/pip" install -q --disable-pip-version-check "nx-27017==$NX_VERSION" >&2
    fi
    mkdir -p "$STATE"
    if [ -f "$PID_FILE" ] && kill -0 "$(cat "$PID_FILE")" 2>/dev/null; then
        log "stopping the previous nx-27017 (pid $(cat "$PID_FILE"))"
        stop
    fi
    local port
    port=$(free_port)
    # In memory: nothing to clean up, and every test uses a database name of its own.
    nohup "$VENV/bin/nx-27017" --db memory --host 127.0.0.1 -p "$port" \
        --log-file "$LOG_FILE" --pid-file "$PID_FILE" >>"$LOG_FILE.out" 2>&1 &
    local pid=$!
    if ! wait_port "$port"; then
        log "nx-27017 did not open port $port within 10 s; log follows"
        tail -n 30 "$LOG_FILE" "$LOG_FILE.out" >&2 || true
        kill "$pid" 2>/dev/null || true
        exit 1
    fi
    # nx-27017 writes its own pid file (and refuses to start if one names a live process).
    [ -f "$PID_FILE" ] || echo "$pid" >"$PID_FILE"
    log "nx-27017 listening on 127.0.0.1:$port (pid $pid, log $LOG_FILE)"
    echo "export PIGEON_TEST_MONGODB_URI=mongodb://127.0.0.1:$port"
}

stop() {
    if [ ! -f "$PID_FILE" ]; then
        log "not running (no $PID_FILE)"
        return 0
    fi
    local pid
    pid=$(cat "$PID_FILE")
    if kill "$pid" 2>/dev/null; then
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -9 "$pid" 2>/dev/null || true
        log "stopped nx-27017 (pid $pid)"
    fi
    rm -f "$PID_FILE"
}

case "${1:-}" in
start) start ;;
stop) stop ;;
*)
    echo "usage: $0 start|stop" >&2
    exit 2
    ;;
esac
