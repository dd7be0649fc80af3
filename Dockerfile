# warmpool image: the service and the agent are the same binary.
#   docker build -t warmpool:0.1.0 .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY manifests ./manifests
RUN cargo build --release --locked --bin warmpool

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates git \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 65532 --user-group --create-home --home-dir /home/warmpool warmpool
COPY --from=build /src/target/release/warmpool /usr/local/bin/warmpool
USER 65532:65532
WORKDIR /home/warmpool
EXPOSE 7420
ENTRYPOINT ["warmpool"]
CMD ["serve", "--listen", "0.0.0.0:7420"]
