//! A bulk fold's rows in two chunks: the one being folded, and the one handed to a write and
//! held until the write settles — the write may not have committed its rows yet, so rows the
//! next events touch are read from it, never from the tables.

use anyhow::bail;
use std::sync::Arc;

pub struct Chunks<F> {
    /// The chunk being folded.
    pub current: F,
    in_flight: Option<Arc<F>>,
}

impl<F: Default> Default for Chunks<F> {
    fn default() -> Self {
        Self {
            current: F::default(),
            in_flight: None,
        }
    }
}

impl<F> Chunks<F> {
    /// The chunk being written, if any.
    pub fn in_flight(&self) -> Option<Arc<F>> {
        self.in_flight.clone()
    }

    /// Every chunk held, the one being written first.
    pub fn held(&self) -> impl Iterator<Item = &F> {
        self.in_flight.as_deref().into_iter().chain([&self.current])
    }

    /// Hands the current chunk to a write (`next` becomes the current one); refused while the
    /// previous write has not settled.
    pub fn take(&mut self, model: &str, next: F) -> anyhow::Result<Arc<F>> {
        if self.in_flight.is_some() {
            bail!("the previous chunk of the {model} rebuild was not settled");
        }
        let chunk = Arc::new(std::mem::replace(&mut self.current, next));
        self.in_flight = Some(chunk.clone());
        Ok(chunk)
    }

    /// The write has committed: its chunk is no longer needed. Returns it when nothing else
    /// holds it any more (normally), for reuse.
    pub fn settle(&mut self) -> Option<F> {
        self.in_flight.take().and_then(|f| Arc::try_unwrap(f).ok())
    }

    /// Drops both chunks (their write was rolled back); `fresh` becomes the current one.
    pub fn discard(&mut self, fresh: F) {
        self.current = fresh;
        self.in_flight = None;
    }
}
