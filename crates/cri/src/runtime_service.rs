//! The CRI RuntimeService. Only `Version` and `Status` work so far. Every
//! other RPC returns `Unimplemented` naming itself.

use std::collections::HashMap;
use std::path::PathBuf;
use std::pin::Pin;

use k8s_cri::v1;
use k8s_cri::v1::runtime_service_server::RuntimeService;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::DaemonConfig;

/// Name reported in `VersionResponse.runtime_name`.
pub const RUNTIME_NAME: &str = "hatoba";

/// Version of the runtime, reported in `VersionResponse.runtime_version`.
pub const RUNTIME_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The CRI RuntimeService of the daemon.
pub struct CriRuntimeService {
    config: DaemonConfig,
    config_path: Option<PathBuf>,
}

impl CriRuntimeService {
    /// Creates the service. `config_path` is the file the config came from,
    /// `None` when the defaults were used. A verbose `Status` reports both.
    pub fn new(config: DaemonConfig, config_path: Option<PathBuf>) -> Self {
        Self {
            config,
            config_path,
        }
    }

    fn verbose_info(&self) -> Result<HashMap<String, String>, Status> {
        let config = serde_json::to_string(&self.config)
            .map_err(|error| Status::internal(format!("failed to encode the config: {error}")))?;
        let config_path = self
            .config_path
            .as_ref()
            .map(|path| path.display().to_string())
            .unwrap_or_default();
        Ok(HashMap::from([
            ("config".to_owned(), config),
            ("configPath".to_owned(), config_path),
        ]))
    }
}

/// Builds the status of an RPC that hatoba does not serve yet.
fn not_implemented(rpc: &str) -> Status {
    tracing::debug!(rpc, "rejected a call to an RPC that is not implemented yet");
    Status::unimplemented(format!("{rpc} is not implemented yet"))
}

/// Returns the runtime conditions that `Status` reports. The runtime is up,
/// but pod networking does not exist yet, which kubelet shows as NetworkReady=false.
fn runtime_conditions() -> Vec<v1::RuntimeCondition> {
    vec![
        v1::RuntimeCondition {
            r#type: "RuntimeReady".to_owned(),
            status: true,
            reason: String::new(),
            message: String::new(),
        },
        v1::RuntimeCondition {
            r#type: "NetworkReady".to_owned(),
            status: false,
            reason: "NetworkPluginNotReady".to_owned(),
            message: "pod networking is not implemented yet".to_owned(),
        },
    ]
}

type ContainerEventStream =
    Pin<Box<dyn Stream<Item = Result<v1::ContainerEventResponse, Status>> + Send>>;

#[tonic::async_trait]
impl RuntimeService for CriRuntimeService {
    type GetContainerEventsStream = ContainerEventStream;

    async fn version(
        &self,
        _request: Request<v1::VersionRequest>,
    ) -> Result<Response<v1::VersionResponse>, Status> {
        tracing::debug!("Version");
        Ok(Response::new(v1::VersionResponse {
            version: "0.1.0".to_owned(),
            runtime_name: RUNTIME_NAME.to_owned(),
            runtime_version: RUNTIME_VERSION.to_owned(),
            runtime_api_version: "v1".to_owned(),
        }))
    }

    async fn status(
        &self,
        request: Request<v1::StatusRequest>,
    ) -> Result<Response<v1::StatusResponse>, Status> {
        let verbose = request.into_inner().verbose;
        tracing::debug!(verbose, "Status");

        let info = if verbose {
            self.verbose_info()?
        } else {
            HashMap::new()
        };
        Ok(Response::new(v1::StatusResponse {
            status: Some(v1::RuntimeStatus {
                conditions: runtime_conditions(),
            }),
            info,
            runtime_handlers: Vec::new(),
            features: None,
        }))
    }

    async fn get_container_events(
        &self,
        _request: Request<v1::GetEventsRequest>,
    ) -> Result<Response<Self::GetContainerEventsStream>, Status> {
        Err(not_implemented("GetContainerEvents"))
    }

    async fn run_pod_sandbox(
        &self,
        _request: Request<v1::RunPodSandboxRequest>,
    ) -> Result<Response<v1::RunPodSandboxResponse>, Status> {
        Err(not_implemented("RunPodSandbox"))
    }

