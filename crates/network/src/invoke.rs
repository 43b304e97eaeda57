//! Building and running CNI plugin invocations for a configuration list.
//!
//! Processes are started by a [`PluginRunner`]. This module decides what
//! each plugin gets (environment, stdin) and in which order plugins run.

use std::fmt;
use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use serde_json::{Map, Value};

use crate::config::{NetworkConfigList, PluginConfig};
use crate::result::{self, CniError, CniResult, ResultError};

/// Default directories searched for plugin binaries.
pub const DEFAULT_BIN_DIRS: &[&str] = &["/opt/cni/bin", "/usr/lib/cni"];

/// The CNI operation a plugin is asked to perform.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
}

impl Command {
    /// Returns the value of `CNI_COMMAND`.
    pub fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
        }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Transport protocol of a port mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

/// One entry of the `portMappings` capability.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PortMapping {
    pub host_port: u16,
    pub container_port: u16,
    pub protocol: Protocol,
    #[serde(rename = "hostIP", skip_serializing_if = "String::is_empty")]
    pub host_ip: String,
}

/// The `dns` capability: the pod's resolver settings.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct DnsCapability {
    pub servers: Vec<String>,
    pub searches: Vec<String>,
    pub options: Vec<String>,
}

/// The pod a network attachment is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodIdentity {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub sandbox_id: String,
}

/// Network attachment of a sandbox: its namespace, interface and the
/// capability arguments from its config.
#[derive(Debug, Clone, PartialEq)]
pub struct Attachment {
    pub pod: PodIdentity,
    pub netns: PathBuf,
    pub ifname: String,
    pub port_mappings: Vec<PortMapping>,
    pub dns: Option<DnsCapability>,
}

/// Failure of the process that ran a plugin, as a runner reports it.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("start {binary}: {source}")]
    Spawn {
        binary: PathBuf,
        source: std::io::Error,
    },
    #[error("{binary} timed out after {timeout:?}")]
    Timeout { binary: PathBuf, timeout: Duration },
    #[error("{binary} failed with {status}: {stderr}")]
    Exited {
        binary: PathBuf,
        status: String,
        stdout: Vec<u8>,
        stderr: String,
    },
    #[error("write config to stdin of {binary}: {source}")]
    WriteStdin {
        binary: PathBuf,
        source: std::io::Error,
    },
    #[error("read {stream} of {binary}: {source}")]
    ReadOutput {
        binary: PathBuf,
        stream: &'static str,
        source: std::io::Error,
    },
    #[error("wait for {binary}: {source}")]
    Wait {
        binary: PathBuf,
        source: std::io::Error,
    },
    #[error("kill {binary} after its timeout: {source}")]
    Kill {
        binary: PathBuf,
        source: std::io::Error,
    },
    #[error("{binary} wrote more than {limit} bytes to stdout, the maximum for a CNI result")]
    OutputTooLarge { binary: PathBuf, limit: usize },
}

/// Runs one plugin binary with the given environment and stdin, returning
/// its stdout when it exits successfully.
pub trait PluginRunner {
    fn run(
        &self,
        binary: &Path,
        env: &[(String, String)],
        stdin: Vec<u8>,
        timeout: Duration,
    ) -> impl Future<Output = Result<Vec<u8>, PluginError>> + Send;
}

/// Failure of a step of a plugin invocation.
#[derive(Debug, thiserror::Error)]
pub enum InvokeError {
    #[error("network {network} has no plugins")]
    EmptyList { network: String },
    #[error("network {network}: plugin type {plugin_type:?} is not a plain file name")]
    InvalidPluginType {
        network: String,
        plugin_type: String,
    },
    #[error(
        "network {network}: CNI plugin {plugin_type} not found in {dirs}; \
         install it there or configure the CNI bin dirs"
    )]
    PluginNotFound {
        network: String,
        plugin_type: String,
        dirs: String,
    },
    #[error("network {network}: encode config for CNI plugin {plugin_type}: {source}")]
    EncodeConfig {
        network: String,
        plugin_type: String,
        source: serde_json::Error,
    },
    #[error("network {network}: {command} with CNI plugin {plugin_type}: {source}")]
    Run {
        network: String,
        plugin_type: String,
        command: Command,
        source: Box<PluginError>,
    },
    #[error("network {network}: {command}: {source}")]
    Plugin {
        network: String,
        command: Command,
        source: CniError,
    },
    #[error("network {network}: decode {command} output of CNI plugin {plugin_type}: {source}")]
    DecodeOutput {
        network: String,
        plugin_type: String,
        command: Command,
        source: serde_json::Error,
    },
    #[error("network {network}: {source}")]
    Result {
        network: String,
        source: ResultError,
    },
    #[error("network {network}: CHECK is not defined for cniVersion {version}")]
    CheckUnsupported { network: String, version: String },
}

