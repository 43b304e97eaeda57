//! Pod sandboxes and containers: stores, lifecycle and OCI spec generation.
//!
//! Empty until sandboxes and containers land. The crate exists so that the
//! workspace keeps the separation between the gRPC layer and the runtime.
