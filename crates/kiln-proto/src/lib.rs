//! BuildKit's wire API as kiln speaks it.
//!
//! The `.proto` files under `proto/` are written in this repository from the
//! field tables of `shared/reference/buildkit-and-nerdctl.md` §5: same
//! packages, message names and field numbers as upstream, so the bytes on the
//! wire match and upstream `buildctl` / `buildkitd` interoperate with kiln.
//! This crate holds only the generated code; hand-written clients live in
//! `kiln-client` and `kiln-session`.
//!
//! Module paths mirror the proto packages:
//! - [`pb`] — LLB (`Definition`, `Op`, `ExecOp`, `SourceOp`, `FileOp`, …)
//! - [`errdefs`] — typed gRPC error details (`Source`: the lines a failing step came from)
//! - [`fsutil::types`] — DiffCopy `Packet` and `Stat`
//! - [`moby::filesync::v1`] — `FileSync`, `FileSend` and `Auth` session services
//! - [`moby::buildkit::v1`] — the `Control` service; [`moby::buildkit::v1::types`] — worker records;
//!   [`moby::buildkit::v1::frontend`] — the gateway `LLBBridge` (Ping, Solve, Return)
//! - [`moby::buildkit::secrets::v1`] — the `Secrets` session service;
//!   [`moby::sshforward::v1`] — the `SSH` agent-forwarding session service
//! - [`containerd::services::content::v1`] — containerd's `Content` service, served by the
//!   client as a session content store (`buildkit-attachable-store-id`)

#![allow(clippy::all, missing_docs)]

/// LLB, package `pb`.
pub mod pb {
    tonic::include_proto!("pb");
}

/// fsutil, package `fsutil.types`.
pub mod fsutil {
    /// DiffCopy wire types.
    pub mod types {
        tonic::include_proto!("fsutil.types");
    }
}

/// BuildKit's typed error details, package `errdefs`.
pub mod errdefs {
    tonic::include_proto!("errdefs");
}

/// Google packages.
pub mod google {
    /// Package `google.rpc`.
    pub mod rpc {
        tonic::include_proto!("google.rpc");
    }
}

/// Moby packages.
pub mod moby {
    /// Session file services.
    pub mod filesync {
        /// Package `moby.filesync.v1`.
        pub mod v1 {
            tonic::include_proto!("moby.filesync.v1");
        }
    }
    /// BuildKit control API.
    pub mod buildkit {
        /// Package `moby.buildkit.v1`.
        pub mod v1 {
            tonic::include_proto!("moby.buildkit.v1");
            /// Package `moby.buildkit.v1.types`.
            pub mod types {
                tonic::include_proto!("moby.buildkit.v1.types");
            }
            /// Package `moby.buildkit.v1.sourcepolicy`: rules over LLB sources.
            pub mod sourcepolicy {
                tonic::include_proto!("moby.buildkit.v1.sourcepolicy");
            }
            /// Package `moby.buildkit.v1.apicaps`.
            pub mod apicaps {
                tonic::include_proto!("moby.buildkit.v1.apicaps");
            }
            /// Package `moby.buildkit.v1.frontend`: the gateway API.
            pub mod frontend {
                tonic::include_proto!("moby.buildkit.v1.frontend");
            }
        }
        /// Secrets session service.
        pub mod secrets {
            /// Package `moby.buildkit.secrets.v1`.
            pub mod v1 {
                tonic::include_proto!("moby.buildkit.secrets.v1");
            }
        }
    }
    /// SSH agent forwarding session service.
    pub mod sshforward {
        /// Package `moby.sshforward.v1`.
        pub mod v1 {
            tonic::include_proto!("moby.sshforward.v1");
        }
    }
}

/// containerd packages.
pub mod containerd {
    /// containerd services.
    pub mod services {
        /// containerd's content store.
        pub mod content {
            /// Package `containerd.services.content.v1`: the `Content` service a
            /// session content store (reference §5.6) speaks.
            pub mod v1 {
                tonic::include_proto!("containerd.services.content.v1");
            }
        }
    }
}

/// Go `os.FileMode` bits as carried in [`fsutil::types::Stat::mode`].
pub mod filemode {
    /// Directory.
    pub const DIR: u32 = 1 << 31;
    /// Symbolic link.
    pub const SYMLINK: u32 = 1 << 27;
    /// Device file.
    pub const DEVICE: u32 = 1 << 26;
    /// Named pipe (FIFO).
    pub const NAMED_PIPE: u32 = 1 << 25;
    /// Unix domain socket.
    pub const SOCKET: u32 = 1 << 24;
    /// Setuid.
    pub const SETUID: u32 = 1 << 23;
    /// Setgid.
    pub const SETGID: u32 = 1 << 22;
    /// Character device (with [`DEVICE`]).
    pub const CHAR_DEVICE: u32 = 1 << 21;
    /// Sticky bit.
    pub const STICKY: u32 = 1 << 20;
    /// Permission bits.
    pub const PERM: u32 = 0o777;
}
