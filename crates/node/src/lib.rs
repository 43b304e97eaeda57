//! The node agent: manifests, pod workers, probes, back-off and status.
//!
//! Empty until the node agent lands. It will drive a runtime only through a
//! CRI client.
