//! The import rules of `redirector-user/src`, checked from the source text
//! (ARCHITECTURE.md states them):
//!
//! 1. No import cycle between files.
//! 2. The data path imports forward only, in the order a connection meets
//!    it: capture → proxy → route → endpoint → transport → copy →
//!    telemetry (`capture::orig_dst` is a leaf any stage may read).
//! 3. The control plane (config, net, mesh, identity, tls, ca) never imports
//!    the data path or the node (inpod, app, cmd, admin, state).
//! 4. `sys`, `net` and `copy` are leaves: they import nothing of the crate.
//! 5. Nothing imports `app` or `cmd` from outside their own files.
//!
//! An edge is any `crate::`, `super::` or child-module path in a file's
//! non-test code (everything before its first `#[cfg(test)]`; files named
//! `tests.rs` hold tests only), comments left out; `mod x;` declarations
//! are not edges.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// Stages of the data path, in order.
const DATA_PATH: [&str; 7] = ["capture", "proxy", "route", "endpoint", "transport", "copy", "telemetry"];
const CONTROL_PLANE: [&str; 6] = ["config", "net", "mesh", "identity", "tls", "ca"];
const LEAVES: [&str; 4] = ["sys", "net", "copy", "capture::orig_dst"];

/// One file: its module path and the modules it refers to.
struct File {
    path: PathBuf,
    module: String,
    refs: BTreeSet<String>,
}

/// Check the rules on the crate rooted at `src` (its `lib.rs`); returns
/// every violation, or the number of files and edges read.
pub fn check(src: &Path) -> Result<(usize, usize)> {
    let files = read_tree(src)?;
    let modules: BTreeSet<String> = files.iter().map(|f| f.module.clone()).collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in &files {
        let edges = graph.entry(f.module.clone()).or_default();
        for r in &f.refs {
            if let Some(target) = resolve(r, &modules) {
                if target != f.module && !target.is_empty() {
                    edges.insert(target);
                }
            }
        }
    }
    let mut problems = Vec::new();
    for scc in strongly_connected(&graph) {
        if scc.len() > 1 {
            problems.push(format!("import cycle between files: {}", scc.join(" -> ")));
        }
    }
    let path_of =
        |m: &str| files.iter().find(|f| f.module == m).map(|f| f.path.display().to_string()).unwrap_or_default();
    for (from, tos) in &graph {
        for to in tos {
            if let Some(why) = forbidden(from, to) {
                problems.push(format!("{} ({from}) imports {to}: {why}", path_of(from)));
            }
        }
    }
    if !problems.is_empty() {
        bail!("the module layering is broken:\n  {}\nfix: move the item to the module the rule allows (see ARCHITECTURE.md, \"Import rules\")", problems.join("\n  "));
    }
    Ok((files.len(), graph.values().map(BTreeSet::len).sum()))
}

fn top(m: &str) -> &str {
    m.split("::").next().unwrap_or(m)
}

fn within(m: &str, family: &str) -> bool {
    m == family || m.starts_with(&format!("{family}::"))
}

/// Why `from` may not import `to`, if it may not.
fn forbidden(from: &str, to: &str) -> Option<String> {
    if (within(to, "app") && !within(from, "app")) || (within(to, "cmd") && !within(from, "cmd")) {
        return Some("the composition root and the commands are imported by nothing".into());
    }
    if LEAVES.iter().any(|l| within(from, l)) && !LEAVES.iter().any(|l| within(to, l) && within(from, l)) {
        return Some("this module is a leaf and imports nothing of the crate".into());
    }
    let stage = |m: &str| DATA_PATH.iter().position(|s| *s == top(m));
    if CONTROL_PLANE.contains(&top(from)) {
        if stage(to).is_some() && !within(to, "capture::orig_dst") {
            return Some("the control plane never imports the data path".into());
        }
        if ["inpod", "admin", "state"].contains(&top(to)) {
            return Some("the control plane never imports the node".into());
        }
    }
    if let (Some(a), Some(b)) = (stage(from), stage(to)) {
        if b < a && !within(to, "capture::orig_dst") {
            return Some(format!(
                "the data path imports forward only ({} comes before {})",
                DATA_PATH[b], DATA_PATH[a]
            ));
        }
    }
    if stage(from).is_some() && ["inpod", "admin", "state"].contains(&top(to)) {
        return Some("the data path does not import the node".into());
    }
    None
}

/// The longest known module that `path` (a `::` path from the crate root)
/// starts with.
fn resolve(path: &str, modules: &BTreeSet<String>) -> Option<String> {
    let parts: Vec<&str> = path.split("::").collect();
    (1..=parts.len()).rev().map(|n| parts[..n].join("::")).find(|m| modules.contains(m))
}

fn read_tree(src: &Path) -> Result<Vec<File>> {
    let mut out = Vec::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let rel = p.strip_prefix(src).expect("below src").with_extension("");
                let rel = rel.to_string_lossy().replace('/', "::");
                let module = match rel.as_str() {
                    "lib" => String::new(),
                    // The binary is its own crate.
                    "main" => continue,
                    // A file of tests only (`#[cfg(test)] mod tests;`).
                    r if r.ends_with("::tests") => continue,
                    r => r.strip_suffix("::mod").unwrap_or(r).to_string(),
                };
                let text = std::fs::read_to_string(&p)?;
                let refs = references(&module, &text);
                out.push(File { path: p, module, refs });
            }
        }
    }
    Ok(out)
}

