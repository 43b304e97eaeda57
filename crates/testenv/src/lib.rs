//! The test environment: a local registry with fixture images, and helpers
//! that start the daemon and talk CRI to it.

pub mod client;
pub mod daemon;
pub mod env;
pub mod fixtures;
pub mod guard;
pub mod proxy;
pub mod registry;
pub mod token;
