//! OCI images: registry pulls, the content store, layer unpacking and
//! snapshots, and the image metadata store.
//!
//! Nothing here knows about gRPC. The `cri` crate maps [`ImageError`] to
//! gRPC status codes.

mod config;
mod error;
mod manager;
mod reference;

pub use config::{ImageConfig, RegistryConfig};
pub use error::ImageError;
pub use manager::{
    Credentials, FsUsage, ImageManager, ImageRecord, LayerRecord, PullEvent, PullProgress,
};
pub use reference::Reference;