/// The module paths a file's non-test code refers to, from the crate root.
fn references(module: &str, text: &str) -> BTreeSet<String> {
    let code: String = text
        .split("#[cfg(test)]")
        .next()
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .fold(String::new(), |mut code, l| {
            code.push_str(l);
            code.push('\n');
            code
        });
    let children: BTreeSet<String> = code
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let l = l.strip_prefix("pub(crate) ").or_else(|| l.strip_prefix("pub ")).unwrap_or(l);
            l.strip_prefix("mod ").and_then(|r| r.strip_suffix(';')).map(str::to_string)
        })
        .collect();
    let parent = module.rsplit_once("::").map(|(p, _)| p.to_string()).unwrap_or_default();
    let join = |base: &str, rest: &str| if base.is_empty() { rest.to_string() } else { format!("{base}::{rest}") };
    let mut refs = BTreeSet::new();
    for (head, base) in [("crate::", String::new()), ("super::", parent)] {
        for path in paths_after(&code, head) {
            refs.insert(join(&base, &path));
        }
    }
    for c in &children {
        for path in paths_after(&code, &format!("{c}::")) {
            refs.insert(join(module, &format!("{c}::{path}")));
        }
    }
    refs
}

/// Every path that follows `head` in `code`, with `{a, b::c}` groups
/// expanded to one path each.
fn paths_after(code: &str, head: &str) -> Vec<String> {
    let mut out = Vec::new();
    let bytes = code.as_bytes();
    let mut from = 0;
    while let Some(i) = code[from..].find(head) {
        let start = from + i;
        from = start + head.len();
        // A whole path segment: not the tail of a longer identifier.
        if start > 0
            && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_' || bytes[start - 1] == b':')
        {
            continue;
        }
        expand(&code[from..], "", &mut out);
    }
    out
}

/// Read one use-tree at the start of `rest`, prefixed by `prefix`.
fn expand(rest: &str, prefix: &str, out: &mut Vec<String>) {
    let ident: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':').collect();
    let path = format!("{prefix}{}", ident.trim_end_matches(':'));
    let after = &rest[ident.len()..];
    if (ident.is_empty() || ident.ends_with("::")) && after.starts_with('{') {
        // A group: split at top-level commas up to the matching brace.
        let base = if path.is_empty() { String::new() } else { format!("{path}::") };
        let mut depth = 0;
        let mut item_start = 1;
        for (i, c) in after.char_indices() {
            match c {
                '{' => depth += 1,
                '}' | ',' if depth == 1 => {
                    let item = after[item_start..i].trim();
                    // `x as y` renames; a nested group keeps its own.
                    let item = if item.contains('{') { item } else { item.split(" as ").next().unwrap_or(item).trim() };
                    if item == "self" {
                        if !path.is_empty() {
                            out.push(path.clone());
                        }
                    } else if !item.is_empty() {
                        expand(item, &base, out);
                    }
                    item_start = i + 1;
                    if c == '}' {
                        return;
                    }
                }
                '}' => depth -= 1,
                _ => {}
            }
        }
    } else if !path.is_empty() {
        out.push(path);
    }
}

/// Tarjan's strongly connected components, each sorted.
fn strongly_connected(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct State<'a> {
        graph: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a str) {
        let i = s.index.len();
        s.index.insert(v, i);
        s.low.insert(v, i);
        s.stack.push(v);
        s.on_stack.insert(v);
        if let Some(ws) = s.graph.get(v) {
            for w in ws {
                let w = w.as_str();
                if !s.index.contains_key(w) {
                    visit(s, w);
                    let lw = s.low[w];
                    let lv = s.low.get_mut(v).expect("visited");
                    *lv = (*lv).min(lw);
                } else if s.on_stack.contains(w) {
                    let iw = s.index[w];
                    let lv = s.low.get_mut(v).expect("visited");
                    *lv = (*lv).min(iw);
                }
            }
        }
        if s.low[v] == s.index[v] {
            let mut scc = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                scc.push(w.to_string());
                if w == v {
                    break;
                }
            }
            scc.sort();
            s.out.push(scc);
        }
    }
    let mut s = State {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        out: Vec::new(),
    };
    for v in graph.keys() {
        if !s.index.contains_key(v.as_str()) {
            visit(&mut s, v);
        }
    }
    s.out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn use_groups_expand_to_one_path_each() {
        let refs = references("proxy::outbound", "use crate::{copy::{a, b}, route::http::{self as l7}};\nuse super::ProxySettings;\nfn f() { crate::telemetry::label(\"x\"); }\n#[cfg(test)]\nuse crate::app;\n");
        let want: BTreeSet<String> = ["copy::a", "copy::b", "route::http", "proxy::ProxySettings", "telemetry::label"]
            .iter()
            .map(std::string::ToString::to_string)
            .collect();
        assert_eq!(refs, want);
    }

    #[test]
    fn a_cycle_and_a_backward_import_are_found() {
        let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        g.entry("a".into()).or_default().insert("b".into());
        g.entry("b".into()).or_default().insert("a".into());
        g.entry("c".into()).or_default();
        let sccs = strongly_connected(&g);
        assert!(sccs.iter().any(|s| s == &vec!["a".to_string(), "b".to_string()]));
        assert!(forbidden("transport::hbone", "proxy::inbound").is_some());
        assert!(forbidden("proxy::inbound", "transport::hbone").is_none());
        assert!(forbidden("mesh::model", "route::http").is_some());
        assert!(forbidden("route::http", "capture::orig_dst").is_none());
        assert!(forbidden("sys::netns", "config").is_some());
    }
}
