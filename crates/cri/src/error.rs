//! The one place where errors become gRPC status codes.

use hatoba_image::ImageError;
use tonic::{Code, Status};

/// Maps an image error to the gRPC status that CRI clients expect.
///
/// `DigestMismatch` becomes `DataLoss`: the registry served corrupt content,
/// which a retry from the same source will not fix. `Registry` (an error
/// response the image crate could not classify further) becomes `Unknown`
/// because its HTTP status does not tell whether a retry helps.
/// `InvalidConfig` (a daemon setting the image crate rejects) becomes
/// `FailedPrecondition`: the node, not the request, needs fixing.
pub fn image_error_status(error: &ImageError) -> Status {
    let code = match error {
        ImageError::InvalidReference { .. } | ImageError::InvalidArchive { .. } => {
            Code::InvalidArgument
        }
        ImageError::NotFound { .. } => Code::NotFound,
        ImageError::RegistryUnavailable { .. } => Code::Unavailable,
        ImageError::Unauthenticated { .. } => Code::Unauthenticated,
        ImageError::Registry { .. } => Code::Unknown,
        ImageError::DigestMismatch { .. } => Code::DataLoss,
        ImageError::UnsafeLayerEntry { .. }
        | ImageError::UnsupportedMediaType { .. }
        | ImageError::InvalidContent { .. }
        | ImageError::PlatformNotFound { .. }
        | ImageError::InvalidConfig { .. } => Code::FailedPrecondition,
        ImageError::Storage { .. } | ImageError::Unpack { .. } => Code::Internal,
    };
    Status::new(code, error_chain(error))
}

/// Joins an error and its sources with `": "`, skipping a source whose text
/// the message already ends with (thiserror messages often embed their source).
///
/// Control characters are escaped, because registries and archives put
/// their own text into errors: a newline would forge a log line and an
/// escape sequence would recolor the terminal showing the message.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.ends_with(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    escape_control(&message)
}

/// Escapes the control characters of `text` as `str::escape_debug` writes
/// them (`\n`, `\r`, `\t`, `\u{1b}`). Invisible characters that break or
/// reorder lines on display are escaped too. Every other character stays,
/// quotes and backslashes included, so the text keeps to one line.
pub fn escape_control(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() || is_invisible_format(c) {
            escaped.extend(c.escape_debug());
        } else {
            escaped.push(c);
        }
    }
    escaped
}

