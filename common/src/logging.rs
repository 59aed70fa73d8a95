use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Log to stderr, filtered by `RUST_LOG` (default `info`).
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // A second init (tests, embedding) keeps the first subscriber; that is fine.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .try_init();
}

/// A command's outcome as its exit status: a failure is logged and printed on stderr,
/// prefixed with the program's name.
pub fn exit_status(
    program: &str,
    result: Result<std::process::ExitCode, String>,
) -> std::process::ExitCode {
    result.unwrap_or_else(|e| {
        tracing::error!("{e}");
        eprintln!("{program}: {e}");
        std::process::ExitCode::FAILURE
    })
}
