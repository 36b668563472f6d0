//! A bounded mutation fuzzer for the parser, the word expander and the compiler: seeds are the
//! golden and corpus Dockerfiles, mutated with byte flips, splices and the tokens that drive
//! the grammar (`$`, `${`, `<<EOF`, quotes, escapes, continuations, flags). Every input must
//! give `Ok` or an error — never a panic — and a parse error must name a line inside the file.
//!
//! Time-bounded: `KILN_FUZZ_SECONDS` (default 15) and deterministic for a given
//! `KILN_FUZZ_SEED` (default: time-based, printed, so a failure can be replayed).

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::time::{Duration, Instant};

use kiln_dockerfile::shell::Lexer;
use kiln_dockerfile::{compile, parse, CompileOptions, ImageMetaResolver, ResolveError};
use kiln_image::oci::Platform;
use kiln_image::reference::Reference;
use kiln_image::Digest;

/// xorshift64*: small, fast, reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const TOKENS: &[&str] = &[
    "$",
    "${",
    "}",
    "${A:-",
    "${A:+x}",
    "${A#*}",
    "${A%%.*}",
    "${A//a/b}",
    "${A?",
    "\\",
    "`",
    "\"",
    "'",
    "\n",
    "\\\n",
    " ",
    "\t",
    "#",
    "# escape=`\n",
    "# syntax=x\n",
    "<<EOF\n",
    "<<-'EOF'\n",
    "\nEOF\n",
    "<<",
    "=",
    ",",
    "[",
    "]",
    "[\"a\",",
    "--from=",
    "--mount=type=cache,target=/c",
    "--mount=type=bind,from=0",
    "--chown=1:1",
    "--chmod=755",
    "--exclude=*",
    "--parents",
    "--network=none",
    "AS ",
    "FROM ",
    "RUN ",
    "COPY ",
    "ADD ",
    "ARG ",
    "ENV ",
    "ONBUILD ",
    "HEALTHCHECK ",
    "CMD ",
    "SHELL ",
    "USER ",
    "WORKDIR ",
    "EXPOSE ",
    "LABEL ",
    "VOLUME ",
    "STOPSIGNAL ",
    "\u{e9}",
    "\u{1f600}",
    "\0",
];

fn seeds() -> Vec<Vec<u8>> {
    let mut seeds = Vec::new();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for dir in [
        root.join("tests/testdata"),
        root.join("tests/testdata/invalid"),
        root.join("../kiln-testkit/tests/corpus"),
    ] {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if let Ok(bytes) = std::fs::read(entry.path().join("Dockerfile")) {
                seeds.push(bytes);
            }
        }
    }
    assert!(seeds.len() > 20, "seed Dockerfiles not found");
    seeds
}

fn mutate(rng: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut data = seeds[rng.below(seeds.len())].clone();
    for _ in 0..1 + rng.below(8) {
        let at = rng.below(data.len() + 1);
        match rng.below(6) {
            0 if !data.is_empty() => {
                let i = rng.below(data.len());
                data[i] ^= 1 << rng.below(8);
            }
            1 if !data.is_empty() => {
                let end = (at + rng.below(16)).min(data.len());
                data.drain(at.min(end)..end);
            }
            2 => {
                let other = &seeds[rng.below(seeds.len())];
                let from = rng.below(other.len());
                let to = (from + rng.below(64)).min(other.len());
                data.splice(at..at, other[from..to].iter().copied());
            }
            _ => {
                let token = TOKENS[rng.below(TOKENS.len())].as_bytes();
                data.splice(at..at, token.iter().copied());
            }
        }
    }
    data
}

struct Resolver;

#[async_trait::async_trait]
impl ImageMetaResolver for Resolver {
    async fn resolve(
        &self,
        reference: &Reference,
        platform: &Platform,
    ) -> Result<(Digest, Vec<u8>), ResolveError> {
        let config = serde_json::json!({
            "architecture": platform.architecture,
            "os": platform.os,
            "config": {"Env": ["PATH=/bin"], "Cmd": ["sh"]},
            "rootfs": {"type": "layers", "diff_ids": [Digest::of(b"layer").to_string()]},
        });
        Ok((
            Digest::of(reference.to_string().as_bytes()),
            serde_json::to_vec(&config)?,
        ))
    }
}

#[test]
fn parser_expander_and_compiler_never_panic() {
    let seconds: u64 = std::env::var("KILN_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(15);
    let seed: u64 = std::env::var("KILN_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    println!("fuzz seed {seed} (replay with KILN_FUZZ_SEED={seed})");
    let seeds = seeds();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mut rng = Rng(seed);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let (mut runs, mut parsed, mut compiled) = (0u64, 0u64, 0u64);
    while Instant::now() < deadline {
        let input = mutate(&mut rng, &seeds);
        let text = String::from_utf8_lossy(&input).to_string();
        let lines = text.lines().count().max(1);
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
            let env = vec![
                ("A".to_string(), "a.b.c".to_string()),
                ("B".to_string(), String::new()),
            ];
            for escape in ['\\', '`'] {
                let _ = Lexer::new(escape).process_word(&text, &env);
            }
            match parse(&text) {
                Err(error) => {
                    assert!(
                        error.line >= 1 && error.line <= lines + 1,
                        "parse error line {} outside 1..={}: {}",
                        error.line,
                        lines + 1,
                        error.message
                    );
                    (false, false)
                }
                Ok(dockerfile) => {
                    let options = CompileOptions {
                        source: input.clone(),
                        build_args: BTreeMap::from([("X".to_string(), "1".to_string())]),
                        ..Default::default()
                    };
                    let ok = runtime
                        .block_on(compile(&dockerfile, &options, &Resolver))
                        .is_ok();
                    (true, ok)
                }
            }
        }));
        match outcome {
            Ok((p, c)) => {
                parsed += u64::from(p);
                compiled += u64::from(c);
            }
            Err(_) => panic!(
                "panic on input (seed {seed}, run {runs}):\n---\n{text}\n---\n{:?}",
                input
            ),
        }
        runs += 1;
    }
    println!("{runs} inputs: {parsed} parsed, {compiled} compiled");
    assert!(runs > 100, "the fuzzer ran only {runs} inputs");
    assert!(
        parsed > 0 && compiled > 0,
        "mutations never produced a valid file"
    );
}
