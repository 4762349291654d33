//! The worker's tracing subscriber: level or filter, text or JSON, stderr or a file.

use std::path::PathBuf;

use tracing_subscriber::EnvFilter;

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!(
                "unknown log format '{other}': use 'text' or 'json'"
            )),
        }
    }
}

/// Where and how to log.
#[derive(Debug, Clone, Default)]
pub struct LogConfig {
    /// Level or filter; `None` means `MODE_LOG`, else `info`.
    pub level: Option<String>,
    /// Text or JSON.
    pub format: LogFormat,
    /// Append to this file instead of writing to stderr.
    pub file: Option<PathBuf>,
}

/// Logging could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LoggingError {
    /// The level or filter does not parse.
    #[error("invalid log level or filter '{filter}': {message} (try 'info', 'debug' or 'info,mode=debug')")]
    BadFilter {
        /// What was given.
        filter: String,
        /// The parser's complaint.
        message: String,
    },
    /// The log file cannot be opened.
    #[error("cannot open log file {path}: {source} (check the directory exists and is writable)")]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// Install the global subscriber. Returns `Ok` without changing anything if one is already
/// installed (tests, or a program that set up its own).
pub fn init_logging(config: &LogConfig) -> Result<(), LoggingError> {
    let filter_text = config
        .level
        .clone()
        .or_else(|| std::env::var("MODE_LOG").ok())
        .unwrap_or_else(|| "info".to_string());
    // openraft and h2 are chatty at info.
    let filter_text = if filter_text.contains('=') || filter_text.contains(',') {
        filter_text
    } else {
        format!("{filter_text},openraft=warn,h2=warn,tower=warn")
    };
    let filter = EnvFilter::try_new(&filter_text).map_err(|e| LoggingError::BadFilter {
        filter: config.level.clone().unwrap_or(filter_text.clone()),
        message: e.to_string(),
    })?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    let result = match (&config.file, config.format) {
        (None, LogFormat::Text) => builder.with_writer(std::io::stderr).try_init(),
        (None, LogFormat::Json) => builder.json().with_writer(std::io::stderr).try_init(),
        (Some(path), format) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| LoggingError::File {
                    path: path.clone(),
                    source,
                })?;
            let writer = std::sync::Mutex::new(file);
            match format {
                LogFormat::Text => builder.with_ansi(false).with_writer(writer).try_init(),
                LogFormat::Json => builder.json().with_writer(writer).try_init(),
            }
        }
    };
    // An already installed subscriber is not an error.
    let _ = result;
    Ok(())
}
