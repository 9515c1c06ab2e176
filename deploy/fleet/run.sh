#!/usr/bin/env bash
# A local fleet: REPLICAS crossrank processes on loopback behind HAProxy (deploy/fleet/haproxy.cfg).
#
#   deploy/fleet/run.sh up         start the replicas and the balancer; returns once the balancer
#                                  answers /ready
#   deploy/fleet/run.sh down       stop them all (each replica drains first)
#   deploy/fleet/run.sh restart    rolling restart: one replica at a time, taken out of rotation
#                                  (HAProxy drain), stopped with SIGTERM (it answers what it holds),
#                                  started again, waited for until ready, put back
#   deploy/fleet/run.sh kill I     SIGKILL replica I (0-based); `restart` brings it back
#
# Environment: REPLICAS (3), PORT (8080: the balancer's; replica i listens on PORT+1+i, the admin
# socket on PORT+1+REPLICAS), MODEL (models/crossrank-minilm-l6), PYTHON (.venv/bin/python),
# FLEET_DIR (logs, pids and the generated config; /tmp/crossrank-fleet-PORT). CROSSRANK_*
# variables reach every replica (e.g. CROSSRANK_THREADS, default 1 here: the replicas share the
# machine's cores).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
REPLICAS="${REPLICAS:-3}"
PORT="${PORT:-8080}"
MODEL="${MODEL:-$ROOT/models/crossrank-minilm-l6}"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
FLEET_DIR="${FLEET_DIR:-/tmp/crossrank-fleet-$PORT}"
ADMIN_PORT=$((PORT + 1 + REPLICAS))
export CROSSRANK_THREADS="${CROSSRANK_THREADS:-1}"
# The balancer stops sending to a replica before it is told to stop: no delay is needed to let
# routes converge, as a Kubernetes endpoint update needs.
export CROSSRANK_DRAIN_DELAY_S="${CROSSRANK_DRAIN_DELAY_S:-0}"
export CROSSRANK_LOG_FORMAT="${CROSSRANK_LOG_FORMAT:-json}"

replica_port() { echo $((PORT + 1 + $1)); }

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

wait_ready() { # URL SECONDS
  local deadline=$((SECONDS + $2))
  until [ "$(curl -s -o /dev/null -w '%{http_code}' "$1/ready")" = 200 ]; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "not ready within $2 s: $1" >&2
      return 1
    fi
    sleep 0.2
  done
}

admin() { # a command to HAProxy's runtime API
  exec 3<>"/dev/tcp/127.0.0.1/$ADMIN_PORT"
  echo "$1" >&3
  cat <&3 >/dev/null
  exec 3<&-
}

start_replica() {
  local i="$1"
  "$PYTHON" -m crossrank.cli serve --model "$MODEL" --host 127.0.0.1 \
    --port "$(replica_port "$i")" >>"$FLEET_DIR/replica-$i.log" 2>&1 &
  echo $! >"$FLEET_DIR/replica-$i.pid"
}

stop_replica() { # SIGTERM, then wait for the drain and exit
  local pidfile="$FLEET_DIR/replica-$1.pid"
  if alive "$pidfile"; then
    local pid
    pid="$(cat "$pidfile")"
    kill -TERM "$pid"
    while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
  fi
  rm -f "$pidfile"
}

up() {
  mkdir -p "$FLEET_DIR"
  for ((i = 0; i < REPLICAS; i++)); do
    alive "$FLEET_DIR/replica-$i.pid" || start_replica "$i"
  done
  {
    cat "$ROOT/deploy/fleet/haproxy.cfg"
    for ((i = 0; i < REPLICAS; i++)); do
      echo "    server r$i 127.0.0.1:$(replica_port "$i") check"
    done
  } >"$FLEET_DIR/haproxy.cfg"
  if ! alive "$FLEET_DIR/haproxy.pid"; then
    FLEET_BIND="127.0.0.1:$PORT" FLEET_ADMIN="ipv4@127.0.0.1:$ADMIN_PORT" \
      haproxy -D -f "$FLEET_DIR/haproxy.cfg" -p "$FLEET_DIR/haproxy.pid"
  fi
  for ((i = 0; i < REPLICAS; i++)); do
    wait_ready "http://127.0.0.1:$(replica_port "$i")" 300
  done
  wait_ready "http://127.0.0.1:$PORT" 30
}

down() {
  if alive "$FLEET_DIR/haproxy.pid"; then
    kill "$(cat "$FLEET_DIR/haproxy.pid")"
  fi
  rm -f "$FLEET_DIR/haproxy.pid"
  for ((i = 0; i < REPLICAS; i++)); do
    stop_replica "$i" &
  done
  wait
}

restart() {
  for ((i = 0; i < REPLICAS; i++)); do
    admin "set server crossrank/r$i state drain"
    # The balancer sends nothing new once drained; what it sent is answered by the replica's
    # own drain on SIGTERM.
    sleep 0.2
    stop_replica "$i"
    start_replica "$i"
    wait_ready "http://127.0.0.1:$(replica_port "$i")" 300
    admin "set server crossrank/r$i state ready"
    # Back in rotation once its health checks pass again (rise 2 x inter).
    wait_ready "http://127.0.0.1:$PORT" 30
    sleep 1.2
  done
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  restart) restart ;;
  kill) kill -KILL "$(cat "$FLEET_DIR/replica-${2:?kill needs a replica number}.pid")" ;;
  *)
    echo "usage: $0 up | down | restart | kill I" >&2
    exit 2
    ;;
esac
