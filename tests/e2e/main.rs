//! End-to-end suite: the real application over HTTP against real Postgres and NATS.
#![allow(clippy::unwrap_used)]

mod auth;
mod authz;
mod chat;
mod flow;
mod layout;
mod migrations;
mod ops;
mod pipeline;
mod recovery;
mod store;
mod uniqueness;
