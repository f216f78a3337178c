//! Value types shared by events, commands and read models.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use utoipa::ToSchema;

/// Generates `as_str`, `Display`, `FromStr` and `ALL` for a fieldless enum whose serde form is its
/// snake_case name, so the wire, the database and error messages spell values the same way.
macro_rules! string_enum {
    ($(#[$m:meta])* $name:ident { $($variant:ident => $s:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
        #[serde(rename_all = "snake_case")]
        pub enum $name { $($variant),+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $s),+ }
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result { f.write_str(self.as_str()) }
        }
        impl FromStr for $name {
            type Err = UnknownValue;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($s => Ok($name::$variant),)+
                    _ => Err(UnknownValue {
                        kind: stringify!($name),
                        value: s.to_string(),
                        expected: &[$($s),+],
                    }),
                }
            }
        }
    };
}

/// A value outside a closed set, with the values that would have been accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind} `{value}`; expected one of: {}", expected.join(", "))]
pub struct UnknownValue {
    pub kind: &'static str,
    pub value: String,
    pub expected: &'static [&'static str],
}

string_enum!(
    /// A chat platform a community lives on.
    Platform { Twitch => "twitch", Discord => "discord", Youtube => "youtube", Kick => "kick", Slack => "slack" }
);

string_enum!(
    /// A member's role in a community, from most to least privileged.
    Role { Owner => "owner", Admin => "admin", Moderator => "moderator", Vip => "vip", Member => "member" }
);

string_enum!(
    /// How users get into a community.
    JoinMode { Open => "open", Approval => "approval", Invite => "invite" }
);

string_enum!(
    /// Where a membership stands.
    MemberStatus { Active => "active", Pending => "pending", Left => "left", Removed => "removed", Banned => "banned" }
);

impl Role {
    /// Privilege rank: higher manages lower.
    pub fn rank(self) -> u8 {
        match self {
            Role::Owner => 5,
            Role::Admin => 4,
            Role::Moderator => 3,
            Role::Vip => 2,
            Role::Member => 1,
        }
    }

    /// Owners and admins manage members, roles and platform links.
    pub fn can_manage(self) -> bool {
        self.rank() >= Role::Admin.rank()
    }

    /// Moderators and above may ban and unban.
    pub fn can_moderate(self) -> bool {
        self.rank() >= Role::Moderator.rank()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_through_their_string_form() {
        for role in Role::ALL {
            assert_eq!(role.as_str().parse::<Role>(), Ok(*role));
            assert_eq!(
                serde_json::to_value(role).ok(),
                Some(serde_json::json!(role.as_str()))
            );
        }
        let err = "king".parse::<Role>().expect_err("not a role");
        assert!(err
            .to_string()
            .contains("owner, admin, moderator, vip, member"));
    }
}
