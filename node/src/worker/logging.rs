//! The worker's tracing subscriber: level or filter, text or JSON, stderr or a file; colour
//! only on a terminal.

use std::ffi::OsStr;
use std::io::IsTerminal as _;
use std::path::PathBuf;

use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer, Registry};

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
    /// The OpenTelemetry service name when `OTEL_SERVICE_NAME` does not give one (default:
    /// the program's name). Traces are exported only when `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
    pub otel_service: Option<String>,
    /// Extra OpenTelemetry resource attributes (`mode.node.id`, ...).
    pub otel_attributes: Vec<(String, String)>,
    /// Export each batch once, without retrying: for a short-lived program (a CLI) that must
    /// not wait on a collector that is down.
    pub otel_no_retry: bool,
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
    /// The OpenTelemetry exporter cannot be set up.
    #[error("{0}")]
    Telemetry(String),
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
    // openraft and h2 are chatty at info. openraft's replication also logs every failed
    // attempt to reach a peer that is down (an ERROR a second); the transport logs each
    // change of a peer's reachability once instead.
    let filter_text = if filter_text.contains('=') || filter_text.contains(',') {
        filter_text
    } else {
        format!("{filter_text},openraft=warn,openraft::replication=off,openraft::engine::handler::replication_handler=off,h2=warn,tower=warn")
    };
    let filter = EnvFilter::try_new(&filter_text).map_err(|e| LoggingError::BadFilter {
        filter: config.level.clone().unwrap_or(filter_text.clone()),
        message: e.to_string(),
    })?;
    // Spans meant for traces stay out of log lines.
    let filter = filter.add_directive(
        format!("{}=off", crate::telemetry::TARGET)
            .parse()
            .expect("a valid directive"),
    );
    let fmt = tracing_subscriber::fmt::layer().with_target(false);
    let ansi = colour_wanted(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    );
    let fmt: Box<dyn Layer<Registry> + Send + Sync> = match (&config.file, config.format) {
        (None, LogFormat::Text) => fmt.with_ansi(ansi).with_writer(std::io::stderr).boxed(),
        (None, LogFormat::Json) => fmt
            .json()
            .with_ansi(false)
            .with_writer(std::io::stderr)
            .boxed(),
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
                LogFormat::Text => fmt.with_ansi(false).with_writer(writer).boxed(),
                LogFormat::Json => fmt.json().with_ansi(false).with_writer(writer).boxed(),
            }
        }
    };
    let mut layers = vec![fmt.with_filter(filter).boxed()];
    let service = config.otel_service.clone().unwrap_or_else(program_name);
    let attributes = config
        .otel_attributes
        .iter()
        .map(|(k, v)| opentelemetry::KeyValue::new(k.clone(), v.clone()))
        .collect();
    if let Some(otel) = crate::telemetry::layer(&service, attributes, !config.otel_no_retry)
        .map_err(LoggingError::Telemetry)?
    {
        layers.push(otel);
    }
    let result = tracing_subscriber::registry().with(layers).try_init();
    // An already installed subscriber is not an error.
    let _ = result;
    Ok(())
}

/// Colour escapes only on a terminal, and never when `NO_COLOR` is set to anything but the
/// empty string (<https://no-color.org>): a pipe or a file gets plain text.
pub fn colour_wanted(stderr_is_terminal: bool, no_color: Option<&OsStr>) -> bool {
    stderr_is_terminal && no_color.is_none_or(|v| v.is_empty())
}

fn program_name() -> String {
    std::env::args()
        .next()
        .as_deref()
        .map(std::path::Path::new)
        .and_then(|p| p.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "mode".to_string())
}
