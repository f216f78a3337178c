//! The read side as handlers use it: wait until the read models an answer comes from have
//! applied the client's write (`min_position`), then query them. One wait for every read
//! model, so a new model's handlers get read-your-writes by naming it.

use std::future::Future;

use rookery_projections::Projection;

use crate::error::ApiError;
use crate::extract::MinPosition;
use crate::state::AppState;

/// Waits until each of `models` has applied `min` (when given, within the configured read
/// wait in all), then runs `query`; 503 with `Retry-After: 1` when one does not get there in
/// time. `query` is not started before the wait ends (a future does nothing until awaited).
pub(crate) async fn after<T, E>(
    state: &AppState,
    models: &[&dyn Projection],
    min: MinPosition,
    query: impl Future<Output = Result<T, E>>,
) -> Result<T, ApiError>
where
    ApiError: From<E>,
{
    if let MinPosition(Some(position)) = min {
        let config = state.config();
        let behind = rookery_projections::wait_for_models(
            state.pool(),
            models,
            config.partitions,
            position,
            config.read_wait,
        )
        .await
        .map_err(|e| ApiError::Internal(e.context("waiting for the read models")))?;
        if let Some(name) = behind {
            return Err(ApiError::Unavailable {
                detail: format!(
                    "the {name} read model has not reached position {position} yet; retry shortly"
                ),
                retry_after: Some(1),
                errors: vec![],
            });
        }
    }
    Ok(query.await?)
}
