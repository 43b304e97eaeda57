//! The daemon's settings, read from a TOML file.

use std::collections::BTreeMap;
use std::net::Ipv6Addr;
use std::path::{Path, PathBuf};

use hatoba_image::{ImageConfig, RegistryConfig};
use serde::{Deserialize, Serialize};

/// Config file that `hatoba daemon` reads when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/hatoba/config.toml";

/// Socket that the daemon serves on and the CLI connects to by default.
pub const DEFAULT_SOCKET: &str = "/run/hatoba/hatoba.sock";

/// Settings of `hatoba daemon`.
///
/// Every key is optional, and unknown keys are rejected at every level so a
/// misspelled key fails the start instead of being ignored. Keys and defaults:
///
/// | key | default | meaning |
/// | --- | --- | --- |
/// | `socket` | `"/run/hatoba/hatoba.sock"` | CRI socket, created with mode 0660; a missing parent directory is created with mode 0711 |
/// | `socket_group` | `""` | group owning the socket, by name or number; empty keeps the daemon's primary group; a number need not be in /etc/group |
/// | `root` | `"/var/lib/hatoba"` | persistent state; images live under `<root>/images` |
/// | `state` | `"/run/hatoba"` | runtime state: the daemon's lock file |
/// | `log_level` | `"info"` | comma-separated levels (`trace` ... `error`, `off`) and `target=level` directives (`hatoba_cri=debug,info`); `RUST_LOG` overrides it |
/// | `log_format` | `"text"` | `text` or `json`, written to stderr |
/// | `image.platform` | `""` | `os/arch[/variant]` that image indexes resolve to; empty means the host's |
/// | `image.max_concurrent_downloads` | `3` | layers fetched at once by one pull, at least 1 |
/// | `image.registries."HOST[:PORT]".mirrors` | `[]` | `http://` or `https://` endpoints tried before the registry |
/// | `image.registries."HOST[:PORT]".endpoint` | `""` | URL that replaces the registry's own endpoint |
/// | `image.registries."HOST[:PORT]".plain_http` | `false` | talk plain HTTP to the registry itself |
/// | `image.registries."HOST[:PORT]".insecure_skip_verify` | `false` | skip TLS certificate checks for the registry and its mirrors |
///
/// The image store's directory is not a key: it is always `<root>/images`.
/// A registry without a section is reached over HTTPS, or plain HTTP for a
/// loopback host. A section replaces that choice with its `plain_http`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonConfig {
    /// CRI socket path, absolute. Default `/run/hatoba/hatoba.sock`.
    pub socket: PathBuf,
    /// Group owning the socket, by name or numeric ID. Default empty: the
    /// daemon's primary group. A numeric ID is used as given, even when
    /// /etc/group has no name for it.
    pub socket_group: String,
    /// Directory of persistent state, absolute. Default `/var/lib/hatoba`.
    pub root: PathBuf,
    /// Directory of runtime state, absolute. Default `/run/hatoba`.
    pub state: PathBuf,
    /// Tracing filter: levels and `target=level` directives, comma-separated.
    /// Default `info`.
    pub log_level: String,
    /// Format of log lines on stderr. Default `text`.
    pub log_format: LogFormat,
    /// Settings of the image service.
    pub image: ImageSettings,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            socket: PathBuf::from(DEFAULT_SOCKET),
            socket_group: String::new(),
            root: PathBuf::from("/var/lib/hatoba"),
            state: PathBuf::from("/run/hatoba"),
            log_level: "info".to_owned(),
            log_format: LogFormat::Text,
            image: ImageSettings::default(),
        }
    }
}

/// Format of the daemon's log lines.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The `[image]` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ImageSettings {
    /// `os/arch[/variant]` that image indexes resolve to. Default empty: the host's.
    pub platform: String,
    /// Layers fetched at once by one pull. Default 3.
    pub max_concurrent_downloads: usize,
    /// Per-registry settings keyed by `host[:port]`. Default empty.
    pub registries: BTreeMap<String, RegistryConfig>,
}

