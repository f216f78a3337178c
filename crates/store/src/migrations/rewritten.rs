//! Migrations whose files were rewritten after databases had applied them.
//!
//! sqlx refuses to start on a database whose applied migration no longer matches its file
//! (checksum). Rookery rewrote three once, in 2026-12: the read models' tables moved out of
//! `…0003_projections.sql` into one migration per model (`…_rm_members.sql`), and comments
//! pointing at a design document outside the repository were redirected. A database migrated
//! before then holds exactly the schema the new files create, so it is adopted: each rewritten
//! migration whose recorded checksum is that of its earlier text gets the current checksum, and
//! the migrations that took over its tables are recorded as applied without running. The earlier
//! texts live in `crates/store/legacy/`, so the recognition is exact. Idempotent, and safe when
//! several processes start at once.

use super::MIGRATOR;
use anyhow::Context as _;
use sqlx::migrate::{Migration, MigrationType};
use sqlx::PgPool;
use std::borrow::Cow;

/// A migration rewritten after release: its version, the text databases may have applied, and
/// the migrations that took over part of what that text created.
struct Rewritten {
    version: i64,
    earlier: &'static str,
    took_over_by: &'static [i64],
}

const REWRITTEN: &[Rewritten] = &[
    Rewritten {
        version: 20261122000001,
        earlier: include_str!("../../legacy/20261122000001_event_store.sql"),
        took_over_by: &[],
    },
    Rewritten {
        version: 20261122000003,
        earlier: include_str!("../../legacy/20261122000003_projections.sql"),
        took_over_by: &[20261207000001],
    },
    Rewritten {
        version: 20261122000004,
        earlier: include_str!("../../legacy/20261122000004_projection_dead_letters.sql"),
        took_over_by: &[],
    },
];

/// The checksum sqlx recorded for a migration of `sql`.
fn checksum_of(sql: &'static str) -> Vec<u8> {
    Migration::new(
        0,
        Cow::Borrowed(""),
        MigrationType::Simple,
        Cow::Borrowed(sql),
        false,
    )
    .checksum
    .into_owned()
}

/// Adopts a database migrated with the earlier texts (see the module docs); nothing to do on a
/// fresh one or one already adopted.
pub(super) async fn adopt(pool: &PgPool) -> anyhow::Result<()> {
    let recorded: bool = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
        .fetch_one(pool)
        .await
        .context("looking for the migrations table")?;
    if !recorded {
        return Ok(());
    }
    let mut tx = pool.begin().await?;
    for rewritten in REWRITTEN {
        let current = MIGRATOR
            .iter()
            .find(|m| m.version == rewritten.version)
            .with_context(|| format!("migration {} is not embedded", rewritten.version))?;
        let adopted = sqlx::query(
            "UPDATE _sqlx_migrations SET checksum = $3 WHERE version = $1 AND checksum = $2",
        )
        .bind(rewritten.version)
        .bind(checksum_of(rewritten.earlier))
        .bind(current.checksum.as_ref())
        .execute(&mut *tx)
        .await
        .with_context(|| format!("adopting migration {}", rewritten.version))?;
        if adopted.rows_affected() == 0 {
            continue;
        }
        for version in rewritten.took_over_by {
            let successor = MIGRATOR
                .iter()
                .find(|m| m.version == *version)
                .with_context(|| format!("migration {version} is not embedded"))?;
            sqlx::query(
                "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
                 VALUES ($1, $2, true, $3, 0) ON CONFLICT (version) DO NOTHING",
            )
            .bind(successor.version)
            .bind(successor.description.as_ref())
            .bind(successor.checksum.as_ref())
            .execute(&mut *tx)
            .await
            .with_context(|| format!("recording migration {version} as applied"))?;
        }
        tracing::info!(
            version = rewritten.version,
            "adopted a migration applied before it was rewritten"
        );
    }
    tx.commit().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The recognition is exact only if sqlx checksums a text as this module does.
    #[test]
    fn checksums_are_computed_as_sqlx_records_them() {
        for m in MIGRATOR.iter() {
            let text: &'static str = Box::leak(m.sql.to_string().into_boxed_str());
            assert_eq!(checksum_of(text), m.checksum.as_ref(), "{}", m.version);
        }
    }

    #[test]
    fn every_rewritten_migration_differs_from_its_earlier_text() {
        for r in REWRITTEN {
            let current = MIGRATOR.iter().find(|m| m.version == r.version);
            let current = current.map(|m| m.checksum.to_vec());
            assert_ne!(current, Some(checksum_of(r.earlier)), "{}", r.version);
        }
    }
}