/// Returns whether `c` is a line or paragraph separator, or a format
/// character that changes text direction or hides itself (Unicode general
/// categories Zl, Zp and the bidirectional and zero-width marks of Cf).
fn is_invisible_format(c: char) -> bool {
    matches!(
        c,
        '\u{00ad}'
            | '\u{061c}'
            | '\u{180e}'
            | '\u{200b}'..='\u{200f}'
            | '\u{2028}'..='\u{202e}'
            | '\u{2060}'..='\u{2064}'
            | '\u{2066}'..='\u{206f}'
            | '\u{feff}'
    )
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::path::PathBuf;

    use super::*;

    fn io_error() -> io::Error {
        io::Error::new(io::ErrorKind::PermissionDenied, "permission denied")
    }

    #[test]
    fn every_image_error_maps_to_its_code() {
        let cases = [
            (
                ImageError::InvalidReference {
                    reference: "Bad Ref".into(),
                    reason: "uppercase".into(),
                },
                Code::InvalidArgument,
            ),
            (
                ImageError::NotFound {
                    reference: "busybox".into(),
                },
                Code::NotFound,
            ),
            (
                ImageError::RegistryUnavailable {
                    registry: "127.0.0.1:5000".into(),
                    reason: "connection refused".into(),
                },
                Code::Unavailable,
            ),
            (
                ImageError::Unauthenticated {
                    registry: "127.0.0.1:5001".into(),
                    reference: "private/busybox".into(),
                    reason: "401".into(),
                },
                Code::Unauthenticated,
            ),
            (
                ImageError::Registry {
                    registry: "127.0.0.1:5000".into(),
                    reference: "busybox".into(),
                    reason: "500".into(),
                },
                Code::Unknown,
            ),
            (
                ImageError::PlatformNotFound {
                    reference: "multiarch".into(),
                    platform: "linux/s390x".into(),
                },
                Code::FailedPrecondition,
            ),
            (
                ImageError::UnsupportedMediaType {
                    reference: "busybox".into(),
                    media_type: "text/plain".into(),
                },
                Code::FailedPrecondition,
            ),
            (
                ImageError::InvalidContent {
                    reference: "busybox".into(),
                    what: "manifest",
                    reason: "not JSON".into(),
                },
                Code::FailedPrecondition,
            ),
            (
                ImageError::DigestMismatch {
                    expected: "sha256:aa".into(),
                    actual: "sha256:bb".into(),
                },
                Code::DataLoss,
            ),
            (
                ImageError::UnsafeLayerEntry {
                    layer: "sha256:aa".into(),
                    entry: "../x".into(),
                    reason: "escapes the root".into(),
                },
                Code::FailedPrecondition,
            ),
            (
                ImageError::Unpack {
                    layer: "sha256:aa".into(),
                    entry: "bin/sh".into(),
                    source: io_error(),
                },
                Code::Internal,
            ),
            (
                ImageError::Storage {
                    step: "write",
                    path: PathBuf::from("/var/lib/hatoba/images/blobs"),
                    source: io_error(),
                },
                Code::Internal,
            ),
            (
                ImageError::InvalidConfig {
                    setting: "platform".into(),
                    reason: "unknown architecture".into(),
                },
                Code::FailedPrecondition,
            ),
            (
                ImageError::InvalidArchive {
                    reason: "no index.json".into(),
                },
                Code::InvalidArgument,
            ),
        ];
        for (error, code) in cases {
            let status = image_error_status(&error);
            assert_eq!(status.code(), code, "{error}");
            assert_eq!(status.message(), error.to_string(), "{error}");
        }
    }

    #[derive(Debug, thiserror::Error)]
    #[error("failed to open the store")]
    struct Outer {
        #[source]
        source: io::Error,
    }

    #[test]
    fn error_chain_appends_new_sources() {
        let error = Outer { source: io_error() };
        assert_eq!(
            error_chain(&error),
            "failed to open the store: permission denied"
        );
    }

    #[test]
    fn error_chain_escapes_control_characters() {
        let error = ImageError::Registry {
            registry: "127.0.0.1:5000".into(),
            reference: "busybox".into(),
            reason: "denied\n2026-01-01T00:00:00Z  INFO forged\r\x1b[31mred\x1b[0m\t\u{7f}\u{85}"
                .into(),
        };
        let message = error_chain(&error);
        assert!(
            message.ends_with(
                "denied\\n2026-01-01T00:00:00Z  INFO forged\\r\\u{1b}[31mred\\u{1b}[0m\\t\\u{7f}\\u{85}"
            ),
            "{message}"
        );
        assert!(!message.chars().any(char::is_control), "{message:?}");
    }

    #[test]
    fn error_chain_escapes_control_characters_of_sources() {
        let error = Outer {
            source: io::Error::other("numeric field was not a number: \n\x1b[1mFORGED"),
        };
        assert_eq!(
            error_chain(&error),
            "failed to open the store: numeric field was not a number: \\n\\u{1b}[1mFORGED"
        );
    }

    #[test]
    fn separators_and_direction_marks_are_escaped() {
        let text = "a\u{2028}b\u{2029}c\u{202e}d\u{200b}e\u{feff}f";
        assert_eq!(
            escape_control(text),
            "a\\u{2028}b\\u{2029}c\\u{202e}d\\u{200b}e\\u{feff}f"
        );
    }

    #[test]
    fn error_chain_keeps_normal_text() {
        let text =
            "pull of \"caf\u{e9}/\u{65e5}\u{672c}:latest\" failed: C:\\path \u{2014} \u{1f600}";
        let error = Outer {
            source: io::Error::other(text),
        };
        assert_eq!(
            error_chain(&error),
            format!("failed to open the store: {text}")
        );
    }

    #[test]
    fn status_messages_are_escaped() {
        let error = ImageError::InvalidArchive {
            reason: "failed to read the tar stream: bad\nINFO forged \x1b[31m".into(),
        };
        let status = image_error_status(&error);
        assert_eq!(
            status.message(),
            "invalid image archive: failed to read the tar stream: bad\\nINFO forged \\u{1b}[31m",
        );
    }

    #[test]
    fn error_chain_skips_repeated_source() {
        let error = ImageError::Storage {
            step: "create",
            path: PathBuf::from("/x"),
            source: io_error(),
        };
        assert_eq!(
            error_chain(&error),
            "failed to create /x: permission denied"
        );
    }
}
