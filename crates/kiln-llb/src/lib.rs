//! Typed LLB for kiln: build a [`pb::Definition`] from ops, and read one back as a graph.
//!
//! LLB is BuildKit's build graph: a list of marshaled [`pb::Op`]s, each named by the digest of
//! its exact bytes ([`op_digest`]), whose inputs reference earlier ops by that digest and output
//! index ([`OutputRef`]). The last element of a definition is a terminal op holding only
//! `inputs[0]`, the result.
//!
//! - [`DefinitionBuilder`] — the writing side: add ops (deduplicated by digest), per-op
//!   [`pb::OpMetadata`] and source locations, then [`DefinitionBuilder::build`] the definition
//!   with only the ops reachable from the result.
//! - [`Graph`] — the reading side: [`Graph::from_definition`] decodes and verifies a definition
//!   (digests, unknown inputs, output indexes, cycles) and answers questions about it
//!   (topological order, inputs, metadata, source locations for error messages).
//!
//! - [`errdefs`] — the source excerpt an error carries (BuildKit's `errdefs.Source` status
//!   detail): encoded by the daemon, rendered by the client.
//!
//! Ops are marshaled with prost; proto maps are `BTreeMap`s, so the bytes (and thus digests) are
//! deterministic.

mod builder;
pub mod errdefs;
mod graph;

pub use builder::DefinitionBuilder;
pub use graph::{Graph, LineRange, SourceLocation};
pub use kiln_proto::pb;

use sha2::{Digest as _, Sha256};

/// The digest of marshaled op bytes: `sha256:<hex>`.
pub fn op_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Marshals an op with prost (deterministic: proto maps are `BTreeMap`s).
pub fn marshal_op(op: &pb::Op) -> Vec<u8> {
    prost::Message::encode_to_vec(op)
}

/// One output of an op: the op's digest and the output index.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OutputRef {
    /// Digest of the op producing the output (`sha256:<hex>`).
    pub digest: String,
    /// Output index within that op.
    pub index: i64,
}

impl OutputRef {
    /// A reference to output `index` of the op with `digest`.
    pub fn new(digest: impl Into<String>, index: i64) -> Self {
        Self {
            digest: digest.into(),
            index,
        }
    }

    /// This reference as a wire `pb::Input`.
    pub fn to_input(&self) -> pb::Input {
        pb::Input {
            digest: self.digest.clone(),
            index: self.index,
        }
    }
}

/// Errors from building or reading LLB.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An op in the definition could not be decoded.
    #[error("failed to decode op {position} of the definition")]
    Decode {
        /// Position of the op in `Definition.def`.
        position: usize,
        /// The prost error.
        #[source]
        source: prost::DecodeError,
    },
    /// An input references a digest that is not an op of the definition (or builder).
    #[error("op {digest} references unknown input {input}")]
    UnknownInput {
        /// The op holding the reference (`terminal` for the result).
        digest: String,
        /// The referenced digest.
        input: String,
    },
    /// An input references an output index the op does not have.
    #[error("op {digest} references output {index} of {input}, which has {outputs} output(s)")]
    OutputOutOfRange {
        /// The op holding the reference.
        digest: String,
        /// The referenced op.
        input: String,
        /// The referenced index.
        index: i64,
        /// How many outputs the referenced op has.
        outputs: i64,
    },
    /// The ops reference each other in a cycle.
    #[error("cycle in the llb graph at op {digest}")]
    Cycle {
        /// An op on the cycle.
        digest: String,
    },
    /// The last op of a non-empty definition is not a terminal op (only `inputs[0]`).
    #[error("the last op of the definition ({digest}) is not a terminal op with a single input")]
    NoTerminal {
        /// Digest of the last op.
        digest: String,
    },
    /// Metadata or a source location names an op that is not in the builder.
    #[error("no op {digest} in the builder")]
    UnknownOp {
        /// The digest.
        digest: String,
    },
}

/// Number of outputs an op produces (what input indexes may reference).
pub fn output_count(op: &pb::Op) -> i64 {
    use pb::op::Op as O;
    match &op.op {
        None => 0,
        Some(O::Exec(exec)) => exec.mounts.iter().filter(|m| m.output >= 0).count() as i64,
        Some(O::File(file)) => file
            .actions
            .iter()
            .map(|a| a.output + 1)
            .max()
            .unwrap_or(0)
            .max(0),
        Some(O::Source(_)) | Some(O::Build(_)) | Some(O::Merge(_)) | Some(O::Diff(_)) => 1,
    }
}

#[cfg(test)]
mod tests;
