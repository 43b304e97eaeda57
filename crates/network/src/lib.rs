//! Network namespaces and CNI plugin invocation.
//!
//! Empty until pod sandboxes land.
