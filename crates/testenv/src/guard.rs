//! A firewall guard that keeps pods of the test environment on this machine.
//!
//! The CNI bridge plugin adds forwarding and masquerade rules for the
//! `hatoba0` bridge, which would let a pod reach other networks. While the
//! test environment runs, chain [`CHAIN`] in the filter table (IPv4 and IPv6)
//! drops every packet forwarded between the bridge and another interface,
//! and FORWARD jumps to it first. Pods still reach each other across the
//! bridge and the host itself through INPUT and OUTPUT.
//!
//! The bridge's masquerade needs no rule here: masquerade happens in
//! POSTROUTING, after FORWARD, so a packet this chain drops is never
//! translated.

use std::process::Command;

/// Name of the guard chain in the filter table of both families.
pub const CHAIN: &str = "HATOBA-TESTENV-GUARD";

/// The bridge that the CNI bridge plugin creates for pod sandboxes.
pub const BRIDGE: &str = "hatoba0";

/// A guard chain and the bridge whose forwarding it drops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Guard {
    chain: String,
    bridge: String,
}

impl Guard {
    /// Returns the guard of the test environment: [`CHAIN`] for [`BRIDGE`].
    pub fn testenv() -> Self {
        Self::new(CHAIN, BRIDGE)
    }

    /// Returns a guard with its own chain and bridge names, so a test can
    /// install and remove one without touching the environment's guard.
    pub fn new(chain: impl Into<String>, bridge: impl Into<String>) -> Self {
        Self {
            chain: chain.into(),
            bridge: bridge.into(),
        }
    }

    /// Returns the chain name.
    pub fn chain(&self) -> &str {
        &self.chain
    }

    /// Returns the rules of the chain, in order, as `iptables -S` prints
    /// them after `-A <chain>`.
    pub fn rules(&self) -> [Vec<&str>; 2] {
        let bridge = self.bridge.as_str();
        [
            vec!["-i", bridge, "!", "-o", bridge, "-j", "DROP"],
            vec!["!", "-i", bridge, "-o", bridge, "-j", "DROP"],
        ]
    }

    /// Installs the guard for both families. Running it again changes nothing.
    pub fn install(&self) -> Result<(), GuardError> {
        for family in Family::ALL {
            install_family(self, family)?;
        }
        Ok(())
    }

    /// Removes the guard from both families. A missing chain or jump counts
    /// as removed, so running it again succeeds.
    pub fn remove(&self) -> Result<(), GuardError> {
        for family in Family::ALL {
            match remove_family(self, family) {
                // Without the program no rules of this family can exist.
                Err(GuardError::Spawn { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound => {}
                result => result?,
            }
        }
        Ok(())
    }

    /// Returns whether both families have the chain with its rules and a
    /// jump to it from FORWARD. Any failure to ask counts as not installed.
    pub fn is_installed(&self) -> bool {
        Family::ALL.into_iter().all(|family| {
            let rules = self
                .rules()
                .iter()
                .all(|rule| rule_exists(family, &rule_args(self, "-C", rule)).unwrap_or(false));
            rules && rule_exists(family, &jump_args(self, "-C")).unwrap_or(false)
        })
    }
}

/// Installs the test environment's guard.
pub fn install() -> Result<(), GuardError> {
    Guard::testenv().install()
}

/// Removes the test environment's guard.
pub fn remove() -> Result<(), GuardError> {
    Guard::testenv().remove()
}

/// Returns whether the test environment's guard is installed.
pub fn is_installed() -> bool {
    Guard::testenv().is_installed()
}

// Each `-D` deletes one jump. The bound ends the loop if another program
// keeps adding jumps while this one removes them.
const MAX_JUMP_DELETIONS: usize = 1000;

/// The iptables program of one address family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Ipv4,
    Ipv6,
}

impl Family {
    /// Both families, in the order the guard is installed.
    pub const ALL: [Family; 2] = [Family::Ipv4, Family::Ipv6];

    /// Returns the name of the program that manages this family's rules.
    pub fn program(self) -> &'static str {
        match self {
            Family::Ipv4 => "iptables",
            Family::Ipv6 => "ip6tables",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    #[error("failed to run `{command}`: {source}; install iptables (scripts/install-deps)")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },

    #[error("`{command}` failed to list chain {CHAIN} (exit code {code}): {stderr}")]
    ListChain {
        command: String,
        code: i32,
        stderr: String,
    },

    #[error("`{command}` failed to create chain {CHAIN} (exit code {code}): {stderr}")]
    CreateChain {
        command: String,
        code: i32,
        stderr: String,
    },

    #[error("`{command}` failed to check a rule (exit code {code}): {stderr}")]
    CheckRule {
        command: String,
        code: i32,
        stderr: String,
    },

    #[error("`{command}` failed to append a rule to {CHAIN} (exit code {code}): {stderr}")]
    AppendRule {
        command: String,
        code: i32,
        stderr: String,
    },

    #[error(
        "`{command}` failed to insert the jump to {CHAIN} into FORWARD (exit code {code}): {stderr}"
    )]
    InsertJump {
        command: String,
        code: i32,
        stderr: String,
    },

    #[error(
        "`{command}` failed to delete the jump to {CHAIN} from FORWARD (exit code {code}): {stderr}"
    )]
    DeleteJump {
        command: String,
        code: i32,
        stderr: String,
    },

    #[error(
        "`{command}` still finds a jump to {CHAIN} in FORWARD after {MAX_JUMP_DELETIONS} deletions: another program keeps adding it"
    )]
    JumpKeepsReturning { command: String },

    #[error("`{command}` failed to flush chain {CHAIN} (exit code {code}): {stderr}")]
    FlushChain {
        command: String,
        code: i32,
        stderr: String,
    },

    #[error("`{command}` failed to delete chain {CHAIN} (exit code {code}): {stderr}")]
    DeleteChain {
        command: String,
        code: i32,
        stderr: String,
    },
}

