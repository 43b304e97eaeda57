//! OCI images: registry pulls, the content store, layer unpacking and
//! snapshots, and the image metadata store.
//!
//! Nothing here depends on gRPC. The `cri` crate maps [`ImageError`] to
//! gRPC status codes.

mod archive;
mod config;
mod content;
mod digest;
mod error;
mod gc;
mod manager;
mod pull;
mod reference;
pub mod registry;
mod snapshot;
mod store;
mod unpack;

pub use config::{ImageConfig, RegistryConfig};
pub use error::ImageError;
pub use manager::{
    Credentials, FsUsage, ImageManager, ImageRecord, LayerRecord, PullEvent, PullProgress,
};
pub use reference::Reference;
