//! rookery-nats against a real NATS JetStream and Postgres: each test has its own database and
//! its own stream and subject prefix, removed afterwards even when the test fails.
#![allow(clippy::unwrap_used)]

mod bus;
mod consumer;
mod helpers;
mod relay;
