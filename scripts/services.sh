#!/usr/bin/env bash
# Make sure the local PostgreSQL, Redis and RabbitMQ the tests talk to are running (127.0.0.1).
# Starts whichever is down with the commands from the platform notes; SeaweedFS is started by
# the test fixtures themselves.
set -uo pipefail

up() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_for() {  # name port seconds
  local i
  for ((i = 0; i < $3 * 2; i++)); do up "$2" && return 0; sleep 0.5; done
  echo "services: $1 did not come up on port $2" >&2
  return 1
}

status=0
if ! up 5432; then
  echo "services: starting PostgreSQL"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n 1)" main start || true
  wait_for PostgreSQL 5432 30 || status=1
fi
if ! up 6379; then
  echo "services: starting Redis"
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log || true
  wait_for Redis 6379 30 || status=1
fi
if ! up 5672; then
  echo "services: starting RabbitMQ"
  rabbitmq-server -detached || true
  wait_for RabbitMQ 5672 90 || status=1
fi
exit $status
