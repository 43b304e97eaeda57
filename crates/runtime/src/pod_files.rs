//! Per-pod files that every container of a sandbox bind-mounts: `hostname`,
//! `hosts` and `resolv.conf`.
//!
//! Rendering is pure. Writing replaces each file atomically, so a crash in the
//! middle of `RunPodSandbox` leaves either the old or the new file, never half of one.

use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Write};
use std::net::IpAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// glibc reads at most this many `nameserver` lines (MAXNS), and Kubernetes
/// validation (`MaxDNSNameservers`) has the same cap.
pub const MAX_NAMESERVERS: usize = 3;

/// Kubernetes validation's cap on search domains (`MaxDNSSearchPaths`).
/// NOTE: glibc 2.26 and later read any number, but older glibc reads only 6.
pub const MAX_SEARCH_DOMAINS: usize = 32;

/// The kernel's limit on a UTS hostname (`HOST_NAME_MAX`).
pub const MAX_HOSTNAME_LEN: usize = 64;

/// RFC 1123 caps each dot-separated label at 63 characters.
const MAX_LABEL_LEN: usize = 63;

/// RFC 1035 caps a whole domain name at 253 characters in text form.
const MAX_DOMAIN_LEN: usize = 253;

const HOSTNAME_FILE: &str = "hostname";
const HOSTS_FILE: &str = "hosts";
const RESOLV_CONF_FILE: &str = "resolv.conf";
const POD_FILE_NAMES: [&str; 3] = [HOSTNAME_FILE, HOSTS_FILE, RESOLV_CONF_FILE];

/// Marks temp files so that `remove_pod_files` can clean up after a crash.
const TEMP_MARKER: &str = ".hatoba-tmp-";

/// Containers may run as any user and must be able to read these files.
const POD_FILE_MODE: u32 = 0o644;

/// Distinguishes temp files of concurrent writers within one process.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// DNS settings for a pod, mirroring the CRI `DNSConfig` message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodDns {
    /// Nameserver IP addresses.
    pub servers: Vec<String>,
    /// Search domains.
    pub searches: Vec<String>,
    /// resolv.conf options such as `ndots:5`.
    pub options: Vec<String>,
}

impl PodDns {
    fn is_empty(&self) -> bool {
        self.servers.is_empty() && self.searches.is_empty() && self.options.is_empty()
    }
}

/// The rendered contents of a sandbox's files, ready to be written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodFiles {
    hostname: String,
    hosts: String,
    resolv_conf: String,
}

impl PodFiles {
    /// Validates the hostname and DNS config and renders all three files.
    pub fn new(
        hostname: &str,
        ips: &[IpAddr],
        dns: Option<&PodDns>,
        host_resolv: &str,
    ) -> Result<Self, PodFilesError> {
        validate_hostname(hostname)?;

        Ok(Self {
            hostname: hostname.to_owned(),
            hosts: hosts_file(hostname, ips),
            resolv_conf: resolv_conf(dns, host_resolv)?,
        })
    }

    /// Returns the pod hostname, without a trailing newline.
    pub fn hostname(&self) -> &str {
        &self.hostname
    }

    /// Returns the rendered hosts file.
    pub fn hosts(&self) -> &str {
        &self.hosts
    }

    /// Returns the rendered resolv.conf.
    pub fn resolv_conf(&self) -> &str {
        &self.resolv_conf
    }
}

/// Errors from rendering, writing or removing a sandbox's files.
#[derive(Debug, thiserror::Error)]
pub enum PodFilesError {
    #[error("invalid hostname {hostname:?}: {rule}")]
    InvalidHostname { hostname: String, rule: String },

    #[error("invalid nameserver {server:?}: not an IP address")]
    InvalidNameserver { server: String },

