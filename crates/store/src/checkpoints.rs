//! Projection checkpoints and state (see rookery-projections).
