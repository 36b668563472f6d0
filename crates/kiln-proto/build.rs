//! Compiles the `.proto` files under `proto/` with tonic. `protoc` comes from
//! the system (Debian's `protobuf-compiler`) or `$PROTOC`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/pb/ops.proto",
        "proto/fsutil/types/wire.proto",
        "proto/moby/filesync/v1/filesync.proto",
        "proto/moby/filesync/v1/auth.proto",
        "proto/moby/buildkit/v1/types/worker.proto",
        "proto/moby/buildkit/v1/sourcepolicy/policy.proto",
        "proto/moby/buildkit/v1/control.proto",
        "proto/google/rpc/status.proto",
        "proto/errdefs/errdefs.proto",
        "proto/moby/buildkit/v1/apicaps/caps.proto",
        "proto/moby/buildkit/v1/frontend/gateway.proto",
        "proto/moby/buildkit/secrets/v1/secrets.proto",
        "proto/moby/sshforward/v1/ssh.proto",
        "proto/containerd/services/content/v1/content.proto",
    ];
    // The whole directory too: a proto file added later must rerun this
    // script even in a target dir whose last run predates it.
    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rerun-if-changed=build.rs");
    for proto in &protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    // Maps as BTreeMap: marshaled LLB ops must be byte-identical for the same
    // content (op digests are hashes of the bytes), as Go's deterministic
    // marshaling gives upstream.
    tonic_prost_build::configure()
        .btree_map(".")
        .build_server(true)
        .build_client(true)
        .compile_protos(&protos, &["proto"])?;
    Ok(())
}