impl Default for ImageSettings {
    fn default() -> Self {
        Self {
            platform: String::new(),
            max_concurrent_downloads: 3,
            registries: BTreeMap::new(),
        }
    }
}

/// The config file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("failed to read config file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The message is the TOML parser's, with the line and column it points
    /// at and the text of that line, which shows the key.
    #[error("{}: {message}", path.display())]
    Parse { path: PathBuf, message: String },

    #[error("{}: {source}", path.display())]
    Invalid {
        path: PathBuf,
        #[source]
        source: InvalidValue,
    },
}

/// A config key has a value the daemon cannot use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {key}: {reason}")]
pub struct InvalidValue {
    /// Dotted path of the key, `image.registries."127.0.0.1:5000".mirrors`.
    pub key: String,
    pub reason: String,
}

impl InvalidValue {
    fn new(key: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            reason: reason.into(),
        }
    }
}

impl DaemonConfig {
    /// Reads and validates the config file at `path`. A missing file means
    /// all defaults unless the user named the file (`explicit`).
    pub fn load(path: &Path, explicit: bool) -> Result<Self, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound && !explicit => {
                return Ok(Self::default());
            }
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        Self::parse(&text, path)
    }

    /// Parses and validates TOML text read from `path`.
    fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text).map_err(|error| ConfigError::Parse {
            path: path.to_owned(),
            message: one_line_toml_error(&error, text),
        })?;

        config.validate().map_err(|source| ConfigError::Invalid {
            path: path.to_owned(),
            source,
        })?;
        Ok(config)
    }

    /// Checks every value that TOML types alone do not constrain.
    pub fn validate(&self) -> Result<(), InvalidValue> {
        check_absolute("socket", &self.socket)?;
        if self.socket.file_name().is_none() {
            return Err(InvalidValue::new(
                "socket",
                format!("{} does not name a file", self.socket.display()),
            ));
        }
        check_absolute("root", &self.root)?;
        check_absolute("state", &self.state)?;
        check_log_level(&self.log_level)?;
        self.image.validate()
    }

    /// Returns the image service's settings, with its store under `<root>/images`.
    pub fn image_config(&self) -> ImageConfig {
        ImageConfig {
            root: self.root.join("images"),
            registries: self.image.registries.clone(),
            platform: self.image.platform.clone(),
            max_concurrent_downloads: self.image.max_concurrent_downloads,
        }
    }
}

impl ImageSettings {
    fn validate(&self) -> Result<(), InvalidValue> {
        check_platform(&self.platform)?;

        if self.max_concurrent_downloads == 0 {
            return Err(InvalidValue::new(
                "image.max_concurrent_downloads",
                "must be at least 1",
            ));
        }

        for (host, registry) in &self.registries {
            check_registry_host(host).map_err(|reason| {
                InvalidValue::new(format!("image.registries key {host:?}"), reason)
            })?;
            for mirror in &registry.mirrors {
                check_endpoint_url(mirror).map_err(|reason| {
                    InvalidValue::new(format!("image.registries.{host:?}.mirrors"), reason)
                })?;
            }
            if !registry.endpoint.is_empty() {
                check_endpoint_url(&registry.endpoint).map_err(|reason| {
                    InvalidValue::new(format!("image.registries.{host:?}.endpoint"), reason)
                })?;
            }
        }
        Ok(())
    }
}