/// Every plugin failure of one DEL of a list.
#[derive(Debug, thiserror::Error)]
#[error("DEL on network {network}: {}", join_errors(.errors))]
pub struct DelError {
    pub network: String,
    pub errors: Vec<InvokeError>,
}

fn join_errors(errors: &[InvokeError]) -> String {
    let messages: Vec<String> = errors.iter().map(ToString::to_string).collect();
    messages.join("; ")
}

/// One list operation: which network, for which sandbox, with which
/// plugin directories and per-plugin timeout.
#[derive(Debug, Clone, Copy)]
pub struct ListCall<'a> {
    pub list: &'a NetworkConfigList,
    pub attachment: &'a Attachment,
    pub bin_dirs: &'a [PathBuf],
    pub timeout: Duration,
}

/// The outcome of ADD: the last plugin's result as printed, for the cache
/// and later prevResult, and its 1.0.0 form.
#[derive(Debug, Clone, PartialEq)]
pub struct AddOutcome {
    pub raw: Value,
    pub result: CniResult,
}

/// Finds `plugin_type` in `bin_dirs`: the first regular executable file wins.
pub async fn find_plugin(
    network: &str,
    plugin_type: &str,
    bin_dirs: &[PathBuf],
) -> Result<PathBuf, InvokeError> {
    // The type comes from a config file; it must not walk out of the bin dirs.
    let plain = !plugin_type.is_empty()
        && !plugin_type.contains('/')
        && plugin_type != "."
        && plugin_type != "..";
    if !plain {
        return Err(InvokeError::InvalidPluginType {
            network: network.into(),
            plugin_type: plugin_type.into(),
        });
    }
    for dir in bin_dirs {
        let candidate = dir.join(plugin_type);
        if is_executable_file(&candidate).await {
            return Ok(candidate);
        }
    }
    let dirs: Vec<String> = bin_dirs.iter().map(|d| d.display().to_string()).collect();
    Err(InvokeError::PluginNotFound {
        network: network.into(),
        plugin_type: plugin_type.into(),
        dirs: dirs.join(":"),
    })
}

async fn is_executable_file(path: &Path) -> bool {
    match tokio::fs::metadata(path).await {
        Ok(meta) => meta.is_file() && meta.permissions().mode() & 0o111 != 0,
        Err(_) => false,
    }
}

/// Returns the CNI environment for one invocation. The runner adds what the
/// process itself needs, such as PATH.
pub fn plugin_env(
    command: Command,
    attachment: &Attachment,
    bin_dirs: &[PathBuf],
) -> Vec<(String, String)> {
    let pod = &attachment.pod;
    // Kubernetes names and uids cannot contain ';' or '=', so no escaping.
    let args = format!(
        "K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={};\
         K8S_POD_UID={};IgnoreUnknown=1",
        pod.namespace, pod.name, pod.sandbox_id, pod.uid
    );
    let path: Vec<String> = bin_dirs.iter().map(|d| d.display().to_string()).collect();
    vec![
        ("CNI_COMMAND".into(), command.as_str().into()),
        ("CNI_CONTAINERID".into(), pod.sandbox_id.clone()),
        ("CNI_NETNS".into(), attachment.netns.display().to_string()),
        ("CNI_IFNAME".into(), attachment.ifname.clone()),
        ("CNI_ARGS".into(), args),
        ("CNI_PATH".into(), path.join(":")),
    ]
}

