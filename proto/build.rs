//! Compile `mode/v1/*.proto` with protox (pure Rust): no system `protoc` needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["mode/v1/control.proto", "mode/v1/peer.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let descriptors = protox::compile(files, ["."])?;
    // The descriptor set also feeds gRPC server reflection (`grpcurl list`).
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("mode_descriptor.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    tonic_prost_build::configure()
        // Its `secrets` must not show in `{:?}`: Debug is written by hand (src/lib.rs).
        .skip_debug(["mode.v1.ServiceSpec"])
        .compile_fds(descriptors)?;
    Ok(())
}
