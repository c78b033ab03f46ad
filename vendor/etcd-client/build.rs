// Changed by remask (see vendor/README.md): the protos are compiled with
// protox, in pure Rust, instead of protoc, so that building needs no system
// protoc. Upstream called `.compile_protos(&[..], &[proto_root])`, which runs
// protoc (with --include_imports and --include_source_info, as protox::compile
// does) and adds `#[allow(clippy::all)]` to every type, which compile_fds does
// not: the type_attribute below does. The generated code is the same, byte for
// byte.

#[cfg(feature = "build-server")]
fn should_build_server() -> bool {
    true
}

#[cfg(not(feature = "build-server"))]
fn should_build_server() -> bool {
    false
}

fn main() {
    let proto_root = "proto";
    println!("cargo:rerun-if-changed={proto_root}");

    let fds = protox::compile(
        [
            "proto/etcd/api/authpb/auth.proto",
            "proto/etcd/api/etcdserverpb/rpc.proto",
            "proto/etcd/api/mvccpb/kv.proto",
            "proto/etcd/server/etcdserver/api/v3election/v3electionpb/v3election.proto",
            "proto/etcd/server/etcdserver/api/v3lock/v3lockpb/v3lock.proto",
        ],
        [proto_root],
    )
    .expect("Failed to parse proto files");

    tonic_prost_build::configure()
        .build_server(should_build_server())
        .type_attribute(".", "#[allow(clippy::all)]")
        .compile_fds(fds)
        .expect("Failed to compile proto files");
}
