//! The read side as handlers use it: wait until a read model has applied the client's write
//! (`min_position`), then query it. One wait for every read model, so a new model's handlers
//! get read-your-writes by naming it.

use std::future::Future;

use crate::error::ApiError;
use crate::extract::MinPosition;
use crate::state::AppState;

/// Waits until projection `projection` has applied `min` (when given, up to the configured read
/// wait), then runs `query`; 503 with `Retry-After: 1` when the model does not get there in
/// time. `query` is not started before the wait ends (a future does nothing until awaited).
pub(crate) async fn after<T, E>(
    state: &AppState,
    projection: &str,
    min: MinPosition,
    query: impl Future<Output = Result<T, E>>,
) -> Result<T, ApiError>
where
    ApiError: From<E>,
{
    if let MinPosition(Some(position)) = min {
        let config = state.config();
        let reached = rookery_projections::wait_for_position(
            state.pool(),
            projection,
            config.partitions,
            position,
            config.read_wait,
        )
        .await
        .map_err(|e| {
            ApiError::Internal(e.context(format!("waiting for projection {projection}")))
        })?;
        if !reached {
            return Err(ApiError::Unavailable {
                detail: format!(
                    "the {projection} read model has not reached position {position} yet; retry shortly"
                ),
                retry_after: Some(1),
                errors: vec![],
            });
        }
    }
    Ok(query.await?)
}
