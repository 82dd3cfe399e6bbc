# Postroom's one image: every service of docker-compose.yml runs it (worker, beat, http,
# metrics, the dev mail catcher). Two stages: the build stage compiles what needs compiling,
# the runtime stage has only the installed virtualenv, and runs as a user that is not root.
#
# Installs exactly the versions in constraints.txt (`make lock` refreshes it), so an image
# built next month runs the Celery and kombu Postroom was tested with.
#   docker build -t postroom .      (docker-compose builds it for you)

ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
# The dependencies in a layer of their own (pyproject.toml's list and the otel extra, for
# OTLP export when OTEL_* asks for it; pinned by constraints.txt):
# a change to worker/ alone rebuilds only the last step.
RUN python -m venv /opt/postroom \
 && python -c "import tomllib; print('\n'.join((p := tomllib.load(open('pyproject.toml', 'rb'))['project'])['dependencies'] + p['optional-dependencies']['otel']))" \
      > requirements.txt \
 && /opt/postroom/bin/pip install --no-cache-dir --disable-pip-version-check -c constraints.txt -r requirements.txt
COPY worker ./worker
RUN /opt/postroom/bin/pip install --no-cache-dir --disable-pip-version-check --no-deps -c constraints.txt ".[otel]"

FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 postroom \
 && useradd --system --uid 10001 --gid postroom --home-dir /srv/postroom --shell /usr/sbin/nologin postroom \
 && mkdir -p /srv/postroom/accounts /srv/postroom/config /srv/postroom/api-keys /srv/postroom/webhooks /var/lib/postroom \
 && chown postroom:postroom /var/lib/postroom /srv/postroom/api-keys /srv/postroom/webhooks
COPY --from=build /opt/postroom /opt/postroom
ENV PATH=/opt/postroom/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    POSTROOM_ACCOUNTS_DIR=/srv/postroom/accounts \
    POSTROOM_CONFIG_DIR=/srv/postroom/config \
    POSTROOM_VAR_DIR=/var/lib/postroom
WORKDIR /srv/postroom
USER postroom:postroom
ENTRYPOINT ["postroom"]
CMD ["worker"]
