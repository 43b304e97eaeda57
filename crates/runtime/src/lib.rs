//! Pod sandboxes and containers: stores, lifecycle and OCI spec generation.
//!
//! So far it contains the per-pod files a sandbox gives its containers
//! (hostname, hosts, resolv.conf). Sandbox and container lifecycles come next.

mod pod_files;

pub use pod_files::{
    MAX_HOSTNAME_LEN, MAX_NAMESERVERS, MAX_SEARCH_DOMAINS, PodDns, PodFiles, PodFilesError,
    hosts_file, remove_pod_files, resolv_conf, validate_hostname, write_pod_files,
};
