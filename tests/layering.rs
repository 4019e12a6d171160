//! The module map of docs/architecture.md, checked against the code: every top-level
//! module imports only the modules its layer allows, and the allowed graph has no circle.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Which top-level modules each may import (docs/architecture.md, "Modules").
const ALLOWED: &[(&str, &[&str])] = &[
    ("base", &[]),
    ("model", &[]),
    ("limits", &["base", "model"]),
    ("auth", &["base", "model"]),
    ("usage", &["base", "model", "limits"]),
    ("tls", &["base", "model"]),
    ("config", &["base", "model", "auth", "tls"]),
    ("router", &["base", "model", "config"]),
    ("metrics", &["base", "model", "limits"]),
    ("upstream", &["base", "model", "config", "metrics", "tls"]),
    ("state", &["base", "model", "config", "limits", "usage", "metrics"]),
    ("logs", &["base", "model", "config", "metrics"]),
    (
        "gateway",
        &[
            "base", "model", "config", "limits", "auth", "usage", "router", "metrics", "upstream", "state", "tls",
            "logs",
        ],
    ),
    (
        "proxy",
        &[
            "base", "model", "config", "limits", "auth", "usage", "router", "metrics", "upstream", "gateway", "logs",
        ],
    ),
    (
        "listener",
        &["base", "model", "config", "metrics", "gateway", "proxy", "tls", "logs"],
    ),
    (
        "admin",
        &[
            "base", "model", "config", "limits", "auth", "usage", "metrics", "upstream", "state", "gateway", "tls",
            "logs",
        ],
    ),
    (
        "cli",
        &[
            "base", "model", "config", "limits", "auth", "usage", "router", "metrics", "upstream", "state", "gateway",
            "proxy", "listener", "admin", "tls", "logs",
        ],
    ),
];

/// Code without `//` comments (doc comments may name any module).
fn without_comments(source: &str) -> String {
    source
        .lines()
        .map(|line| match line.find("//") {
            Some(at) => &line[..at],
            None => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The top-level modules a source file names through `crate::`, including inside
/// `crate::{a::X, b}` groups.
fn imported_modules(source: &str) -> BTreeSet<String> {
    let code = without_comments(source);
    let mut found = BTreeSet::new();
    let ident = |text: &str| -> String { text.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect() };
    let mut rest = code.as_str();
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // Top-level names of the group: the first identifier of each element at depth 1.
            let mut depth = 1;
            let mut start_of_element = true;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    ',' if depth == 1 => start_of_element = true,
                    c if c.is_whitespace() => {}
                    _ if start_of_element && depth == 1 => {
                        found.insert(ident(&group[i..]));
                        start_of_element = false;
                    }
                    _ => {}
                }
            }
        } else {
            found.insert(ident(rest));
        }
    }
    found.remove("");
    found.remove("self");
    found
}

fn source_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            source_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn modules_import_only_what_their_layer_allows() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let allowed: BTreeMap<&str, BTreeSet<&str>> = ALLOWED
        .iter()
        .map(|(module, deps)| (*module, deps.iter().copied().collect()))
        .collect();
    let mut files = Vec::new();
    source_files(&src, &mut files);
    let mut violations = Vec::new();
    let mut seen_modules = BTreeSet::new();
    for file in &files {
        let relative = file.strip_prefix(&src).unwrap();
        let top = relative.components().next().unwrap().as_os_str().to_string_lossy();
        let top = top.trim_end_matches(".rs").to_string();
        if top == "lib" || top == "main" {
            continue;
        }
        seen_modules.insert(top.clone());
        let Some(may) = allowed.get(top.as_str()) else {
            violations.push(format!("module `{top}` is not in the module map"));
            continue;
        };
        let source = std::fs::read_to_string(file).unwrap();
        for module in imported_modules(&source) {
            if module != top && !may.contains(module.as_str()) {
                violations.push(format!("{} imports `{module}`", relative.display()));
            }
        }
    }
    assert!(violations.is_empty(), "layering violations:\n{}", violations.join("\n"));
    // The map names only modules that exist.
    for module in allowed.keys() {
        assert!(
            seen_modules.contains(*module),
            "the map names `{module}`, which has no files"
        );
    }
}

#[test]
fn the_module_map_has_no_circles() {
    let allowed: BTreeMap<&str, &[&str]> = ALLOWED.iter().copied().collect();
    // Depth-first search for a back edge.
    fn visit<'a>(
        module: &'a str,
        allowed: &BTreeMap<&'a str, &'a [&'a str]>,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) {
        if done.contains(module) {
            return;
        }
        assert!(!path.contains(&module), "circle: {} -> {module}", path.join(" -> "));
        path.push(module);
        for dep in allowed.get(module).copied().unwrap_or_default() {
            visit(dep, allowed, path, done);
        }
        path.pop();
        done.insert(module);
    }
    let mut done = BTreeSet::new();
    for module in allowed.keys() {
        visit(module, &allowed, &mut Vec::new(), &mut done);
    }
}

#[test]
fn imports_are_read_from_paths_and_groups() {
    let source = "use crate::model::Plan; // crate::admin in a comment\nuse crate::{base::{ErrorKind, stopped}, limits};\nlet x = crate::usage::report::x();";
    let found: Vec<String> = imported_modules(source).into_iter().collect();
    assert_eq!(found, ["base", "limits", "model", "usage"]);
}
