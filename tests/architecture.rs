//! The rules the workspace's layout stands for, checked on its files: the
//! crate graph goes one way (each crate depends only on crates below it),
//! `unsafe` appears only in ferry-sys, and CRIU's raw protobuf types only in
//! the crates that speak CRIU. (`[workspace.lints]` already refuses unsafe
//! code elsewhere at compile time; this names the rule where it breaks.)

use std::fs;
use std::path::{Path, PathBuf};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The library crates, lowest first: a crate may depend only on crates
/// listed before it.
const LAYERS: &[&str] = &[
    "ferry-sys",
    "ferry-image",
    "ferry-criu",
    "ferry-archive",
    "ferry-transport",
    "ferry-core",
    "ferry-migrate",
    "ferry-agent",
    "ferry-lab",
];

/// The crates that may use CRIU's protobuf schemas (criu-proto).
const SPEAK_CRIU: &[&str] = &["ferry-image", "ferry-criu"];

/// The ferry crates a manifest's `[dependencies]` name.
fn ferry_dependencies(manifest: &Path) -> Vec<String> {
    let text = fs::read_to_string(manifest).unwrap();
    let mut deps = Vec::new();
    let mut in_deps = false;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_deps = line == "[dependencies]";
            continue;
        }
        if in_deps {
            let name = line.split(['.', ' ', '=']).next().unwrap_or("");
            if name.starts_with("ferry-") || name == "criu-proto" {
                deps.push(name.to_string());
            }
        }
    }
    deps
}

#[test]
fn each_crate_depends_only_on_crates_below_it() {
    for (layer, name) in LAYERS.iter().enumerate() {
        let manifest = Path::new(ROOT).join("crates").join(name).join("Cargo.toml");
        for dep in ferry_dependencies(&manifest) {
            if dep == "criu-proto" {
                assert!(
                    SPEAK_CRIU.contains(name),
                    "{name} depends on criu-proto: CRIU's raw protobuf types stay in {SPEAK_CRIU:?}"
                );
                continue;
            }
            let below = LAYERS[..layer].contains(&dep.as_str());
            assert!(
                below,
                "{name} depends on {dep}, which is not below it in {LAYERS:?}"
            );
        }
    }
}

/// Every `.rs` file under `dir`.
fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Lines of `text` that use `unsafe` as a keyword (comments dropped).
fn unsafe_lines(text: &str) -> Vec<String> {
    text.lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .filter(|code| {
            let mut rest = *code;
            while let Some(i) = rest.find("unsafe") {
                let before = rest[..i].chars().last();
                let after = rest[i + 6..].trim_start();
                let word_start = before.is_none_or(|c| !c.is_alphanumeric() && c != '_');
                let keyword = ["{", "fn", "impl", "extern", "trait"]
                    .iter()
                    .any(|k| after.starts_with(k));
                if word_start && keyword {
                    return true;
                }
                rest = &rest[i + 6..];
            }
            false
        })
        .map(str::to_string)
        .collect()
}

#[test]
fn unsafe_code_lives_only_in_ferry_sys() {
    let mut files = Vec::new();
    for name in LAYERS.iter().filter(|n| **n != "ferry-sys") {
        sources(&Path::new(ROOT).join("crates").join(name), &mut files);
    }
    for dir in ["src", "tests", "benches"] {
        sources(&Path::new(ROOT).join(dir), &mut files);
    }
    let mut found = Vec::new();
    for f in &files {
        // This file names the keyword in its own checks.
        if f.ends_with("tests/architecture.rs") {
            continue;
        }
        for line in unsafe_lines(&fs::read_to_string(f).unwrap()) {
            found.push(format!("{}: {}", f.display(), line.trim()));
        }
    }
    assert!(
        found.is_empty(),
        "unsafe outside ferry-sys:\n{}",
        found.join("\n")
    );
    // And the check sees what it looks for (the keyword spelt in two
    // halves, so that this file holds no unsafe code even as text).
    assert_eq!(
        unsafe_lines(concat!("let x = un", "safe { f() };")).len(),
        1
    );
    assert_eq!(unsafe_lines(concat!("pub un", "safe fn f() {}")).len(), 1);
    assert!(unsafe_lines(concat!("// un", "safe { }\nlet unsafe_code = 1;")).is_empty());
}
