//! Plugin output: CNI errors and results, normalised to the 1.0.0 form.

use std::net::IpAddr;

use serde::Deserialize;
use serde_json::Value;

/// An error a plugin reported on stdout in the CNI error format.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("CNI plugin {plugin_type} failed with code {code}: {msg}{}", details_suffix(.details))]
pub struct CniError {
    pub plugin_type: String,
    pub code: u32,
    pub msg: String,
    pub details: String,
}

fn details_suffix(details: &str) -> String {
    if details.is_empty() {
        String::new()
    } else {
        format!(" ({details})")
    }
}

#[derive(Deserialize)]
struct WireError {
    code: u32,
    #[serde(default)]
    msg: String,
    #[serde(default)]
    details: String,
}

/// Parses a CNI error from a failed plugin's stdout. Returns `None` when the
/// output is not in the error format.
pub fn parse_error(plugin_type: &str, stdout: &[u8]) -> Option<CniError> {
    let wire: WireError = serde_json::from_slice(stdout).ok()?;
    Some(CniError {
        plugin_type: plugin_type.into(),
        code: wire.code,
        msg: wire.msg,
        details: wire.details,
    })
}

/// Failure to understand a plugin's result.
#[derive(Debug, thiserror::Error)]
pub enum ResultError {
    #[error("decode result of CNI plugin {plugin_type}: {source}")]
    Decode {
        plugin_type: String,
        source: serde_json::Error,
    },
    #[error("result of CNI plugin {plugin_type} has unsupported cniVersion {version:?}")]
    UnsupportedVersion {
        plugin_type: String,
        version: String,
    },
    #[error("result of CNI plugin {plugin_type} has invalid address {address:?}")]
    InvalidAddress {
        plugin_type: String,
        address: String,
    },
    #[error(
        "result of CNI plugin {plugin_type}: address {address} refers to interface {index}, \
         but only {count} interfaces are listed"
    )]
    InterfaceOutOfRange {
        plugin_type: String,
        address: String,
        index: usize,
        count: usize,
    },
    #[error(
        "result of CNI plugin {plugin_type}: address {address} is marked as IPv{version} \
         but is not"
    )]
    FamilyMismatch {
        plugin_type: String,
        address: String,
        version: String,
    },
}

/// A plugin result in the CNI 1.0.0 form.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CniResult {
    pub cni_version: String,
    #[serde(default)]
    pub interfaces: Vec<Interface>,
    #[serde(default)]
    pub ips: Vec<IpConfig>,
    #[serde(default)]
    pub routes: Vec<Route>,
    #[serde(default)]
    pub dns: Dns,
}

/// An interface a plugin created or configured.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
pub struct Interface {
    pub name: String,
    #[serde(default)]
    pub mac: String,
    #[serde(default)]
    pub mtu: Option<u32>,
    /// The namespace path for interfaces inside the sandbox, empty on the host.
    #[serde(default)]
    pub sandbox: String,
}

/// An address in CIDR form, on the interface at index `interface`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
pub struct IpConfig {
    pub address: String,
    #[serde(default)]
    pub gateway: Option<String>,
    #[serde(default)]
    pub interface: Option<usize>,
}

impl IpConfig {
    /// Returns the address without its prefix length.
    pub fn ip(&self) -> Option<IpAddr> {
        let (ip, _prefix) = self.address.split_once('/')?;
        ip.parse().ok()
    }
}

/// A route a plugin installed.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
pub struct Route {
    pub dst: String,
    #[serde(default)]
    pub gw: Option<String>,
}

/// DNS settings a plugin suggests.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
pub struct Dns {
    #[serde(default)]
    pub nameservers: Vec<String>,
    #[serde(default)]
    pub domain: String,
    #[serde(default)]
    pub search: Vec<String>,
    #[serde(default)]
    pub options: Vec<String>,
}

