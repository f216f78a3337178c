//! The read side as handlers use it: wait until the read models an answer comes from have
//! applied the client's write (`min_position`), then query them. One wait for every read
//! model, so a new model's handlers get read-your-writes by naming it.

use std::future::Future;

use rookery_projections::engine::partitions_of;
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
        let deadline = tokio::time::Instant::now() + config.read_wait;
        for model in models {
            let name = model.name();
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let reached = rookery_projections::wait_for_position(
                state.pool(),
                name,
                partitions_of(*model, config.partitions),
                position,
                left,
            )
            .await
            .map_err(|e| ApiError::Internal(e.context(format!("waiting for projection {name}"))))?;
            if !reached {
                return Err(ApiError::Unavailable {
                    detail: format!(
                        "the {name} read model has not reached position {position} yet; retry shortly"
                    ),
                    retry_after: Some(1),
                    errors: vec![],
                });
            }
        }
    }
    Ok(query.await?)
}
