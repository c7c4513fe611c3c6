#!/bin/bash
# Container HEALTHCHECK: GET /v2/health/ready (KServe OIP v2) on the local port, healthy on HTTP 200.
# Plain bash (/dev/tcp), so the image needs no curl or wget.
port=${LORKD_PORT:-8080}
host=127.0.0.1
case "${LORKD_HOST:-}" in ::1|\[::1\]) host=::1 ;; esac
exec 3<>"/dev/tcp/$host/$port" || exit 1
printf 'GET /v2/health/ready HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n' >&3
IFS= read -r -t 3 status <&3 || exit 1
case "$status" in "HTTP/1."?" 200"*) exit 0 ;; *) echo "not ready: $status"; exit 1 ;; esac
