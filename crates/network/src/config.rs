//! CNI network configuration lists (spec 1.0.0) and the built-in default.
//!
//! Loading is synchronous file I/O, so async callers run it on a blocking thread.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value, json};

/// Directory scanned for network configuration when none is configured.
pub const DEFAULT_CONF_DIR: &str = "/etc/cni/net.d";

/// Configuration versions whose plugins and results hatoba understands.
pub const SUPPORTED_VERSIONS: &[&str] = &["1.1.0", "1.0.0", "0.4.0", "0.3.1", "0.3.0"];

/// Name of the built-in network.
pub const DEFAULT_NETWORK: &str = "hatoba";

/// Bridge device of the built-in network.
pub const DEFAULT_BRIDGE: &str = "hatoba0";

/// Subnet the built-in network allocates pod addresses from.
pub const DEFAULT_SUBNET: &str = "10.88.0.0/16";

/// Failure to load or validate a network configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("read CNI config directory {dir}: {source}")]
    ReadDir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("read CNI config file {file}: {source}")]
    ReadFile {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("parse CNI config file {file}: {source}")]
    Parse {
        file: PathBuf,
        source: serde_json::Error,
    },
    #[error("CNI config file {file}: top level is not a JSON object")]
    NotObject { file: PathBuf },
    #[error("CNI config file {file}: missing or empty network name")]
    MissingName { file: PathBuf },
    #[error(
        "CNI config file {file}: network name {network:?} must start with a letter or digit \
         and contain only letters, digits, '-', '_' and '.'"
    )]
    InvalidName { file: PathBuf, network: String },
    #[error(
        "CNI config file {file}: network {network} has cniVersion {version:?}; \
         supported versions are {SUPPORTED_VERSIONS:?}"
    )]
    UnsupportedVersion {
        file: PathBuf,
        network: String,
        version: String,
    },
    #[error("CNI config file {file}: network {network} has no plugins")]
    NoPlugins { file: PathBuf, network: String },
    #[error("CNI config file {file}: plugin {index} of network {network} is not a JSON object")]
    PluginNotObject {
        file: PathBuf,
        network: String,
        index: usize,
    },
    #[error("CNI config file {file}: plugin {index} of network {network} has no type")]
    MissingType {
        file: PathBuf,
        network: String,
        index: usize,
    },
}

/// One plugin of a list: its type and its configuration exactly as written.
#[derive(Clone, Debug, PartialEq)]
pub struct PluginConfig {
    pub plugin_type: String,
    /// The plugin's own object, passed back to the plugin verbatim.
    pub raw: Map<String, Value>,
}

impl PluginConfig {
    /// Reports whether the plugin declares `capability` as true.
    pub fn has_capability(&self, capability: &str) -> bool {
        self.raw
            .get("capabilities")
            .and_then(|caps| caps.get(capability))
            .and_then(Value::as_bool)
            .unwrap_or(false)
    }
}

/// A validated network configuration list.
#[derive(Clone, Debug, PartialEq)]
pub struct NetworkConfigList {
    pub name: String,
    pub cni_version: String,
    pub disable_check: bool,
    pub plugins: Vec<PluginConfig>,
}

impl NetworkConfigList {
    /// Validates a configuration list read from `file`.
    pub fn from_value(value: Value, file: &Path) -> Result<Self, ConfigError> {
        let Value::Object(mut list) = value else {
            return Err(ConfigError::NotObject { file: file.into() });
        };
        let name = network_name(&list, file)?;
        let cni_version = cni_version(&list, &name, file)?;
        let disable_check = list
            .get("disableCheck")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let plugins = match list.remove("plugins") {
            Some(Value::Array(plugins)) => plugins,
            _ => Vec::new(),
        };
        if plugins.is_empty() {
            return Err(ConfigError::NoPlugins {
                file: file.into(),
                network: name,
            });
        }
        let plugins = plugins
            .into_iter()
            .enumerate()
            .map(|(index, plugin)| plugin_config(plugin, index, &name, file))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            name,
            cni_version,
            disable_check,
            plugins,
        })
    }

    /// Wraps a single-plugin configuration (`.conf`) into a list, taking
    /// the list's name and version from the plugin's own fields.
    pub fn from_single(value: Value, file: &Path) -> Result<Self, ConfigError> {
        let Value::Object(plugin) = value else {
            return Err(ConfigError::NotObject { file: file.into() });
        };
        let mut list = Map::new();
        for key in ["name", "cniVersion", "disableCheck"] {
            if let Some(field) = plugin.get(key) {
                list.insert(key.into(), field.clone());
            }
        }
        list.insert("plugins".into(), Value::Array(vec![Value::Object(plugin)]));
        Self::from_value(Value::Object(list), file)
    }

    /// Returns the list as conflist JSON, plugins unchanged.
    pub fn to_json(&self) -> Value {
        let plugins: Vec<Value> = self
            .plugins
            .iter()
            .map(|plugin| Value::Object(plugin.raw.clone()))
            .collect();
        json!({
            "cniVersion": self.cni_version,
            "name": self.name,
            "disableCheck": self.disable_check,
            "plugins": plugins,
        })
    }
}

