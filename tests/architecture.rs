//! docs/ARCHITECTURE.md's code map is a promise: each module of `src/` uses only the modules
//! listed above it. This test reads the map's order and every `crate::<module>` path in the
//! code outside tests, and names each back-edge.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The top-level modules in the order the code map lists them: each bullet's lead (before its
/// ` — `) names one or more as `name.rs` or `name/`.
fn map_order(root: &Path, modules: &[String]) -> Vec<String> {
    let doc = std::fs::read_to_string(root.join("docs/ARCHITECTURE.md")).expect("read the map");
    let section = doc
        .split("## Code map")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("docs/ARCHITECTURE.md has a `## Code map` section");
    let mut bullets: Vec<String> = Vec::new();
    for line in section.lines() {
        if let Some(b) = line.strip_prefix("- ") {
            bullets.push(b.to_string());
        } else if line.starts_with("  ") {
            if let Some(b) = bullets.last_mut() {
                b.push(' ');
                b.push_str(line.trim());
            }
        }
    }
    let mut order: Vec<String> = Vec::new();
    for bullet in &bullets {
        let lead = bullet.split(" — ").next().unwrap_or("");
        for quoted in lead.split('`').skip(1).step_by(2) {
            let name = quoted
                .strip_suffix(".rs")
                .or_else(|| quoted.strip_suffix('/'))
                .unwrap_or("");
            if modules.iter().any(|m| m == name) && !order.iter().any(|o| o == name) {
                order.push(name.to_string());
            }
        }
    }
    order
}

/// `src/*.rs` and `src/*/` as module names, with every file of each.
fn modules(src: &Path) -> HashMap<String, Vec<PathBuf>> {
    fn files(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).expect("read src").flatten() {
            let p = e.path();
            if p.is_dir() {
                files(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    let mut mods: HashMap<String, Vec<PathBuf>> = HashMap::new();
    for e in std::fs::read_dir(src).expect("read src").flatten() {
        let p = e.path();
        let stem = p.file_stem().unwrap().to_string_lossy().to_string();
        if stem == "lib" {
            continue;
        }
        let entry = mods.entry(stem).or_default();
        if p.is_dir() {
            files(&p, entry);
        } else if p.extension().is_some_and(|x| x == "rs") {
            entry.push(p);
        }
    }
    mods
}

/// The modules `file`'s code (before its test module, comments left out) names as
/// `crate::<m>` or `crate::{<m>, ..}`; `main.rs` and `cli/` name the library as `gpt2::<m>`.
fn uses(file: &Path, prefix: &str) -> Vec<(usize, String)> {
    let text = std::fs::read_to_string(file).expect("read a source file");
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let code = line.trim_start();
        // The test module ends the code; a test-only item (`#[cfg(test)] fn`) does not.
        let next = lines.get(i + 1).map_or("", |l| l.trim_start());
        if code.starts_with("#[cfg(test)]") && next.starts_with("mod ") {
            break;
        }
        if code.starts_with("//") {
            continue;
        }
        let code = code.split("//").next().unwrap_or("");
        for part in code.split(prefix).skip(1) {
            // `crate::a::..`, or a group `crate::{a, b::c}` (one line).
            let group = part
                .strip_prefix('{')
                .map(|g| g.split('}').next().unwrap_or(""));
            let heads: Vec<&str> = match group {
                Some(g) => g.split(',').map(str::trim).collect(),
                None => vec![part],
            };
            for head in heads {
                let name: String = head
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    out.push((i + 1, name));
                }
            }
        }
    }
    out
}

#[test]
fn no_module_uses_one_listed_below_it() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mods = modules(&root.join("src"));
    let names: Vec<String> = mods.keys().cloned().collect();
    let order = map_order(root, &names);
    let mut missing: Vec<&String> = names.iter().filter(|m| !order.contains(m)).collect();
    missing.sort();
    assert!(
        missing.is_empty(),
        "docs/ARCHITECTURE.md's code map does not list {missing:?}"
    );
    let rank = |m: &str| order.iter().position(|o| o == m);
    let mut back_edges = Vec::new();
    for (module, files) in &mods {
        let prefix = if matches!(module.as_str(), "main" | "cli") {
            "gpt2::"
        } else {
            "crate::"
        };
        for file in files {
            for (line, used) in uses(file, prefix) {
                if let (Some(from), Some(to)) = (rank(module), rank(&used)) {
                    if to > from {
                        back_edges.push(format!(
                            "{}:{line} ({module}) uses {used}, listed below it",
                            file.strip_prefix(root).unwrap_or(file).display()
                        ));
                    }
                }
            }
        }
    }
    back_edges.sort();
    assert!(
        back_edges.is_empty(),
        "the code map's order is broken:\n{}",
        back_edges.join("\n")
    );
}

/// The test above is not vacuous: it finds the modules and reads the map.
#[test]
fn the_map_lists_the_core_in_order() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let names: Vec<String> = modules(&root.join("src")).keys().cloned().collect();
    let order = map_order(root, &names);
    let at = |m: &str| order.iter().position(|o| o == m).unwrap_or(usize::MAX);
    for pair in [
        "config",
        "checkpoint",
        "linear",
        "attention",
        "block",
        "model",
    ]
    .windows(2)
    {
        assert!(at(pair[0]) < at(pair[1]), "{pair:?} in {order:?}");
    }
}

/// The library does not depend on the command line's parser: clap is named only in `main.rs`
/// and `cli/` (Cargo.toml makes it optional, for the binary's `cli` feature).
#[test]
fn only_the_binary_names_clap() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut offenders = Vec::new();
    for (module, files) in modules(&root.join("src")) {
        if matches!(module.as_str(), "main" | "cli") {
            continue;
        }
        for file in files {
            let text = std::fs::read_to_string(&file).expect("read a source file");
            if text.contains("clap::") || text.contains("use clap") {
                offenders.push(file.display().to_string());
            }
        }
    }
    assert!(offenders.is_empty(), "clap in the library: {offenders:?}");
}
