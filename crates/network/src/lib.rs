//! Network namespaces and CNI plugin invocation.
//!
//! Apart from [`netns`], which pins a pod's namespaces as root, this layer
//! needs no root: it loads network configuration lists, builds plugin
//! invocations, parses results and caches them. Executing a plugin goes
//! through [`invoke::PluginRunner`], so the chain logic is tested without
//! spawning processes; [`runner::ProcessRunner`] is the real one.

pub mod cache;
pub mod config;
pub mod invoke;
pub mod netns;
pub mod result;
pub mod runner;