    #[error(
        "too many nameservers: {count} given, the limit is {MAX_NAMESERVERS} (glibc reads no more)"
    )]
    TooManyNameservers { count: usize },

    #[error("too many search domains: {count} given, the limit is {MAX_SEARCH_DOMAINS}")]
    TooManySearchDomains { count: usize },

    #[error("invalid search domain {domain:?}: {rule}")]
    InvalidSearchDomain { domain: String, rule: String },

    #[error("invalid resolv.conf option {option:?}: must be a non-empty word without whitespace")]
    InvalidDnsOption { option: String },

    #[error("failed to create temp file {path}")]
    CreateTemp {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("failed to write temp file {path}")]
    WriteTemp {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("failed to set mode 0644 on {path}")]
    SetMode {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("failed to sync temp file {path}")]
    SyncTemp {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("failed to rename {from} to {to}")]
    Rename {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("failed to sync directory {path}")]
    SyncDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("failed to list directory {path}")]
    ListDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("failed to remove {path}")]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Renders resolv.conf from the pod's DNS config, or returns the host's file
/// when the pod has none (or an empty one), as containerd does.
pub fn resolv_conf(dns: Option<&PodDns>, host_resolv: &str) -> Result<String, PodFilesError> {
    let Some(dns) = dns.filter(|dns| !dns.is_empty()) else {
        return Ok(host_resolv.to_owned());
    };

    if dns.servers.len() > MAX_NAMESERVERS {
        return Err(PodFilesError::TooManyNameservers {
            count: dns.servers.len(),
        });
    }
    for server in &dns.servers {
        if server.parse::<IpAddr>().is_err() {
            return Err(PodFilesError::InvalidNameserver {
                server: server.clone(),
            });
        }
    }

    if dns.searches.len() > MAX_SEARCH_DOMAINS {
        return Err(PodFilesError::TooManySearchDomains {
            count: dns.searches.len(),
        });
    }
    for domain in &dns.searches {
        check_search_domain(domain).map_err(|rule| PodFilesError::InvalidSearchDomain {
            domain: domain.clone(),
            rule,
        })?;
    }

    for option in &dns.options {
        if option.is_empty() || option.chars().any(char::is_whitespace) {
            return Err(PodFilesError::InvalidDnsOption {
                option: option.clone(),
            });
        }
    }

    let mut out = String::new();
    for server in &dns.servers {
        out.push_str(&format!("nameserver {server}\n"));
    }
    if !dns.searches.is_empty() {
        out.push_str(&format!("search {}\n", dns.searches.join(" ")));
    }
    if !dns.options.is_empty() {
        out.push_str(&format!("options {}\n", dns.options.join(" ")));
    }
    Ok(out)
}

/// Renders the pod's hosts file: loopback entries, then one line per pod IP.
/// The hostname is written as given, so callers validate it first (`PodFiles::new` does).
pub fn hosts_file(hostname: &str, ips: &[IpAddr]) -> String {
    let mut out = String::from(
        "# Managed by hatoba for this pod sandbox; local edits are lost when it is recreated.\n",
    );
    out.push_str(
        "127.0.0.1 localhost\n\
         ::1 localhost ip6-localhost ip6-loopback\n\
         fe00::0 ip6-localnet\n\
         fe00::0 ip6-mcastprefix\n\
         fe00::1 ip6-allnodes\n\
         fe00::2 ip6-allrouters\n",
    );
    for ip in ips {
        out.push_str(&format!("{ip} {hostname}\n"));
    }
    out
}

/// Checks a pod hostname: dot-separated lowercase RFC 1123 labels, at most
/// 64 characters in total (the kernel's UTS limit).
pub fn validate_hostname(name: &str) -> Result<(), PodFilesError> {
    check_hostname(name).map_err(|rule| PodFilesError::InvalidHostname {
        hostname: name.to_owned(),
        rule,
    })
}

fn check_hostname(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".to_owned());
    }
    if name.len() > MAX_HOSTNAME_LEN {
        return Err(format!(
            "is {} characters long, the kernel allows at most {MAX_HOSTNAME_LEN}",
            name.len()
        ));
    }
    // Kubernetes only produces lowercase pod hostnames, so uppercase means a caller bug.
    for label in name.split('.') {
        check_label(label, false)?;
    }
    Ok(())
}

