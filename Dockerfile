# Multi-stage build: compile the release binary, ship it on a slim base.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
COPY models ./models
COPY config ./config
RUN cargo build --release --locked --bin triage

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home /var/lib/triage --create-home triage
COPY --from=build /src/target/release/triage /usr/local/bin/triage
COPY config /etc/triage
# The default config listens on 127.0.0.1; in a container listen on all interfaces.
RUN sed -i 's/^listen = "127.0.0.1:8080"/listen = "0.0.0.0:8080"/' /etc/triage/triage.toml
USER triage
WORKDIR /var/lib/triage
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8080/healthz || exit 1
ENTRYPOINT ["/usr/local/bin/triage"]
CMD ["serve", "--config", "/etc/triage/triage.toml"]
