//! The writing side: ops → `pb::Definition`.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use kiln_proto::pb;

use crate::{marshal_op, op_digest, output_count, Error, OutputRef};

/// One op as stored by the builder.
#[derive(Debug, Clone)]
struct Entry {
    bytes: Vec<u8>,
    inputs: Vec<OutputRef>,
}

/// Builds a [`pb::Definition`] op by op.
///
/// Ops are added with their inputs already built (inputs must reference ops added before), so
/// the insertion order is a topological order. Identical ops (same bytes) are stored once.
#[derive(Debug, Default, Clone)]
pub struct DefinitionBuilder {
    entries: Vec<(String, Entry)>,
    by_digest: HashMap<String, usize>,
    metadata: BTreeMap<String, pb::OpMetadata>,
    infos: Vec<pb::SourceInfo>,
    locations: BTreeMap<String, Vec<pb::Location>>,
}

impl DefinitionBuilder {
    /// An empty builder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `op` with `inputs` (replacing `op.inputs`) and returns its digest.
    ///
    /// Fails if an input names an op not added before or an output index it does not have.
    /// Adding an identical op again returns the same digest and stores nothing new.
    pub fn add(&mut self, mut op: pb::Op, inputs: &[OutputRef]) -> Result<String, Error> {
        op.inputs = inputs.iter().map(OutputRef::to_input).collect();
        let bytes = marshal_op(&op);
        let digest = op_digest(&bytes);
        for input in inputs {
            let Some(&position) = self.by_digest.get(&input.digest) else {
                return Err(Error::UnknownInput {
                    digest,
                    input: input.digest.clone(),
                });
            };
            let outputs = output_count(&self.op_at(position));
            if input.index < 0 || input.index >= outputs {
                return Err(Error::OutputOutOfRange {
                    digest,
                    input: input.digest.clone(),
                    index: input.index,
                    outputs,
                });
            }
        }
        if !self.by_digest.contains_key(&digest) {
            self.by_digest.insert(digest.clone(), self.entries.len());
            self.entries.push((
                digest.clone(),
                Entry {
                    bytes,
                    inputs: inputs.to_vec(),
                },
            ));
        }
        Ok(digest)
    }

    /// Adds `op` and attaches `metadata` to it; see [`DefinitionBuilder::add`].
    ///
    /// When the op already exists, metadata already attached is kept and merged: descriptions
    /// are added, `ignore_cache` is or-ed.
    pub fn add_with_metadata(
        &mut self,
        op: pb::Op,
        inputs: &[OutputRef],
        metadata: pb::OpMetadata,
    ) -> Result<String, Error> {
        let digest = self.add(op, inputs)?;
        self.merge_metadata(&digest, metadata)?;
        Ok(digest)
    }

    /// Merges `metadata` into the metadata of the op `digest`.
    pub fn merge_metadata(&mut self, digest: &str, metadata: pb::OpMetadata) -> Result<(), Error> {
        self.check_known(digest)?;
        match self.metadata.get_mut(digest) {
            None => {
                self.metadata.insert(digest.to_string(), metadata);
            }
            Some(existing) => {
                existing.ignore_cache |= metadata.ignore_cache;
                for (key, value) in metadata.description {
                    existing.description.entry(key).or_insert(value);
                }
                for (key, value) in metadata.caps {
                    existing.caps.insert(key, value);
                }
                if existing.progress_group.is_none() {
                    existing.progress_group = metadata.progress_group;
                }
                if existing.export_cache.is_none() {
                    existing.export_cache = metadata.export_cache;
                }
            }
        }
        Ok(())
    }

    /// Registers a source file (for example the Dockerfile) and returns its index for
    /// [`DefinitionBuilder::add_location`].
    pub fn add_source(
        &mut self,
        filename: impl Into<String>,
        data: Vec<u8>,
        language: impl Into<String>,
    ) -> i32 {
        self.infos.push(pb::SourceInfo {
            filename: filename.into(),
            data,
            definition: None,
            language: language.into(),
        });
        (self.infos.len() - 1) as i32
    }

    /// Records that op `digest` comes from lines `start..=end` (1-based) of source
    /// `source_index`.
    pub fn add_location(
        &mut self,
        digest: &str,
        source_index: i32,
        start: i32,
        end: i32,
    ) -> Result<(), Error> {
        self.check_known(digest)?;
        let range = pb::Range {
            start: Some(pb::Position {
                line: start,
                character: 0,
            }),
            end: Some(pb::Position {
                line: end,
                character: 0,
            }),
        };
        let locations = self.locations.entry(digest.to_string()).or_default();
        match locations
            .iter_mut()
            .find(|l| l.source_index == source_index)
        {
            Some(location) => {
                if !location.ranges.contains(&range) {
                    location.ranges.push(range);
                }
            }
            None => locations.push(pb::Location {
                source_index,
                ranges: vec![range],
            }),
        }
        Ok(())
    }

    /// The op stored under `digest`, if any.
    pub fn op(&self, digest: &str) -> Option<pb::Op> {
        self.by_digest.get(digest).map(|&i| self.op_at(i))
    }

    /// Builds the definition of `result`: only ops reachable from it, inputs before users, then
    /// the terminal op. `None` (scratch) gives an empty definition, as BuildKit marshals scratch.
    pub fn build(&self, result: Option<OutputRef>) -> pb::Definition {
        let Some(result) = result else {
            return pb::Definition::default();
        };
        let mut reachable = BTreeSet::new();
        let mut stack = vec![result.digest.clone()];
        while let Some(digest) = stack.pop() {
            if !reachable.insert(digest.clone()) {
                continue;
            }
            if let Some(&i) = self.by_digest.get(&digest) {
                stack.extend(self.entries[i].1.inputs.iter().map(|r| r.digest.clone()));
            }
        }

        let mut definition = pb::Definition::default();
        for (digest, entry) in &self.entries {
            if !reachable.contains(digest) {
                continue;
            }
            definition.def.push(entry.bytes.clone());
            if let Some(metadata) = self.metadata.get(digest) {
                definition.metadata.insert(digest.clone(), metadata.clone());
            }
        }
        let terminal = pb::Op {
            inputs: vec![result.to_input()],
            ..Default::default()
        };
        definition.def.push(marshal_op(&terminal));

        let mut source = pb::Source {
            infos: self.infos.clone(),
            ..Default::default()
        };
        for (digest, locations) in &self.locations {
            if reachable.contains(digest) {
                source.locations.insert(
                    digest.clone(),
                    pb::Locations {
                        locations: locations.clone(),
                    },
                );
            }
        }
        if !source.infos.is_empty() || !source.locations.is_empty() {
            definition.source = Some(source);
        }
        definition
    }

    fn op_at(&self, position: usize) -> pb::Op {
        // Bytes were produced by `marshal_op` in `add`, so decoding cannot fail; fall back to an
        // empty op rather than panic.
        prost::Message::decode(self.entries[position].1.bytes.as_slice()).unwrap_or_default()
    }

    fn check_known(&self, digest: &str) -> Result<(), Error> {
        if self.by_digest.contains_key(digest) {
            Ok(())
        } else {
            Err(Error::UnknownOp {
                digest: digest.to_string(),
            })
        }
    }
}
