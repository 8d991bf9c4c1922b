//! Compiles ferry's own `.proto` files with protox (a pure-Rust protobuf
//! compiler), so building ferry needs no system `protoc`.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "rpc.proto",
    "pagemap.proto",
    "stats.proto",
    "inventory.proto",
    "pstree.proto",
    "core.proto",
    "mm.proto",
    "img-streamer.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = PathBuf::from("proto");
    let files: Vec<PathBuf> = PROTOS.iter().map(|p| dir.join(p)).collect();
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let fds = protox::compile(&files, [&dir])?;
    prost_build::Config::new().compile_fds(fds)?;
    Ok(())
}
