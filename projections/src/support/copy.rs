//! Rows in PostgreSQL's binary `COPY` format: the fastest way for a bulk fold to create rows.

use anyhow::Context as _;
use sqlx::PgConnection;

/// How a model's write creates rows that were not loaded from the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Insert {
    /// `INSERT … ON CONFLICT DO UPDATE`, like every other row.
    Upsert,
    /// `COPY`: only for tables nobody else writes (a rebuild's shadow tables), where a row not
    /// loaded is certainly absent.
    Copy,
}

/// Rows in PostgreSQL's binary `COPY` format. Each value is encoded by sqlx exactly as a bound
/// parameter of its type, so copied rows equal rows written by `INSERT` byte for byte.
pub struct CopyRows {
    buf: Vec<u8>,
    scratch: sqlx::postgres::PgArgumentBuffer,
    fields: i16,
    rows: usize,
}

/// Sent to the server in pieces of about this size while the rest is being encoded.
const COPY_PIECE: usize = 1 << 20;

impl CopyRows {
    /// Rows of `fields` values each.
    pub fn new(fields: i16) -> Self {
        let mut buf = Vec::with_capacity(COPY_PIECE + 4096);
        // Signature, flags (no OIDs), header extension length.
        buf.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
        buf.extend_from_slice(&0i32.to_be_bytes());
        buf.extend_from_slice(&0i32.to_be_bytes());
        Self {
            buf,
            scratch: sqlx::postgres::PgArgumentBuffer::default(),
            fields,
            rows: 0,
        }
    }

    /// Starts a row; exactly `fields` calls of [`CopyRows::value`] follow.
    fn row(&mut self) {
        self.buf.extend_from_slice(&self.fields.to_be_bytes());
        self.rows += 1;
        // Encoders may leave bookkeeping in the argument buffer (jsonb does); it is never used
        // here, so start from a clean one now and then rather than let it grow.
        if self.rows.is_multiple_of(1024) {
            self.scratch = sqlx::postgres::PgArgumentBuffer::default();
        }
    }

    pub fn value<'q, T>(&mut self, value: &T) -> anyhow::Result<()>
    where
        T: sqlx::Encode<'q, sqlx::Postgres>,
    {
        let at = self.buf.len();
        self.buf.extend_from_slice(&(-1i32).to_be_bytes());
        // Encode straight into `buf`, lent to the argument buffer, then fill in the length.
        std::mem::swap(&mut *self.scratch, &mut self.buf);
        let encoded = value.encode_by_ref(&mut self.scratch);
        std::mem::swap(&mut *self.scratch, &mut self.buf);
        match encoded.map_err(|e| anyhow::anyhow!("encoding a COPY value: {e}"))? {
            sqlx::encode::IsNull::Yes => self.buf.truncate(at + 4),
            sqlx::encode::IsNull::No => {
                let len = i32::try_from(self.buf.len() - at - 4)
                    .context("a COPY value is larger than 2 GiB")?;
                self.buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
            }
        }
        Ok(())
    }

    /// Whether enough is buffered to send a piece.
    fn is_full(&self) -> bool {
        self.buf.len() >= COPY_PIECE
    }

    /// Hands the buffered bytes over for sending.
    fn drain(&mut self) -> Vec<u8> {
        std::mem::replace(&mut self.buf, Vec::with_capacity(COPY_PIECE + 4096))
    }
}

/// Runs `statement` (`COPY … FROM STDIN (FORMAT binary)`) with one row per item, each
/// encoded by `encode` (one [`CopyRows::value`] per field), sending full pieces while encoding
/// the rest. Returns the rows copied.
pub async fn copy_in<I, F>(
    conn: &mut PgConnection,
    statement: &str,
    fields: i16,
    items: I,
    mut encode: F,
) -> anyhow::Result<u64>
where
    I: IntoIterator,
    I::IntoIter: Send,
    F: FnMut(&mut CopyRows, I::Item) -> anyhow::Result<()> + Send,
{
    let mut rows = CopyRows::new(fields);
    let mut copy = conn
        .copy_in_raw(statement)
        .await
        .with_context(|| format!("starting {statement}"))?;
    for item in items {
        rows.row();
        encode(&mut rows, item)?;
        if rows.is_full() {
            copy.send(rows.drain()).await?;
        }
    }
    rows.buf.extend_from_slice(&(-1i16).to_be_bytes());
    copy.send(rows.drain()).await?;
    Ok(copy.finish().await?)
}
