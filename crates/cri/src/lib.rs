//! The CRI v1 gRPC services: RuntimeService and ImageService, translating
//! requests into runtime and image calls.
