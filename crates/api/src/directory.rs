//! What this process last saw of platform accounts: the hub user of each (with the version it
//! was seen at) and the memberships known to exist. Never trusted alone: a write decided on it
//! is guarded by the versions (see `ingest`).

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use rookery_domain::claims::{kinds, platform_key};
use rookery_domain::User;
use rookery_events::user::shadow_user_id;
use rookery_events::Platform;
use rookery_store::EventStore;
use uuid::Uuid;

use crate::error::ApiError;

/// A platform account, as a platform names it in a message or an activity.
#[derive(Clone, Debug)]
pub(crate) struct PlatformSender {
    pub platform: Platform,
    pub platform_user_id: String,
    pub username: String,
}

/// Beyond this many entries a memory starts over (a miss costs a load, as without it).
const REMEMBERED: usize = 100_000;

/// Hub users of platform accounts (with the version they were seen at) and memberships known
/// to exist, as this process last saw them. Never trusted alone: see the module docs.
#[derive(Default)]
pub(crate) struct Directory {
    senders: Mutex<HashMap<(Platform, String), (Uuid, i64)>>,
    members: Mutex<HashSet<(Uuid, Uuid)>>,
}

/// Who sent it.
pub(crate) enum Resolved {
    /// An existing hub user at `version`.
    Known { user_id: Uuid, version: i64 },
    /// Nobody yet: a shadow user to create with the write.
    New { user_id: Uuid },
}

impl Resolved {
    pub(crate) fn user_id(&self) -> Uuid {
        match self {
            Resolved::Known { user_id, .. } | Resolved::New { user_id } => *user_id,
        }
    }
}

impl Directory {
    /// The hub user of `sender`'s account: remembered (unless `fresh`), else the claim's holder,
    /// else a shadow user to make.
    pub(crate) async fn resolve(
        &self,
        store: &EventStore,
        sender: &PlatformSender,
        fresh: bool,
    ) -> Result<Resolved, ApiError> {
        let account = (sender.platform, sender.platform_user_id.clone());
        if !fresh {
            if let Some((user_id, version)) = self
                .senders
                .lock()
                .ok()
                .and_then(|s| s.get(&account).copied())
            {
                return Ok(Resolved::Known { user_id, version });
            }
        }
        let key = platform_key(sender.platform, &sender.platform_user_id);
        let holder = store.claim_holder(kinds::PLATFORM_IDENTITY, &key).await?;
        let Some(holder) = holder else {
            return Ok(Resolved::New {
                user_id: shadow_user_id(sender.platform, &sender.platform_user_id),
            });
        };
        let user_id = Uuid::parse_str(&holder).map_err(|e| {
            ApiError::Internal(anyhow::Error::new(e).context("a platform identity claim's holder"))
        })?;
        let user = store.load::<User>(&holder).await?;
        Ok(Resolved::Known {
            user_id,
            version: user.version,
        })
    }

    pub(crate) fn remember(
        &self,
        sender: &PlatformSender,
        user_id: Uuid,
        version: i64,
        community_id: Uuid,
    ) {
        if let Ok(mut senders) = self.senders.lock() {
            if senders.len() >= REMEMBERED {
                senders.clear();
            }
            senders.insert(
                (sender.platform, sender.platform_user_id.clone()),
                (user_id, version),
            );
        }
        if let Ok(mut members) = self.members.lock() {
            if members.len() >= REMEMBERED {
                members.clear();
            }
            members.insert((community_id, user_id));
        }
    }

    pub(crate) fn is_member(&self, community_id: Uuid, user_id: Uuid) -> bool {
        self.members
            .lock()
            .is_ok_and(|m| m.contains(&(community_id, user_id)))
    }
}
