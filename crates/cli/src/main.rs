//! `hatoba`: the daemon and the commands that talk to it.

// First, so its macros are in scope in the modules below.
#[macro_use]
mod output;

mod client;
mod daemon;
mod format;
mod image;
mod pull;
mod system;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::parser::ValueSource;
use clap::{CommandFactory as _, FromArgMatches as _, Parser, Subcommand, ValueEnum};

/// A Kubernetes container runtime and node agent.
#[derive(Debug, Parser)]
#[command(name = "hatoba", version)]
struct Cli {
    /// Socket of the hatoba daemon that client commands connect to
    /// (`hatoba daemon` takes its socket from the config file, and rejects this option)
    #[arg(
        long,
        global = true,
        env = "HATOBA_SOCKET",
        default_value = hatoba_cri::DEFAULT_SOCKET,
        value_name = "PATH"
    )]
    socket: PathBuf,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the CRI daemon in the foreground until SIGTERM or SIGINT
    ///
    /// The daemon serves on the `socket` set in its config file. It rejects
    /// `--socket` and ignores HATOBA_SOCKET, which only client commands use.
    Daemon {
        /// Config file (without it, /etc/hatoba/config.toml is read if it exists)
        #[arg(long, value_name = "PATH")]
        config: Option<PathBuf>,
    },

    /// Pull, list, inspect, load and remove images
    #[command(subcommand)]
    Image(ImageCommand),

    /// Show the client and server versions
    Version,

    /// Show runtime conditions, image store usage and config paths
    Info {
        /// Output format
        #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
        format: OutputFormat,
    },
}

#[derive(Debug, Subcommand)]
enum ImageCommand {
    /// Pull an image from a registry
    Pull {
        /// Image reference, like 127.0.0.1:5000/testenv/busybox:latest
        reference: String,
        /// Registry credentials
        #[arg(long, value_name = "USER:PASS")]
        creds: Option<String>,
        /// Print only the image ID, no progress
        #[arg(long, short)]
        quiet: bool,
    },

    /// List images
    #[command(visible_alias = "list")]
    Ls {
        /// Print only image IDs
        #[arg(long, short)]
        quiet: bool,
        /// Show the digest of each image
        #[arg(long)]
        digests: bool,
        /// Output format
        #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
        format: OutputFormat,
    },

    /// Remove images and all of their names
    #[command(visible_alias = "remove")]
    Rm {
        /// Image names, IDs or ID prefixes
        #[arg(required = true)]
        names: Vec<String>,
    },

    /// Show details of images as a JSON array
    Inspect {
        /// Image names, IDs or ID prefixes
        #[arg(required = true)]
        names: Vec<String>,
    },

    /// Load images from an OCI layout or `docker save` archive
    Load {
        /// Archive file (tar, optionally gzip-compressed)
        #[arg(value_name = "FILE", required_unless_present = "input")]
        file: Option<PathBuf>,
        /// Archive file, as podman's `-i` option names it
        #[arg(long, short, value_name = "FILE", conflicts_with = "file")]
        input: Option<PathBuf>,
    },
}

/// Output format of listing commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum OutputFormat {
    /// Aligned columns for people
    Table,
    /// JSON for scripts
    Json,
}

/// Marks a failure whose messages were already printed, so `main` only
/// sets the exit code.
#[derive(Debug, thiserror::Error)]
#[error("{failed} of {total} operations failed")]
struct AlreadyReported {
    failed: usize,
    total: usize,
}

fn main() -> ExitCode {
    let cli = parse_cli(std::env::args_os()).unwrap_or_else(|error| error.exit());
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        // A reader that stopped reading, as `head` does, is not a failure.
        Err(error) if output::is_closed_stdout(&error) => ExitCode::SUCCESS,
        Err(error) => {
            if !error.is::<AlreadyReported>() {
                errln!("Error: {}", hatoba_cri::error_chain(error.as_ref()));
            }
            ExitCode::FAILURE
        }
    }
}

