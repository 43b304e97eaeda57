//! Compiles hatoba's own gRPC service definition.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    tonic_prost_build::configure().compile_protos(&["proto/hatoba.proto"], &["proto"])?;
    Ok(())
}
