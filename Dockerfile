# Multi-stage build: compile the shipped binary (fat LTO, `dist` profile), run it on a slim base.
FROM rust:1-bookworm AS build
WORKDIR /src

# Dependencies in their own layer: build them against the real manifest and a
# dummy crate, so a source change only rebuilds triage itself.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src benches \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && echo 'fn main() {}' > benches/hot_path.rs \
    && cp benches/hot_path.rs benches/load.rs \
    && cargo build --profile dist --locked --bin triage \
    && rm -rf src benches

COPY src ./src
COPY benches ./benches
COPY models ./models
COPY config ./config
# COPY keeps the files' old mtimes; touch them so cargo does not reuse the dummy crate.
RUN touch src/main.rs src/lib.rs \
    && cargo build --profile dist --locked --bin triage

FROM debian:bookworm-slim
# The base image's security updates matter more than pinned versions here.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home /var/lib/triage --create-home triage \
    && mkdir -p /var/lib/triage/state \
    && chown triage:triage /var/lib/triage/state
COPY --from=build /src/target/dist/triage /usr/local/bin/triage
COPY config /etc/triage
USER 10001
WORKDIR /var/lib/triage
# The spend ledger (`store.state_dir = "state"`, relative to this directory):
# mount a volume here or it is lost when the container is recreated.
VOLUME ["/var/lib/triage/state"]
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["curl", "-fsS", "http://127.0.0.1:8080/healthz"]
# SIGTERM drains for up to `server.shutdown_grace` (30s): stop with `docker stop -t 35`.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/triage"]
# The listen address is a flag, not an edit of the config: the config's
# loopback default can never leave the container unreachable.
CMD ["serve", "--config", "/etc/triage/triage.toml", "--listen", "0.0.0.0:8080"]