fn network_name(list: &Map<String, Value>, file: &Path) -> Result<String, ConfigError> {
    let name = match list.get("name").and_then(Value::as_str) {
        Some(name) if !name.is_empty() => name.to_owned(),
        _ => return Err(ConfigError::MissingName { file: file.into() }),
    };
    // The spec's name pattern: ^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if !(first_ok && rest_ok) {
        return Err(ConfigError::InvalidName {
            file: file.into(),
            network: name,
        });
    }
    Ok(name)
}

fn cni_version(
    list: &Map<String, Value>,
    network: &str,
    file: &Path,
) -> Result<String, ConfigError> {
    let version = list
        .get("cniVersion")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if !SUPPORTED_VERSIONS.contains(&version) {
        return Err(ConfigError::UnsupportedVersion {
            file: file.into(),
            network: network.into(),
            version: version.into(),
        });
    }
    Ok(version.into())
}

fn plugin_config(
    plugin: Value,
    index: usize,
    network: &str,
    file: &Path,
) -> Result<PluginConfig, ConfigError> {
    let Value::Object(raw) = plugin else {
        return Err(ConfigError::PluginNotObject {
            file: file.into(),
            network: network.into(),
            index,
        });
    };
    let plugin_type = match raw.get("type").and_then(Value::as_str) {
        Some(plugin_type) if !plugin_type.is_empty() => plugin_type.to_owned(),
        _ => {
            return Err(ConfigError::MissingType {
                file: file.into(),
                network: network.into(),
                index,
            });
        }
    };
    Ok(PluginConfig { plugin_type, raw })
}

/// A configuration file that was passed over, and why.
#[derive(Debug)]
pub struct SkippedFile {
    pub file: PathBuf,
    pub reason: ConfigError,
}

/// Result of scanning the configuration directory.
#[derive(Debug, Default)]
pub struct ConfigScan {
    /// The first valid list in file name order, with the file it came from.
    pub chosen: Option<(PathBuf, NetworkConfigList)>,
    /// Invalid files met before the chosen one, for logs and NetworkReady.
    pub skipped: Vec<SkippedFile>,
}

/// Loads the first valid network configuration from `dir` in lexical file
/// name order. A missing directory yields an empty scan.
pub fn load_dir(dir: &Path) -> Result<ConfigScan, ConfigError> {
    let mut scan = ConfigScan::default();
    for file in config_files(dir)? {
        match load_file(&file) {
            Ok(list) => {
                scan.chosen = Some((file, list));
                break;
            }
            Err(reason) => scan.skipped.push(SkippedFile { file, reason }),
        }
    }
    Ok(scan)
}