/// Parses the command line, rejecting `--socket` for `hatoba daemon`:
/// the daemon would silently serve on the socket of its config file instead.
fn parse_cli<I, T>(args: I) -> Result<Cli, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let mut command = Cli::command();
    let matches = command.try_get_matches_from_mut(args)?;
    let cli = Cli::from_arg_matches(&matches)?;
    let socket_given = matches.value_source("socket") == Some(ValueSource::CommandLine);
    if socket_given && matches!(cli.command, Command::Daemon { .. }) {
        return Err(command.error(
            ErrorKind::ArgumentConflict,
            "hatoba daemon does not take --socket: set `socket` in its config file \
             (/etc/hatoba/config.toml, or the file given with --config)",
        ));
    }
    Ok(cli)
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Daemon { config } => daemon::run(config),
        Command::Image(command) => block_on(image::run(&cli.socket, command)),
        Command::Version => block_on(system::version(&cli.socket)),
        Command::Info { format } => block_on(system::info(&cli.socket, format)),
    }
}

/// Runs a client command on a single-threaded runtime: the CLI makes one
/// call at a time.
fn block_on(command: impl Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|error| anyhow::anyhow!("failed to start the async runtime: {error}"))?;
    runtime.block_on(command)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn socket_defaults_to_run_hatoba() {
        let cli = Cli::try_parse_from(["hatoba", "version"]).expect("parses");
        // HATOBA_SOCKET in the test's environment would override the default.
        if std::env::var_os("HATOBA_SOCKET").is_none() {
            assert_eq!(cli.socket, PathBuf::from("/run/hatoba/hatoba.sock"));
        }
    }

    #[test]
    fn socket_flag_works_after_the_subcommand() {
        let cli = Cli::try_parse_from(["hatoba", "image", "ls", "--socket", "/tmp/x.sock"])
            .expect("parses");
        assert_eq!(cli.socket, PathBuf::from("/tmp/x.sock"));
    }

    #[test]
    fn daemon_rejects_the_socket_flag() {
        for args in [
            ["hatoba", "daemon", "--socket", "/tmp/x.sock"],
            ["hatoba", "--socket", "/tmp/x.sock", "daemon"],
        ] {
            let error = parse_cli(args).expect_err("daemon with --socket is rejected");
            assert_eq!(error.kind(), ErrorKind::ArgumentConflict);
            let message = error.to_string();
            assert!(
                message.contains("set `socket` in its config file"),
                "{args:?}: {message}"
            );
        }
    }

    #[test]
    fn daemon_without_the_socket_flag_parses() {
        let cli = parse_cli(["hatoba", "daemon", "--config", "/tmp/c.toml"]).expect("parses");
        assert!(matches!(cli.command, Command::Daemon { .. }));
        let cli = parse_cli(["hatoba", "version", "--socket", "/tmp/x.sock"]).expect("parses");
        assert_eq!(cli.socket, PathBuf::from("/tmp/x.sock"));
    }

    #[test]
    fn image_rm_needs_a_name() {
        assert!(Cli::try_parse_from(["hatoba", "image", "rm"]).is_err());
    }

    #[test]
    fn image_load_takes_input_file() {
        let cli =
            Cli::try_parse_from(["hatoba", "image", "load", "-i", "/tmp/a.tar"]).expect("parses");
        let Command::Image(ImageCommand::Load { file, input }) = cli.command else {
            panic!("expected image load, got {:?}", cli.command);
        };
        assert_eq!(file, None);
        assert_eq!(input, Some(PathBuf::from("/tmp/a.tar")));
    }

    #[test]
    fn image_load_takes_positional_file() {
        let cli = Cli::try_parse_from(["hatoba", "image", "load", "/tmp/a.tar"]).expect("parses");
        let Command::Image(ImageCommand::Load { file, input }) = cli.command else {
            panic!("expected image load, got {:?}", cli.command);
        };
        assert_eq!(file, Some(PathBuf::from("/tmp/a.tar")));
        assert_eq!(input, None);
    }

    #[test]
    fn image_load_needs_exactly_one_file() {
        assert!(Cli::try_parse_from(["hatoba", "image", "load"]).is_err());
        let both = ["hatoba", "image", "load", "/tmp/a.tar", "-i", "/tmp/b.tar"];
        assert!(Cli::try_parse_from(both).is_err());
    }
}