/// Renders a TOML error on one line, as the daemon reports start errors:
/// the parser's message, its line and column, and the text of that line.
/// The parser's own rendering spans several lines with a caret diagram.
fn one_line_toml_error(error: &toml::de::Error, text: &str) -> String {
    let message = error.message().trim_end();
    let Some(span) = error.span() else {
        return format!("TOML parse error: {message}");
    };

    let start = span.start.min(text.len());
    if !text.is_char_boundary(start) {
        return format!("TOML parse error: {message}");
    }
    let line_start = text[..start].rfind('\n').map_or(0, |newline| newline + 1);
    let line_end = text[start..]
        .find('\n')
        .map_or(text.len(), |newline| start + newline);
    let line_number = text[..start].matches('\n').count() + 1;
    let column = text[line_start..start].chars().count() + 1;
    let line_text = text[line_start..line_end].trim();
    format!("TOML parse error at line {line_number}, column {column}: {message}, in `{line_text}`")
}

fn check_absolute(key: &str, path: &Path) -> Result<(), InvalidValue> {
    if path.is_absolute() {
        Ok(())
    } else {
        Err(InvalidValue::new(
            key,
            format!("{:?} is not an absolute path", path.display().to_string()),
        ))
    }
}

fn check_log_level(filter: &str) -> Result<(), InvalidValue> {
    let invalid = |reason: String| InvalidValue::new("log_level", reason);
    check_log_filter(filter).map_err(|error| invalid(error.to_string()))?;

    // The daemon parses the filter again when it sets up logging. A filter
    // that passes the check above but not tracing fails here, before the start.
    tracing_subscriber::EnvFilter::builder()
        .parse(filter)
        .map(|_| ())
        .map_err(|error| invalid(format!("{filter:?} is not a tracing filter: {error}")))
}

/// Levels a log filter directive may name, in the words of the error messages.
const LOG_LEVELS: &str = "trace, debug, info, warn, error, off";

/// A log filter that hatoba does not accept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LogFilterError {
    #[error("the filter is empty; use a level such as \"info\"")]
    Empty,

    #[error("{filter:?} has an empty directive between commas")]
    EmptyDirective { filter: String },

    #[error("{filter:?} contains whitespace; separate directives with commas only")]
    Whitespace { filter: String },

    #[error(
        "{directive:?} is not a level or target=level; the levels are {LOG_LEVELS}, like \"info\" or \"hatoba_cri=debug,info\""
    )]
    NotADirective { directive: String },

    #[error("{directive:?} has an unknown level {level:?}; the levels are {LOG_LEVELS}")]
    UnknownLevel { directive: String, level: String },

    #[error(
        "{directive:?} has an invalid target {target:?}; a target is a module path like \"hatoba_cri\" or \"hatoba_cri::server\""
    )]
    InvalidTarget { directive: String, target: String },
}

/// Checks a tracing filter: comma-separated directives, each a level or
/// `target=level`, levels case-insensitive.
///
/// tracing reads a bare word that is not a level as a target name, so a
/// typo like `warning` would silently turn off every other log line. Span
/// and field filters (`target[span{field}]=level`) are rejected as well,
/// because nothing in hatoba needs them.
pub fn check_log_filter(filter: &str) -> Result<(), LogFilterError> {
    if filter.trim().is_empty() {
        return Err(LogFilterError::Empty);
    }
    // tracing mis-parses directives with spaces around them.
    if filter.contains(char::is_whitespace) {
        return Err(LogFilterError::Whitespace {
            filter: filter.to_owned(),
        });
    }
    for directive in filter.split(',') {
        if directive.is_empty() {
            return Err(LogFilterError::EmptyDirective {
                filter: filter.to_owned(),
            });
        }
        check_log_directive(directive)?;
    }
    Ok(())
}

fn check_log_directive(directive: &str) -> Result<(), LogFilterError> {
    let Some((target, level)) = directive.split_once('=') else {
        return if is_log_level(directive) {
            Ok(())
        } else {
            Err(LogFilterError::NotADirective {
                directive: directive.to_owned(),
            })
        };
    };

    // Targets are module paths such as `hatoba_cri::server`: lowercase
    // words joined by `::`. A crate name with `-` never matches anything.
    let target_ok = target.split("::").all(|part| {
        !part.is_empty()
            && part
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    });
    if !target_ok {
        return Err(LogFilterError::InvalidTarget {
            directive: directive.to_owned(),
            target: target.to_owned(),
        });
    }
    if !is_log_level(level) {
        return Err(LogFilterError::UnknownLevel {
            directive: directive.to_owned(),
            level: level.to_owned(),
        });
    }
    Ok(())
}

