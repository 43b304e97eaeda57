//! Validation of the sysctls a pod sandbox requests (`PodSandboxConfig.linux.sysctls`).
//!
//! A sandbox writes sysctls into its own namespaces, so only sysctls the kernel
//! namespaces may pass, because a node-wide one would change every pod on the node.
//! The namespaced set is the one Kubernetes lists for pod sysctls.

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::fmt;
use std::path::PathBuf;

/// Sysctls of the IPC namespace outside the `fs.mqueue.` prefix.
const IPC_SYSCTLS: [&str; 8] = [
    "kernel.shmmax",
    "kernel.shmall",
    "kernel.shmmni",
    "kernel.shm_rmid_forced",
    "kernel.msgmax",
    "kernel.msgmnb",
    "kernel.msgmni",
    "kernel.sem",
];

/// Root of the sysctl tree in procfs.
const PROC_SYS: &str = "/proc/sys";

/// Namespaces the pod shares with the node, from the CRI `NamespaceOption`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NamespaceModes {
    /// Flag set when the pod uses the node's network namespace.
    pub host_network: bool,
    /// Flag set when the pod uses the node's IPC namespace.
    pub host_ipc: bool,
}

/// Namespace that a namespaced sysctl belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SysctlNamespace {
    /// The network namespace (`net.`).
    Network,
    /// The IPC namespace (System V IPC limits and `fs.mqueue.`).
    Ipc,
}

impl fmt::Display for SysctlNamespace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Network => f.write_str("network"),
            Self::Ipc => f.write_str("ipc"),
        }
    }
}

/// Error for a pod sysctl that a sandbox must not apply.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SysctlError {
    #[error(
        "invalid sysctl name {name:?}: a component is empty, write it like \
         net.ipv4.ip_forward or net/ipv4/ip_forward"
    )]
    EmptyComponent { name: String },

    #[error(
        "invalid sysctl name {name:?}: a \".\" or \"..\" component would point outside \
         its /proc/sys file"
    )]
    DotComponent { name: String },

    #[error(
        "invalid sysctl name {name:?}: {character:?} is not allowed, use only a-z, 0-9, \
         '_', '-' and '.' or '/' as separators"
    )]
    InvalidCharacter { name: String, character: char },

    #[error(
        "invalid value for sysctl {name:?}: it contains a newline or NUL byte, but a value \
         written to /proc/sys must be one line of text"
    )]
    InvalidValue { name: String },

    #[error("sysctl {name:?} is set twice, as {first:?} and {second:?}: keep one spelling")]
    Duplicate {
        name: String,
        first: String,
        second: String,
    },

    #[error(
        "sysctl {name:?} is not namespaced and would change the node: a pod may set only net.* \
         (network namespace), fs.mqueue.*, kernel.shmmax, kernel.shmall, kernel.shmmni, \
         kernel.shm_rmid_forced, kernel.msgmax, kernel.msgmnb, kernel.msgmni and kernel.sem \
         (ipc namespace)"
    )]
    NotNamespaced { name: String },

    #[error(
        "sysctl {name:?} belongs to the {namespace} namespace, which this pod shares with the \
         node, so setting it would change the node: drop the sysctl or give the pod its own \
         {namespace} namespace"
    )]
    HostNamespace {
        name: String,
        namespace: SysctlNamespace,
    },
}

