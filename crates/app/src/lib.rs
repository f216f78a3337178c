//! Rookery's composition root.
//!
//! [`Application::build`] connects to Postgres (creating the database and running migrations) and
//! NATS (creating the stream), binds the HTTP listener first so tests can pass port 0 and read the
//! real port back, and [`Application::run_until_stopped`] runs the API, the relay and the
//! projection workers until the shutdown future resolves, then drains them.
//!
//! # Layout
//! - [`config`]: configuration from the environment, with working defaults.
//! - [`telemetry`]: the tracing subscriber (pretty locally, JSON in production, quiet in tests).
//! - [`application`]: building and running the parts, graceful shutdown.
//! - [`pipeline`]: the relay and projection workers; beside the API, on threads of their own.
//! - [`doctor`]: `rookery doctor`, every check with its fix.
//! - [`embedded`]: private Postgres and NATS servers when nothing answers at the defaults.
//! - [`exit`]: start-up failures classified into exit codes.

pub mod application;
pub mod config;
pub mod doctor;
pub mod embedded;
pub mod exit;
pub mod pipeline;
pub mod telemetry;

pub use application::{Application, Mode};
pub use config::Config;
