//! Generates the gRPC code of `proto/`, with the protoc that ships in a crate (no system
//! package needed); `PROTOC` overrides it.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        // Edition 2024: set_var is unsafe; a build script is single-threaded here.
        unsafe { std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    }
    println!("cargo:rerun-if-changed=proto/tracker.proto");
    println!("cargo:rerun-if-changed=proto/ca.proto");
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(&["proto/tracker.proto", "proto/ca.proto"], &["proto"])?;
    Ok(())
}