/// Validates the sysctls of a pod sandbox and returns them normalized, in name order.
///
/// Names follow kubelet's `NormalizeName`: when the first separator is `/`, the name
/// is in the slash form (`net/ipv4/ip_forward`) and comes back dotted
/// (`net.ipv4.ip_forward`). A dot inside a component, such as the VLAN interface in
/// `net/ipv4/conf/eth0.100/forwarding`, comes back as `/` (`net.ipv4.conf.eth0/100.forwarding`).
pub fn validate_sysctls(
    sysctls: &BTreeMap<String, String>,
    modes: NamespaceModes,
) -> Result<Vec<(String, String)>, SysctlError> {
    // Maps the normalized name to the spelling it came from and its value.
    let mut accepted: BTreeMap<String, (&str, &str)> = BTreeMap::new();
    for (raw, value) in sysctls {
        let name = normalize(raw)?;

        if value.contains(['\n', '\0']) {
            return Err(SysctlError::InvalidValue { name: raw.clone() });
        }

        let namespace =
            namespace_of(&name).ok_or_else(|| SysctlError::NotNamespaced { name: raw.clone() })?;
        let shared = match namespace {
            SysctlNamespace::Network => modes.host_network,
            SysctlNamespace::Ipc => modes.host_ipc,
        };
        if shared {
            return Err(SysctlError::HostNamespace {
                name: raw.clone(),
                namespace,
            });
        }

        match accepted.entry(name.text) {
            Entry::Vacant(slot) => {
                slot.insert((raw, value));
            }
            Entry::Occupied(slot) => {
                return Err(SysctlError::Duplicate {
                    name: slot.key().clone(),
                    first: slot.get().0.to_owned(),
                    second: raw.clone(),
                });
            }
        }
    }
    Ok(accepted
        .into_iter()
        .map(|(name, (_, value))| (name, value.to_owned()))
        .collect())
}

/// Returns the `/proc/sys` file of a sysctl name.
///
/// Dots in a dotted name become slashes. A component that contains a dot, such as
/// the VLAN interface in `net/ipv4/conf/eth0.100/forwarding`, cannot be written
/// with dots alone and must be given with slashes, as sysctl.d(5) describes. When the
/// first separator is `/`, the components are kept as they are. In a dotted name a
/// `/` stands for a dot inside a component, the form [`validate_sysctls`] returns.
/// The name is not checked here, so pass one that [`validate_sysctls`] returned.
pub fn proc_sys_path(name: &str) -> PathBuf {
    let relative: String = if first_separator(name) == Some('/') {
        name.to_owned()
    } else {
        name.chars()
            .map(|c| match c {
                '.' => '/',
                '/' => '.',
                other => other,
            })
            .collect()
    };
    PathBuf::from(format!("{PROC_SYS}/{relative}"))
}

/// A checked sysctl name split into its components.
struct Normalized {
    /// Components as in `/proc/sys`, where a dot is part of the component.
    components: Vec<String>,
    /// Dotted name returned to the caller, with `/` for a dot inside a component.
    text: String,
}

/// Returns the first `.` or `/` of a name, which decides between the dotted and slash forms.
fn first_separator(name: &str) -> Option<char> {
    name.chars().find(|c| matches!(c, '.' | '/'))
}

/// Splits a name in the dotted or slash form into checked components.
fn normalize(raw: &str) -> Result<Normalized, SysctlError> {
    let components: Vec<String> = if first_separator(raw) == Some('/') {
        raw.split('/').map(str::to_owned).collect()
    } else {
        raw.split('.').map(|c| c.replace('/', ".")).collect()
    };

    for component in &components {
        if component.is_empty() {
            return Err(SysctlError::EmptyComponent {
                name: raw.to_owned(),
            });
        }
        if component == "." || component == ".." {
            return Err(SysctlError::DotComponent {
                name: raw.to_owned(),
            });
        }
        if let Some(character) = component.chars().find(|c| !is_name_char(*c)) {
            return Err(SysctlError::InvalidCharacter {
                name: raw.to_owned(),
                character,
            });
        }
    }

    let dotted: Vec<String> = components.iter().map(|c| c.replace('.', "/")).collect();
    let text = dotted.join(".");
    Ok(Normalized { components, text })
}

/// Tells whether `c` may appear inside a component of a sysctl name.
fn is_name_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '-' | '.')
}