/// Returns the stdin config for one plugin: its own object plus the list's
/// name and version, `prevResult`, and the capabilities it declares.
pub fn plugin_stdin(
    list: &NetworkConfigList,
    plugin: &PluginConfig,
    prev_result: Option<&Value>,
    attachment: &Attachment,
) -> Result<Vec<u8>, InvokeError> {
    let mut config = plugin.raw.clone();
    config.insert("name".into(), Value::String(list.name.clone()));
    config.insert("cniVersion".into(), Value::String(list.cni_version.clone()));
    if let Some(prev) = prev_result {
        config.insert("prevResult".into(), prev.clone());
    }
    let encode = |source| InvokeError::EncodeConfig {
        network: list.name.clone(),
        plugin_type: plugin.plugin_type.clone(),
        source,
    };
    let runtime_config = runtime_config(plugin, attachment).map_err(encode)?;
    if !runtime_config.is_empty() {
        config.insert("runtimeConfig".into(), Value::Object(runtime_config));
    }
    serde_json::to_vec(&config).map_err(encode)
}

fn runtime_config(
    plugin: &PluginConfig,
    attachment: &Attachment,
) -> Result<Map<String, Value>, serde_json::Error> {
    let mut runtime = Map::new();
    if plugin.has_capability("portMappings") && !attachment.port_mappings.is_empty() {
        let mappings = serde_json::to_value(&attachment.port_mappings)?;
        runtime.insert("portMappings".into(), mappings);
    }
    if let Some(dns) = attachment
        .dns
        .as_ref()
        .filter(|_| plugin.has_capability("dns"))
    {
        runtime.insert("dns".into(), serde_json::to_value(dns)?);
    }
    Ok(runtime)
}

async fn invoke<R: PluginRunner>(
    runner: &R,
    call: &ListCall<'_>,
    command: Command,
    plugin: &PluginConfig,
    prev_result: Option<&Value>,
) -> Result<Vec<u8>, InvokeError> {
    let network = &call.list.name;
    let binary = find_plugin(network, &plugin.plugin_type, call.bin_dirs).await?;
    let env = plugin_env(command, call.attachment, call.bin_dirs);
    let stdin = plugin_stdin(call.list, plugin, prev_result, call.attachment)?;

    let outcome = runner.run(&binary, &env, stdin, call.timeout).await;
    outcome.map_err(|error| plugin_failure(network, &plugin.plugin_type, command, error))
}

/// Prefers the CNI error a plugin printed over the bare exit status.
fn plugin_failure(
    network: &str,
    plugin_type: &str,
    command: Command,
    error: PluginError,
) -> InvokeError {
    if let PluginError::Exited { stdout, .. } = &error
        && let Some(source) = result::parse_error(plugin_type, stdout)
    {
        return InvokeError::Plugin {
            network: network.into(),
            command,
            source,
        };
    }
    InvokeError::Run {
        network: network.into(),
        plugin_type: plugin_type.into(),
        command,
        source: Box::new(error),
    }
}

/// Runs ADD through the list in order, feeding each result to the next
/// plugin as prevResult. It stops at the first failure; the caller then
/// runs DEL, as the spec requires, to release what earlier plugins set up.
pub async fn add_list<R: PluginRunner>(
    runner: &R,
    call: &ListCall<'_>,
) -> Result<AddOutcome, InvokeError> {
    let network = &call.list.name;
    let mut last: Option<AddOutcome> = None;
    for plugin in &call.list.plugins {
        let prev = last.as_ref().map(|outcome| &outcome.raw);
        let stdout = invoke(runner, call, Command::Add, plugin, prev).await?;

        let raw: Value =
            serde_json::from_slice(&stdout).map_err(|source| InvokeError::DecodeOutput {
                network: network.clone(),
                plugin_type: plugin.plugin_type.clone(),
                command: Command::Add,
                source,
            })?;
        let result = result::parse_result(&plugin.plugin_type, &raw).map_err(|source| {
            InvokeError::Result {
                network: network.clone(),
                source,
            }
        })?;
        last = Some(AddOutcome { raw, result });
    }
    last.ok_or_else(|| InvokeError::EmptyList {
        network: network.clone(),
    })
}