fn is_log_level(word: &str) -> bool {
    ["trace", "debug", "info", "warn", "error", "off"]
        .iter()
        .any(|level| word.eq_ignore_ascii_case(level))
}

/// Checks an `os/arch[/variant]` platform string. Empty means the host's platform.
fn check_platform(platform: &str) -> Result<(), InvalidValue> {
    if platform.is_empty() {
        return Ok(());
    }
    let parts: Vec<&str> = platform.split('/').collect();
    let well_formed = (2..=3).contains(&parts.len())
        && parts
            .iter()
            .all(|part| !part.is_empty() && part.chars().all(|c| c.is_ascii_alphanumeric()));
    if well_formed {
        Ok(())
    } else {
        Err(InvalidValue::new(
            "image.platform",
            format!(
                "{platform:?} is not os/arch[/variant], like \"linux/amd64\" or \"linux/arm64/v8\""
            ),
        ))
    }
}

/// Checks a registry key: `host[:port]`, without scheme or path.
fn check_registry_host(key: &str) -> Result<(), String> {
    let expected = "expected host[:port] without a scheme or path, like \"registry.example.com\" or \"127.0.0.1:5000\"";

    let (host_ok, port) = if let Some(rest) = key.strip_prefix('[') {
        // A bracketed IPv6 address, `[::1]:5000`.
        let Some((address, after)) = rest.split_once(']') else {
            return Err(expected.to_owned());
        };
        let port = match after {
            "" => None,
            _ => match after.strip_prefix(':') {
                Some(port) => Some(port),
                None => return Err(expected.to_owned()),
            },
        };
        (address.parse::<Ipv6Addr>().is_ok(), port)
    } else {
        match key.split_once(':') {
            Some((host, port)) => (is_host_name(host), Some(port)),
            None => (is_host_name(key), None),
        }
    };

    let port_ok = port.is_none_or(|port| port.parse::<u16>().is_ok_and(|number| number != 0));
    if host_ok && port_ok {
        Ok(())
    } else {
        Err(expected.to_owned())
    }
}

