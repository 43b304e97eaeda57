//! Checks the firewall guard against the real iptables and ip6tables: install
//! and remove are idempotent, and the rules are the ones the guard promises.
//!
//! Runs only as root with iptables installed. Otherwise it prints why it
//! was skipped, and under `CI=true` a missing iptables fails it. The test only
//! inspects rules: it creates no bridge and sends no packets. It uses a chain
//! and bridge name of its own, so the environment's guard stays in place
//! while pod tests may run beside it.

use std::process::Command;

use hatoba_testenv::guard::{Family, Guard};

/// Returns why the test cannot run here, or None when it can.
fn skip_reason() -> Option<String> {
    if !rustix::process::geteuid().is_root() {
        return Some("not root".to_string());
    }
    for family in Family::ALL {
        let program = family.program();
        if Command::new(program).arg("-V").output().is_err() {
            let reason = format!("{program} is not installed (scripts/install-deps installs it)");
            if std::env::var("CI").is_ok_and(|value| value == "true") {
                panic!("CI=true requires the guard test to run: {reason}");
            }
            return Some(reason);
        }
    }
    None
}

/// Returns the lines of `<program> -S <chain>`, or None when the chain is
/// missing.
fn list(family: Family, chain: &str) -> Option<Vec<String>> {
    let output = Command::new(family.program())
        .args(["-w", "-S", chain])
        .output()
        .expect("run iptables");
    if !output.status.success() {
        return None;
    }
    let text = String::from_utf8(output.stdout).expect("iptables output is UTF-8");
    Some(text.lines().map(str::to_string).collect())
}

/// Removes the test's chain even when an assertion fails halfway.
struct RemoveOnDrop(Guard);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Err(error) = self.0.remove() {
            eprintln!(
                "failed to remove the test guard {}: {error}",
                self.0.chain()
            );
        }
    }
}

#[test]
fn install_and_remove_are_idempotent() {
    if let Some(reason) = skip_reason() {
        eprintln!("skipped: {reason}");
        return;
    }
    // Chain names may have 28 characters and interface names 15.
    let id = std::process::id();
    let chain = format!("HATOBA-GUARD-TEST-{id}");
    let bridge = format!("hatobat{id}");
    let guard = RemoveOnDrop(Guard::new(&chain, &bridge));
    let jump_line = format!("-A FORWARD -j {chain}");

    guard.0.install().expect("first install");
    guard.0.install().expect("second install");
    assert!(guard.0.is_installed());

    for family in Family::ALL {
        let program = family.program();
        let forward = list(family, "FORWARD").expect("FORWARD exists");
        let jumps = forward.iter().filter(|line| **line == jump_line).count();
        assert_eq!(jumps, 1, "{program}: jumps in {forward:?}");
        let first_rule = forward.iter().find(|line| line.starts_with("-A "));
        assert_eq!(
            first_rule,
            Some(&jump_line),
            "{program}: the jump is not the first rule of FORWARD"
        );

        let rules = list(family, &chain).expect("the guard chain exists");
        let expected = vec![
            format!("-N {chain}"),
            format!("-A {chain} -i {bridge} ! -o {bridge} -j DROP"),
            format!("-A {chain} ! -i {bridge} -o {bridge} -j DROP"),
        ];
        assert_eq!(rules, expected, "{program}: rules of {chain}");
    }

    guard.0.remove().expect("first remove");
    guard.0.remove().expect("second remove");
    assert!(!guard.0.is_installed());

    for family in Family::ALL {
        let program = family.program();
        assert_eq!(
            list(family, &chain),
            None,
            "{program}: {chain} still exists"
        );
        let forward = list(family, "FORWARD").expect("FORWARD exists");
        assert!(
            !forward.iter().any(|line| line.contains(&chain)),
            "{program}: FORWARD still jumps to {chain}: {forward:?}"
        );
    }
}
