#!/usr/bin/env bash
# Local stand-ins for every image Postroom's Dockerfile and docker-compose.yml name, for a
# machine with no image registry (only Debian's mirror and PyPI reachable), then the
# project's own image built from them, and the compose stack's smoke test (`make compose-test`).
# Adapted from our workplace's shared docker-standins.sh tool: the project is
# exported from the working tree at every build (not a clone made once), a stand-in image that
# exists is kept (REBUILD=1 builds it again), host ports come from docker-compose.yml's
# variables, and the smoke test sends through the stack, on Redis and on RabbitMQ.
#
# Run from the project's root (it copies the project from there):
#   bash .ci/docker-standins.sh                 # dockerd if none answers, stand-ins, postroom:local
#   bash .ci/docker-standins.sh debian python redis prometheus flower rabbitmq postroom   # some
#   bash .ci/docker-standins.sh test            # `make compose-test`: the images, then up + smoke
#                                               # test + down, on Redis and (unless SKIP_RABBITMQ=1)
#                                               # on RabbitMQ
#   bash .ci/docker-standins.sh up              # the stack (Redis broker) + smoke test; `down` after
#   bash .ci/docker-standins.sh up-rabbitmq     # the same with --profile rabbitmq
#   bash .ci/docker-standins.sh down            # down -v (images kept)
# Host ports: POSTROOM_HTTP_PORT, POSTROOM_METRICS_PORT, POSTROOM_PROMETHEUS_PORT and
# POSTROOM_FLOWER_PORT (docker-compose.yml's variables; here 18425, 19464, 19090 and 15555 by
# default, so that a `postroom up` on this machine does not clash). COMPOSE_PROJECT names the
# stack (postroom-compose-test). Then `export DOCKER_HOST=unix://$WORK/docker.sock` to use
# docker / docker-compose yourself.
#
# Images made (tagged with the names the project uses; NONE is the official image):
#   debian:bookworm-slim               debootstrap --variant=minbase bookworm, imported
#   python:3.11.7-slim-bookworm        Debian's python3 (3.11.2!) + venv + pip, links in /usr/local/bin
#   redis:7.2.5-bookworm               Debian's redis-server (7.0.x!), official-like entrypoint
#   prom/prometheus:v2.53.0            Debian's prometheus (2.42!), official CMD/user/paths
#   mher/flower:2.0.1                  flower==2.0.1 from PyPI on the python stand-in (Debian, not Alpine)
#   rabbitmq:3.13.7-management-alpine  Debian's rabbitmq-server (3.10.x!) + management plugin
# The daemon here runs with --bridge=none, so every build uses --network host.
set -euo pipefail

