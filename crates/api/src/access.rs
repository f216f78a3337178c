//! Who may see and act on a community, decided from the write side.
//!
//! The caller's role comes from their Membership aggregate, loaded from the event store like the
//! community itself, so a member promoted a moment ago can act at once and a member banned a
//! moment ago cannot (the members read model may lag). Outsiders learn nothing about private
//! communities: every refusal there is the same 404 a missing community gets.
//!
//! Every community loaded here is also remembered by [`Communities`], which lets a first join
//! skip the load altogether: it is decided on the cached community and written with guards that
//! make the insert itself confirm what the load would have (see `routes::members`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rookery_domain::{Community, Membership};
use rookery_events::membership::membership_id;
use rookery_events::{MemberStatus, Role};
use rookery_store::{EventStore, Loaded};
use uuid::Uuid;

use crate::auth::AuthUser;
use crate::error::ApiError;

/// Communities and the caller's memberships, loaded from the event store, with the cache of the
/// communities last loaded. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Communities {
    store: EventStore,
    cache: Arc<CommunityCache>,
}

impl Communities {
    pub fn new(store: EventStore) -> Self {
        Self {
            store,
            cache: Arc::default(),
        }
    }

    /// The community as this process last loaded it, if it did (see [`CommunityCache`]).
    pub fn cached(&self, id: Uuid) -> Option<Arc<Loaded<Community>>> {
        self.cache.get(id)
    }

    /// The community as last loaded, or loaded now; 404 when it does not exist. A command
    /// decided on it guards its commit with the version, so a stale copy is never trusted.
    pub async fn community(&self, id: Uuid) -> Result<Arc<Loaded<Community>>, ApiError> {
        if let Some(community) = self.cached(id) {
            return Ok(community);
        }
        let loaded = self.store.load::<Community>(&id.to_string()).await?;
        if !loaded.aggregate.exists() {
            return Err(community_not_found());
        }
        self.cache.remember(id, &loaded);
        Ok(Arc::new(loaded))
    }

    /// Forgets `id` (a guard found the cached copy stale).
    pub fn forget(&self, id: Uuid) {
        self.cache.forget(id);
    }
}

pub(crate) struct CommunityAccess {
    pub community: Loaded<Community>,
    /// The caller's membership in this community (default state when they never joined).
    pub caller: Loaded<Membership>,
}

pub(crate) fn community_not_found() -> ApiError {
    ApiError::not_found("community")
}

impl CommunityAccess {
    /// Loads the community and the caller's membership; 404 when the community does not exist
    /// or the caller's token is scoped to another one.
    pub async fn load(
        communities: &Communities,
        auth: &AuthUser,
        community_id: Uuid,
    ) -> Result<Self, ApiError> {
        if !auth.reaches(community_id) {
            return Err(community_not_found());
        }
        let membership = membership_id(community_id, auth.user_id).to_string();
        let (community, caller) = communities
            .store
            .load_two::<Community, Membership>(&community_id.to_string(), &membership)
            .await?;
        if !community.aggregate.exists() {
            return Err(community_not_found());
        }
        communities.cache.remember(community_id, &community);
        Ok(Self { community, caller })
    }

    pub fn is_public(&self) -> bool {
        self.community.aggregate.is_public
    }

    /// The caller's role while they are an active member.
    pub fn role(&self) -> Option<Role> {
        self.caller
            .aggregate
            .role
            .filter(|_| self.caller.aggregate.is_active())
    }

    pub fn caller_status(&self) -> Option<MemberStatus> {
        self.caller.aggregate.status
    }

    /// Anyone may see a public community; a private one only its active members.
    pub fn require_visible(&self) -> Result<(), ApiError> {
        if self.is_public() || self.role().is_some() {
            Ok(())
        } else {
            Err(community_not_found())
        }
    }

    /// The caller's role; outsiders get 404 for a private community and 403 for a public one.
    /// What the role allows is the domain's call.
    pub fn require_member(&self) -> Result<Role, ApiError> {
        match self.role() {
            Some(role) => Ok(role),
            None if self.is_public() => Err(ApiError::Forbidden(
                "only members of this community can do this".into(),
            )),
            None => Err(community_not_found()),
        }
    }
}

/// Communities as last loaded by this process, each with its version. Entries are never trusted
/// on their own: a command decided on one guards its insert with the cached version, so a
/// community changed since (by any process) makes it fall back to a fresh load.
#[derive(Default)]
struct CommunityCache {
    entries: Mutex<HashMap<Uuid, Arc<Loaded<Community>>>>,
}

/// Beyond this many communities the cache starts over (a miss costs one load, as without it).
const CACHED_COMMUNITIES: usize = 10_000;

impl CommunityCache {
    fn get(&self, id: Uuid) -> Option<Arc<Loaded<Community>>> {
        self.entries.lock().ok()?.get(&id).cloned()
    }

    fn forget(&self, id: Uuid) {
        if let Ok(mut entries) = self.entries.lock() {
            entries.remove(&id);
        }
    }

    fn remember(&self, id: Uuid, community: &Loaded<Community>) {
        let Ok(mut entries) = self.entries.lock() else {
            return;
        };
        if entries
            .get(&id)
            .is_some_and(|c| c.version == community.version)
        {
            return;
        }
        if entries.len() >= CACHED_COMMUNITIES {
            entries.clear();
        }
        entries.insert(
            id,
            Arc::new(Loaded {
                aggregate: community.aggregate.clone(),
                version: community.version,
            }),
        );
    }
}
