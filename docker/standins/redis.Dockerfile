# Stand-in for redis:7.4-alpine on machines that cannot pull from Docker Hub: Redis from
# Debian's packages on a local Debian base (see docs/deployment.md, "Without internet
# access"). It runs the same `redis-server ...` command line as the official image.
ARG BASE=clusca-local/debian:bookworm
FROM ${BASE}
# Debian's version moves with security updates, so it is not pinned.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends redis-server redis-tools \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /data && chown 65534:65534 /data
WORKDIR /data
USER 65534:65534
EXPOSE 6379
CMD ["redis-server"]
