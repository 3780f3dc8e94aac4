# syntax=docker/dockerfile:1
#
# Portico's proxy image. The entrypoint is `portico esp`, so ESP's documented command lines work
# with only the image name changed, e.g.
#
#   docker run --detach --name=esp --net=host --volume=$HOME/Downloads:/esp \
#     portico:latest --service=SERVICE --rollout_strategy=managed --http_port=8082 \
#     --backend=localhost:8080 --service_account_key=/esp/service-account-creds.json
#
# The entrypoint sets --listen_address=0.0.0.0; a later --listen_address after the image name
# wins, e.g. `docker run IMAGE --listen_address=127.0.0.1 ...`.
#
# ESPv2 (endpoints-runtime:2) command lines: build the `espv2` target, whose entrypoint is
# `portico espv2 --listener_address=0.0.0.0`, and pass ESPv2's flags unchanged, e.g.
#
#   docker build --target espv2 -t portico:espv2 .
#   docker run --detach --net=host --volume=$HOME/Downloads:/esp portico:espv2 \
#     --service=SERVICE --rollout_strategy=managed --backend=http://127.0.0.1:8080 \
#     --non_gcp --service_account_key=/esp/service-account-creds.json
#
# The same binary carries every other subcommand; override the entrypoint to run them, e.g.
#   docker run --entrypoint /usr/local/bin/portico portico:latest control-plane --listen 0.0.0.0:8000 --data /data
#
# Build: docker build -t portico:latest .   (the default target is ESP's, `esp`)

FROM rust:1.95-bookworm AS builder
WORKDIR /src
COPY . .
# The cache mounts keep the registry and target dir between builds; the binary is copied out of
# the cached target dir because cache mounts are not part of the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin portico \
    && install -D -m 0755 target/release/portico /out/portico

FROM debian:bookworm-slim AS runtime
# ca-certificates: the proxy reaches HTTPS backends, JWKS URLs and a TLS-fronted control plane.
# Versions are left to the bookworm point release: pinning them breaks the build whenever Debian
# publishes a security update.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
# A non-root account for deployments that can use one (the Kubernetes manifests run as it). The
# default stays root because `docker run --volume=$HOME/Downloads:/esp` mounts a key file that
# gcloud wrote with mode 0600 for the host user, which no other uid could read.
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin portico
COPY --from=builder /out/portico /usr/local/bin/portico

# ESPv2's face: one listener (--listener_port, default 8080); the status server only when
# --status_port names a port.
FROM runtime AS espv2
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/portico", "espv2", "--listener_address=0.0.0.0"]

# ESP's face, the default target (the last stage).
FROM runtime AS esp
# 8080: ESP's default serving port; 8090: the status port (/endpoints_status, /healthz, /metrics).
EXPOSE 8080 8090
ENTRYPOINT ["/usr/local/bin/portico", "esp", "--listen_address=0.0.0.0"]