/// Checks a search domain. Uppercase is accepted because DNS compares names
/// case-insensitively and kubelet passes the node's own search domains through.
fn check_search_domain(domain: &str) -> Result<(), String> {
    let name = domain.strip_suffix('.').unwrap_or(domain);
    if name.is_empty() {
        return Err("must not be empty".to_owned());
    }
    if name.len() > MAX_DOMAIN_LEN {
        return Err(format!(
            "is {} characters long, at most {MAX_DOMAIN_LEN} are allowed",
            name.len()
        ));
    }
    for label in name.split('.') {
        check_label(label, true)?;
    }
    Ok(())
}

/// Checks one RFC 1123 label: 1 to 63 letters, digits or hyphens, starting
/// and ending with a letter or digit.
fn check_label(label: &str, allow_uppercase: bool) -> Result<(), String> {
    if label.is_empty() {
        return Err("has an empty label (two dots in a row, or a leading or trailing dot)".into());
    }
    if label.len() > MAX_LABEL_LEN {
        return Err(format!(
            "label {label:?} is {} characters long, at most {MAX_LABEL_LEN} are allowed",
            label.len()
        ));
    }
    if label.starts_with('-') || label.ends_with('-') {
        return Err(format!(
            "label {label:?} must start and end with a letter or digit"
        ));
    }
    for c in label.chars() {
        let allowed = c.is_ascii_lowercase()
            || c.is_ascii_digit()
            || c == '-'
            || (allow_uppercase && c.is_ascii_uppercase());
        if !allowed {
            let allowed_chars = if allow_uppercase {
                "letters, digits and '-'"
            } else {
                "lowercase letters, digits and '-'"
            };
            return Err(format!(
                "label {label:?} contains {c:?}, only {allowed_chars} are allowed"
            ));
        }
    }
    Ok(())
}

/// Writes `hostname`, `hosts` and `resolv.conf` into `dir`, each replaced atomically.
pub fn write_pod_files(dir: &Path, files: &PodFiles) -> Result<(), PodFilesError> {
    write_atomic(
        dir,
        HOSTNAME_FILE,
        format!("{}\n", files.hostname).as_bytes(),
    )?;
    write_atomic(dir, HOSTS_FILE, files.hosts.as_bytes())?;
    write_atomic(dir, RESOLV_CONF_FILE, files.resolv_conf.as_bytes())?;

    // The renames are durable only once the directory entry itself is on disk.
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| PodFilesError::SyncDir {
            path: dir.to_owned(),
            source,
        })
}

/// Removes the files `write_pod_files` creates and any temp files a crash left
/// behind. Missing files and a missing `dir` are not errors, so it is idempotent.
pub fn remove_pod_files(dir: &Path) -> Result<(), PodFilesError> {
    for name in POD_FILE_NAMES {
        remove_if_present(&dir.join(name))?;
    }

    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(PodFilesError::ListDir {
                path: dir.to_owned(),
                source,
            });
        }
    };
    for entry in entries {
        let entry = entry.map_err(|source| PodFilesError::ListDir {
            path: dir.to_owned(),
            source,
        })?;
        if entry.file_name().to_string_lossy().contains(TEMP_MARKER) {
            remove_if_present(&entry.path())?;
        }
    }
    Ok(())
}

