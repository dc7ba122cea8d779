//! Generated protobuf and gRPC code for StemeDB.
//!
//! Only the `grpc` layers of `wald`, `stemed` and the SDK use these types;
//! domain code converts at that boundary.

/// The WAL service spoken between stemed and walld.
pub mod wal {
    pub mod v1 {
        tonic::include_proto!("stemedb.wal.v1");
    }
}

/// The public assertion store API.
pub mod store {
    pub mod v1 {
        tonic::include_proto!("stemedb.v1");
    }
}

/// The encoded file descriptor set of every StemeDB proto, for gRPC
/// server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("stemedb_descriptor");