    async fn stop_pod_sandbox(
        &self,
        _request: Request<v1::StopPodSandboxRequest>,
    ) -> Result<Response<v1::StopPodSandboxResponse>, Status> {
        Err(not_implemented("StopPodSandbox"))
    }

    async fn remove_pod_sandbox(
        &self,
        _request: Request<v1::RemovePodSandboxRequest>,
    ) -> Result<Response<v1::RemovePodSandboxResponse>, Status> {
        Err(not_implemented("RemovePodSandbox"))
    }

    async fn pod_sandbox_status(
        &self,
        _request: Request<v1::PodSandboxStatusRequest>,
    ) -> Result<Response<v1::PodSandboxStatusResponse>, Status> {
        Err(not_implemented("PodSandboxStatus"))
    }

    async fn list_pod_sandbox(
        &self,
        _request: Request<v1::ListPodSandboxRequest>,
    ) -> Result<Response<v1::ListPodSandboxResponse>, Status> {
        Err(not_implemented("ListPodSandbox"))
    }

    async fn create_container(
        &self,
        _request: Request<v1::CreateContainerRequest>,
    ) -> Result<Response<v1::CreateContainerResponse>, Status> {
        Err(not_implemented("CreateContainer"))
    }

    async fn start_container(
        &self,
        _request: Request<v1::StartContainerRequest>,
    ) -> Result<Response<v1::StartContainerResponse>, Status> {
        Err(not_implemented("StartContainer"))
    }

    async fn stop_container(
        &self,
        _request: Request<v1::StopContainerRequest>,
    ) -> Result<Response<v1::StopContainerResponse>, Status> {
        Err(not_implemented("StopContainer"))
    }

    async fn remove_container(
        &self,
        _request: Request<v1::RemoveContainerRequest>,
    ) -> Result<Response<v1::RemoveContainerResponse>, Status> {
        Err(not_implemented("RemoveContainer"))
    }

    async fn list_containers(
        &self,
        _request: Request<v1::ListContainersRequest>,
    ) -> Result<Response<v1::ListContainersResponse>, Status> {
        Err(not_implemented("ListContainers"))
    }

    async fn container_status(
        &self,
        _request: Request<v1::ContainerStatusRequest>,
    ) -> Result<Response<v1::ContainerStatusResponse>, Status> {
        Err(not_implemented("ContainerStatus"))
    }

    async fn update_container_resources(
        &self,
        _request: Request<v1::UpdateContainerResourcesRequest>,
    ) -> Result<Response<v1::UpdateContainerResourcesResponse>, Status> {
        Err(not_implemented("UpdateContainerResources"))
    }

    async fn reopen_container_log(
        &self,
        _request: Request<v1::ReopenContainerLogRequest>,
    ) -> Result<Response<v1::ReopenContainerLogResponse>, Status> {
        Err(not_implemented("ReopenContainerLog"))
    }

    async fn exec_sync(
        &self,
        _request: Request<v1::ExecSyncRequest>,
    ) -> Result<Response<v1::ExecSyncResponse>, Status> {
        Err(not_implemented("ExecSync"))
    }

    async fn exec(
        &self,
        _request: Request<v1::ExecRequest>,
    ) -> Result<Response<v1::ExecResponse>, Status> {
        Err(not_implemented("Exec"))
    }

    async fn attach(
        &self,
        _request: Request<v1::AttachRequest>,
    ) -> Result<Response<v1::AttachResponse>, Status> {
        Err(not_implemented("Attach"))
    }

    async fn port_forward(
        &self,
        _request: Request<v1::PortForwardRequest>,
    ) -> Result<Response<v1::PortForwardResponse>, Status> {
        Err(not_implemented("PortForward"))
    }

    async fn container_stats(
        &self,
        _request: Request<v1::ContainerStatsRequest>,
    ) -> Result<Response<v1::ContainerStatsResponse>, Status> {
        Err(not_implemented("ContainerStats"))
    }

    async fn list_container_stats(
        &self,
        _request: Request<v1::ListContainerStatsRequest>,
    ) -> Result<Response<v1::ListContainerStatsResponse>, Status> {
        Err(not_implemented("ListContainerStats"))
    }

