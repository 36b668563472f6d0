//! The reading side: `pb::Definition` → verified graph.

use std::collections::{BTreeMap, HashMap};

use kiln_proto::pb;

use crate::{op_digest, output_count, Error, OutputRef};

/// A line range in a source file, 1-based and inclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LineRange {
    /// First line.
    pub start: i32,
    /// Last line.
    pub end: i32,
}

/// Where an op comes from, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceLocation {
    /// Source file name (for example `Dockerfile`).
    pub filename: String,
    /// Language of the source (for example `Dockerfile`).
    pub language: String,
    /// Line ranges in that file.
    pub ranges: Vec<LineRange>,
    /// The whole source text, for rendering an excerpt around the ranges.
    pub data: Vec<u8>,
}

/// A decoded and verified LLB definition.
#[derive(Debug, Clone)]
pub struct Graph {
    ops: HashMap<String, pb::Op>,
    metadata: BTreeMap<String, pb::OpMetadata>,
    source: Option<pb::Source>,
    result: Option<OutputRef>,
    order: Vec<String>,
}

impl Graph {
    /// Decodes every op of `definition`, keys it by the digest of its bytes, and verifies the
    /// graph: every input names an op of the definition and an output it has, there is no cycle,
    /// and a non-empty definition ends with a terminal op (only `inputs[0]`).
    pub fn from_definition(definition: &pb::Definition) -> Result<Self, Error> {
        let mut ops: HashMap<String, pb::Op> = HashMap::new();
        let mut last: Option<(String, pb::Op)> = None;
        for (position, bytes) in definition.def.iter().enumerate() {
            let op: pb::Op = prost::Message::decode(bytes.as_slice())
                .map_err(|source| Error::Decode { position, source })?;
            let digest = op_digest(bytes);
            if position + 1 == definition.def.len() {
                last = Some((digest, op));
            } else {
                ops.insert(digest, op);
            }
        }

        let result = match last {
            None => None,
            Some((digest, op)) => {
                let terminal = op.op.is_none()
                    && op.platform.is_none()
                    && op.constraints.is_none()
                    && op.inputs.len() == 1;
                if !terminal {
                    return Err(Error::NoTerminal { digest });
                }
                let input = &op.inputs[0];
                Some(OutputRef::new(input.digest.clone(), input.index))
            }
        };

        for (digest, op) in &ops {
            check_inputs(&ops, digest, op)?;
        }
        if let Some(result) = &result {
            let terminal = pb::Op {
                inputs: vec![result.to_input()],
                ..Default::default()
            };
            check_inputs(&ops, "terminal", &terminal)?;
        }

        let mut marks = HashMap::new();
        let mut order = Vec::new();
        if let Some(result) = &result {
            topological(&ops, &result.digest, &mut marks, &mut order)?;
        }
        // Cycles among ops not reachable from the result are still malformed input.
        let mut unreachable = Vec::new();
        for digest in ops.keys() {
            topological(&ops, digest, &mut marks, &mut unreachable)?;
        }

        Ok(Self {
            ops,
            metadata: definition.metadata.clone(),
            source: definition.source.clone(),
            result,
            order,
        })
    }

    /// The result of the definition; `None` for an empty definition (scratch).
    pub fn result(&self) -> Option<OutputRef> {
        self.result.clone()
    }

    /// The op with `digest`.
    pub fn op(&self, digest: &str) -> Option<&pb::Op> {
        self.ops.get(digest)
    }

    /// The metadata attached to op `digest`, if any.
    pub fn metadata(&self, digest: &str) -> Option<&pb::OpMetadata> {
        self.metadata.get(digest)
    }

    /// Digests of the ops reachable from the result, every op after its inputs.
    pub fn topological_order(&self) -> &[String] {
        &self.order
    }

    /// The inputs of op `digest` (empty for unknown ops).
    pub fn inputs(&self, digest: &str) -> Vec<OutputRef> {
        self.ops
            .get(digest)
            .map(|op| {
                op.inputs
                    .iter()
                    .map(|i| OutputRef::new(i.digest.clone(), i.index))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Where op `digest` comes from (first source file that locates it), if recorded.
    pub fn source_location(&self, digest: &str) -> Option<SourceLocation> {
        let source = self.source.as_ref()?;
        let locations = source.locations.get(digest)?;
        let location = locations.locations.first()?;
        let info = source
            .infos
            .get(usize::try_from(location.source_index).ok()?)?;
        let ranges = location
            .ranges
            .iter()
            .map(|r| LineRange {
                start: r.start.as_ref().map(|p| p.line).unwrap_or_default(),
                end: r.end.as_ref().map(|p| p.line).unwrap_or_default(),
            })
            .collect();
        Some(SourceLocation {
            filename: info.filename.clone(),
            language: info.language.clone(),
            ranges,
            data: info.data.clone(),
        })
    }

    /// Number of ops (without the terminal op).
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// Whether the definition holds no ops.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

fn check_inputs(ops: &HashMap<String, pb::Op>, digest: &str, op: &pb::Op) -> Result<(), Error> {
    for input in &op.inputs {
        let Some(target) = ops.get(&input.digest) else {
            return Err(Error::UnknownInput {
                digest: digest.to_string(),
                input: input.digest.clone(),
            });
        };
        let outputs = output_count(target);
        if input.index < 0 || input.index >= outputs {
            return Err(Error::OutputOutOfRange {
                digest: digest.to_string(),
                input: input.digest.clone(),
                index: input.index,
                outputs,
            });
        }
    }
    Ok(())
}

#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Mark {
    Visiting,
    Done,
}

/// Post-order DFS from `root` without recursion, appending to `order` ops not yet marked done;
/// errors on a back edge (a cycle).
pub(crate) fn topological<'a>(
    ops: &'a HashMap<String, pb::Op>,
    root: &'a str,
    marks: &mut HashMap<&'a str, Mark>,
    order: &mut Vec<String>,
) -> Result<(), Error> {
    if marks.contains_key(root) {
        return Ok(());
    }
    // (digest, next input position to visit)
    let mut stack: Vec<(&str, usize)> = vec![(root, 0)];
    marks.insert(root, Mark::Visiting);
    while let Some((digest, next)) = stack.pop() {
        let inputs = ops
            .get(digest)
            .map(|op| op.inputs.as_slice())
            .unwrap_or(&[]);
        if let Some(input) = inputs.get(next) {
            stack.push((digest, next + 1));
            let child = input.digest.as_str();
            match marks.get(child) {
                Some(Mark::Done) => {}
                Some(Mark::Visiting) => {
                    return Err(Error::Cycle {
                        digest: child.to_string(),
                    })
                }
                None => {
                    marks.insert(child, Mark::Visiting);
                    stack.push((child, 0));
                }
            }
        } else {
            marks.insert(digest, Mark::Done);
            order.push(digest.to_string());
        }
    }
    Ok(())
}
