# Stand-in for prom/prometheus on machines that cannot pull from Docker Hub: Prometheus
# from Debian's packages on a local Debian base. Same entry point as the official image
# (`prometheus` with the compose file's flags as its arguments), same user and data path;
# wget for the compose health check, as in the official image (busybox).
ARG BASE=clusca-local/debian:bookworm
FROM ${BASE}
# Debian's version moves with security updates, so it is not pinned.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends prometheus wget \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /prometheus /etc/prometheus && chown 65534:65534 /prometheus
USER 65534:65534
WORKDIR /prometheus
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
