//! Dependencies inside the crate point one way: down the pipeline, from the edges to storage.
//!
//! Each top-level module of `src/` has a layer; code may use `crate::m` only for a module `m`
//! of a lower layer (or its own module). Two modules of one layer (the edges: HTTP, Socket.io,
//! plain WebSocket) may not use each other. `lib.rs` and `main.rs`, which assemble everything,
//! are exempt. docs/ARCHITECTURE.md draws the same picture.

use std::collections::BTreeSet;
use std::path::Path;

/// Lowest first. Keep in step with the module list in `src/lib.rs`.
const LAYERS: &[&[&str]] = &[
    &["wire"],
    &["config", "fault", "observe", "tasks"],
    &["auth", "cluster", "net", "rate_limit"],
    &["rooms"],
    &["session"],
    &["evaluate"],
    &["store"],
    &["ingest"],
    &["deliver"],
    &["http", "socketio", "ws", "web"],
    &["demo", "proto"],
];

fn layer(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

/// The crate modules a line of code names (`crate::x`, `crate::{x, y::z}`).
fn named(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = line;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for part in group[..end].split(',') {
                let name: String = part
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    out.push(name);
                }
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            out.push(name);
        }
    }
    out
}

fn files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn dependencies_point_down_the_pipeline() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut all = Vec::new();
    files(&src, &mut all);
    let mut wrong = BTreeSet::new();
    let mut seen = BTreeSet::new();
    for path in all {
        let rel = path.strip_prefix(&src).unwrap();
        let first = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let module = first.trim_end_matches(".rs").to_string();
        if module == "lib" || module == "main" {
            continue;
        }
        seen.insert(module.clone());
        let own =
            layer(&module).unwrap_or_else(|| panic!("src/{first} has no layer in tests/layers.rs"));
        let text = std::fs::read_to_string(&path).unwrap();
        for (n, line) in text.lines().enumerate() {
            if line.trim_start().starts_with("//") {
                continue; // a doc link is not a dependency
            }
            for used in named(line) {
                if used == module || used == "self" {
                    continue;
                }
                let Some(theirs) = layer(&used) else { continue };
                if theirs >= own {
                    wrong.insert(format!(
                        "src/{}:{}: {module} uses {used}",
                        rel.display(),
                        n + 1
                    ));
                }
            }
        }
    }
    let listed: BTreeSet<String> = LAYERS
        .iter()
        .flat_map(|l| l.iter().map(|m| m.to_string()))
        .collect();
    let stale: Vec<_> = listed.difference(&seen).collect();
    assert!(
        stale.is_empty(),
        "layers name modules that do not exist: {stale:?}"
    );
    assert!(
        wrong.is_empty(),
        "dependencies against the layering:\n{}",
        wrong.into_iter().collect::<Vec<_>>().join("\n")
    );
}

#[test]
fn reads_grouped_imports() {
    assert_eq!(
        named("use crate::{store::Store, wire::Alert};"),
        ["store", "wire"]
    );
    assert_eq!(named("let x = crate::observe::flushed(d);"), ["observe"]);
}