/// The command line, exit code and stderr of one iptables run.
struct Outcome {
    command: String,
    // None when a signal ended the program.
    code: Option<i32>,
    stderr: String,
}

impl Outcome {
    fn succeeded(&self) -> bool {
        self.code == Some(0)
    }

    // iptables 1.8.9 exits with 1 when a rule or chain is not found, and
    // with 2 (usage) or 4 (permission, lock) for other problems.
    fn not_found(&self) -> bool {
        self.code == Some(1)
    }

    fn code(&self) -> i32 {
        self.code.unwrap_or(-1)
    }
}

/// Runs `program` with `-w` (wait for the xtables lock) and `args`.
fn run(family: Family, args: &[&str]) -> Result<Outcome, GuardError> {
    let program = family.program();
    let command = format!("{program} -w {}", args.join(" "));
    let output = Command::new(program)
        .arg("-w")
        .args(args)
        .output()
        .map_err(|source| GuardError::Spawn {
            command: command.clone(),
            source,
        })?;
    Ok(Outcome {
        command,
        code: output.status.code(),
        stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
    })
}

fn jump_args<'a>(guard: &'a Guard, action: &'a str) -> Vec<&'a str> {
    vec![action, "FORWARD", "-j", &guard.chain]
}

fn rule_args<'a>(guard: &'a Guard, action: &'a str, rule: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![action, guard.chain.as_str()];
    args.extend_from_slice(rule);
    args
}

/// Returns whether the guard chain exists in `family`'s filter table.
fn chain_exists(guard: &Guard, family: Family) -> Result<bool, GuardError> {
    let outcome = run(family, &["-S", &guard.chain])?;
    if outcome.succeeded() {
        Ok(true)
    } else if outcome.not_found() {
        Ok(false)
    } else {
        Err(GuardError::ListChain {
            code: outcome.code(),
            command: outcome.command,
            stderr: outcome.stderr,
        })
    }
}

/// Returns whether a rule exists, using `-C` with `args`.
fn rule_exists(family: Family, args: &[&str]) -> Result<bool, GuardError> {
    let outcome = run(family, args)?;
    if outcome.succeeded() {
        Ok(true)
    } else if outcome.not_found() {
        Ok(false)
    } else {
        Err(GuardError::CheckRule {
            code: outcome.code(),
            command: outcome.command,
            stderr: outcome.stderr,
        })
    }
}

fn install_family(guard: &Guard, family: Family) -> Result<(), GuardError> {
    if !chain_exists(guard, family)? {
        let outcome = run(family, &["-N", &guard.chain])?;
        // Another `up` may have created it between the check and here.
        if !outcome.succeeded() && !chain_exists(guard, family)? {
            return Err(GuardError::CreateChain {
                code: outcome.code(),
                command: outcome.command,
                stderr: outcome.stderr,
            });
        }
    }

    // The rules go in before the jump, so FORWARD never jumps to a
    // half-filled chain.
    for rule in guard.rules() {
        if rule_exists(family, &rule_args(guard, "-C", &rule))? {
            continue;
        }
        let outcome = run(family, &rule_args(guard, "-A", &rule))?;
        if !outcome.succeeded() {
            return Err(GuardError::AppendRule {
                code: outcome.code(),
                command: outcome.command,
                stderr: outcome.stderr,
            });
        }
    }

    if rule_exists(family, &jump_args(guard, "-C"))? {
        return Ok(());
    }
    // Position 1 puts the guard before any ACCEPT rule the bridge plugin adds.
    let outcome = run(family, &["-I", "FORWARD", "1", "-j", &guard.chain])?;
    if !outcome.succeeded() {
        return Err(GuardError::InsertJump {
            code: outcome.code(),
            command: outcome.command,
            stderr: outcome.stderr,
        });
    }
    Ok(())
}

fn remove_family(guard: &Guard, family: Family) -> Result<(), GuardError> {
    // A jump needs its target chain, and `-D` with a missing target fails
    // with a usage error rather than "not found".
    if !chain_exists(guard, family)? {
        return Ok(());
    }

    let delete = jump_args(guard, "-D");
    let mut deleted_all = false;
    for _ in 0..MAX_JUMP_DELETIONS {
        let outcome = run(family, &delete)?;
        if outcome.not_found() {
            deleted_all = true;
            break;
        }
        if !outcome.succeeded() {
            return Err(GuardError::DeleteJump {
                code: outcome.code(),
                command: outcome.command,
                stderr: outcome.stderr,
            });
        }
    }
    if !deleted_all {
        return Err(GuardError::JumpKeepsReturning {
            command: format!("{} -w {}", family.program(), delete.join(" ")),
        });
    }

    let outcome = run(family, &["-F", &guard.chain])?;
    if !outcome.succeeded() {
        return Err(GuardError::FlushChain {
            code: outcome.code(),
            command: outcome.command,
            stderr: outcome.stderr,
        });
    }
    let outcome = run(family, &["-X", &guard.chain])?;
    // A concurrent `down` may have deleted it between the check and here.
    if !outcome.succeeded() && chain_exists(guard, family)? {
        return Err(GuardError::DeleteChain {
            code: outcome.code(),
            command: outcome.command,
            stderr: outcome.stderr,
        });
    }
    Ok(())
}