/// The pod's addresses, one per family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PodIps {
    pub v4: Option<IpAddr>,
    pub v6: Option<IpAddr>,
}

/// 0.3.x and 0.4.0 results tag each address with its family.
#[derive(Deserialize)]
struct LegacyIpConfig {
    version: String,
    #[serde(flatten)]
    ip: IpConfig,
}

#[derive(Deserialize)]
struct LegacyResult {
    #[serde(default)]
    interfaces: Vec<Interface>,
    #[serde(default)]
    ips: Vec<LegacyIpConfig>,
    #[serde(default)]
    routes: Vec<Route>,
    #[serde(default)]
    dns: Dns,
}

/// Parses the result `plugin_type` printed, converting older forms to 1.0.0.
pub fn parse_result(plugin_type: &str, value: &Value) -> Result<CniResult, ResultError> {
    let decode = |source| ResultError::Decode {
        plugin_type: plugin_type.into(),
        source,
    };
    let version = value
        .get("cniVersion")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let result = match version {
        "1.0.0" | "1.1.0" => CniResult::deserialize(value).map_err(decode)?,
        "0.4.0" | "0.3.1" | "0.3.0" => {
            let legacy = LegacyResult::deserialize(value).map_err(decode)?;
            from_legacy(plugin_type, legacy)?
        }
        _ => {
            return Err(ResultError::UnsupportedVersion {
                plugin_type: plugin_type.into(),
                version: version.into(),
            });
        }
    };
    validate(plugin_type, &result)?;
    Ok(result)
}

fn from_legacy(plugin_type: &str, legacy: LegacyResult) -> Result<CniResult, ResultError> {
    let mut ips = Vec::with_capacity(legacy.ips.len());
    for tagged in legacy.ips {
        let family_ok = match tagged.ip.ip() {
            Some(IpAddr::V4(_)) => tagged.version == "4",
            Some(IpAddr::V6(_)) => tagged.version == "6",
            // validate() reports an unparsable address as InvalidAddress.
            None => true,
        };
        if !family_ok {
            return Err(ResultError::FamilyMismatch {
                plugin_type: plugin_type.into(),
                address: tagged.ip.address,
                version: tagged.version,
            });
        }
        ips.push(tagged.ip);
    }
    Ok(CniResult {
        cni_version: "1.0.0".into(),
        interfaces: legacy.interfaces,
        ips,
        routes: legacy.routes,
        dns: legacy.dns,
    })
}

fn validate(plugin_type: &str, result: &CniResult) -> Result<(), ResultError> {
    for ip in &result.ips {
        if ip.ip().is_none() {
            return Err(ResultError::InvalidAddress {
                plugin_type: plugin_type.into(),
                address: ip.address.clone(),
            });
        }
        let count = result.interfaces.len();
        if let Some(index) = ip.interface.filter(|index| *index >= count) {
            return Err(ResultError::InterfaceOutOfRange {
                plugin_type: plugin_type.into(),
                address: ip.address.clone(),
                index,
                count,
            });
        }
    }
    Ok(())
}

