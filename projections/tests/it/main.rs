//! rookery-projections integration tests, against real Postgres and NATS. Each test has its own
//! database and stream (removed afterwards, also on failure).

mod batch_tx;
mod conformance;
mod locks;
mod members;
mod reactors;
mod rebuild;
mod support;
mod worker;
