//! The read side as the API uses it: the members read model (rookery-projections) and
//! read-your-writes waits. Everything the API needs from the projections crate goes through here.

use rookery_events::LogPosition;
use rookery_projections::members::{self, MemberPage, MemberQuery, MemberView, QueryError};
use uuid::Uuid;

use crate::error::ApiError;
use crate::state::AppState;

/// The projection whose tables these queries read.
pub const MEMBERS: &str = members::NAME;

/// Waits until the members projection applied `position` (when given), up to the configured
/// read wait; 503 with `Retry-After: 1` when it does not get there in time.
pub(crate) async fn await_members(
    state: &AppState,
    position: Option<LogPosition>,
) -> Result<(), ApiError> {
    let Some(position) = position else {
        return Ok(());
    };
    let config = state.config();
    let reached = rookery_projections::wait_for_position(
        state.pool(),
        MEMBERS,
        config.partitions,
        position,
        config.read_wait,
    )
    .await
    .map_err(|e| ApiError::Internal(e.context("waiting for the members projection")))?;
    if reached {
        Ok(())
    } else {
        Err(ApiError::Unavailable {
            detail: format!(
                "the members read model has not reached position {position} yet; retry shortly"
            ),
            retry_after: Some(1),
            errors: vec![],
        })
    }
}

pub(crate) async fn member_count(state: &AppState, community_id: Uuid) -> Result<i64, ApiError> {
    members::member_count(state.pool(), community_id)
        .await
        .map_err(query_error)
}

pub(crate) async fn list_members(
    state: &AppState,
    community_id: Uuid,
    query: &MemberQuery,
) -> Result<MemberPage, ApiError> {
    members::list_members(state.pool(), community_id, query)
        .await
        .map_err(query_error)
}

pub(crate) async fn get_member(
    state: &AppState,
    community_id: Uuid,
    user_id: Uuid,
) -> Result<Option<MemberView>, ApiError> {
    members::get_member(state.pool(), community_id, user_id)
        .await
        .map_err(query_error)
}

fn query_error(e: QueryError) -> ApiError {
    match e {
        QueryError::BadCursor => ApiError::bad_request("cursor", e.to_string()),
        QueryError::BadLimit => ApiError::invalid("limit", e.to_string()),
        QueryError::Db(_) => ApiError::Internal(anyhow::Error::new(e)),
    }
}
