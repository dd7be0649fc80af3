# warmpool's image for a real cluster: the service and the agent are the same binary.
#   docker build -t warmpool:0.1.0 .
#
# Stage `build` (rust:1.95-bookworm) produces target/release/warmpool from the locked sources.
# Stage `runtime` (debian:bookworm-slim, the image) holds that binary as
# /usr/local/bin/warmpool, git and CA certificates for jobs, and runs as user 65532.
#
# Both base images come from Docker Hub, so this file cannot be built where no registry is
# reachable, such as warmpool's CI machine. There, scripts/agent-image.sh builds the local test
# image (warmpool-agent:dev) FROM scratch instead: a binary built on the host with the libraries
# `ldd` lists, and Debian's static busybox for `sh`; no git, no CA certificates, runs as root.
# See docs/KUBERNETES.md, "Testing on a real node".
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY manifests ./manifests
RUN cargo build --release --locked --bin warmpool

FROM debian:bookworm-slim AS runtime
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates git \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 65532 --user-group --create-home --home-dir /home/warmpool warmpool
COPY --from=build /src/target/release/warmpool /usr/local/bin/warmpool
USER 65532:65532
WORKDIR /home/warmpool
EXPOSE 7420
ENTRYPOINT ["warmpool"]
CMD ["serve", "--listen", "0.0.0.0:7420"]
