# Build: docker build -t rookery .   (used by docker-compose.yml)
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --bin rookery

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/rookery /usr/local/bin/rookery
USER nobody
EXPOSE 8080
ENTRYPOINT ["rookery"]
CMD ["up"]