/// Runs CHECK through the list in order, giving every plugin the cached ADD
/// result. A list with `disableCheck` passes without running anything.
pub async fn check_list<R: PluginRunner>(
    runner: &R,
    call: &ListCall<'_>,
    cached_result: &Value,
) -> Result<(), InvokeError> {
    if is_legacy_03(&call.list.cni_version) {
        return Err(InvokeError::CheckUnsupported {
            network: call.list.name.clone(),
            version: call.list.cni_version.clone(),
        });
    }
    if call.list.disable_check {
        return Ok(());
    }
    for plugin in &call.list.plugins {
        invoke(runner, call, Command::Check, plugin, Some(cached_result)).await?;
    }
    Ok(())
}

/// Runs DEL through the list in reverse order. A failing plugin does not
/// stop the others, so teardown releases as much as it can. Every failure
/// is returned.
pub async fn del_list<R: PluginRunner>(
    runner: &R,
    call: &ListCall<'_>,
    cached_result: Option<&Value>,
) -> Result<(), DelError> {
    // The spec added prevResult to DEL in 0.4.0, so 0.3.x plugins get none.
    let prev = cached_result.filter(|_| !is_legacy_03(&call.list.cni_version));
    let mut errors = Vec::new();
    for plugin in call.list.plugins.iter().rev() {
        if let Err(error) = invoke(runner, call, Command::Del, plugin, prev).await {
            errors.push(error);
        }
    }
    if errors.is_empty() {
        return Ok(());
    }
    Err(DelError {
        network: call.list.name.clone(),
        errors,
    })
}

