//! The shadow tables' indexes. Secondary indexes are left out while loading and built once at
//! the end, side by side; a bulk fold's keyless tables also lose their unique indexes while every
//! row is new. Each is built by its live twin's definition and renamed at the switch, so names do
//! not drift from rebuild to rebuild.

use anyhow::Context as _;
use sqlx::PgConnection;

/// `maintenance_work_mem` for building a shadow table's deferred indexes, at least (the sort of
/// a million members' index entries fits).
const INDEX_BUILD_MEMORY: &str = "128MB";

/// One index of a table.
pub(super) struct Index {
    pub(super) name: String,
    pub(super) unique: bool,
    /// The constraint it backs: its kind (`p`rimary key, `u`nique, e`x`clusion).
    pub(super) constraint: Option<char>,
    /// `USING btree (cols) …`: the definition without name and table.
    pub(super) using: String,
    /// What makes two indexes on different tables the same.
    pub(super) definition: String,
}

pub(super) async fn table_indexes(
    conn: &mut PgConnection,
    table: &str,
) -> anyhow::Result<Vec<Index>> {
    let rows: Vec<(String, bool, Option<String>, String)> = sqlx::query_as(
        "SELECT ci.relname::text, i.indisunique, c.contype::text, pg_get_indexdef(i.indexrelid)
         FROM pg_index i JOIN pg_class ci ON ci.oid = i.indexrelid
         LEFT JOIN pg_constraint c ON c.conindid = i.indexrelid AND c.conrelid = i.indrelid
         WHERE i.indrelid = to_regclass($1)
         ORDER BY ci.relname",
    )
    .bind(format!("\"{table}\""))
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(name, unique, constraint, def)| {
            // "CREATE [UNIQUE] INDEX name ON public.table USING btree (cols)"
            let using = def
                .find(" USING ")
                .map_or(def.as_str(), |i| &def[i + 1..])
                .to_string();
            let definition = format!("{}{using}", if unique { "UNIQUE " } else { "" });
            Index {
                name,
                unique,
                constraint: constraint.and_then(|c| c.chars().next()),
                using,
                definition,
            }
        })
        .collect())
}

/// Which of a table's indexes [`build_missing_indexes`] builds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Only {
    All,
    Unique,
}

/// An index of a live table its shadow lacks, or has without the constraint it backs.
pub(super) struct Missing {
    pub(super) shadow: String,
    /// The live table's index.
    pub(super) index: Index,
    /// The shadow's index of the same definition, when only the constraint is missing (a
    /// crash came between building the index and attaching it).
    pub(super) built: Option<String>,
}

impl Missing {
    /// The shadow index's name.
    pub(super) fn name(&self) -> String {
        self.built.clone().unwrap_or_else(|| {
            format!(
                "{}{}",
                self.index.name,
                crate::engine::projection::SHADOW_SUFFIX
            )
            .chars()
            .take(63)
            .collect()
        })
    }

    /// The constraint the index backs on the live table, as `ADD CONSTRAINT` spells it.
    pub(super) fn constraint(&self) -> Option<&'static str> {
        match self.index.constraint {
            Some('p') => Some("PRIMARY KEY"),
            Some('u') => Some("UNIQUE"),
            _ => None,
        }
    }
}

/// What the `(live, shadow)` tables' shadows lack of their live tables' indexes.
pub(super) async fn missing_indexes(
    conn: &mut PgConnection,
    tables: &[(String, String)],
    only: Only,
) -> anyhow::Result<Vec<Missing>> {
    let mut missing = Vec::new();
    for (live, shadow) in tables {
        let have = table_indexes(conn, shadow).await?;
        for index in table_indexes(conn, live).await? {
            if only == Only::Unique && !index.unique {
                continue;
            }
            let built = have.iter().find(|h| h.definition == index.definition);
            let m = Missing {
                shadow: shadow.clone(),
                built: built.map(|h| h.name.clone()),
                index,
            };
            match built {
                None => missing.push(m),
                Some(h) if m.constraint().is_some() && h.constraint.is_none() => missing.push(m),
                Some(_) => {}
            }
        }
    }
    Ok(missing)
}

/// Builds a missing index, in a transaction (a savepoint inside the switch) of its own.
pub(super) async fn build_index(conn: &mut PgConnection, m: &Missing) -> anyhow::Result<()> {
    if m.built.is_some() {
        return Ok(());
    }
    let (name, shadow) = (m.name(), &m.shadow);
    let unique = if m.index.unique { "UNIQUE " } else { "" };
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    // The default 64 MB spills a million members' index entries to disk; never lower a bigger
    // setting. An index lost in a crash is simply built again (by definition, on resume), so
    // the commit need not wait for the disk either.
    sqlx::query(
        "SELECT set_config('synchronous_commit', 'off', true),
                CASE WHEN pg_size_bytes(current_setting('maintenance_work_mem')) < pg_size_bytes($1)
                     THEN set_config('maintenance_work_mem', $1, true) END",
    )
    .bind(INDEX_BUILD_MEMORY)
    .execute(&mut *tx)
    .await?;
    sqlx::query(&format!(
        "CREATE {unique}INDEX \"{name}\" ON \"{shadow}\" {}",
        m.index.using
    ))
    .execute(&mut *tx)
    .await
    .with_context(|| format!("building index {name} on {shadow}"))?;
    tx.commit().await?;
    Ok(())
}

/// Makes a built unique index back the primary key or unique constraint its live twin backs.
/// After the builds: it locks the table exclusively, which would deadlock two builds.
pub(super) async fn attach_constraint(conn: &mut PgConnection, m: &Missing) -> anyhow::Result<()> {
    let Some(kind) = m.constraint() else {
        return Ok(());
    };
    let (name, shadow) = (m.name(), &m.shadow);
    sqlx::query(&format!(
        "ALTER TABLE \"{shadow}\" ADD CONSTRAINT \"{name}\" {kind} USING INDEX \"{name}\""
    ))
    .execute(&mut *conn)
    .await
    .with_context(|| format!("making {name} the {kind} of {shadow}"))?;
    Ok(())
}

/// Gives each `(live, shadow)` table the indexes of `live` it lacks, one after the other on
/// `conn`; a unique index backing a primary key or unique constraint on `live` backs the same
/// constraint on `shadow`.
pub(super) async fn build_missing_indexes(
    conn: &mut PgConnection,
    tables: &[(String, String)],
    only: Only,
) -> anyhow::Result<()> {
    let missing = missing_indexes(conn, tables, only).await?;
    for m in &missing {
        build_index(conn, m).await?;
    }
    for m in &missing {
        attach_constraint(conn, m).await?;
    }
    Ok(())
}

/// Drops `table`'s unique indexes and the primary key and unique constraints they back
/// (exclusion constraints stay: they cannot be rebuilt from an index).
pub(super) async fn drop_unique_indexes(
    conn: &mut PgConnection,
    table: &str,
) -> anyhow::Result<()> {
    for index in table_indexes(conn, table).await? {
        let sql = match index.constraint {
            _ if !index.unique => continue,
            Some('p' | 'u') => {
                format!("ALTER TABLE \"{table}\" DROP CONSTRAINT \"{}\"", index.name)
            }
            Some(_) => continue,
            None => format!("DROP INDEX \"{}\"", index.name),
        };
        sqlx::query(&sql)
            .execute(&mut *conn)
            .await
            .with_context(|| format!("dropping {} of {table}", index.name))?;
    }
    Ok(())
}
