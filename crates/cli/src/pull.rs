//! `hatoba image pull`: streams the daemon's pull events and draws them.

use std::collections::{HashMap, HashSet};
use std::io::IsTerminal as _;

use anyhow::Context as _;
use hatoba_cri::proto::{self, pull_event::Event};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use crate::client::Clients;
use crate::format::{human_size, short_id};

/// Pulls `reference` and prints its image ID on stdout. Progress goes to
/// stderr: bars on a terminal, plain lines otherwise, nothing with `quiet`.
pub async fn pull(
    clients: &mut Clients,
    reference: &str,
    creds: Option<&str>,
    quiet: bool,
) -> anyhow::Result<()> {
    let (username, password) = match creds {
        Some(creds) => parse_creds(creds)?,
        None => (String::new(), String::new()),
    };
    let request = proto::PullRequest {
        reference: reference.to_owned(),
        username,
        password,
    };

    let context = format!("failed to pull {reference}");
    let mut events = clients
        .hatoba
        .pull_image(request)
        .await
        .map_err(|status| clients.call_failed(&context, status))?
        .into_inner();

    let mut view = if quiet {
        View::Quiet
    } else if std::io::stdout().is_terminal() && std::io::stderr().is_terminal() {
        View::Bars(Bars::new())
    } else {
        View::Lines(Lines::default())
    };

    while let Some(message) = events
        .message()
        .await
        .map_err(|status| clients.call_failed(&context, status))?
    {
        match message.event {
            Some(Event::Done(done)) => {
                view.finish();
                outln!("{}", done.image_id)?;
                return Ok(());
            }
            Some(event) => view.show(event),
            None => {}
        }
    }
    anyhow::bail!("{context}: the daemon ended the pull without a result")
}

/// Splits `--creds USER:PASS` at the first colon.
fn parse_creds(creds: &str) -> anyhow::Result<(String, String)> {
    let (username, password) = creds.split_once(':').context("--creds must be USER:PASS")?;
    if username.is_empty() {
        anyhow::bail!("--creds must be USER:PASS with a non-empty USER");
    }
    Ok((username.to_owned(), password.to_owned()))
}

/// Display mode of pull progress.
enum View {
    Quiet,
    Bars(Bars),
    Lines(Lines),
}

impl View {
    fn show(&mut self, event: Event) {
        match self {
            View::Quiet => {}
            View::Bars(bars) => bars.show(event),
            View::Lines(lines) => lines.show(event),
        }
    }

    fn finish(&mut self) {
        if let View::Bars(bars) = self {
            bars.finish();
        }
    }
}

/// One progress bar per layer, drawn on stderr.
struct Bars {
    multi: MultiProgress,
    style: ProgressStyle,
    layers: HashMap<String, ProgressBar>,
}

impl Bars {
    fn new() -> Self {
        let style = ProgressStyle::with_template(
            "{prefix} [{bar:20}] {decimal_bytes:>10}/{decimal_total_bytes:<10} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        Self {
            multi: MultiProgress::new(),
            style,
            layers: HashMap::new(),
        }
    }

    fn show(&mut self, event: Event) {
        match event {
            Event::Resolved(resolved) => {
                // A failed write to the terminal only loses a status line.
                let _ = self.multi.println(format!(
                    "Pulling {} ({})",
                    resolved.reference, resolved.manifest_digest
                ));
                for layer in resolved.layers {
                    let bar = self.multi.add(ProgressBar::new(layer.size));
                    bar.set_style(self.style.clone());
                    bar.set_prefix(short_id(&layer.digest).to_owned());
                    bar.set_message("waiting");
                    self.layers.insert(layer.digest, bar);
                }
            }
            Event::Downloading(progress) => {
                if let Some(bar) = self.layers.get(&progress.digest) {
                    if progress.total > 0 {
                        bar.set_length(progress.total);
                    }
                    bar.set_position(progress.received);
                    bar.set_message("downloading");
                }
            }
            Event::Downloaded(layer) => {
                if let Some(bar) = self.layers.get(&layer.digest) {
                    bar.set_position(bar.length().unwrap_or_default());
                    bar.set_message(if layer.reused {
                        "already exists"
                    } else {
                        "downloaded"
                    });
                }
            }
            Event::Unpacked(layer) => {
                if let Some(bar) = self.layers.get(&layer.digest) {
                    bar.set_position(bar.length().unwrap_or_default());
                    bar.finish_with_message(if layer.reused {
                        "already unpacked"
                    } else {
                        "unpacked"
                    });
                }
            }
            Event::Done(_) => {}
        }
    }

    fn finish(&mut self) {
        for bar in self.layers.values() {
            if !bar.is_finished() {
                bar.finish();
            }
        }
    }
}

/// Plain progress lines on stderr, for logs and pipes.
#[derive(Default)]
struct Lines {
    sizes: HashMap<String, u64>,
    started: HashSet<String>,
}

impl Lines {
    fn show(&mut self, event: Event) {
        match event {
            Event::Resolved(resolved) => {
                let count = resolved.layers.len();
                let noun = if count == 1 { "layer" } else { "layers" };
                errln!(
                    "Pulling {} ({}, {count} {noun})",
                    resolved.reference,
                    resolved.manifest_digest
                );
                for layer in resolved.layers {
                    self.sizes.insert(layer.digest, layer.size);
                }
            }
            // Only layers get a line: the manager may also report the
            // config blob, which is not in the resolved layer list.
            Event::Downloading(progress) if self.sizes.contains_key(&progress.digest) => {
                if self.started.insert(progress.digest.clone()) {
                    errln!("Copying blob {}", short_id(&progress.digest));
                }
            }
            Event::Downloading(_) => {}
            Event::Downloaded(layer) if layer.reused => {
                errln!(
                    "Copying blob {} skipped: already exists",
                    short_id(&layer.digest)
                );
            }
            Event::Downloaded(layer) => {
                let size = self.sizes.get(&layer.digest).copied().unwrap_or_default();
                errln!(
                    "Copied blob {} ({})",
                    short_id(&layer.digest),
                    human_size(size)
                );
            }
            Event::Unpacked(layer) if layer.reused => {
                errln!("Layer {} already unpacked", short_id(&layer.digest));
            }
            Event::Unpacked(layer) => {
                errln!("Unpacked layer {}", short_id(&layer.digest));
            }
            Event::Done(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creds_split_at_the_first_colon() {
        let (username, password) = parse_creds("hatoba:pw:with:colons").expect("valid creds");
        assert_eq!(username, "hatoba");
        assert_eq!(password, "pw:with:colons");
    }

    #[test]
    fn creds_without_colon_or_user_are_rejected() {
        for creds in ["hatoba", ":password"] {
            let error = parse_creds(creds).expect_err("invalid creds");
            assert!(
                error.to_string().starts_with("--creds must be USER:PASS"),
                "{error}"
            );
        }
    }
}
