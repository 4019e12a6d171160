# Tollgate as a container (docs/packaging.md): built with the Rust toolchain, run on a
# distroless base as a non-root user. `docker build -t tollgate .`
FROM rust:1-bookworm AS build
# BUILD=release (the default): `cargo build --release`. BUILD=optimized: the production
# build of docs/operations.md, profile-guided and laid out by BOLT (bench/pgo.sh), which
# trains on loopback with NGINX as the upstream and wrk as the load; about three times as
# long to build, and 5-18 % less CPU per request (docs/benchmarks.md).
ARG BUILD=release
RUN if [ "$BUILD" = optimized ]; then \
      apt-get update && apt-get install -y --no-install-recommends nginx-light wrk bolt-16 python3 \
      && rm -rf /var/lib/apt/lists/*; \
    fi
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY vendor ./vendor
COPY benches ./benches
COPY examples ./examples
COPY bench ./bench
RUN if [ "$BUILD" = optimized ]; then \
      bench/pgo.sh && built=target/pgo/tollgate; \
    else \
      cargo build --release --locked --bin tollgate && built=target/release/tollgate; \
    fi \
    && install -D -s -m 0755 "$built" /out/tollgate
# The state directory, empty: the runtime image has no shell to create it with, so it is
# copied in with its owner (a step of its own, so that changing it reuses the build above).
RUN mkdir -p /out/state

# glibc and libgcc only (SQLite is compiled into the binary); `nonroot` is uid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/tollgate /usr/local/bin/tollgate
# Listens on every interface of the container; the upstream and the admin token come from
# TOLLGATE_UPSTREAM and TOLLGATE_ADMIN_TOKEN (deploy/container.toml).
COPY deploy/container.toml /etc/tollgate/tollgate.toml
# Where the SQLite store and access logs go, writable by the user the gateway runs as; a
# named volume mounted here starts with the same owner.
COPY --from=build --chown=65532:65532 /out/state /var/lib/tollgate
USER nonroot
WORKDIR /var/lib/tollgate
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/tollgate"]
CMD ["serve", "--config", "/etc/tollgate/tollgate.toml"]
