//! Writing what commands print. A reader that closes stdout early, as
//! `hatoba image ls | head -1` does, ends the command quietly, as it ends `ls`.

use std::fmt;
use std::io::Write as _;

/// Writing to stdout failed.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    /// The reader of stdout went away: the command ends, but has not failed.
    #[error("stdout was closed by its reader")]
    Closed,

    #[error("failed to write to stdout: {source}")]
    Write {
        #[source]
        source: std::io::Error,
    },
}

impl From<std::io::Error> for OutputError {
    fn from(source: std::io::Error) -> Self {
        if source.kind() == std::io::ErrorKind::BrokenPipe {
            Self::Closed
        } else {
            Self::Write { source }
        }
    }
}

/// Returns whether `error` only means that the reader of stdout went away.
pub fn is_closed_stdout(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<OutputError>(),
            Some(OutputError::Closed)
        )
    })
}

/// Writes to stdout and flushes, so a write error is reported by the
/// command instead of being lost in the flush at exit.
pub fn print(text: fmt::Arguments<'_>) -> Result<(), OutputError> {
    let mut stdout = std::io::stdout().lock();
    stdout.write_fmt(text)?;
    stdout.flush()?;
    Ok(())
}

/// Writes to stderr. A failure is ignored: stderr is where it would be reported.
pub fn eprint(text: fmt::Arguments<'_>) {
    let _ = std::io::stderr().lock().write_fmt(text);
}

/// Prints a line to stdout, returning an [`OutputError`] instead of
/// panicking as `println!` does.
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::output::print(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// Prints to stdout without a newline, like [`outln!`].
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::output::print(format_args!($($arg)*))
    };
}

/// Prints a line to stderr, ignoring a failure instead of panicking as
/// `eprintln!` does.
macro_rules! errln {
    ($($arg:tt)*) => {
        $crate::output::eprint(format_args!("{}\n", format_args!($($arg)*)))
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broken_pipe_means_closed() {
        let error = OutputError::from(std::io::Error::from(std::io::ErrorKind::BrokenPipe));
        assert!(matches!(error, OutputError::Closed));
        let error = anyhow::Error::from(error).context("failed to list images");
        assert!(is_closed_stdout(&error));
    }

    #[test]
    fn other_write_errors_are_failures() {
        let error = OutputError::from(std::io::Error::from(std::io::ErrorKind::StorageFull));
        assert!(matches!(error, OutputError::Write { .. }), "{error}");
        assert!(
            error.to_string().starts_with("failed to write to stdout: "),
            "{error}"
        );
        assert!(!is_closed_stdout(&anyhow::Error::from(error)));
    }
}
