//! Pod sandboxes and containers: stores, lifecycle and OCI spec generation.
//!
//! So far it contains the per-pod files a sandbox gives its containers
//! (hostname, hosts, resolv.conf), the name registry and the sandbox store.
//! Sandbox and container lifecycles come next.

mod names;
mod pod_files;
mod sandbox_store;
mod sysctls;

pub use names::{NameError, NameRegistry, Reservation, sandbox_name};

pub use pod_files::{
    MAX_HOSTNAME_LEN, MAX_NAMESERVERS, MAX_SEARCH_DOMAINS, PodDns, PodFiles, PodFilesError,
    hosts_file, remove_pod_files, resolv_conf, validate_hostname, write_pod_files,
};
pub use sandbox_store::{
    ID_LEN, LoadFailure, SandboxMetadata, SandboxRecord, SandboxState, SandboxStore,
    SandboxStoreError, new_id, validate_id,
};
pub use sysctls::{NamespaceModes, SysctlError, SysctlNamespace, proc_sys_path, validate_sysctls};