/// Returns the namespace a sysctl belongs to, or `None` for a node-wide one.
fn namespace_of(name: &Normalized) -> Option<SysctlNamespace> {
    let components: Vec<&str> = name.components.iter().map(String::as_str).collect();
    match components.as_slice() {
        ["net", _, ..] => Some(SysctlNamespace::Network),
        ["fs", "mqueue", _, ..] => Some(SysctlNamespace::Ipc),
        ["kernel", leaf] if IPC_SYSCTLS.contains(&format!("kernel.{leaf}").as_str()) => {
            Some(SysctlNamespace::Ipc)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OWN: NamespaceModes = NamespaceModes {
        host_network: false,
        host_ipc: false,
    };
    const HOST_NETWORK: NamespaceModes = NamespaceModes {
        host_network: true,
        host_ipc: false,
    };
    const HOST_IPC: NamespaceModes = NamespaceModes {
        host_network: false,
        host_ipc: true,
    };

    fn one(name: &str, value: &str) -> BTreeMap<String, String> {
        BTreeMap::from([(name.to_owned(), value.to_owned())])
    }

    #[test]
    fn namespaced_sysctls_are_accepted_and_normalized() {
        // (name as given, normalized name)
        let cases = [
            ("net.ipv4.ip_forward", "net.ipv4.ip_forward"),
            ("net/ipv4/ip_forward", "net.ipv4.ip_forward"),
            (
                "net.ipv4.ip_local_port_range",
                "net.ipv4.ip_local_port_range",
            ),
            ("net.core.somaxconn", "net.core.somaxconn"),
            (
                "net/ipv4/conf/eth0.100/forwarding",
                "net.ipv4.conf.eth0/100.forwarding",
            ),
            (
                "net.ipv4.conf.eth0/100.forwarding",
                "net.ipv4.conf.eth0/100.forwarding",
            ),
            (
                "net.ipv6.conf.all.disable_ipv6",
                "net.ipv6.conf.all.disable_ipv6",
            ),
            (
                "net.ipv4.conf.veth-1.rp_filter",
                "net.ipv4.conf.veth-1.rp_filter",
            ),
            ("kernel.shmmax", "kernel.shmmax"),
            ("kernel.shmall", "kernel.shmall"),
            ("kernel.shmmni", "kernel.shmmni"),
            ("kernel.shm_rmid_forced", "kernel.shm_rmid_forced"),
            ("kernel.msgmax", "kernel.msgmax"),
            ("kernel.msgmnb", "kernel.msgmnb"),
            ("kernel.msgmni", "kernel.msgmni"),
            ("kernel.sem", "kernel.sem"),
            ("kernel/sem", "kernel.sem"),
            ("fs.mqueue.msg_max", "fs.mqueue.msg_max"),
            ("fs/mqueue/queues_max", "fs.mqueue.queues_max"),
        ];
        for (name, normalized) in cases {
            let got = validate_sysctls(&one(name, "1"), OWN)
                .unwrap_or_else(|e| panic!("{name} should pass: {e}"));
            assert_eq!(got, vec![(normalized.to_owned(), "1".to_owned())], "{name}");
        }
    }

    #[test]
    fn node_wide_sysctls_are_not_namespaced() {
        let cases = [
            "kernel.hostname",
            "kernel.pid_max",
            "kernel.shm_next_id",
            "kernel.sem.extra",
            "vm.overcommit_memory",
            "fs.file-max",
            "fs.mqueue",
            "fs/mqueue",
            "net",
            "kernel",
            "user.max_user_namespaces",
            "network.ipv4.ip_forward",
            "fs.mqueue/msg_max",
            "kernel.shmmax/x",
        ];
        for name in cases {
            let err = validate_sysctls(&one(name, "1"), OWN).expect_err(name);
            assert_eq!(
                err,
                SysctlError::NotNamespaced {
                    name: name.to_owned()
                },
                "{name}"
            );
            let message = err.to_string();
            assert!(message.contains(name), "{message}");
            assert!(message.contains("kernel.shm_rmid_forced"), "{message}");
            assert!(message.contains("net.*"), "{message}");
        }
    }

    #[test]
    fn shared_namespace_sysctls_are_rejected() {
        // (name, modes, namespace it belongs to)
        let cases = [
            (
                "net.ipv4.ip_forward",
                HOST_NETWORK,
                SysctlNamespace::Network,
            ),
            ("net/core/somaxconn", HOST_NETWORK, SysctlNamespace::Network),
            ("kernel.shmmax", HOST_IPC, SysctlNamespace::Ipc),
            ("kernel.sem", HOST_IPC, SysctlNamespace::Ipc),
            ("fs.mqueue.msg_max", HOST_IPC, SysctlNamespace::Ipc),
        ];
        for (name, modes, namespace) in cases {
            let err = validate_sysctls(&one(name, "1"), modes).expect_err(name);
            assert_eq!(
                err,
                SysctlError::HostNamespace {
                    name: name.to_owned(),
                    namespace
                },
                "{name}"
            );
            let message = err.to_string();
            assert!(message.contains(name), "{message}");
            assert!(
                message.contains(&format!("{namespace} namespace")),
                "{message}"
            );
        }
    }

    #[test]
    fn sharing_one_namespace_leaves_the_other_usable() {
        let cases = [
            ("kernel.shmmax", HOST_NETWORK),
            ("fs.mqueue.msg_max", HOST_NETWORK),
            ("net.ipv4.ip_forward", HOST_IPC),
        ];
        for (name, modes) in cases {
            let got = validate_sysctls(&one(name, "1"), modes)
                .unwrap_or_else(|e| panic!("{name} should pass: {e}"));
            assert_eq!(got.len(), 1, "{name}");
        }
    }

    #[test]
    fn malformed_names_are_rejected() {
        let empty = |n: &str| SysctlError::EmptyComponent { name: n.to_owned() };
        let dots = |n: &str| SysctlError::DotComponent { name: n.to_owned() };
        let character = |n: &str, c: char| SysctlError::InvalidCharacter {
            name: n.to_owned(),
            character: c,
        };
        let cases = [
            ("", empty("")),
            ("net..ipv4", empty("net..ipv4")),
            (".net.ipv4.ip_forward", empty(".net.ipv4.ip_forward")),
            ("net.ipv4.ip_forward.", empty("net.ipv4.ip_forward.")),
            ("net//ipv4", empty("net//ipv4")),
            ("/net/ipv4/ip_forward", empty("/net/ipv4/ip_forward")),
            ("net/ipv4/", empty("net/ipv4/")),
            ("net/../kernel/hostname", dots("net/../kernel/hostname")),
            ("net/./ipv4/ip_forward", dots("net/./ipv4/ip_forward")),
            ("net.//.ip_forward", dots("net.//.ip_forward")),
            ("net./.ip_forward", dots("net./.ip_forward")),
            ("net.ipv4.IP_FORWARD", character("net.ipv4.IP_FORWARD", 'I')),
            ("net.ipv4.ip forward", character("net.ipv4.ip forward", ' ')),
            (
                "net.ipv4.ip_forward*",
                character("net.ipv4.ip_forward*", '*'),
            ),
            ("net.ipv4.conf.é.x", character("net.ipv4.conf.é.x", 'é')),
            ("net.ipv4\0.x", character("net.ipv4\0.x", '\0')),
        ];
        for (name, expected) in cases {
            let err = validate_sysctls(&one(name, "1"), OWN).expect_err(name);
            assert_eq!(err, expected, "{name:?}");
            let message = err.to_string();
            assert!(message.contains(&format!("{name:?}")), "{message}");
        }
    }

    #[test]
    fn values_with_newlines_or_nul_are_rejected() {
        let cases = ["1\n", "1\n0", "\n", "1\0", "\0"];
        for value in cases {
            let err = validate_sysctls(&one("net.ipv4.ip_forward", value), OWN).expect_err(value);
            assert_eq!(
                err,
                SysctlError::InvalidValue {
                    name: "net.ipv4.ip_forward".to_owned()
                },
                "{value:?}"
            );
            assert!(err.to_string().contains("net.ipv4.ip_forward"));
        }
    }

    #[test]
    fn ordinary_values_pass_unchanged() {
        let cases = ["1", "0", "32768 60999", "250 32000 32 128", "", " 1 "];
        for value in cases {
            let got = validate_sysctls(&one("kernel.sem", value), OWN)
                .unwrap_or_else(|e| panic!("{value:?} should pass: {e}"));
            assert_eq!(got, vec![("kernel.sem".to_owned(), value.to_owned())]);
        }
    }

    #[test]
    fn result_is_sorted_by_normalized_name() {
        let sysctls = BTreeMap::from([
            ("net/ipv4/ip_forward".to_owned(), "1".to_owned()),
            ("kernel.sem".to_owned(), "250 32000 32 128".to_owned()),
            ("fs/mqueue/msg_max".to_owned(), "20".to_owned()),
            ("net.core.somaxconn".to_owned(), "1024".to_owned()),
        ]);
        let got = validate_sysctls(&sysctls, OWN).expect("all are namespaced");
        let names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "fs.mqueue.msg_max",
                "kernel.sem",
                "net.core.somaxconn",
                "net.ipv4.ip_forward"
            ]
        );
        assert_eq!(got[3].1, "1");
    }

    #[test]
    fn empty_map_yields_empty_list() {
        let got = validate_sysctls(&BTreeMap::new(), HOST_NETWORK).expect("nothing to reject");
        assert!(got.is_empty());
    }

    #[test]
    fn duplicate_spellings_are_rejected() {
        let sysctls = BTreeMap::from([
            ("net.ipv4.ip_forward".to_owned(), "1".to_owned()),
            ("net/ipv4/ip_forward".to_owned(), "0".to_owned()),
        ]);
        let err = validate_sysctls(&sysctls, OWN).expect_err("same sysctl twice");
        assert_eq!(
            err,
            SysctlError::Duplicate {
                name: "net.ipv4.ip_forward".to_owned(),
                first: "net.ipv4.ip_forward".to_owned(),
                second: "net/ipv4/ip_forward".to_owned(),
            }
        );
    }

    #[test]
    fn first_failure_in_name_order_is_reported() {
        let sysctls = BTreeMap::from([
            ("net.ipv4.ip_forward".to_owned(), "1".to_owned()),
            ("kernel.hostname".to_owned(), "x".to_owned()),
            ("vm.swappiness".to_owned(), "1".to_owned()),
        ]);
        let err = validate_sysctls(&sysctls, OWN).expect_err("node-wide sysctls");
        assert_eq!(
            err,
            SysctlError::NotNamespaced {
                name: "kernel.hostname".to_owned()
            }
        );
    }

    #[test]
    fn proc_sys_path_maps_both_forms() {
        let cases = [
            ("net.ipv4.ip_forward", "/proc/sys/net/ipv4/ip_forward"),
            ("net/ipv4/ip_forward", "/proc/sys/net/ipv4/ip_forward"),
            ("kernel.sem", "/proc/sys/kernel/sem"),
            ("fs.mqueue.msg_max", "/proc/sys/fs/mqueue/msg_max"),
            (
                "net/ipv4/conf/eth0.100/forwarding",
                "/proc/sys/net/ipv4/conf/eth0.100/forwarding",
            ),
            (
                "net.ipv4.conf.eth0/100.forwarding",
                "/proc/sys/net/ipv4/conf/eth0.100/forwarding",
            ),
            // The dotted form splits the interface name: why Kubernetes requires slashes.
            (
                "net.ipv4.conf.eth0.100.forwarding",
                "/proc/sys/net/ipv4/conf/eth0/100/forwarding",
            ),
        ];
        for (name, path) in cases {
            assert_eq!(proc_sys_path(name), PathBuf::from(path), "{name}");
        }
    }

    #[test]
    fn validated_names_map_to_kernel_paths() {
        let cases = [
            (
                "net/ipv4/conf/eth0.100/forwarding",
                "/proc/sys/net/ipv4/conf/eth0.100/forwarding",
            ),
            ("net/ipv4/ip_forward", "/proc/sys/net/ipv4/ip_forward"),
            (
                "net.ipv4.conf.eth0/100.forwarding",
                "/proc/sys/net/ipv4/conf/eth0.100/forwarding",
            ),
            ("kernel.shm_rmid_forced", "/proc/sys/kernel/shm_rmid_forced"),
        ];
        for (name, path) in cases {
            let got = validate_sysctls(&one(name, "1"), OWN).expect(name);
            assert_eq!(proc_sys_path(&got[0].0), PathBuf::from(path), "{name}");
        }
    }
}
