#!/usr/bin/env bash
# Start the HH reward server in the background and wait until it is ready.
#
#   HH_REWARD_MODEL_PATH=/path/to/reward_model bash experiments/hh/reward/run_with_server.sh [server flags...]
#
# Environment (all optional but the model):
#   HH_REWARD_MODEL_PATH   trained reward model directory (or pass --model DIR among the flags)
#   REWARD_SERVER_HOST     bind address, default 127.0.0.1 (use 0.0.0.0 only on a trusted network, with a token)
#   REWARD_SERVER_PORT     default 8888
#   REWARD_SERVER_TOKEN    bearer token the server will require (read from the environment, not the command line;
#                          a --token among the flags is moved there, so it is neither logged nor in `ps`)
#   REWARD_SERVER_LOG_DIR  where the log and pid files go, default ./logs
#   HEALTH_TIMEOUT         seconds to wait for GET /health to say ready, default 900 (a 7B model loads slowly)
#   PYTHON                 interpreter with verl_tre installed, default python
# Extra arguments go to `python -m verl_tre.reward_server` (e.g. --devices cuda:0,cuda:1 --max-length 4096).
# On success prints the URL, PID and log path and exits 0, leaving the server running (stop it: kill PID).
# On failure stops what it started, prints the log's tail and exits non-zero. The log and pid files are
# readable by their owner only.
set -euo pipefail
umask 077

ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --token) [ $# -ge 2 ] || { echo "--token needs a value" >&2; exit 2; }; export REWARD_SERVER_TOKEN="$2"; shift 2 ;;
    --token=*) export REWARD_SERVER_TOKEN="${1#--token=}"; shift ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
set -- ${ARGS[@]+"${ARGS[@]}"}

HOST="${REWARD_SERVER_HOST:-127.0.0.1}"
PORT="${REWARD_SERVER_PORT:-8888}"
LOG_DIR="${REWARD_SERVER_LOG_DIR:-logs}"
TIMEOUT="${HEALTH_TIMEOUT:-900}"
PYTHON="${PYTHON:-python}"
LOG="$LOG_DIR/reward_server_$PORT.log"
PID_FILE="$LOG_DIR/reward_server_$PORT.pid"
CHECK_HOST="$HOST"
[ "$HOST" = "0.0.0.0" ] && CHECK_HOST=127.0.0.1
BASE="http://$CHECK_HOST:$PORT"

mkdir -p "$LOG_DIR"
touch "$LOG" && chmod 600 "$LOG"  # an older log may have been created under a wider umask
# Refuse a busy port: a server already answering there would pass the health check below for ours.
if ! "$PYTHON" -c "import socket, sys; sys.exit(socket.socket().connect_ex(('$CHECK_HOST', $PORT)) == 0)"; then
  echo "port $PORT on $HOST is already in use (another reward server? see $PID_FILE); set REWARD_SERVER_PORT" >&2
  exit 2
fi

echo "==== $(date -u +%FT%TZ) starting: $PYTHON -m verl_tre.reward_server --host $HOST --port $PORT $*" >>"$LOG"
nohup "$PYTHON" -m verl_tre.reward_server --host "$HOST" --port "$PORT" "$@" >>"$LOG" 2>&1 &
PID=$!
echo "$PID" >"$PID_FILE"

fail() {
  echo "reward server failed: $1" >&2
  kill "$PID" 2>/dev/null || true
  rm -f "$PID_FILE"
  echo "---- last lines of $LOG ----" >&2
  tail -n 40 "$LOG" >&2
  exit 1
}

# Poll /health (no proxy for this machine) until it says ready, the process dies, or the timeout passes.
"$PYTHON" -m verl_tre.reward_server.check "$BASE" --timeout "$TIMEOUT" --pid "$PID" >/dev/null \
  || fail "not ready (see above)"

echo "reward server ready"
echo "  URL: $BASE/predict   (export REWARD_SERVER_URL=$BASE/predict)"
echo "  PID: $PID            (stop: kill $PID)"
echo "  log: $LOG"
