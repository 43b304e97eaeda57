//! The test environment: a local registry with fixture images, and helpers
//! that start the daemon and talk CRI to it.
