//! `rookery up` on a machine that runs neither Postgres nor NATS: a *default* URL that nothing
//! answers is replaced by a private server (see `rookery-localdev`); an explicitly configured URL
//! is never replaced (an unreachable one is an error). Data lives under `ROOKERY_DATA_DIR`
//! (default `./.rookery`), so a second start reuses it.

use crate::config::Config;
use crate::exit::{self, Classified};
pub use rookery_localdev::LocalServers;
pub use rookery_localdev::{answers, find_nats_server, find_postgres_bin, install_hint};
use rookery_store::db::redact;

/// Makes sure Postgres and NATS answer for `config`: a default URL nothing answers is replaced by
/// a private server started here; an explicit one is an error. Blocking (runs `initdb`/`pg_ctl`).
pub fn prepare(config: &mut Config) -> Result<LocalServers, Classified> {
    let mut servers = LocalServers::default();
    let mut started = Vec::new();
    if !answers(&config.database_url, 5432) {
        if config.database_url_explicit {
            return Err(Classified::new(
                exit::POSTGRES,
                format!(
                    "nothing answers at DATABASE_URL {}; start Postgres there or correct the URL",
                    redact(&config.database_url)
                ),
            ));
        }
        if find_postgres_bin().is_none() {
            return Err(Classified::new(exit::NO_SERVERS, install_hint("postgres")));
        }
        let database = url::Url::parse(&config.database_url)
            .ok()
            .map(|u| u.path().trim_start_matches('/').to_string())
            .filter(|d| !d.is_empty())
            .unwrap_or_else(|| "rookery".to_string());
        config.database_url = servers
            .start_postgres(&config.data_dir, &database)
            .map_err(|e| Classified::new(exit::POSTGRES, format!("{e:#}")))?;
        started.push(format!("Postgres on {}", redact(&config.database_url)));
    }
    if !answers(&config.nats_url, 4222) {
        if config.nats_url_explicit {
            return Err(Classified::new(
                exit::NATS,
                format!("nothing answers at NATS_URL {}; start nats-server -js there or correct the URL", config.nats_url),
            ));
        }
        if find_nats_server().is_none() {
            return Err(Classified::new(exit::NO_SERVERS, install_hint("nats")));
        }
        config.nats_url = servers
            .start_nats(&config.data_dir)
            .map_err(|e| Classified::new(exit::NATS, format!("{e:#}")))?;
        started.push(format!("NATS on {}", config.nats_url));
    }
    if !started.is_empty() {
        tracing::info!(
            "nothing answered at the default URLs: started private {} (data in {}); they stop when rookery exits",
            started.join(" and "),
            config.data_dir.display()
        );
    }
    Ok(servers)
}
