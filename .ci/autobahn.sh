#!/usr/bin/env bash
# WebSocket conformance: runs Autobahn|Testsuite's fuzzingclient against Pigeon's test-only
# echo route (/echo, same tungstenite settings as real sessions) and fails on any case
# whose behavior is not OK / NON-STRICT / INFORMATIONAL / UNIMPLEMENTED.
#
# Usage: bash .ci/autobahn.sh [PATH_TO_PIGEON_BINARY]
#   The binary must be built with the cargo feature `echo` (the one `cargo test` builds
#   is; `cargo build --release` leaves /echo out and refuses echo_route). Without an
#   argument it builds a debug binary with it (CARGO_TARGET_DIR is honoured).
# Needs: Python 2.7 (autobahntestsuite is Python 2 code; the pyenv 2.7.18 of the image,
#   or AUTOBAHN_PYTHON=/path/to/python2.7), python3, network access to PyPI on first run.
#   The virtualenv is cached in .venv-autobahn; the report is left in
#   ${AUTOBAHN_OUT:-target/autobahn}/reports.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

# ---- Python 2.7 ---------------------------------------------------------------------
PY2=${AUTOBAHN_PYTHON:-}
if [ -z "$PY2" ]; then
    for c in "$HOME/.pyenv/versions/2.7.18/bin/python" python2.7 python2; do
        if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; assert sys.version_info[:2] == (2, 7)' 2>/dev/null; then
            PY2=$(command -v "$c")
            break
        fi
    done
fi
if [ -z "$PY2" ]; then
    {
        echo "################################################################"
        echo "## AUTOBAHN: Python 2.7 NOT FOUND - CONFORMANCE TESTS NOT RUN  ##"
        echo "## autobahntestsuite needs Python 2.7 (pyenv install 2.7.18,   ##"
        echo "## or set AUTOBAHN_PYTHON=/path/to/python2.7).                 ##"
        echo "################################################################"
    } >&2
    exit 2
fi
echo "== autobahn: python 2.7 is $PY2"

# ---- virtualenv with the suite's pinned dependencies --------------------------------
# autobahntestsuite 25.10.1's requires.txt, verbatim (pinned for Python 2.7 / Autobahn 0.10.9).
SUITE_VERSION=25.10.1
REQUIREMENTS=(
    'setuptools==44.0.0' 'txaio==2.1.0' 'incremental==16.10.1' 'pyOpenSSL==19.1.0'
    'cryptography==3.3.2' 'Twisted==19.10.0' 'zope.interface==4.6.0' 'jinja2==2.11.3'
    'markupsafe==1.1.1' 'Werkzeug==1.0.1' 'klein==17.10.0' 'service_identity==18.1.0'
    'unittest2==1.1.0' 'six==1.16.0' 'autobahn[accelerate,twisted]==0.10.9'
)
VENV=$ROOT/.venv-autobahn
STAMP="$VENV/.pigeon-ok-$SUITE_VERSION"
if [ ! -f "$STAMP" ]; then
    echo "== autobahn: creating $VENV (a few minutes, once)"
    if ! "$PY2" -m virtualenv --version >/dev/null 2>&1; then
        "$PY2" -m pip install --disable-pip-version-check -q 'virtualenv<20.22'
    fi
    rm -rf "$VENV"
    "$PY2" -m virtualenv -q "$VENV"
    export PYTHONWARNINGS=ignore
    "$VENV/bin/python" -m pip install --disable-pip-version-check -q "${REQUIREMENTS[@]}"
    "$VENV/bin/python" -m pip install --disable-pip-version-check -q --no-deps \
        "autobahntestsuite==$SUITE_VERSION"
    touch "$STAMP"
fi
WSTEST=$VENV/bin/wstest

