//! Unit tests: build → marshal → graph round trips, digest stability, error cases.

use std::collections::BTreeMap;

use super::*;

fn image(name: &str) -> pb::Op {
    pb::Op {
        op: Some(pb::op::Op::Source(pb::SourceOp {
            identifier: format!("docker-image://{name}"),
            attrs: BTreeMap::new(),
        })),
        platform: Some(pb::Platform {
            architecture: "amd64".into(),
            os: "linux".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn exec(args: &[&str]) -> pb::Op {
    pb::Op {
        op: Some(pb::op::Op::Exec(pb::ExecOp {
            meta: Some(pb::Meta {
                args: args.iter().map(|s| s.to_string()).collect(),
                cwd: "/".into(),
                ..Default::default()
            }),
            mounts: vec![pb::Mount {
                input: 0,
                dest: "/".into(),
                output: 0,
                ..Default::default()
            }],
            ..Default::default()
        })),
        ..Default::default()
    }
}

fn named(name: &str) -> pb::OpMetadata {
    pb::OpMetadata {
        description: BTreeMap::from([("llb.customname".to_string(), name.to_string())]),
        ..Default::default()
    }
}

#[test]
fn op_digest_is_sha256_of_bytes() {
    // sha256 of the empty string
    assert_eq!(
        op_digest(b""),
        "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
}

#[test]
fn digest_is_stable_across_map_insertion_order() {
    let mut a = image("x");
    let mut b = image("x");
    if let Some(pb::op::Op::Source(s)) = &mut a.op {
        s.attrs.insert("a".into(), "1".into());
        s.attrs.insert("b".into(), "2".into());
    }
    if let Some(pb::op::Op::Source(s)) = &mut b.op {
        s.attrs.insert("b".into(), "2".into());
        s.attrs.insert("a".into(), "1".into());
    }
    assert_eq!(op_digest(&marshal_op(&a)), op_digest(&marshal_op(&b)));
    assert_ne!(
        op_digest(&marshal_op(&a)),
        op_digest(&marshal_op(&image("x")))
    );
}

#[test]
fn build_then_read_round_trips() {
    let mut builder = DefinitionBuilder::new();
    let source = builder.add_source("Dockerfile", b"FROM x\nRUN a\n".to_vec(), "Dockerfile");
    let base = builder
        .add_with_metadata(image("x"), &[], named("[1/2] FROM x"))
        .unwrap();
    builder.add_location(&base, source, 1, 1).unwrap();
    let run = builder
        .add_with_metadata(
            exec(&["/bin/sh", "-c", "a"]),
            &[OutputRef::new(base.clone(), 0)],
            named("[2/2] RUN a"),
        )
        .unwrap();
    builder.add_location(&run, source, 2, 2).unwrap();

    let definition = builder.build(Some(OutputRef::new(run.clone(), 0)));
    assert_eq!(definition.def.len(), 3, "two ops and the terminal op");
    assert_eq!(op_digest(&definition.def[0]), base);
    assert_eq!(op_digest(&definition.def[1]), run);

    // The terminal op has only inputs[0].
    let terminal: pb::Op = prost::Message::decode(definition.def[2].as_slice()).unwrap();
    assert_eq!(
        terminal,
        pb::Op {
            inputs: vec![pb::Input {
                digest: run.clone(),
                index: 0
            }],
            ..Default::default()
        }
    );

    // Through the wire and back.
    let bytes = prost::Message::encode_to_vec(&definition);
    let decoded: pb::Definition = prost::Message::decode(bytes.as_slice()).unwrap();
    let graph = Graph::from_definition(&decoded).unwrap();
    assert_eq!(graph.result(), Some(OutputRef::new(run.clone(), 0)));
    assert_eq!(graph.topological_order(), &[base.clone(), run.clone()]);
    assert_eq!(graph.inputs(&run), vec![OutputRef::new(base.clone(), 0)]);
    assert!(graph.inputs(&base).is_empty());
    assert_eq!(
        graph.metadata(&run).unwrap().description["llb.customname"],
        "[2/2] RUN a"
    );
    assert!(matches!(
        graph.op(&base).unwrap().op,
        Some(pb::op::Op::Source(_))
    ));
    let location = graph.source_location(&run).unwrap();
    assert_eq!(location.filename, "Dockerfile");
    assert_eq!(location.language, "Dockerfile");
    assert_eq!(location.ranges, vec![LineRange { start: 2, end: 2 }]);
    assert_eq!(
        decoded.source.as_ref().unwrap().infos[0].data,
        b"FROM x\nRUN a\n"
    );
}

#[test]
fn build_is_deterministic() {
    let make = || {
        let mut builder = DefinitionBuilder::new();
        let base = builder
            .add_with_metadata(image("x"), &[], named("a"))
            .unwrap();
        let run = builder
            .add(exec(&["true"]), &[OutputRef::new(base, 0)])
            .unwrap();
        prost::Message::encode_to_vec(&builder.build(Some(OutputRef::new(run, 0))))
    };
    assert_eq!(make(), make());
}

#[test]
fn identical_ops_are_deduplicated() {
    let mut builder = DefinitionBuilder::new();
    let a = builder.add(image("x"), &[]).unwrap();
    let b = builder.add(image("x"), &[]).unwrap();
    assert_eq!(a, b);
    let run1 = builder
        .add(exec(&["a"]), &[OutputRef::new(a.clone(), 0)])
        .unwrap();
    let run2 = builder
        .add(exec(&["a"]), &[OutputRef::new(b.clone(), 0)])
        .unwrap();
    assert_eq!(run1, run2);
    let definition = builder.build(Some(OutputRef::new(run1, 0)));
    assert_eq!(definition.def.len(), 3);
}

#[test]
fn unreachable_ops_are_not_emitted() {
    let mut builder = DefinitionBuilder::new();
    let unused = builder
        .add_with_metadata(image("unused"), &[], named("u"))
        .unwrap();
    let used = builder.add(image("used"), &[]).unwrap();
    let definition = builder.build(Some(OutputRef::new(used.clone(), 0)));
    assert_eq!(definition.def.len(), 2);
    assert!(!definition.metadata.contains_key(&unused));
    let graph = Graph::from_definition(&definition).unwrap();
    assert!(graph.op(&unused).is_none());
    assert_eq!(graph.topological_order(), &[used]);
}

#[test]
fn scratch_result_is_an_empty_definition() {
    let mut builder = DefinitionBuilder::new();
    builder.add(image("x"), &[]).unwrap();
    let definition = builder.build(None);
    assert!(definition.def.is_empty());
    let graph = Graph::from_definition(&definition).unwrap();
    assert_eq!(graph.result(), None);
    assert!(graph.topological_order().is_empty());
}

#[test]
fn builder_rejects_unknown_inputs_and_bad_indexes() {
    let mut builder = DefinitionBuilder::new();
    let err = builder
        .add(exec(&["a"]), &[OutputRef::new("sha256:00", 0)])
        .unwrap_err();
    assert!(matches!(err, Error::UnknownInput { ref input, .. } if input == "sha256:00"));
    let base = builder.add(image("x"), &[]).unwrap();
    let err = builder
        .add(exec(&["a"]), &[OutputRef::new(base.clone(), 1)])
        .unwrap_err();
    assert!(err.to_string().contains("references output 1 of"), "{err}");
    assert!(matches!(
        builder.add_location("sha256:nope", 0, 1, 1),
        Err(Error::UnknownOp { .. })
    ));
}

fn definition_of(ops: &[pb::Op]) -> pb::Definition {
    pb::Definition {
        def: ops.iter().map(marshal_op).collect(),
        ..Default::default()
    }
}

fn terminal(digest: &str, index: i64) -> pb::Op {
    pb::Op {
        inputs: vec![pb::Input {
            digest: digest.into(),
            index,
        }],
        ..Default::default()
    }
}

#[test]
fn graph_rejects_unknown_input_digest() {
    let mut run = exec(&["a"]);
    run.inputs = vec![pb::Input {
        digest: "sha256:missing".into(),
        index: 0,
    }];
    let run_digest = op_digest(&marshal_op(&run));
    let err = Graph::from_definition(&definition_of(&[run, terminal(&run_digest, 0)])).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("op {run_digest} references unknown input sha256:missing")
    );
}

#[test]
fn graph_rejects_a_tampered_op() {
    // The input names the digest of image("x"), but the bytes present are image("y").
    let wanted = op_digest(&marshal_op(&image("x")));
    let err =
        Graph::from_definition(&definition_of(&[image("y"), terminal(&wanted, 0)])).unwrap_err();
    assert!(matches!(err, Error::UnknownInput { ref digest, .. } if digest == "terminal"));
}

#[test]
fn graph_rejects_out_of_range_index() {
    let base = image("x");
    let base_digest = op_digest(&marshal_op(&base));
    let err =
        Graph::from_definition(&definition_of(&[base, terminal(&base_digest, 3)])).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("op terminal references output 3 of {base_digest}, which has 1 output(s)")
    );
}

#[test]
fn graph_requires_terminal_op() {
    let err = Graph::from_definition(&definition_of(&[image("x")])).unwrap_err();
    assert!(matches!(err, Error::NoTerminal { .. }), "{err}");
}

#[test]
fn graph_rejects_garbage_bytes() {
    let definition = pb::Definition {
        def: vec![vec![0xff, 0xff, 0xff]],
        ..Default::default()
    };
    let err = Graph::from_definition(&definition).unwrap_err();
    assert!(
        err.to_string().starts_with("failed to decode op 0"),
        "{err}"
    );
}

#[test]
fn cycle_detection() {
    // Real digests make cycles impossible to construct; exercise the walk on a hand-made map.
    let mut ops = std::collections::HashMap::new();
    let mut a = exec(&["a"]);
    a.inputs = vec![pb::Input {
        digest: "b".into(),
        index: 0,
    }];
    let mut b = exec(&["b"]);
    b.inputs = vec![pb::Input {
        digest: "a".into(),
        index: 0,
    }];
    ops.insert("a".to_string(), a);
    ops.insert("b".to_string(), b);
    let mut marks = std::collections::HashMap::new();
    let mut order = Vec::new();
    let err = graph::topological(&ops, "a", &mut marks, &mut order).unwrap_err();
    assert!(matches!(err, Error::Cycle { .. }));
}

#[test]
fn file_op_output_count() {
    let op = pb::Op {
        op: Some(pb::op::Op::File(pb::FileOp {
            actions: vec![
                pb::FileAction {
                    output: -1,
                    ..Default::default()
                },
                pb::FileAction {
                    output: 0,
                    ..Default::default()
                },
            ],
        })),
        ..Default::default()
    };
    assert_eq!(output_count(&op), 1);
    assert_eq!(output_count(&pb::Op::default()), 0);
}