fn config_files(dir: &Path) -> Result<Vec<PathBuf>, ConfigError> {
    let read_dir_error = |source| ConfigError::ReadDir {
        dir: dir.into(),
        source,
    };
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(read_dir_error(error)),
    };
    let mut files = Vec::new();
    for entry in entries {
        let path = entry.map_err(read_dir_error)?.path();
        if is_config_file(&path) {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

fn is_config_file(path: &Path) -> bool {
    let extension = path.extension().and_then(|ext| ext.to_str());
    matches!(extension, Some("conflist" | "conf" | "json")) && !path.is_dir()
}

/// Loads one file: `.conflist` as a list, `.conf` and `.json` as a single
/// plugin wrapped into a list.
pub fn load_file(file: &Path) -> Result<NetworkConfigList, ConfigError> {
    let bytes = std::fs::read(file).map_err(|source| ConfigError::ReadFile {
        file: file.into(),
        source,
    })?;
    let value = serde_json::from_slice(&bytes).map_err(|source| ConfigError::Parse {
        file: file.into(),
        source,
    })?;
    if file.extension().is_some_and(|ext| ext == "conflist") {
        NetworkConfigList::from_value(value, file)
    } else {
        NetworkConfigList::from_single(value, file)
    }
}

/// Returns the built-in list used when no configuration is installed.
///
/// Loopback is left out on purpose: like containerd, hatoba brings `lo` up
/// with a separate loopback invocation on every sandbox, so it also runs
/// when an administrator's list does not include it. The host-local
/// allocations go under `state_dir`, so they live and die with hatoba's state.
pub fn default_list(state_dir: &Path) -> NetworkConfigList {
    let data_dir = state_dir.join("cni").join("networks");
    let bridge = json!({
        "type": "bridge",
        "bridge": DEFAULT_BRIDGE,
        "isGateway": true,
        "ipMasq": true,
        "hairpinMode": true,
        "ipam": {
            "type": "host-local",
            "ranges": [[{ "subnet": DEFAULT_SUBNET }]],
            "routes": [{ "dst": "0.0.0.0/0" }],
            "dataDir": data_dir.to_string_lossy(),
        },
    });
    let portmap = json!({
        "type": "portmap",
        "capabilities": { "portMappings": true },
    });
    NetworkConfigList {
        name: DEFAULT_NETWORK.into(),
        cni_version: "1.0.0".into(),
        disable_check: false,
        plugins: vec![
            builtin_plugin("bridge", bridge),
            builtin_plugin("portmap", portmap),
        ],
    }
}

fn builtin_plugin(plugin_type: &str, value: Value) -> PluginConfig {
    let raw = match value {
        Value::Object(raw) => raw,
        _ => Map::new(),
    };
    PluginConfig {
        plugin_type: plugin_type.into(),
        raw,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write config");
        path
    }

    const LIST: &str = r#"{"cniVersion":"1.0.0","name":"net-a","plugins":[
        {"type":"bridge","bridge":"br0","custom":{"k":1}},
        {"type":"portmap","capabilities":{"portMappings":true}}]}"#;

    #[test]
    fn first_valid_file_in_name_order_wins() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), "20-b.conflist", &LIST.replace("net-a", "net-b"));
        write(dir.path(), "10-a.conflist", LIST);

        let scan = load_dir(dir.path()).expect("scan");

        let (file, list) = scan.chosen.expect("a list");
        assert_eq!(file, dir.path().join("10-a.conflist"));
        assert_eq!(list.name, "net-a");
        assert_eq!(list.plugins.len(), 2);
        assert!(scan.skipped.is_empty());
    }

    #[test]
    fn invalid_files_skipped_with_reason() {
        let dir = tempfile::tempdir().expect("tempdir");
        let broken = write(dir.path(), "01-broken.conflist", "{not json");
        let no_plugins = write(
            dir.path(),
            "02-empty.conflist",
            r#"{"cniVersion":"1.0.0","name":"x","plugins":[]}"#,
        );
        write(dir.path(), "03-good.conflist", LIST);

        let scan = load_dir(dir.path()).expect("scan");

        assert_eq!(scan.chosen.expect("a list").1.name, "net-a");
        assert_eq!(scan.skipped.len(), 2);
        assert_eq!(scan.skipped[0].file, broken);
        assert!(matches!(scan.skipped[0].reason, ConfigError::Parse { .. }));
        assert!(matches!(
            scan.skipped[1].reason,
            ConfigError::NoPlugins { .. }
        ));
        assert!(
            scan.skipped[1]
                .reason
                .to_string()
                .contains(&no_plugins.display().to_string())
        );
    }

    #[test]
    fn other_extensions_are_ignored() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), "00-notes.txt", "hello");

        let scan = load_dir(dir.path()).expect("scan");

        assert!(scan.chosen.is_none());
        assert!(scan.skipped.is_empty());
    }

    #[test]
    fn missing_dir_is_an_empty_scan() {
        let dir = tempfile::tempdir().expect("tempdir");

        let scan = load_dir(&dir.path().join("absent")).expect("scan");

        assert!(scan.chosen.is_none());
        assert!(scan.skipped.is_empty());
    }

    #[test]
    fn single_plugin_conf_is_wrapped_into_a_list() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(
            dir.path(),
            "10-single.conf",
            r#"{"cniVersion":"0.4.0","name":"single","type":"bridge","bridge":"br1"}"#,
        );

        let (_, list) = load_dir(dir.path()).expect("scan").chosen.expect("list");

        assert_eq!(list.name, "single");
        assert_eq!(list.cni_version, "0.4.0");
        assert_eq!(list.plugins[0].plugin_type, "bridge");
        assert_eq!(list.plugins[0].raw["bridge"], "br1");
    }

    #[test]
    fn validation_rejects_each_broken_field() {
        let file = Path::new("/x.conflist");
        let check = |text: &str| {
            let value = serde_json::from_str(text).expect("json");
            NetworkConfigList::from_value(value, file).expect_err("invalid")
        };
        assert!(matches!(check(r#"[]"#), ConfigError::NotObject { .. }));
        assert!(matches!(
            check(r#"{"cniVersion":"1.0.0","plugins":[{"type":"a"}]}"#),
            ConfigError::MissingName { .. }
        ));
        assert!(matches!(
            check(r#"{"name":"-bad","cniVersion":"1.0.0","plugins":[{"type":"a"}]}"#),
            ConfigError::InvalidName { .. }
        ));
        assert!(matches!(
            check(r#"{"name":"n","cniVersion":"0.2.0","plugins":[{"type":"a"}]}"#),
            ConfigError::UnsupportedVersion { .. }
        ));
        assert!(matches!(
            check(r#"{"name":"n","cniVersion":"1.0.0","plugins":[{"type":"a"},{"x":1}]}"#),
            ConfigError::MissingType { index: 1, .. }
        ));
        assert!(matches!(
            check(r#"{"name":"n","cniVersion":"1.0.0","plugins":[3]}"#),
            ConfigError::PluginNotObject { index: 0, .. }
        ));
    }

    #[test]
    fn all_supported_versions_are_accepted() {
        for version in ["1.0.0", "1.1.0", "0.4.0", "0.3.1", "0.3.0"] {
            let value = json!({"name":"n","cniVersion":version,"plugins":[{"type":"a"}]});
            let list = NetworkConfigList::from_value(value, Path::new("/x")).expect(version);
            assert_eq!(list.cni_version, version);
        }
    }

    #[test]
    fn plugin_config_is_kept_verbatim_and_round_trips() {
        let value: Value = serde_json::from_str(LIST).expect("json");
        let list = NetworkConfigList::from_value(value.clone(), Path::new("/x")).expect("list");

        assert_eq!(list.plugins[0].raw["custom"], json!({"k":1}));
        assert!(list.plugins[1].has_capability("portMappings"));
        assert!(!list.plugins[0].has_capability("portMappings"));
        let again = NetworkConfigList::from_value(list.to_json(), Path::new("/y")).expect("again");
        assert_eq!(again, list);
    }

    #[test]
    fn default_list_omits_loopback() {
        let list = default_list(Path::new("/var/lib/hatoba"));

        assert_eq!(list.name, "hatoba");
        assert_eq!(list.cni_version, "1.0.0");
        let types: Vec<_> = list
            .plugins
            .iter()
            .map(|p| p.plugin_type.as_str())
            .collect();
        assert_eq!(types, ["bridge", "portmap"]);
        let bridge = &list.plugins[0].raw;
        assert_eq!(bridge["bridge"], "hatoba0");
        assert_eq!(bridge["isGateway"], true);
        assert_eq!(bridge["ipMasq"], true);
        assert_eq!(bridge["hairpinMode"], true);
        assert_eq!(bridge["ipam"]["type"], "host-local");
        assert_eq!(bridge["ipam"]["ranges"][0][0]["subnet"], "10.88.0.0/16");
        assert_eq!(bridge["ipam"]["routes"][0]["dst"], "0.0.0.0/0");
        assert_eq!(bridge["ipam"]["dataDir"], "/var/lib/hatoba/cni/networks");
        assert!(list.plugins[1].has_capability("portMappings"));
        // The default must pass the same validation as an installed file.
        NetworkConfigList::from_value(list.to_json(), Path::new("/builtin")).expect("valid");
    }
}