WORK=${WORK:-${TMPDIR:-/tmp}/postroom-images}
export DOCKER_HOST=${DOCKER_HOST:-unix://$WORK/docker.sock}
POSTROOM=${POSTROOM:-$WORK/compose-test-src}  # the project as built: SRC's working tree, exported anew
SRC=${SRC:-$(pwd)}
mkdir -p "$WORK"
# A Docker daemon of our own when none answers: no bridge and no iptables changes (builds use the
# host's network; compose's own networks still work), its data under $WORK.
if ! docker info >/dev/null 2>&1; then
    command -v dockerd >/dev/null || { apt-get update && apt-get install -y docker.io docker-compose; }
    setsid dockerd --iptables=false --ip6tables=false --ip-forward=false --bridge=none \
        --data-root "$WORK/root" --exec-root "$WORK/exec" -H "$DOCKER_HOST" --pidfile "$WORK/dockerd.pid" \
        >"$WORK/dockerd.log" 2>&1 < /dev/null &
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
    docker info >/dev/null 2>&1 || { echo "dockerd did not start; see $WORK/dockerd.log" >&2; exit 1; }
fi
# Debian mirrors: the ones this machine's apt uses (override with MIRROR / SECURITY_MIRROR)
_apt_uri() { grep -h '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' | grep -E "$1" | head -n 1; }
MIRROR=${MIRROR:-$(_apt_uri '/debian$')}
SECURITY_MIRROR=${SECURITY_MIRROR:-$(_apt_uri 'debian-security$')}
# Extra CA certificates (a TLS-inspecting egress proxy's) that pip inside the images must trust
# to reach PyPI. Empty or missing: none added, and pip uses its own bundle as usual.
EXTRA_CA_DIR=${EXTRA_CA_DIR:-/usr/local/share/ca-certificates}
PY_TAG=python:3.11.7-slim-bookworm
BUILD=(docker build --network host)
[ -z "${NOCACHE:-}" ] || BUILD+=(--no-cache)

log() { printf '\n=== %s\n' "$*" >&2; }

make_debian() {
    log "debian:bookworm-slim from debootstrap"
    command -v debootstrap >/dev/null || { apt-get update && apt-get install -y debootstrap; }
    local rootfs=$WORK/rootfs
    if [ ! -x "$rootfs/usr/bin/apt-get" ]; then
        rm -rf "$rootfs"
        debootstrap --variant=minbase bookworm "$rootfs" "$MIRROR"
    fi
    # what the official slim image has: the three suites in deb822 form, no caches, no lists,
    # docs/man/locales left out by dpkg, apt cleaning after itself
    rm -f "$rootfs/etc/apt/sources.list"
    cat >"$rootfs/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $MIRROR
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $SECURITY_MIRROR
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    cat >"$rootfs/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
    echo 'Acquire::Languages "none";' >"$rootfs/etc/apt/apt.conf.d/docker-no-languages"
    cat >"$rootfs/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
EOF
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/tmp/* \
           "$rootfs"/var/log/*.log "$rootfs"/var/log/apt/* "$rootfs"/etc/machine-id
    : >"$rootfs/etc/resolv.conf"
    echo localhost >"$rootfs/etc/hostname"
    tar --numeric-owner -C "$rootfs" -c . |
        docker import --change 'CMD ["bash"]' --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
            - debian:bookworm-slim
}

make_python() {
    log "$PY_TAG from Debian's python3"
    local ctx=$WORK/standins/python
    rm -rf "$ctx"; mkdir -p "$ctx/ca"
    if [ -d "$EXTRA_CA_DIR" ]; then cp "$EXTRA_CA_DIR"/*.crt "$ctx/ca/" 2>/dev/null || true; fi
    cat >"$ctx/Dockerfile" <<'EOF'
FROM debian:bookworm-slim
ENV LANG=C.UTF-8
# the official slim image's runtime packages (ca-certificates netbase tzdata) + Debian's 3.11
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates netbase tzdata \
      python3 python3-venv python3-pip \
 && rm -rf /var/lib/apt/lists/* \
 && rm -f /usr/lib/python3*/EXTERNALLY-MANAGED \
 && for n in python python3 python3.11; do ln -s /usr/bin/python3.11 /usr/local/bin/$n; done \
 && for n in pip pip3 pip3.11; do ln -s /usr/bin/pip3 /usr/local/bin/$n; done \
 && for n in pydoc pydoc3; do ln -s /usr/bin/pydoc3 /usr/local/bin/$n; done
# extra CAs (an egress proxy's) for pip; /etc/pip.conf makes every pip, venvs' too, use the
# system bundle instead of its own certifi copy. The official image has neither.
COPY ca/ /usr/local/share/ca-certificates/
RUN update-ca-certificates \
 && if ls /usr/local/share/ca-certificates/*.crt >/dev/null 2>&1; then \
      printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' > /etc/pip.conf; fi
ENV PYTHON_VERSION=3.11-debian
CMD ["python3"]
EOF
    "${BUILD[@]}" -t "$PY_TAG" "$ctx"
}

make_redis() {
    log "redis:7.2.5-bookworm from Debian's redis-server"
    local ctx=$WORK/standins/redis
    rm -rf "$ctx"; mkdir -p "$ctx"
    cat >"$ctx/entrypoint.sh" <<'EOF'
#!/bin/sh
# Behaves like the official image's entrypoint for what compose gives it: an option or a
# .conf first means redis-server; as root, own the data directory and drop to user redis.
set -e
case "$1" in -*|*.conf) set -- redis-server "$@";; esac
if [ "$1" = redis-server ] && [ "$(id -u)" = 0 ]; then
    find . \! -user redis -exec chown redis '{}' +
    exec setpriv --reuid=redis --regid=redis --init-groups "$0" "$@"
fi
if [ "$1" = redis-server ]; then
    # the official image builds Redis with protected mode off by default (clients from other
    # containers need no password); Debian's binary has it on when given no config file
    case "${2:-}" in *.conf) ;; *) set -- "$@" --protected-mode no;; esac
fi
umask 0077
exec "$@"
EOF
    cat >"$ctx/Dockerfile" <<'EOF'
FROM debian:bookworm-slim
# same uid/gid as the official image (999)
RUN groupadd -r -g 999 redis && useradd -r -g redis -u 999 -d /data redis \
 && apt-get update && apt-get install -y --no-install-recommends redis-server redis-tools \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir /data && chown redis:redis /data
COPY entrypoint.sh /usr/local/bin/docker-entrypoint.sh
RUN chmod 755 /usr/local/bin/docker-entrypoint.sh
VOLUME /data
WORKDIR /data
EXPOSE 6379
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["redis-server"]
EOF
    "${BUILD[@]}" -t redis:7.2.5-bookworm "$ctx"
}

make_prometheus() {
    log "prom/prometheus:v2.53.0 from Debian's prometheus"
    local ctx=$WORK/standins/prometheus
    rm -rf "$ctx"; mkdir -p "$ctx"
    cat >"$ctx/Dockerfile" <<'EOF'
FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends prometheus \
 && rm -rf /var/lib/apt/lists/* \
 && test -x /bin/prometheus \
 && mkdir -p /prometheus /usr/share/prometheus \
 && for d in console_libraries consoles; do \
      [ -e /usr/share/prometheus/$d ] || ln -s /etc/prometheus/$d /usr/share/prometheus/$d; done \
 && chown -R nobody:nogroup /prometheus /etc/prometheus
USER nobody
EXPOSE 9090
VOLUME ["/prometheus"]
WORKDIR /prometheus
ENTRYPOINT ["/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus", \
     "--web.console.libraries=/usr/share/prometheus/console_libraries", \
     "--web.console.templates=/usr/share/prometheus/consoles"]
EOF
    "${BUILD[@]}" -t prom/prometheus:v2.53.0 "$ctx"
}

make_flower() {
    log "mher/flower:2.0.1 from PyPI on the python stand-in"
    local ctx=$WORK/standins/flower
    rm -rf "$ctx"; mkdir -p "$ctx"
    cat >"$ctx/Dockerfile" <<EOF
FROM $PY_TAG
# kombu[redis] (via celery[redis]) brings packaging, which kombu 5.7 needs for its Redis transport
RUN pip install --no-cache-dir "celery[redis]" flower==2.0.1
ENV PYTHONUNBUFFERED=1 PYTHONHASHSEED=random PYTHONDONTWRITEBYTECODE=1 \\
    FLOWER_DATA_DIR=/data PYTHONPATH=/data
RUN groupadd -g 1000 flower && useradd -u 1000 -g flower -m flower \\
 && mkdir -p /data && chown flower:flower /data
WORKDIR /data
USER flower
VOLUME /data
EXPOSE 5555
CMD ["celery", "flower"]
EOF
    "${BUILD[@]}" -t mher/flower:2.0.1 "$ctx"
}

make_rabbitmq() {
    log "rabbitmq:3.13.7-management-alpine from Debian's rabbitmq-server"
    local ctx=$WORK/standins/rabbitmq
    rm -rf "$ctx"; mkdir -p "$ctx"
    cat >"$ctx/entrypoint.sh" <<'EOF'
#!/bin/sh
# RABBITMQ_DEFAULT_USER/PASS/VHOST as the official image honours them, then the server as
# user rabbitmq (Debian's wrapper scripts switch user themselves).
set -e
conf=/etc/rabbitmq/conf.d/10-defaults.conf
mkdir -p /etc/rabbitmq/conf.d
{
    echo 'loopback_users.guest = false'
    echo 'listeners.tcp.default = 5672'
    echo 'management.tcp.port = 15672'
    [ -n "${RABBITMQ_DEFAULT_USER:-}" ] && echo "default_user = $RABBITMQ_DEFAULT_USER"
    [ -n "${RABBITMQ_DEFAULT_PASS:-}" ] && echo "default_pass = $RABBITMQ_DEFAULT_PASS"
    [ -n "${RABBITMQ_DEFAULT_VHOST:-}" ] && echo "default_vhost = $RABBITMQ_DEFAULT_VHOST"
} >"$conf"
chown -R rabbitmq:rabbitmq /var/lib/rabbitmq /etc/rabbitmq
exec "$@"
EOF
    cat >"$ctx/Dockerfile" <<'EOF'
FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends rabbitmq-server \
 && rm -rf /var/lib/apt/lists/* \
 && rabbitmq-plugins enable --offline rabbitmq_management \
 && chown -R rabbitmq:rabbitmq /var/lib/rabbitmq /etc/rabbitmq
COPY entrypoint.sh /usr/local/bin/docker-entrypoint.sh
RUN chmod 755 /usr/local/bin/docker-entrypoint.sh
ENV RABBITMQ_LOGS=- HOME=/var/lib/rabbitmq
VOLUME /var/lib/rabbitmq
EXPOSE 4369 5671 5672 15672 25672
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["rabbitmq-server"]
EOF
    "${BUILD[@]}" -t rabbitmq:3.13.7-management-alpine "$ctx"
}

# The working tree as git sees it (tracked files, and new ones it does not ignore): what a
# developer is about to commit, without .venv, var/ or secrets.
export_project() {
    rm -rf "$POSTROOM"
    mkdir -p "$POSTROOM"
    (cd "$SRC" && git ls-files -z --cached --others --exclude-standard |
        while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done |
        tar --null -T - -cf -) | tar -C "$POSTROOM" -xf -
}

build_postroom() {
    log "postroom:local from $SRC (exported to $POSTROOM)"
    export_project
    local t0=$SECONDS
    (cd "$POSTROOM" && "${BUILD[@]}" -t postroom:local .)
    echo "postroom:local built in $((SECONDS - t0)) s" >&2
    docker image ls postroom:local >&2
}

# The compose stack on the stand-ins. One adaptation, a file of the export only:
# docker-compose.buildnet.yml (build containers on the host's network: this daemon has no
# default bridge). Host ports come from the compose file's own variables.
export POSTROOM_HTTP_PORT=${POSTROOM_HTTP_PORT:-18425}
export POSTROOM_METRICS_PORT=${POSTROOM_METRICS_PORT:-19464}
export POSTROOM_PROMETHEUS_PORT=${POSTROOM_PROMETHEUS_PORT:-19090}
export POSTROOM_FLOWER_PORT=${POSTROOM_FLOWER_PORT:-15555}
COMPOSE_PROJECT=${COMPOSE_PROJECT:-postroom-compose-test}
AMQP_URL=amqp://postroom:postroom@rabbitmq:5672/postroom
compose_cmd() {
    [ -f "$POSTROOM/docker-compose.yml" ] || export_project
    # what the README has the operator make first: Flower's password, the example's secret
    [ -f "$POSTROOM/.env" ] || echo 'FLOWER_BASIC_AUTH=admin:a-long-password' >"$POSTROOM/.env"
    [ -f "$POSTROOM/config/compose/secrets/support-smtp-password" ] ||
        printf %s 'the password' >"$POSTROOM/config/compose/secrets/support-smtp-password"
    cat >"$POSTROOM/docker-compose.buildnet.yml" <<'EOF'
services:
  worker: {build: {context: ., network: host}}
  beat: {build: {context: ., network: host}}
  http: {build: {context: ., network: host}}
  metrics: {build: {context: ., network: host}}
  mailcatcher: {build: {context: ., network: host}}
EOF
    C=(docker-compose --project-directory "$POSTROOM" -p "$COMPOSE_PROJECT"
       -f "$POSTROOM/docker-compose.yml" -f "$POSTROOM/docker-compose.buildnet.yml")
}

fail() {
    echo "compose-test: FAILED: $*" >&2
    "${C[@]}" --profile rabbitmq ps >&2 || true
    "${C[@]}" --profile rabbitmq logs --tail 30 >&2 || true
    exit 1
}

wait_healthy() {  # wait_healthy SECONDS SERVICE...
    local limit=$1 s id deadline
    shift
    deadline=$((SECONDS + limit))
    for s in "$@"; do
        id=$("${C[@]}" --profile rabbitmq ps -q "$s")
        [ -n "$id" ] || fail "$s has no container"
        until [ "$(docker inspect -f '{{.State.Health.Status}}' "$id")" = healthy ]; do
            [ $SECONDS -lt $deadline ] || fail "$s not healthy within $limit s"
            sleep 3
        done
        echo "$s healthy ($((SECONDS + limit - deadline)) s after up)" >&2
    done
}

ports_free() {
    local var
    for var in POSTROOM_HTTP_PORT POSTROOM_METRICS_PORT POSTROOM_PROMETHEUS_PORT POSTROOM_FLOWER_PORT; do
        if (exec 3<>"/dev/tcp/127.0.0.1/${!var}") 2>/dev/null; then
            echo "compose-test: port ${!var} is taken on this machine; set $var to a free one" >&2
            exit 1
        fi
    done
}

prometheus_scraped() {  # 1 once Prometheus's last scrape of the postroom job succeeded
    curl -fsS "http://127.0.0.1:$POSTROOM_PROMETHEUS_PORT/api/v1/query?query=up%7Bjob%3D%22postroom%22%7D" |
        python3 -c 'import json, sys; r = json.load(sys.stdin)["data"]["result"]; print(r[0]["value"][1] if r else "")'
}

# compose_up redis|rabbitmq: the stack as the README starts it, then a smoke test of what it promises
compose_up() {
    local broker=$1 profile=() wait_for=(redis) key answer deadline
    compose_cmd
    ports_free
    if [ "$broker" = rabbitmq ]; then
        export POSTROOM_BROKER_URL=$AMQP_URL
        profile=(--profile rabbitmq)
        wait_for+=(rabbitmq)
    else
        unset POSTROOM_BROKER_URL
    fi
    log "compose stack ($broker broker, project $COMPOSE_PROJECT) on the stand-ins"
    cd "$POSTROOM"
    "${C[@]}" "${profile[@]}" up -d
    # the worker's health check passes once beat's first health check ran: beat waited for the
    # broker, however long it took to start
    wait_healthy 300 "${wait_for[@]}" http metrics worker
    "${C[@]}" "${profile[@]}" ps
    if [ "$broker" = rabbitmq ]; then
        # exits 1 while the queue is classic (the compose vhost's default type: docs/compose.md);
        # the dead-lettering policy it sets is what must be there
        "${C[@]}" exec -T worker postroom queues declare >"$WORK/queues-declare.txt" || true
        cat "$WORK/queues-declare.txt"
        grep -q "dead-lettering to postroom.poison: yes" "$WORK/queues-declare.txt" || fail "queues declare"
    fi

    log "a message through the stack ($broker)"
    "${C[@]}" exec -T worker postroom send --account dev --to you@example.com \
        --subject "compose smoke $broker" --text x --wait 30 || fail "send --wait did not see it sent"
    "${C[@]}" exec -T mailcatcher postroom dev-smtp --list | grep "compose smoke $broker" ||
        fail "the mail catcher did not catch it"

    log "an API key made in the stack, used over HTTP"
    key=$("${C[@]}" exec -T http postroom api-keys new "smoke-$broker" --account dev) || fail "api-keys new"
    answer=$(curl -sS -w ' %{http_code}' -H "Authorization: Bearer $key" -H 'Content-Type: application/json' \
        -d '{"account": "dev", "to": ["api@example.com"], "subject": "compose api", "text": "x"}' \
        "http://127.0.0.1:$POSTROOM_HTTP_PORT/v1/messages")
    echo "$answer"
    [ "${answer##* }" = 202 ] || fail "POST /v1/messages with the new key: $answer"

    log "health, metrics and Prometheus"
    answer=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$POSTROOM_HTTP_PORT/healthz")
    [ "$answer" = 200 ] || fail "/healthz answered $answer"
    curl -fsS "http://127.0.0.1:$POSTROOM_METRICS_PORT/metrics" | grep -c '^postroom_' || fail "no postroom_ metrics"
    deadline=$((SECONDS + 90))
    until [ "$(prometheus_scraped || true)" = 1 ]; do
        [ $SECONDS -lt $deadline ] || fail "Prometheus has not scraped the metrics service"
        sleep 3
    done
    echo "Prometheus: up{job=\"postroom\"} = 1" >&2
    echo "compose-test: the stack on $broker works" >&2
    cd - >/dev/null
}

compose_down() {
    log "compose stack down (volumes too; the images stay)"
    compose_cmd
    "${C[@]}" --profile rabbitmq down -v --remove-orphans
}

declare -A TAGS=(
    [debian]=debian:bookworm-slim [python]=$PY_TAG [redis]=redis:7.2.5-bookworm
    [prometheus]=prom/prometheus:v2.53.0 [flower]=mher/flower:2.0.1
    [rabbitmq]=rabbitmq:3.13.7-management-alpine
)
make_if_missing() {  # a stand-in that exists is kept unless REBUILD is set
    if [ -z "${REBUILD:-}" ] && docker image inspect "${TAGS[$1]}" >/dev/null 2>&1; then
        echo "have ${TAGS[$1]} (REBUILD=1 builds it again)" >&2
    else
        "make_$1"
    fi
}

compose_test() {
    local base
    for base in debian python redis prometheus flower rabbitmq; do make_if_missing "$base"; done
    build_postroom
    compose_cmd
    trap compose_down EXIT
    compose_down
    compose_up redis
    compose_down
    if [ -z "${SKIP_RABBITMQ:-}" ]; then
        compose_up rabbitmq
        compose_down
    fi
    trap - EXIT
    echo "compose-test: passed" >&2
}

steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(debian python redis prometheus flower rabbitmq postroom)
for s in "${steps[@]}"; do
    case $s in
        debian | python | redis | prometheus | flower | rabbitmq) make_if_missing "$s" ;;
        postroom) build_postroom ;;
        up) compose_up redis ;;
        up-rabbitmq) compose_up rabbitmq ;;
        down) compose_down ;;
        test) compose_test ;;
        *) echo "unknown step: $s" >&2; exit 2 ;;
    esac
done