fn remove_if_present(path: &Path) -> Result<(), PodFilesError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(PodFilesError::Remove {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Writes `contents` to `dir/name` through a synced temp file and a rename.
fn write_atomic(dir: &Path, name: &str, contents: &[u8]) -> Result<(), PodFilesError> {
    let (temp_path, mut file) = create_temp(dir, name)?;

    // From here on, drop the temp file on any failure so none is left behind.
    let result = fill_and_rename(&temp_path, &mut file, contents, &dir.join(name));
    if result.is_err() {
        let _ = fs::remove_file(&temp_path);
    }
    result
}

fn create_temp(dir: &Path, name: &str) -> Result<(PathBuf, File), PodFilesError> {
    let pid = std::process::id();
    loop {
        let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!(".{name}{TEMP_MARKER}{pid}-{n}"));
        let opened = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(POD_FILE_MODE)
            .open(&path);
        match opened {
            Ok(file) => return Ok((path, file)),
            // A stale file from an earlier process with the same pid exists, so take the next name.
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(source) => return Err(PodFilesError::CreateTemp { path, source }),
        }
    }
}

fn fill_and_rename(
    temp_path: &Path,
    file: &mut File,
    contents: &[u8],
    target: &Path,
) -> Result<(), PodFilesError> {
    file.write_all(contents)
        .map_err(|source| PodFilesError::WriteTemp {
            path: temp_path.to_owned(),
            source,
        })?;

    // The umask may have narrowed the mode given at open time.
    file.set_permissions(Permissions::from_mode(POD_FILE_MODE))
        .map_err(|source| PodFilesError::SetMode {
            path: temp_path.to_owned(),
            source,
        })?;

    // Sync before the rename, or a crash could expose an empty file under the real name.
    file.sync_all().map_err(|source| PodFilesError::SyncTemp {
        path: temp_path.to_owned(),
        source,
    })?;

    fs::rename(temp_path, target).map_err(|source| PodFilesError::Rename {
        from: temp_path.to_owned(),
        to: target.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn dns(servers: &[&str], searches: &[&str], options: &[&str]) -> PodDns {
        let owned = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect();
        PodDns {
            servers: owned(servers),
            searches: owned(searches),
            options: owned(options),
        }
    }

    const HOST_RESOLV: &str = "# host file\nnameserver 192.0.2.53\nsearch example.org\n";

    #[test]
    fn resolv_conf_renders_servers_searches_and_options() {
        let config = dns(
            &["10.96.0.10", "fd00::10"],
            &[
                "default.svc.cluster.local",
                "svc.cluster.local",
                "cluster.local",
            ],
            &["ndots:5", "edns0"],
        );

        let out = resolv_conf(Some(&config), HOST_RESOLV).expect("valid config");

        assert_eq!(
            out,
            "nameserver 10.96.0.10\n\
             nameserver fd00::10\n\
             search default.svc.cluster.local svc.cluster.local cluster.local\n\
             options ndots:5 edns0\n"
        );
    }

    #[test]
    fn resolv_conf_omits_lines_for_empty_lists() {
        let config = dns(&["10.96.0.10"], &[], &[]);

        let out = resolv_conf(Some(&config), HOST_RESOLV).expect("valid config");

        assert_eq!(out, "nameserver 10.96.0.10\n");
    }

    #[test]
    fn resolv_conf_no_config_uses_host() {
        let out = resolv_conf(None, HOST_RESOLV).expect("host fallback");

        assert_eq!(out, HOST_RESOLV);
    }

    #[test]
    fn resolv_conf_empty_config_uses_host() {
        let out = resolv_conf(Some(&PodDns::default()), HOST_RESOLV).expect("host fallback");

        assert_eq!(out, HOST_RESOLV);
    }

    #[test]
    fn resolv_conf_rejects_non_ip_nameserver() {
        for bad in [
            "dns.example.org",
            "10.0.0.256",
            "",
            "fe80::1%eth0",
            " 10.0.0.1",
        ] {
            let err = resolv_conf(Some(&dns(&[bad], &[], &[])), "").expect_err(bad);

            assert!(
                matches!(&err, PodFilesError::InvalidNameserver { server } if server == bad),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn resolv_conf_caps_nameservers_at_three() {
        let three = dns(&["10.0.0.1", "10.0.0.2", "10.0.0.3"], &[], &[]);
        let four = dns(&["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"], &[], &[]);

        resolv_conf(Some(&three), "").expect("three nameservers");
        let err = resolv_conf(Some(&four), "").expect_err("four nameservers");

        assert!(matches!(
            err,
            PodFilesError::TooManyNameservers { count: 4 }
        ));
        assert!(err.to_string().contains("limit is 3"), "{err}");
    }

    #[test]
    fn resolv_conf_caps_search_domains_at_32() {
        let names: Vec<String> = (0..33).map(|i| format!("d{i}.example")).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();

        resolv_conf(Some(&dns(&[], &refs[..32], &[])), "").expect("32 search domains");
        let err = resolv_conf(Some(&dns(&[], &refs, &[])), "").expect_err("33 search domains");

        assert!(matches!(
            err,
            PodFilesError::TooManySearchDomains { count: 33 }
        ));
        assert!(err.to_string().contains("limit is 32"), "{err}");
    }

    #[test]
    fn resolv_conf_accepts_fqdn_uppercase_searches() {
        let config = dns(&[], &["cluster.local.", "Corp.Example.COM"], &[]);

        let out = resolv_conf(Some(&config), "").expect("valid search domains");

        assert_eq!(out, "search cluster.local. Corp.Example.COM\n");
    }

    #[test]
    fn resolv_conf_rejects_invalid_search_domains() {
        let too_long_label = format!("{}.example", "a".repeat(64));
        let too_long_name = vec!["abcdefghi"; 26].join(".");
        let bad = [
            "",
            ".",
            "a..b",
            ".leading.dot",
            "-start.example",
            "end-.example",
            "under_score.example",
            "two words",
            too_long_label.as_str(),
            too_long_name.as_str(),
        ];
        for domain in bad {
            let err = resolv_conf(Some(&dns(&[], &[domain], &[])), "").expect_err(domain);

            assert!(
                matches!(&err, PodFilesError::InvalidSearchDomain { domain: d, .. } if d == domain),
                "{domain}: {err}"
            );
        }
    }

    #[test]
    fn resolv_conf_rejects_empty_or_spaced_options() {
        for bad in ["", "ndots: 5", "a\tb", "rotate\n"] {
            let err = resolv_conf(Some(&dns(&[], &[], &[bad])), "").expect_err(bad);

            assert!(
                matches!(&err, PodFilesError::InvalidDnsOption { option } if option == bad),
                "{bad:?}: {err}"
            );
        }
    }

    #[test]
    fn hosts_file_lists_loopback_then_pod_ips() {
        let ips = [
            IpAddr::V4(Ipv4Addr::new(10, 244, 1, 7)),
            IpAddr::V6("fd00:10:244:1::7".parse::<Ipv6Addr>().expect("ipv6")),
        ];

        let out = hosts_file("web-0", &ips);

        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[0].starts_with('#'), "{out}");
        assert!(lines[0].contains("hatoba"), "{out}");
        assert_eq!(
            &lines[1..],
            [
                "127.0.0.1 localhost",
                "::1 localhost ip6-localhost ip6-loopback",
                "fe00::0 ip6-localnet",
                "fe00::0 ip6-mcastprefix",
                "fe00::1 ip6-allnodes",
                "fe00::2 ip6-allrouters",
                "10.244.1.7 web-0",
                "fd00:10:244:1::7 web-0",
            ]
        );
    }

    #[test]
    fn hosts_file_without_ips_is_loopback_only() {
        let out = hosts_file("web-0", &[]);

        assert!(!out.contains("web-0"), "{out}");
        assert!(out.ends_with("fe00::2 ip6-allrouters\n"), "{out}");
    }

    #[test]
    fn validate_hostname_accepts_lowercase_labels() {
        for good in ["a", "web-0", "0abc", "pod.ns.svc", &"a".repeat(63)] {
            validate_hostname(good).expect(good);
        }
    }

    #[test]
    fn validate_hostname_caps_length_at_64() {
        let sixty_four = format!("{}.{}", "a".repeat(31), "b".repeat(32));
        let sixty_five = format!("{}.{}", "a".repeat(32), "b".repeat(32));
        assert_eq!(sixty_four.len(), 64);

        validate_hostname(&sixty_four).expect("64 characters");
        let err = validate_hostname(&sixty_five).expect_err("65 characters");

        assert!(err.to_string().contains("at most 64"), "{err}");
        assert!(err.to_string().contains(&sixty_five), "{err}");
    }

    #[test]
    fn validate_hostname_rejects_label_longer_than_63() {
        let err = validate_hostname(&"a".repeat(64)).expect_err("64-character label");

        assert!(err.to_string().contains("at most 63"), "{err}");
    }

    #[test]
    fn validate_hostname_names_broken_rule() {
        let cases = [
            ("", "empty"),
            ("-web", "start and end"),
            ("web-", "start and end"),
            ("Web-0", "'W'"),
            ("web_0", "'_'"),
            ("web 0", "' '"),
            ("web\n0", "'\\n'"),
            ("a..b", "empty label"),
            (".web", "empty label"),
            ("web.", "empty label"),
        ];
        for (name, rule) in cases {
            let err = validate_hostname(name).expect_err(name);
            let msg = err.to_string();

            assert!(
                matches!(&err, PodFilesError::InvalidHostname { hostname, .. } if hostname == name)
            );
            assert!(msg.contains(rule), "{name:?}: {msg}");
        }
    }

    #[test]
    fn pod_files_new_rejects_invalid_hostname() {
        let err = PodFiles::new("Bad", &[], None, HOST_RESOLV).expect_err("uppercase");

        assert!(matches!(err, PodFilesError::InvalidHostname { .. }));
    }

    fn mode_of(path: &Path) -> u32 {
        fs::metadata(path).expect("metadata").permissions().mode() & 0o7777
    }

    fn names_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .expect("read dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn write_pod_files_sets_mode_0644() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ips = [IpAddr::V4(Ipv4Addr::new(10, 244, 0, 3))];
        let files = PodFiles::new("web-0", &ips, None, HOST_RESOLV).expect("pod files");

        write_pod_files(dir.path(), &files).expect("write");

        let read = |name: &str| fs::read_to_string(dir.path().join(name)).expect(name);
        assert_eq!(read("hostname"), "web-0\n");
        assert_eq!(read("hosts"), files.hosts());
        assert_eq!(read("resolv.conf"), HOST_RESOLV);
        for name in POD_FILE_NAMES {
            assert_eq!(mode_of(&dir.path().join(name)), 0o644, "{name}");
        }
    }

    #[test]
    fn write_pod_files_leaves_no_temp_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = PodFiles::new("web-0", &[], None, HOST_RESOLV).expect("pod files");

        write_pod_files(dir.path(), &files).expect("first write");
        write_pod_files(dir.path(), &files).expect("second write");

        assert_eq!(names_in(dir.path()), ["hostname", "hosts", "resolv.conf"]);
    }

    #[test]
    fn write_pod_files_replaces_previous_contents() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = PodFiles::new("first", &[], None, HOST_RESOLV).expect("first");
        let second = PodFiles::new("second", &[], None, "nameserver 192.0.2.1\n").expect("second");

        write_pod_files(dir.path(), &first).expect("first write");
        write_pod_files(dir.path(), &second).expect("second write");

        let read = |name: &str| fs::read_to_string(dir.path().join(name)).expect(name);
        assert_eq!(read("hostname"), "second\n");
        assert_eq!(read("resolv.conf"), "nameserver 192.0.2.1\n");
    }

    #[test]
    fn write_pod_files_names_missing_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("gone");
        let files = PodFiles::new("web-0", &[], None, HOST_RESOLV).expect("pod files");

        let err = write_pod_files(&missing, &files).expect_err("missing dir");

        assert!(matches!(err, PodFilesError::CreateTemp { .. }), "{err}");
        assert!(err.to_string().contains("gone"), "{err}");
    }

    #[test]
    fn remove_pod_files_is_idempotent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = PodFiles::new("web-0", &[], None, HOST_RESOLV).expect("pod files");
        write_pod_files(dir.path(), &files).expect("write");

        remove_pod_files(dir.path()).expect("first remove");
        remove_pod_files(dir.path()).expect("second remove");

        assert!(names_in(dir.path()).is_empty());
    }

    #[test]
    fn remove_pod_files_accepts_missing_directory() {
        let dir = tempfile::tempdir().expect("tempdir");

        remove_pod_files(&dir.path().join("gone")).expect("missing dir");
    }

    #[test]
    fn remove_pod_files_deletes_leftover_temp_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let leftover = dir.path().join(format!(".hosts{TEMP_MARKER}1-0"));
        fs::write(&leftover, "half").expect("leftover");
        fs::write(dir.path().join("keep"), "x").expect("unrelated file");

        remove_pod_files(dir.path()).expect("remove");

        assert_eq!(names_in(dir.path()), ["keep"]);
    }
}