impl CniResult {
    /// Returns the first IPv4 and IPv6 address on an interface inside the
    /// sandbox, or of all addresses when none names its interface.
    pub fn pod_ips(&self) -> PodIps {
        let any_indexed = self.ips.iter().any(|ip| ip.interface.is_some());
        let in_sandbox = |ip: &&IpConfig| match ip.interface {
            Some(index) => self
                .interfaces
                .get(index)
                .is_some_and(|interface| !interface.sandbox.is_empty()),
            None => !any_indexed,
        };
        let mut ips = PodIps::default();
        for ip in self.ips.iter().filter(in_sandbox).filter_map(IpConfig::ip) {
            match ip {
                IpAddr::V4(_) if ips.v4.is_none() => ips.v4 = Some(ip),
                IpAddr::V6(_) if ips.v6.is_none() => ips.v6 = Some(ip),
                _ => {}
            }
        }
        ips
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn bridge_result() -> Value {
        json!({
            "cniVersion": "1.0.0",
            "interfaces": [
                {"name": "hatoba0", "mac": "aa:aa:aa:aa:aa:aa"},
                {"name": "veth1", "mac": "bb:bb:bb:bb:bb:bb"},
                {"name": "eth0", "mac": "cc:cc:cc:cc:cc:cc", "sandbox": "/run/netns/p1"}
            ],
            "ips": [
                {"address": "10.88.0.1/16", "interface": 0},
                {"address": "10.88.0.7/16", "gateway": "10.88.0.1", "interface": 2},
                {"address": "fd00::7/64", "interface": 2}
            ],
            "routes": [{"dst": "0.0.0.0/0"}],
            "dns": {"nameservers": ["10.96.0.10"]}
        })
    }

    #[test]
    fn pod_ips_come_from_the_sandbox_interface() {
        let result = parse_result("bridge", &bridge_result()).expect("result");

        let ips = result.pod_ips();

        assert_eq!(ips.v4, Some("10.88.0.7".parse().expect("ip")));
        assert_eq!(ips.v6, Some("fd00::7".parse().expect("ip")));
        assert_eq!(result.routes[0].dst, "0.0.0.0/0");
        assert_eq!(result.dns.nameservers, ["10.96.0.10"]);
    }

    #[test]
    fn pod_ips_without_index_use_first() {
        let value = json!({
            "cniVersion": "1.0.0",
            "ips": [{"address": "10.1.0.2/24"}, {"address": "10.1.0.3/24"}]
        });

        let ips = parse_result("ptp", &value).expect("result").pod_ips();

        assert_eq!(ips.v4, Some("10.1.0.2".parse().expect("ip")));
        assert_eq!(ips.v6, None);
    }

    #[test]
    fn legacy_results_are_converted_to_1_0_0() {
        let value = json!({
            "cniVersion": "0.4.0",
            "interfaces": [{"name": "eth0", "sandbox": "/run/netns/p1"}],
            "ips": [
                {"version": "4", "address": "10.88.0.9/16", "interface": 0},
                {"version": "6", "address": "fd00::9/64", "interface": 0}
            ]
        });

        let result = parse_result("bridge", &value).expect("result");

        assert_eq!(result.cni_version, "1.0.0");
        assert_eq!(result.ips[0].address, "10.88.0.9/16");
        assert_eq!(result.pod_ips().v6, Some("fd00::9".parse().expect("ip")));
    }

    #[test]
    fn legacy_family_tag_must_match_the_address() {
        let value = json!({
            "cniVersion": "0.3.1",
            "ips": [{"version": "6", "address": "10.88.0.9/16"}]
        });

        let error = parse_result("bridge", &value).expect_err("mismatch");

        assert!(matches!(error, ResultError::FamilyMismatch { .. }));
    }

    #[test]
    fn malformed_results_name_the_plugin() {
        let cases = [
            json!({"cniVersion": "0.2.0"}),
            json!({"cniVersion": "1.0.0", "ips": [{"address": "nonsense"}]}),
            json!({"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.1/8", "interface": 4}]}),
            json!({"cniVersion": "1.0.0", "ips": "wrong"}),
        ];
        for value in cases {
            let error = parse_result("macvlan", &value).expect_err("malformed");
            assert!(error.to_string().contains("macvlan"), "{error}");
        }
    }

    #[test]
    fn cni_errors_carry_plugin_type_and_code() {
        let stdout = br#"{"cniVersion":"1.0.0","code":7,"msg":"bad config","details":"no subnet"}"#;

        let error = parse_error("host-local", stdout).expect("error");

        assert_eq!(error.code, 7);
        assert_eq!(
            error.to_string(),
            "CNI plugin host-local failed with code 7: bad config (no subnet)"
        );
        assert!(parse_error("host-local", b"segfault").is_none());
    }
}
