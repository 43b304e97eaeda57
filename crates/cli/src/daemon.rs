//! `hatoba daemon`: reads the config, sets up logging and runs the server.

use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use hatoba_cri::{DEFAULT_CONFIG_PATH, DaemonConfig, LogFormat, check_log_filter};
use tracing_subscriber::EnvFilter;

/// How long blocking work (file I/O of the image store) may run after the
/// server stopped before the process exits anyway.
const BLOCKING_TASK_GRACE: Duration = Duration::from_secs(5);

/// Runs the daemon until SIGTERM or SIGINT.
pub fn run(config_path: Option<PathBuf>) -> anyhow::Result<()> {
    let explicit = config_path.is_some();
    let path = config_path.unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH));
    let config = DaemonConfig::load(&path, explicit)?;
    let source = config_source(&path, explicit);

    init_logging(&config)?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("hatoba-daemon")
        .build()
        .context("failed to start the async runtime")?;
    let result = runtime.block_on(hatoba_cri::serve(config, source));
    runtime.shutdown_timeout(BLOCKING_TASK_GRACE);
    Ok(result?)
}

/// Returns the file the config came from, `None` when the default file is
/// absent and the built-in defaults apply.
fn config_source(path: &Path, explicit: bool) -> Option<PathBuf> {
    (explicit || path.exists()).then(|| path.to_owned())
}

/// Logs to stderr as text or JSON. `RUST_LOG`, when set, overrides the
/// config's `log_level` and is checked by the same rules.
fn init_logging(config: &DaemonConfig) -> anyhow::Result<()> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(directives) if !directives.trim().is_empty() => {
            check_log_filter(&directives).context("invalid RUST_LOG")?;
            EnvFilter::builder()
                .parse(&directives)
                .with_context(|| format!("invalid RUST_LOG {directives:?}"))?
        }
        _ => EnvFilter::builder()
            .parse(&config.log_level)
            .with_context(|| format!("invalid log_level {:?}", config.log_level))?,
    };

    // Color codes only on a terminal, so log files and journald get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let installed = match config.log_format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    installed.map_err(|error| anyhow::anyhow!("failed to set up logging: {error}"))
}