    async fn pod_sandbox_stats(
        &self,
        _request: Request<v1::PodSandboxStatsRequest>,
    ) -> Result<Response<v1::PodSandboxStatsResponse>, Status> {
        Err(not_implemented("PodSandboxStats"))
    }

    async fn list_pod_sandbox_stats(
        &self,
        _request: Request<v1::ListPodSandboxStatsRequest>,
    ) -> Result<Response<v1::ListPodSandboxStatsResponse>, Status> {
        Err(not_implemented("ListPodSandboxStats"))
    }

    async fn update_runtime_config(
        &self,
        _request: Request<v1::UpdateRuntimeConfigRequest>,
    ) -> Result<Response<v1::UpdateRuntimeConfigResponse>, Status> {
        Err(not_implemented("UpdateRuntimeConfig"))
    }

    async fn checkpoint_container(
        &self,
        _request: Request<v1::CheckpointContainerRequest>,
    ) -> Result<Response<v1::CheckpointContainerResponse>, Status> {
        Err(not_implemented("CheckpointContainer"))
    }

    async fn list_metric_descriptors(
        &self,
        _request: Request<v1::ListMetricDescriptorsRequest>,
    ) -> Result<Response<v1::ListMetricDescriptorsResponse>, Status> {
        Err(not_implemented("ListMetricDescriptors"))
    }

    async fn list_pod_sandbox_metrics(
        &self,
        _request: Request<v1::ListPodSandboxMetricsRequest>,
    ) -> Result<Response<v1::ListPodSandboxMetricsResponse>, Status> {
        Err(not_implemented("ListPodSandboxMetrics"))
    }

    async fn runtime_config(
        &self,
        _request: Request<v1::RuntimeConfigRequest>,
    ) -> Result<Response<v1::RuntimeConfigResponse>, Status> {
        Err(not_implemented("RuntimeConfig"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service() -> CriRuntimeService {
        CriRuntimeService::new(
            DaemonConfig::default(),
            Some(PathBuf::from("/etc/hatoba/config.toml")),
        )
    }

    #[tokio::test]
    async fn version_names_hatoba_and_api_v1() {
        let response = service()
            .version(Request::new(v1::VersionRequest::default()))
            .await
            .expect("Version succeeds")
            .into_inner();
        assert_eq!(response.version, "0.1.0");
        assert_eq!(response.runtime_name, "hatoba");
        assert_eq!(response.runtime_version, env!("CARGO_PKG_VERSION"));
        assert_eq!(response.runtime_api_version, "v1");
    }

    #[tokio::test]
    async fn status_reports_runtime_ready_and_network_not_ready() {
        let response = service()
            .status(Request::new(v1::StatusRequest { verbose: false }))
            .await
            .expect("Status succeeds")
            .into_inner();
        let conditions = response.status.expect("status is set").conditions;
        assert_eq!(conditions.len(), 2);
        assert_eq!(conditions[0].r#type, "RuntimeReady");
        assert!(conditions[0].status);
        assert_eq!(conditions[1].r#type, "NetworkReady");
        assert!(!conditions[1].status);
        assert_eq!(conditions[1].reason, "NetworkPluginNotReady");
        assert!(response.info.is_empty());
    }

    #[tokio::test]
    async fn verbose_status_carries_the_config_as_json() {
        let response = service()
            .status(Request::new(v1::StatusRequest { verbose: true }))
            .await
            .expect("Status succeeds")
            .into_inner();
        let config: serde_json::Value =
            serde_json::from_str(&response.info["config"]).expect("config is JSON");
        assert_eq!(config["socket"], "/run/hatoba/hatoba.sock");
        assert_eq!(config["log_format"], "text");
        assert_eq!(config["image"]["max_concurrent_downloads"], 3);
        assert_eq!(response.info["configPath"], "/etc/hatoba/config.toml");
    }

    #[tokio::test]
    async fn unimplemented_rpcs_name_themselves() {
        let status = service()
            .run_pod_sandbox(Request::new(v1::RunPodSandboxRequest::default()))
            .await
            .expect_err("RunPodSandbox is not implemented");
        assert_eq!(status.code(), tonic::Code::Unimplemented);
        assert_eq!(status.message(), "RunPodSandbox is not implemented yet");
    }
}
