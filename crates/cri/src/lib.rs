//! The CRI v1 gRPC services: RuntimeService and ImageService, translating
//! requests into runtime and image calls, plus hatoba's own service for the
//! CLI and the daemon that serves them all on one unix socket.

mod authority;
mod config;
mod error;
mod hatoba_service;
mod image_fs_info;
mod image_list;
mod image_pull;
mod image_remove;
mod image_service;
mod image_status;
mod lock;
mod runtime_service;
mod server;

/// Messages, client and server of hatoba's own gRPC service, `hatoba.v1`.
pub mod proto {
    tonic::include_proto!("hatoba.v1");
}

pub use config::{
    ConfigError, DEFAULT_CONFIG_PATH, DEFAULT_SOCKET, DaemonConfig, ImageSettings, InvalidValue,
    LogFilterError, LogFormat, check_log_filter,
};
pub use error::{error_chain, escape_control, image_error_status};
pub use hatoba_service::HatobaService;
pub use image_service::{CriImageService, cri_image};
pub use lock::{LockError, PidLock};
pub use runtime_service::{CriRuntimeService, RUNTIME_NAME, RUNTIME_VERSION};
pub use server::{ServerError, serve};
