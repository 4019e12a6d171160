# Tollgate as a container (docs/packaging.md): built with the Rust toolchain, run on a
# distroless base as a non-root user. `docker build -t tollgate .`
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY vendor ./vendor
COPY benches ./benches
COPY examples ./examples
RUN cargo build --release --locked --bin tollgate \
    && install -D -s -m 0755 target/release/tollgate /out/tollgate

# glibc and libgcc only (SQLite is compiled into the binary); `nonroot` is uid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/tollgate /usr/local/bin/tollgate
COPY examples/basic.toml /etc/tollgate/tollgate.toml
USER nonroot
WORKDIR /var/lib/tollgate
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/tollgate"]
CMD ["serve", "--config", "/etc/tollgate/tollgate.toml"]
