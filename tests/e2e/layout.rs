//! The workspace's shape, checked on its sources: no two modules of a crate import each other
//! round a circle, and no source file outside tests outgrows what a reader holds in their head.
//!
//! A module depends on another when it names an item of it through `crate::` or `super::`
//! (comments aside). An edge is drawn between the two siblings the names diverge at, so
//! `crate::engine::worker::batch` naming `crate::engine::checkpoints::Advance` is
//! `worker → checkpoints` under `engine`; a child naming its parent's own items is not an edge.

use regex::Regex;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Lines a source file may have before its `#[cfg(test)]` module.
const MAX_LINES: usize = 800;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// Every crate's `src/`, from the workspace members.
fn source_dirs() -> Vec<PathBuf> {
    let root = workspace();
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).expect("Cargo.toml");
    let members = manifest
        .split("members = [")
        .nth(1)
        .and_then(|rest| rest.split(']').next())
        .expect("workspace members");
    members
        .split(',')
        .map(|m| m.trim().trim_matches('"'))
        .filter(|m| !m.is_empty())
        .map(|m| root.join(m).join("src"))
        .filter(|p| p.is_dir())
        .collect()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

type Module = Vec<String>;

/// Each file's module path within its crate, with its text.
fn modules(src: &Path) -> BTreeMap<Module, String> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    files
        .into_iter()
        .map(|path| {
            let rel = path
                .strip_prefix(src)
                .expect("under src")
                .with_extension("");
            let mut module: Module = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if matches!(
                module.last().map(String::as_str),
                Some("mod" | "lib" | "main")
            ) {
                module.pop();
            }
            let text = std::fs::read_to_string(&path).expect("source");
            (module, text)
        })
        .collect()
}

/// The paths a module's code names through `crate::` or `super::`, resolved to absolute
/// module-relative paths (`{a, b::c}` groups expanded).
fn named_paths(module: &Module, text: &str) -> Vec<Module> {
    let comment = Regex::new(r"//.*").expect("regex");
    let path = Regex::new(r"\b((?:crate|super)(?:::super)*)::((?:[a-z_][a-z0-9_]*::)*)(\{[^}]*\}|[A-Za-z_][A-Za-z0-9_]*)")
        .expect("regex");
    let code = comment.replace_all(text, "");
    let mut out = Vec::new();
    for m in path.captures_iter(&code) {
        let root = &m[1];
        let mut base: Module = if root == "crate" {
            Vec::new()
        } else {
            // `super` is the parent module, whether the module is `x.rs` or `x/mod.rs`.
            let ups = root.split("::").count();
            let mut b = module.clone();
            for _ in 0..ups {
                b.pop();
            }
            b
        };
        base.extend(m[2].split("::").filter(|s| !s.is_empty()).map(String::from));
        let last = &m[3];
        if let Some(group) = last.strip_prefix('{') {
            for part in group.trim_end_matches('}').split(',') {
                let part = part.split(" as ").next().unwrap_or("").trim();
                let mut p = base.clone();
                p.extend(
                    part.split("::")
                        .map(str::trim)
                        .filter(|s| !s.is_empty() && *s != "self")
                        .map(String::from),
                );
                out.push(p);
            }
        } else {
            base.push(last.to_string());
            out.push(base);
        }
    }
    out
}

/// Sibling edges `(parent, from, to)` between the modules of one crate.
fn edges(mods: &BTreeMap<Module, String>) -> BTreeSet<(Module, String, String)> {
    let mut edges = BTreeSet::new();
    for (module, text) in mods {
        for named in named_paths(module, text) {
            // The longest prefix of the named path that is a module.
            let Some(target) = (1..=named.len())
                .rev()
                .map(|n| named[..n].to_vec())
                .find(|p| mods.contains_key(p))
            else {
                continue;
            };
            let common = module
                .iter()
                .zip(&target)
                .take_while(|(a, b)| a == b)
                .count();
            if common < module.len() && common < target.len() {
                edges.insert((
                    module[..common].to_vec(),
                    module[common].clone(),
                    target[common].clone(),
                ));
            }
        }
    }
    edges
}

/// A circle among siblings, if any: the modules on it in order.
fn find_cycle(edges: &BTreeSet<(Module, String, String)>) -> Option<Vec<String>> {
    let mut graph: BTreeMap<(Module, String), Vec<String>> = BTreeMap::new();
    for (parent, from, to) in edges {
        graph
            .entry((parent.clone(), from.clone()))
            .or_default()
            .push(to.clone());
    }
    fn visit(
        graph: &BTreeMap<(Module, String), Vec<String>>,
        parent: &Module,
        node: &str,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|n| n == node) {
            let mut cycle = path[i..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in graph
            .get(&(parent.clone(), node.to_string()))
            .into_iter()
            .flatten()
        {
            if let Some(c) = visit(graph, parent, next, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let parents: BTreeSet<Module> = graph.keys().map(|(p, _)| p.clone()).collect();
    for parent in parents {
        let mut done = BTreeSet::new();
        for ((p, node), _) in graph.range((parent.clone(), String::new())..) {
            if *p != parent {
                break;
            }
            if let Some(mut cycle) = visit(&graph, &parent, node, &mut Vec::new(), &mut done) {
                let prefix = parent.join("::");
                if !prefix.is_empty() {
                    cycle = cycle
                        .into_iter()
                        .map(|m| format!("{prefix}::{m}"))
                        .collect();
                }
                return Some(cycle);
            }
        }
    }
    None
}

#[test]
fn no_module_imports_form_a_circle() {
    let dirs = source_dirs();
    assert!(dirs.len() >= 8, "found the crates: {dirs:?}");
    let mut circles = Vec::new();
    for src in dirs {
        let mods = modules(&src);
        if let Some(cycle) = find_cycle(&edges(&mods)) {
            circles.push(format!("{}: {}", src.display(), cycle.join(" → ")));
        }
    }
    assert!(
        circles.is_empty(),
        "module circles:\n{}",
        circles.join("\n")
    );
}

#[test]
fn the_checker_finds_a_circle() {
    let edges: BTreeSet<(Module, String, String)> = [
        (vec![], "state".into(), "auth".into()),
        (vec![], "auth".into(), "state".into()),
    ]
    .into_iter()
    .collect();
    assert_eq!(
        find_cycle(&edges),
        Some(vec!["auth".into(), "state".into(), "auth".into()])
    );
    let module: Module = vec!["engine".into(), "worker".into(), "batch".into()];
    let named = named_paths(
        &module,
        "use super::super::checkpoints::{self, Advance};\n// crate::ignored::X\nuse crate::support::KeyHashState;",
    );
    assert!(named.contains(&vec![
        "engine".into(),
        "checkpoints".into(),
        "Advance".into()
    ]));
    assert!(named.contains(&vec!["support".into(), "KeyHashState".into()]));
    assert!(!named
        .iter()
        .any(|p| p.first().is_some_and(|s| s == "ignored")));
}

#[test]
fn no_source_file_outside_tests_outgrows_a_reader() {
    let mut long = Vec::new();
    for src in source_dirs() {
        let mut files = Vec::new();
        rust_files(&src, &mut files);
        for file in files {
            let text = std::fs::read_to_string(&file).expect("source");
            let code = text
                .lines()
                .take_while(|l| !l.starts_with("#[cfg(test)]"))
                .count();
            if code > MAX_LINES {
                long.push(format!("{} ({code} lines)", file.display()));
            }
        }
    }
    assert!(
        long.is_empty(),
        "over {MAX_LINES} lines before the tests; split them:\n{}",
        long.join("\n")
    );
}