# ---- Pigeon --------------------------------------------------------------------------
if [ $# -ge 1 ]; then
    PIGEON=$(realpath "$1")
else
    echo "== autobahn: building pigeon (debug, --features echo)"
    cargo build --bin pigeon --features echo
    PIGEON=${CARGO_TARGET_DIR:-$ROOT/target}/debug/pigeon
fi
[ -x "$PIGEON" ] || { echo "autobahn: no pigeon binary at $PIGEON" >&2; exit 2; }

OUT=${AUTOBAHN_OUT:-$ROOT/target/autobahn}
rm -rf "$OUT"
mkdir -p "$OUT"
DATA=$(mktemp -d)
PID=
cleanup() {
    if [ -n "$PID" ]; then kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; fi
    rm -rf "$DATA"
}
trap cleanup EXIT

PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# Autobahn's 9.* cases send messages up to 16 MiB: allow 32 MiB (the blob relay
# window must be at least the message limit and the write buffer limit above it, or the
# config is refused).
PIGEON_SERVER_ECHO_ROUTE=true \
    PIGEON_LIMITS_MAX_MESSAGE_BYTES=33554432 \
    PIGEON_LIMITS_BLOB_RELAY_BYTES=33554432 \
    PIGEON_WEBSOCKET_MAX_WRITE_BUFFER_BYTES=67108864 \
    PIGEON_LOG_LEVEL=${PIGEON_LOG_LEVEL:-warn} \
    "$PIGEON" serve --bind "127.0.0.1:$PORT" --data-dir "$DATA" >"$OUT/pigeon.log" 2>&1 &
PID=$!
for _ in $(seq 100); do
    if python3 -c "import socket; socket.create_connection(('127.0.0.1', $PORT), 1)" 2>/dev/null; then
        break
    fi
    kill -0 "$PID" 2>/dev/null || { cat "$OUT/pigeon.log" >&2; echo "autobahn: pigeon did not start" >&2; exit 1; }
    sleep 0.1
done
echo "== autobahn: pigeon $PIGEON on port $PORT"

# 12.* and 13.* need permessage-deflate, which Pigeon does not negotiate.
cat >"$OUT/spec.json" <<EOF
{
    "outdir": "$OUT/reports",
    "servers": [{"agent": "pigeon", "url": "ws://127.0.0.1:$PORT/echo"}],
    "cases": ["*"],
    "exclude-cases": ["12.*", "13.*"],
    "exclude-agent-cases": {}
}
EOF

echo "== autobahn: wstest -m fuzzingclient (takes a few minutes)"
(cd "$OUT" && PYTHONWARNINGS=ignore "$WSTEST" -m fuzzingclient -s spec.json) >"$OUT/wstest.log" 2>&1 || {
    tail -30 "$OUT/wstest.log" >&2
    echo "autobahn: wstest itself failed" >&2
    exit 1
}
if ! kill -0 "$PID" 2>/dev/null; then
    cat "$OUT/pigeon.log" >&2
    echo "autobahn: PIGEON DIED during the run" >&2
    exit 1
fi

# ---- verdict: wstest always exits 0, the report decides -----------------------------
python3 - "$OUT/reports/index.json" <<'EOF'
import collections, json, sys

ok = {"OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED"}
with open(sys.argv[1]) as f:
    index = json.load(f)

def case_key(case_id):
    return [int(p) if p.isdigit() else p for p in case_id.split(".")]

counts = collections.Counter()
close_counts = collections.Counter()
failed = []
for agent, cases in sorted(index.items()):
    for case_id in sorted(cases, key=case_key):
        r = cases[case_id]
        counts[r["behavior"]] += 1
        close_counts[r["behaviorClose"]] += 1
        if r["behavior"] not in ok:
            failed.append((agent, case_id, r["behavior"], r["behaviorClose"]))
        elif r["behaviorClose"] not in ok:
            print("  note: %s %s behavior=%s but behaviorClose=%s"
                  % (agent, case_id, r["behavior"], r["behaviorClose"]))
total = sum(counts.values())
print("autobahn: %d cases" % total)
print("  behavior:      " + ", ".join("%s=%d" % kv for kv in sorted(counts.items())))
print("  behaviorClose: " + ", ".join("%s=%d" % kv for kv in sorted(close_counts.items())))
if total == 0:
    print("AUTOBAHN FAILED: the report lists no case")
    sys.exit(1)
if failed:
    print("AUTOBAHN FAILED: %d case(s):" % len(failed))
    for agent, case_id, b, bc in failed:
        print("  %s %s behavior=%s behaviorClose=%s" % (agent, case_id, b, bc))
    sys.exit(1)
print("autobahn: all cases pass")
EOF