fn is_legacy_03(version: &str) -> bool {
    version.starts_with("0.3.")
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Mutex;

    use serde_json::json;

    use super::*;

    /// One recorded call: the binary's file name, its env and its stdin.
    #[derive(Debug, Clone)]
    struct Recorded {
        plugin: String,
        env: HashMap<String, String>,
        stdin: Value,
    }

    enum Reply {
        Stdout(Value),
        CniFailure(Value),
        Timeout,
    }

    /// Stands in for process execution, which needs real plugins and root.
    #[derive(Default)]
    struct RecordingRunner {
        replies: HashMap<String, Reply>,
        calls: Mutex<Vec<Recorded>>,
    }

    impl RecordingRunner {
        fn reply(mut self, plugin: &str, reply: Reply) -> Self {
            self.replies.insert(plugin.into(), reply);
            self
        }

        fn calls(&self) -> Vec<Recorded> {
            self.calls.lock().expect("lock").clone()
        }
    }

    impl PluginRunner for RecordingRunner {
        async fn run(
            &self,
            binary: &Path,
            env: &[(String, String)],
            stdin: Vec<u8>,
            timeout: Duration,
        ) -> Result<Vec<u8>, PluginError> {
            let plugin = binary
                .file_name()
                .expect("file name")
                .to_string_lossy()
                .into_owned();
            self.calls.lock().expect("lock").push(Recorded {
                plugin: plugin.clone(),
                env: env.iter().cloned().collect(),
                stdin: serde_json::from_slice(&stdin).expect("stdin is json"),
            });
            match self.replies.get(&plugin) {
                Some(Reply::Stdout(value)) => Ok(serde_json::to_vec(value).expect("encode")),
                Some(Reply::CniFailure(value)) => Err(PluginError::Exited {
                    binary: binary.into(),
                    status: "exit status: 1".into(),
                    stdout: serde_json::to_vec(value).expect("encode"),
                    stderr: String::new(),
                }),
                Some(Reply::Timeout) => Err(PluginError::Timeout {
                    binary: binary.into(),
                    timeout,
                }),
                None => Ok(Vec::new()),
            }
        }
    }

    struct Fixture {
        _bin: tempfile::TempDir,
        bin_dirs: Vec<PathBuf>,
        list: NetworkConfigList,
        attachment: Attachment,
    }

    impl Fixture {
        fn new(cni_version: &str, types: &[&str]) -> Self {
            let bin = tempfile::tempdir().expect("tempdir");
            for plugin_type in types {
                make_executable(&bin.path().join(plugin_type));
            }
            let plugins: Vec<Value> = types
                .iter()
                .map(|t| json!({"type": t, "capabilities": {"portMappings": *t == "portmap"}}))
                .collect();
            let value = json!({"name": "net", "cniVersion": cni_version, "plugins": plugins});
            let list = NetworkConfigList::from_value(value, Path::new("/test")).expect("list");
            Self {
                bin_dirs: vec![bin.path().to_path_buf()],
                _bin: bin,
                list,
                attachment: attachment(),
            }
        }

        fn call(&self) -> ListCall<'_> {
            ListCall {
                list: &self.list,
                attachment: &self.attachment,
                bin_dirs: &self.bin_dirs,
                timeout: Duration::from_secs(5),
            }
        }
    }

    fn make_executable(path: &Path) {
        std::fs::write(path, "#!/bin/sh\nexit 1\n").expect("write plugin");
        let mode = std::fs::Permissions::from_mode(0o755);
        std::fs::set_permissions(path, mode).expect("chmod plugin");
    }

    fn attachment() -> Attachment {
        Attachment {
            pod: PodIdentity {
                namespace: "default".into(),
                name: "web".into(),
                uid: "uid-1".into(),
                sandbox_id: "sb1".into(),
            },
            netns: "/run/hatoba/netns/sb1".into(),
            ifname: "eth0".into(),
            port_mappings: vec![PortMapping {
                host_port: 8080,
                container_port: 80,
                protocol: Protocol::Tcp,
                host_ip: "127.0.0.1".into(),
            }],
            dns: Some(DnsCapability {
                servers: vec!["10.96.0.10".into()],
                searches: vec!["svc.cluster.local".into()],
                options: vec!["ndots:5".into()],
            }),
        }
    }

    fn result_with(address: &str) -> Value {
        json!({
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "eth0", "sandbox": "/run/hatoba/netns/sb1"}],
            "ips": [{"address": address, "interface": 0}]
        })
    }

    #[test]
    fn env_carries_pod_args_and_joined_bin_dirs() {
        let dirs = vec![PathBuf::from("/opt/cni/bin"), PathBuf::from("/usr/lib/cni")];

        let env: HashMap<_, _> = plugin_env(Command::Del, &attachment(), &dirs)
            .into_iter()
            .collect();

        assert_eq!(env["CNI_COMMAND"], "DEL");
        assert_eq!(env["CNI_CONTAINERID"], "sb1");
        assert_eq!(env["CNI_NETNS"], "/run/hatoba/netns/sb1");
        assert_eq!(env["CNI_IFNAME"], "eth0");
        assert_eq!(
            env["CNI_ARGS"],
            "K8S_POD_NAMESPACE=default;K8S_POD_NAME=web;K8S_POD_INFRA_CONTAINER_ID=sb1;\
             K8S_POD_UID=uid-1;IgnoreUnknown=1"
        );
        assert_eq!(env["CNI_PATH"], "/opt/cni/bin:/usr/lib/cni");
    }

    #[test]
    fn stdin_injects_only_declared_capabilities() {
        let fixture = Fixture::new("1.0.0", &["bridge", "portmap"]);
        let prev = result_with("10.88.0.2/16");
        let stdin = |index: usize, prev: Option<&Value>| -> Value {
            let plugin = &fixture.list.plugins[index];
            let bytes = plugin_stdin(&fixture.list, plugin, prev, &fixture.attachment);
            serde_json::from_slice(&bytes.expect("stdin")).expect("json")
        };

        let bridge = stdin(0, None);
        let portmap = stdin(1, Some(&prev));

        assert_eq!(bridge["name"], "net");
        assert_eq!(bridge["cniVersion"], "1.0.0");
        assert!(bridge.get("runtimeConfig").is_none());
        assert!(bridge.get("prevResult").is_none());
        assert_eq!(portmap["prevResult"], prev);
        assert_eq!(
            portmap["runtimeConfig"],
            json!({"portMappings": [
                {"hostPort": 8080, "containerPort": 80, "protocol": "tcp", "hostIP": "127.0.0.1"}
            ]})
        );
    }

    #[test]
    fn stdin_carries_dns_when_declared() {
        let fixture = Fixture::new("1.0.0", &["dnsaware"]);
        let mut plugin = fixture.list.plugins[0].clone();
        plugin
            .raw
            .insert("capabilities".into(), json!({"dns": true}));

        let bytes = plugin_stdin(&fixture.list, &plugin, None, &fixture.attachment);
        let stdin: Value = serde_json::from_slice(&bytes.expect("stdin")).expect("json");

        assert_eq!(
            stdin["runtimeConfig"]["dns"],
            json!({"servers": ["10.96.0.10"], "searches": ["svc.cluster.local"], "options": ["ndots:5"]})
        );
        assert_eq!(stdin["capabilities"], json!({"dns": true}));
    }

    #[tokio::test]
    async fn find_plugin_takes_the_first_executable_file() {
        let first = tempfile::tempdir().expect("tempdir");
        let second = tempfile::tempdir().expect("tempdir");
        std::fs::write(first.path().join("bridge"), "not executable").expect("write");
        std::fs::create_dir(first.path().join("portmap")).expect("mkdir");
        make_executable(&second.path().join("bridge"));
        make_executable(&second.path().join("portmap"));
        let dirs = vec![first.path().to_path_buf(), second.path().to_path_buf()];

        let bridge = find_plugin("net", "bridge", &dirs).await.expect("bridge");
        let portmap = find_plugin("net", "portmap", &dirs).await.expect("portmap");

        assert_eq!(bridge, second.path().join("bridge"));
        assert_eq!(portmap, second.path().join("portmap"));
    }

    #[tokio::test]
    async fn missing_plugin_error_names_type_and_dirs() {
        let dirs = vec![
            PathBuf::from("/nonexistent/a"),
            PathBuf::from("/nonexistent/b"),
        ];

        let error = find_plugin("net", "macvlan", &dirs)
            .await
            .expect_err("missing");

        let message = error.to_string();
        assert!(message.contains("macvlan"), "{message}");
        assert!(
            message.contains("/nonexistent/a:/nonexistent/b"),
            "{message}"
        );
    }

    #[tokio::test]
    async fn path_like_plugin_types_are_rejected() {
        let dirs = vec![PathBuf::from("/usr/lib/cni")];
        for plugin_type in ["../../bin/sh", "..", "", "a/b"] {
            let error = find_plugin("net", plugin_type, &dirs)
                .await
                .expect_err("rejected");
            assert!(matches!(error, InvokeError::InvalidPluginType { .. }));
        }
    }

    #[tokio::test]
    async fn add_chains_prev_result() {
        let fixture = Fixture::new("1.0.0", &["bridge", "portmap"]);
        let runner = RecordingRunner::default()
            .reply("bridge", Reply::Stdout(result_with("10.88.0.5/16")))
            .reply("portmap", Reply::Stdout(result_with("10.88.0.5/16")));

        let outcome = add_list(&runner, &fixture.call()).await.expect("add");

        let calls = runner.calls();
        let order: Vec<_> = calls.iter().map(|c| c.plugin.as_str()).collect();
        assert_eq!(order, ["bridge", "portmap"]);
        assert!(calls[0].stdin.get("prevResult").is_none());
        assert_eq!(calls[1].stdin["prevResult"], result_with("10.88.0.5/16"));
        assert_eq!(calls[1].env["CNI_COMMAND"], "ADD");
        assert_eq!(outcome.raw, result_with("10.88.0.5/16"));
        assert_eq!(
            outcome.result.pod_ips().v4,
            Some("10.88.0.5".parse().expect("ip"))
        );
    }

    #[tokio::test]
    async fn add_stops_at_first_failure() {
        let fixture = Fixture::new("1.0.0", &["bridge", "portmap"]);
        let failure = json!({"cniVersion": "1.0.0", "code": 11, "msg": "busy"});
        let runner = RecordingRunner::default().reply("bridge", Reply::CniFailure(failure));

        let error = add_list(&runner, &fixture.call()).await.expect_err("fails");

        assert_eq!(runner.calls().len(), 1);
        let InvokeError::Plugin { source, .. } = error else {
            panic!("expected a CNI error, got {error}");
        };
        assert_eq!((source.plugin_type.as_str(), source.code), ("bridge", 11));
    }

    #[tokio::test]
    async fn add_rejects_output_that_is_not_a_result() {
        let fixture = Fixture::new("1.0.0", &["bridge"]);
        let runner = RecordingRunner::default();

        let error = add_list(&runner, &fixture.call())
            .await
            .expect_err("empty stdout");

        assert!(matches!(error, InvokeError::DecodeOutput { .. }), "{error}");
    }

    #[tokio::test]
    async fn timeout_names_plugin_and_command() {
        let fixture = Fixture::new("1.0.0", &["bridge"]);
        let runner = RecordingRunner::default().reply("bridge", Reply::Timeout);

        let error = add_list(&runner, &fixture.call())
            .await
            .expect_err("timeout");

        assert!(matches!(
            error,
            InvokeError::Run {
                command: Command::Add,
                ..
            }
        ));
        assert!(
            error.to_string().contains("ADD with CNI plugin bridge"),
            "{error}"
        );
    }

    #[tokio::test]
    async fn del_runs_in_reverse_and_continues_past_failures() {
        let fixture = Fixture::new("1.0.0", &["bridge", "tuning", "portmap"]);
        let failure = json!({"code": 5, "msg": "iptables"});
        let runner = RecordingRunner::default()
            .reply("portmap", Reply::CniFailure(failure))
            .reply("bridge", Reply::Timeout);
        let cached = result_with("10.88.0.5/16");

        let error = del_list(&runner, &fixture.call(), Some(&cached))
            .await
            .expect_err("two failures");

        let calls = runner.calls();
        let order: Vec<_> = calls.iter().map(|c| c.plugin.as_str()).collect();
        assert_eq!(order, ["portmap", "tuning", "bridge"]);
        assert!(calls.iter().all(|c| c.stdin["prevResult"] == cached));
        assert_eq!(error.errors.len(), 2);
        assert!(error.to_string().contains("portmap"), "{error}");
        assert!(error.to_string().contains("bridge"), "{error}");
    }

    #[tokio::test]
    async fn del_on_0_3_omits_prev_result() {
        let fixture = Fixture::new("0.3.1", &["bridge"]);
        let runner = RecordingRunner::default();
        let cached = result_with("10.88.0.5/16");

        del_list(&runner, &fixture.call(), Some(&cached))
            .await
            .expect("del");

        assert!(runner.calls()[0].stdin.get("prevResult").is_none());
    }

    #[tokio::test]
    async fn del_without_cache_omits_prev_result() {
        let fixture = Fixture::new("1.0.0", &["bridge"]);
        let runner = RecordingRunner::default();

        del_list(&runner, &fixture.call(), None).await.expect("del");

        assert!(runner.calls()[0].stdin.get("prevResult").is_none());
    }

    #[tokio::test]
    async fn check_gives_every_plugin_the_cached_result() {
        let fixture = Fixture::new("1.0.0", &["bridge", "portmap"]);
        let runner = RecordingRunner::default();
        let cached = result_with("10.88.0.5/16");

        check_list(&runner, &fixture.call(), &cached)
            .await
            .expect("check");

        let calls = runner.calls();
        assert_eq!(calls.len(), 2);
        assert!(calls.iter().all(|c| c.stdin["prevResult"] == cached));
        assert!(calls.iter().all(|c| c.env["CNI_COMMAND"] == "CHECK"));
    }

    #[tokio::test]
    async fn check_skipped_when_disabled() {
        let mut fixture = Fixture::new("1.0.0", &["bridge"]);
        fixture.list.disable_check = true;
        let runner = RecordingRunner::default();
        let cached = result_with("10.88.0.5/16");

        check_list(&runner, &fixture.call(), &cached)
            .await
            .expect("skipped");

        assert!(runner.calls().is_empty());
    }

    #[tokio::test]
    async fn check_rejected_before_0_4() {
        let fixture = Fixture::new("0.3.1", &["bridge"]);
        let runner = RecordingRunner::default();
        let cached = result_with("10.88.0.5/16");

        let error = check_list(&runner, &fixture.call(), &cached)
            .await
            .expect_err("old");

        assert!(runner.calls().is_empty());
        assert!(matches!(error, InvokeError::CheckUnsupported { .. }));
    }
}