/// Tells whether `host` is a DNS name or an IPv4 address: dot-separated
/// labels of letters, digits and inner hyphens.
fn is_host_name(host: &str) -> bool {
    !host.is_empty()
        && host.split('.').all(|label| {
            !label.is_empty()
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

/// Checks a mirror or registry endpoint: an `http://` or `https://` URL with a host and
/// an optional path, without credentials or query.
fn check_endpoint_url(url: &str) -> Result<(), String> {
    let not_url = || format!("{url:?} is not an http(s)://host[:port][/path] URL");

    let uri: http::Uri = url.parse().map_err(|_| not_url())?;
    let scheme_ok = matches!(uri.scheme_str(), Some("http" | "https"));
    let host_ok = uri.host().is_some_and(|host| !host.is_empty());
    let credentials = uri
        .authority()
        .is_some_and(|authority| authority.as_str().contains('@'));
    if scheme_ok && host_ok && !credentials && uri.query().is_none() {
        Ok(())
    } else {
        Err(not_url())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<DaemonConfig, ConfigError> {
        DaemonConfig::parse(text, Path::new("/etc/hatoba/config.toml"))
    }

    /// Parses `text` and returns the error message, failing if it parses.
    fn error_of(text: &str) -> String {
        match parse(text) {
            Ok(config) => panic!("expected an error for {text:?}, got {config:?}"),
            Err(error) => error.to_string(),
        }
    }

    #[test]
    fn empty_file_means_defaults() {
        let config = parse("").expect("empty config parses");
        assert_eq!(config, DaemonConfig::default());
        assert_eq!(config.socket, Path::new("/run/hatoba/hatoba.sock"));
        assert_eq!(config.root, Path::new("/var/lib/hatoba"));
        assert_eq!(config.state, Path::new("/run/hatoba"));
        assert_eq!(config.log_level, "info");
        assert_eq!(config.log_format, LogFormat::Text);
        assert_eq!(config.image.max_concurrent_downloads, 3);
        assert!(config.image.platform.is_empty());
        assert!(config.image.registries.is_empty());
    }

    #[test]
    fn contract_example_parses() {
        let text = r#"
socket = "/run/hatoba/hatoba.sock"
socket_group = ""
root = "/var/lib/hatoba"
state = "/run/hatoba"
log_level = "info"
log_format = "json"

[image]
platform = "linux/arm64/v8"
max_concurrent_downloads = 5

[image.registries."127.0.0.1:5000"]
mirrors = ["http://127.0.0.1:6000"]
plain_http = true
insecure_skip_verify = false
"#;
        let config = parse(text).expect("example parses");
        assert_eq!(config.log_format, LogFormat::Json);
        assert_eq!(config.image.platform, "linux/arm64/v8");
        let registry = &config.image.registries["127.0.0.1:5000"];
        assert_eq!(registry.mirrors, ["http://127.0.0.1:6000"]);
        assert!(registry.plain_http);
    }

    #[test]
    fn image_config_lives_under_root() {
        let text = r#"
root = "/srv/hatoba"
[image]
platform = "linux/amd64"
max_concurrent_downloads = 2
[image.registries."127.0.0.1:5000"]
plain_http = true
mirrors = ["https://mirror.example.com"]
"#;
        let image = parse(text).expect("config parses").image_config();
        assert_eq!(image.root, Path::new("/srv/hatoba/images"));
        assert_eq!(image.platform, "linux/amd64");
        assert_eq!(image.max_concurrent_downloads, 2);
        let registry = &image.registries["127.0.0.1:5000"];
        assert!(registry.plain_http);
        assert!(!registry.insecure_skip_verify);
        assert_eq!(registry.mirrors, ["https://mirror.example.com"]);
    }

    #[test]
    fn unknown_keys_rejected_at_every_level() {
        let cases = [
            ("sockett = \"/x.sock\"", "sockett"),
            ("[image]\nroot = \"/images\"", "root"),
            ("[image]\nplatfrom = \"linux/amd64\"", "platfrom"),
            (
                "[image.registries.\"127.0.0.1:5000\"]\nplain-http = true",
                "plain-http",
            ),
            ("[runtime]\nx = 1", "runtime"),
        ];
        for (text, key) in cases {
            let message = error_of(text);
            assert!(message.contains(key), "{text:?}: {message}");
            assert!(message.contains("line"), "{text:?}: {message}");
        }
    }

    #[test]
    fn parse_errors_name_file_line_and_key() {
        let message = error_of("root = \"/var/lib/hatoba\"\nlog_format = \"xml\"\n");
        assert!(
            message.starts_with("/etc/hatoba/config.toml: "),
            "{message}"
        );
        assert!(message.contains("line 2"), "{message}");
        assert!(message.contains("log_format"), "{message}");
        assert!(message.contains("xml"), "{message}");
    }

    #[test]
    fn parse_errors_fit_on_one_line() {
        let message = error_of("[image]\nmax_concurrent_downloads = \"three\"\n");
        assert!(!message.contains('\n'), "{message}");
        assert!(message.contains("line 2, column 28"), "{message}");
        assert!(
            message.ends_with("in `max_concurrent_downloads = \"three\"`"),
            "{message}"
        );
    }

    #[test]
    fn wrongly_typed_values_are_rejected() {
        let cases = [
            (
                "max_concurrent_downloads = -1",
                "[image]\nmax_concurrent_downloads = -1",
            ),
            (
                "plain_http",
                "[image.registries.\"a.io\"]\nplain_http = \"yes\"",
            ),
            ("socket", "socket = 5"),
            (
                "mirrors",
                "[image.registries.\"a.io\"]\nmirrors = \"http://b.io\"",
            ),
        ];
        for (key, text) in cases {
            let message = error_of(text);
            assert!(message.contains(key), "{text:?}: {message}");
        }
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases = [
            ("socket = \"hatoba.sock\"", "invalid socket"),
            ("socket = \"/\"", "invalid socket"),
            ("root = \"var/lib/hatoba\"", "invalid root"),
            ("state = \"./run\"", "invalid state"),
            ("log_level = \"\"", "invalid log_level"),
            ("log_level = \"hatoba=loud\"", "invalid log_level"),
            ("log_level = \"warning\"", "invalid log_level"),
            (
                "[image]\nmax_concurrent_downloads = 0",
                "invalid image.max_concurrent_downloads",
            ),
            ("[image]\nplatform = \"amd64\"", "invalid image.platform"),
            (
                "[image]\nplatform = \"linux//v8\"",
                "invalid image.platform",
            ),
            (
                "[image.registries.\"http://127.0.0.1:5000\"]",
                "invalid image.registries key \"http://127.0.0.1:5000\"",
            ),
            (
                "[image.registries.\"127.0.0.1:5000/v2\"]",
                "invalid image.registries key",
            ),
            (
                "[image.registries.\"a.io:0\"]",
                "invalid image.registries key",
            ),
            (
                "[image.registries.\"a.io:http\"]",
                "invalid image.registries key",
            ),
            ("[image.registries.\"\"]", "invalid image.registries key"),
            (
                "[image.registries.\"[::1\"]",
                "invalid image.registries key",
            ),
            (
                "[image.registries.\"a.io\"]\nmirrors = [\"127.0.0.1:6000\"]",
                "invalid image.registries.\"a.io\".mirrors",
            ),
            (
                "[image.registries.\"a.io\"]\nmirrors = [\"ftp://127.0.0.1\"]",
                "invalid image.registries.\"a.io\".mirrors",
            ),
            (
                "[image.registries.\"a.io\"]\nmirrors = [\"http://\"]",
                "invalid image.registries.\"a.io\".mirrors",
            ),
            (
                "[image.registries.\"a.io\"]\nmirrors = [\"http://user:pw@m.io\"]",
                "invalid image.registries.\"a.io\".mirrors",
            ),
            (
                "[image.registries.\"a.io\"]\nmirrors = [\"http://m.io/?x=1\"]",
                "invalid image.registries.\"a.io\".mirrors",
            ),
            (
                "[image.registries.\"a.io\"]\nendpoint = \"127.0.0.1:5000\"",
                "invalid image.registries.\"a.io\".endpoint",
            ),
        ];
        for (text, expected) in cases {
            let message = error_of(text);
            assert!(message.contains(expected), "{text:?}: {message}");
            assert!(
                message.starts_with("/etc/hatoba/config.toml: "),
                "{text:?}: {message}"
            );
        }
    }

    #[test]
    fn good_values_are_accepted() {
        let cases = [
            "log_level = \"debug\"",
            "log_level = \"hatoba_cri=trace,info\"",
            "log_level = \"WARN\"",
            "log_level = \"info,hatoba_cri=Debug\"",
            "socket_group = \"hatoba\"",
            "[image.registries.\"docker.io\"]",
            "[image.registries.\"localhost:5000\"]",
            "[image.registries.\"[::1]:5000\"]",
            "[image.registries.\"[::1]\"]",
            "[image.registries.\"a.io\"]\nmirrors = [\"http://127.0.0.1:6000\", \"https://m.example.com/path\"]",
        ];
        for text in cases {
            if let Err(error) = parse(text) {
                panic!("{text:?} was rejected: {error}");
            }
        }
    }

    #[test]
    fn level_and_target_filters_accepted() {
        let cases = [
            "trace",
            "debug",
            "info",
            "warn",
            "error",
            "off",
            "INFO",
            "Warn",
            "hatoba_cri=debug",
            "hatoba_cri::server=TRACE,info",
            "info,h2=off",
            "hatoba_cri=warn,tower::buffer=error",
        ];
        for filter in cases {
            assert_eq!(check_log_filter(filter), Ok(()), "{filter:?}");
            // What passes the check must also be a filter tracing understands.
            if let Err(error) = tracing_subscriber::EnvFilter::builder().parse(filter) {
                panic!("{filter:?} passed the check but not tracing: {error}");
            }
        }
    }

    #[test]
    fn log_filter_typos_are_rejected() {
        let cases = [
            ("warning", "\"warning\" is not a level or target=level"),
            ("inf", "\"inf\" is not a level or target=level"),
            ("verbose", "\"verbose\" is not a level or target=level"),
            (
                "hatoba_cri",
                "\"hatoba_cri\" is not a level or target=level",
            ),
            ("info,debg", "\"debg\" is not a level or target=level"),
            ("3", "\"3\" is not a level or target=level"),
            (
                "hatoba=loud",
                "\"hatoba=loud\" has an unknown level \"loud\"",
            ),
            ("hatoba=", "\"hatoba=\" has an unknown level \"\""),
            ("=info", "\"=info\" has an invalid target \"\""),
            (
                "hatoba-cri=debug",
                "\"hatoba-cri=debug\" has an invalid target \"hatoba-cri\"",
            ),
            (
                "Hatoba_CRI=info",
                "\"Hatoba_CRI=info\" has an invalid target \"Hatoba_CRI\"",
            ),
            (
                "hatoba/cri=info",
                "\"hatoba/cri=info\" has an invalid target \"hatoba/cri\"",
            ),
            ("info, debug", "\"info, debug\" contains whitespace"),
            ("info ", "\"info \" contains whitespace"),
            (
                "hatoba[pull]=debug",
                "\"hatoba[pull]=debug\" has an invalid target \"hatoba[pull]\"",
            ),
            ("info,,debug", "has an empty directive between commas"),
            ("info,", "has an empty directive between commas"),
            (" ", "the filter is empty"),
        ];
        for (filter, expected) in cases {
            let message = check_log_filter(filter).expect_err(filter).to_string();
            assert!(message.contains(expected), "{filter:?}: {message}");
        }
    }

    #[test]
    fn log_level_error_names_directive_and_levels() {
        let message = error_of("log_level = \"info,warning\"");
        assert_eq!(
            message,
            "/etc/hatoba/config.toml: invalid log_level: \"warning\" is not a level or \
             target=level; the levels are trace, debug, info, warn, error, off, like \"info\" \
             or \"hatoba_cri=debug,info\""
        );
    }

    #[test]
    fn missing_default_file_means_defaults() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("config.toml");
        let config = DaemonConfig::load(&path, false).expect("missing default file is fine");
        assert_eq!(config, DaemonConfig::default());
    }

    #[test]
    fn missing_explicit_file_is_an_error() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("config.toml");
        let error = DaemonConfig::load(&path, true).expect_err("missing explicit file fails");
        let message = error.to_string();
        assert!(
            message.starts_with("failed to read config file "),
            "{message}"
        );
        assert!(message.contains(&path.display().to_string()), "{message}");
    }

    #[test]
    fn load_reads_the_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("config.toml");
        std::fs::write(&path, "state = \"/tmp/hatoba-state\"\n").expect("write config");
        let config = DaemonConfig::load(&path, true).expect("config loads");
        assert_eq!(config.state, Path::new("/tmp/hatoba-state"));
    }
}
