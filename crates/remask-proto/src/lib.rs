//! Generated gRPC code for `proto/`: the public `remask.v1.Generation`
//! service and the internal `remask.worker.v1.Worker` service.

pub mod v1 {
    tonic::include_proto!("remask.v1");
}

pub mod worker {
    tonic::include_proto!("remask.worker.v1");
}

/// Encoded `FileDescriptorSet` of every proto file, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/remask_descriptor.bin"));
