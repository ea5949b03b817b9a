//! Logging, including the access log: never allowed to block the data plane. Lines go through a
//! bounded in-memory queue to a writer thread; when the queue is full a line is dropped and
//! counted (`switchyard_log_lines_dropped_total`) rather than making a proxy task wait for
//! stderr.
use std::sync::OnceLock;

use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};

/// Lines the queue holds before dropping: seconds of access log at thousands of requests a
/// second. Its slots are allocated (and touched) up front, 32 bytes each: 64 Ki lines cost
/// 1.5 MiB more resident memory per agent than this.
pub const QUEUE_LINES: usize = 16 * 1024;

static DROPPED: OnceLock<ErrorCounter> = OnceLock::new();

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
}

/// Installs the global subscriber (filter from `RUST_LOG`, default `info`). Keep the guard
/// until exit: dropping it flushes the queue.
pub fn init(format: Format) -> WorkerGuard {
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(QUEUE_LINES)
        .thread_name("log-writer")
        .finish(std::io::stderr());
    let _ = DROPPED.set(writer.error_counter());
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only for a terminal: a container log, a file or a pipe gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(writer).with_ansi(ansi);
    match format {
        Format::Text => builder.init(),
        Format::Json => builder.json().init(),
    }
    guard
}

/// Lines dropped because the queue was full (0 when logging was not set up by [`init`]).
pub fn dropped() -> u64 {
    DROPPED.get().map_or(0, |c| c.dropped_lines() as u64)
}
