//! `hatoba version` and `hatoba info`.

use std::path::Path;

use k8s_cri::v1;
use serde_json::{Value, json};

use crate::OutputFormat;
use crate::client::connect;
use crate::format::human_size;

/// Prints the client's version, then the daemon's. The client part is
/// printed even when the daemon cannot be reached.
pub async fn version(socket: &Path) -> anyhow::Result<()> {
    outln!("Client:")?;
    outln!("  Version:      {}", env!("CARGO_PKG_VERSION"))?;

    let mut clients = connect(socket).await?;
    let server = clients
        .runtime
        .version(v1::VersionRequest {
            version: "v1".to_owned(),
        })
        .await
        .map_err(|status| clients.call_failed("failed to get the server version", status))?
        .into_inner();

    outln!("Server:")?;
    outln!("  Runtime:      {}", server.runtime_name)?;
    outln!("  Version:      {}", server.runtime_version)?;
    outln!("  API version:  {}", server.runtime_api_version)?;
    Ok(())
}

/// Prints the runtime conditions, the image store's usage and the paths
/// of the daemon's config.
pub async fn info(socket: &Path, format: OutputFormat) -> anyhow::Result<()> {
    let mut clients = connect(socket).await?;

    let status = clients
        .runtime
        .status(v1::StatusRequest { verbose: true })
        .await
        .map_err(|status| clients.call_failed("failed to get the runtime status", status))?
        .into_inner();
    let filesystems = clients
        .images
        .image_fs_info(v1::ImageFsInfoRequest {})
        .await
        .map_err(|status| clients.call_failed("failed to get the image store usage", status))?
        .into_inner();
    let image_count = clients
        .images
        .list_images(v1::ListImagesRequest { filter: None })
        .await
        .map_err(|status| clients.call_failed("failed to list images", status))?
        .into_inner()
        .images
        .len();

    let info = info_json(&status, &filesystems, image_count);
    match format {
        OutputFormat::Json => outln!("{}", serde_json::to_string_pretty(&info)?)?,
        OutputFormat::Table => out!("{}", info_text(&info))?,
    }
    Ok(())
}

/// Gathers what `hatoba info` shows into one JSON object.
fn info_json(
    status: &v1::StatusResponse,
    filesystems: &v1::ImageFsInfoResponse,
    image_count: usize,
) -> Value {
    let conditions: Vec<Value> = status
        .status
        .iter()
        .flat_map(|status| &status.conditions)
        .map(|condition| {
            json!({
                "type": condition.r#type,
                "status": condition.status,
                "reason": condition.reason,
                "message": condition.message,
            })
        })
        .collect();

    let store = filesystems.image_filesystems.first().map(|usage| {
        json!({
            "mountpoint": usage.fs_id.as_ref().map(|id| id.mountpoint.as_str()),
            "usedBytes": usage.used_bytes.as_ref().map(|value| value.value),
            "inodesUsed": usage.inodes_used.as_ref().map(|value| value.value),
            "images": image_count,
        })
    });

    let daemon_config: Value = status
        .info
        .get("config")
        .and_then(|text| serde_json::from_str(text).ok())
        .unwrap_or(Value::Null);
    let config_file = status
        .info
        .get("configPath")
        .filter(|path| !path.is_empty())
        .cloned();

    json!({
        "conditions": conditions,
        "store": store,
        "config": {
            "file": config_file,
            "socket": daemon_config["socket"],
            "root": daemon_config["root"],
            "state": daemon_config["state"],
        },
    })
}

/// Renders the `hatoba info` object as indented text.
fn info_text(info: &Value) -> String {
    let text = |value: &Value| match value {
        Value::String(text) => text.clone(),
        Value::Null => "unknown".to_owned(),
        other => other.to_string(),
    };
    let mut output = String::from("Runtime:\n");

    for condition in info["conditions"].as_array().into_iter().flatten() {
        let mut line = format!("  {}: {}", text(&condition["type"]), condition["status"]);
        let reason = text(&condition["reason"]);
        if !reason.is_empty() {
            line.push_str(&format!(" ({reason}: {})", text(&condition["message"])));
        }
        output.push_str(&line);
        output.push('\n');
    }

    let store = &info["store"];
    output.push_str("Image store:\n");
    output.push_str(&format!("  Mountpoint:   {}\n", text(&store["mountpoint"])));
    let used = store["usedBytes"]
        .as_u64()
        .map_or_else(|| "unknown".to_owned(), human_size);
    output.push_str(&format!("  Used:         {used}\n"));
    output.push_str(&format!("  Inodes used:  {}\n", text(&store["inodesUsed"])));
    output.push_str(&format!("  Images:       {}\n", text(&store["images"])));

    let config = &info["config"];
    let file = match &config["file"] {
        Value::Null => "none (built-in defaults)".to_owned(),
        file => text(file),
    };
    output.push_str("Config:\n");
    output.push_str(&format!("  File:         {file}\n"));
    output.push_str(&format!("  Socket:       {}\n", text(&config["socket"])));
    output.push_str(&format!("  Root:         {}\n", text(&config["root"])));
    output.push_str(&format!("  State:        {}\n", text(&config["state"])));
    output
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_text_shows_conditions_store_and_paths() {
        let status = v1::StatusResponse {
            status: Some(v1::RuntimeStatus {
                conditions: vec![
                    v1::RuntimeCondition {
                        r#type: "RuntimeReady".into(),
                        status: true,
                        ..Default::default()
                    },
                    v1::RuntimeCondition {
                        r#type: "NetworkReady".into(),
                        status: false,
                        reason: "NetworkPluginNotReady".into(),
                        message: "pod networking is not implemented yet".into(),
                    },
                ],
            }),
            info: [
                (
                    "config".to_owned(),
                    r#"{"socket":"/run/hatoba/hatoba.sock","root":"/var/lib/hatoba","state":"/run/hatoba"}"#
                        .to_owned(),
                ),
                ("configPath".to_owned(), String::new()),
            ]
            .into(),
            ..Default::default()
        };
        let filesystems = v1::ImageFsInfoResponse {
            image_filesystems: vec![v1::FilesystemUsage {
                timestamp: 1,
                fs_id: Some(v1::FilesystemIdentifier {
                    mountpoint: "/var/lib/hatoba/images".into(),
                }),
                used_bytes: Some(v1::UInt64Value { value: 4_260_000 }),
                inodes_used: Some(v1::UInt64Value { value: 42 }),
            }],
            container_filesystems: Vec::new(),
        };

        let text = info_text(&info_json(&status, &filesystems, 3));
        let expected = "\
Runtime:
  RuntimeReady: true
  NetworkReady: false (NetworkPluginNotReady: pod networking is not implemented yet)
Image store:
  Mountpoint:   /var/lib/hatoba/images
  Used:         4.26 MB
  Inodes used:  42
  Images:       3
Config:
  File:         none (built-in defaults)
  Socket:       /run/hatoba/hatoba.sock
  Root:         /var/lib/hatoba
  State:        /run/hatoba
";
        assert_eq!(text, expected);
    }
}
