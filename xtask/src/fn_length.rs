//! No function over 120 lines in the agent, the kernel programs or the
//! task runner, outside the places the architecture allows long ones: the
//! validation of the agent's settings and the model's per-kind compile
//! functions, which are one field after another. Counted from the `fn`
//! line to its closing brace, in non-test code.

use std::path::Path;

use anyhow::{bail, Result};

const LIMIT: usize = 120;

/// (file, function) pairs allowed to be longer.
const ALLOWED: [(&str, &str); 2] =
    [("redirector-user/src/config.rs", "validate"), ("redirector-user/src/mesh/model.rs", "add_")];

/// Check every `.rs` file under each of `dirs` (relative to `root`).
pub fn check(root: &Path, dirs: &[&str]) -> Result<usize> {
    let mut long = Vec::new();
    let mut count = 0;
    for dir in dirs {
        let mut stack = vec![root.join(dir)];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d)? {
                let p = e?.path();
                if p.is_dir() {
                    stack.push(p);
                } else if p.extension().is_some_and(|x| x == "rs") && !p.ends_with("tests.rs") {
                    let rel = p.strip_prefix(root).unwrap_or(&p).display().to_string();
                    let text = std::fs::read_to_string(&p)?;
                    for (name, lines) in functions(text.split("#[cfg(test)]").next().unwrap_or_default()) {
                        count += 1;
                        let allowed = ALLOWED.iter().any(|(f, n)| rel == *f && name.starts_with(n));
                        if lines > LIMIT && !allowed {
                            long.push(format!("{rel}: fn {name} is {lines} lines"));
                        }
                    }
                }
            }
        }
    }
    if !long.is_empty() {
        bail!(
            "functions over {LIMIT} lines:\n  {}\nfix: split decision, I/O and accounting into functions of their own",
            long.join("\n  ")
        );
    }
    Ok(count)
}

/// Each function's name and length in lines, by brace counting (strings
/// and comments are not parsed: a rough count, enough for a limit).
fn functions(code: &str) -> Vec<(String, usize)> {
    let lines: Vec<&str> = code.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let t = line.trim_start();
        let Some(rest) = ["pub(crate) ", "pub(super) ", "pub ", ""]
            .iter()
            .find_map(|v| t.strip_prefix(v))
            .map(|r| r.trim_start_matches("async ").trim_start_matches("const ").trim_start_matches("unsafe "))
            .and_then(|r| r.strip_prefix("fn "))
        else {
            continue;
        };
        let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
        let (mut depth, mut opened) = (0i32, false);
        for (j, l) in lines.iter().enumerate().skip(i) {
            if !opened && l.trim_end().ends_with(';') {
                break;
            }
            for c in l.chars() {
                match c {
                    '{' => {
                        depth += 1;
                        opened = true;
                    }
                    '}' => depth -= 1,
                    _ => {}
                }
            }
            if opened && depth == 0 {
                out.push((name.clone(), j - i + 1));
                break;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn functions_are_measured_from_fn_to_the_closing_brace() {
        let code =
            "pub fn a() {\n    x();\n}\nfn decl();\nasync fn b(\n    y: u8,\n) -> u8 {\n    if y { 1 } else { 2 }\n}\n";
        assert_eq!(functions(code), vec![("a".to_string(), 3), ("b".to_string(), 5)]);
    }
}
