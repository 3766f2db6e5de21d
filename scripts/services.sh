#!/usr/bin/env bash
# Start the local servers the tests use if they are down: PostgreSQL and Redis (and
# MariaDB and RabbitMQ when they are installed). Waits until each answers; fails if one never does.
set -euo pipefail

wait_for() {  # wait_for NAME COMMAND...
    local name=$1; shift
    for _ in $(seq 1 60); do
        if "$@" >/dev/null 2>&1; then echo "services: $name is up"; return 0; fi
        sleep 1
    done
    echo "services: $name did not come up" >&2
    return 1
}

if ! pg_isready -q -h 127.0.0.1 -p 5432; then
    echo "services: starting PostgreSQL"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n 1)" main start
fi
wait_for PostgreSQL pg_isready -q -h 127.0.0.1 -p 5432

if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
    echo "services: starting Redis"
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" \
        --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log
fi
wait_for Redis redis-cli -h 127.0.0.1 -p 6379 ping

if command -v mariadbd >/dev/null 2>&1 || [ -x /usr/sbin/mariadbd ]; then
    if ! mysqladmin -h 127.0.0.1 -u root ping >/dev/null 2>&1; then
        echo "services: starting MariaDB"
        start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd
    fi
    wait_for MariaDB mysqladmin -h 127.0.0.1 -u root ping
fi

if command -v rabbitmq-server >/dev/null 2>&1; then
    if ! rabbitmqctl -q status >/dev/null 2>&1; then
        echo "services: starting RabbitMQ"
        rabbitmq-server -detached
    fi
    wait_for RabbitMQ rabbitmqctl -q status
fi
