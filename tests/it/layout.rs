//! The shape a newcomer can carry, kept: no file in `src/` over 600 lines, and no import cycle
//! anywhere in `src/`: at every level, the modules under one parent form no cycle through their
//! `crate::…`, `super::…` and `self::…` paths (a parent and its own children are one unit; test
//! modules left out).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const MAX_LINES: usize = 600;

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn src() -> (PathBuf, Vec<PathBuf>) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&root, &mut files);
    files.sort();
    (root, files)
}

#[test]
fn no_source_file_is_over_six_hundred_lines() {
    let (root, files) = src();
    let long: Vec<String> = files
        .iter()
        .map(|f| (f, std::fs::read_to_string(f).unwrap().lines().count()))
        .filter(|(_, n)| *n > MAX_LINES)
        .map(|(f, n)| format!("{} ({n} lines)", f.strip_prefix(&root).unwrap().display()))
        .collect();
    assert!(long.is_empty(), "split these by responsibility: {long:?}");
}

/// A module's path from the crate root: `src/reader/format/mod.rs` is `["reader", "format"]`.
type Module = Vec<String>;

fn module_of(rel: &Path) -> Module {
    let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string()).collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib" | "main")) {
        parts.pop();
    }
    parts
}

/// The code with comments, string and character literals blanked (so a doc link or a message
/// naming a module is not an import), and test modules cut off.
fn code_only(text: &str) -> String {
    let text = text.split("#[cfg(test)]\nmod tests").next().unwrap();
    let b = text.as_bytes();
    let mut out = String::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let rest = &text[i..];
        if rest.starts_with("//") {
            let end = rest.find('\n').unwrap_or(rest.len());
            i += end;
        } else if rest.starts_with("/*") {
            let end = rest.find("*/").map_or(rest.len(), |e| e + 2);
            i += end;
            out.push(' ');
        } else if rest.starts_with("r#\"")
            || rest.starts_with("r\"")
            || rest.starts_with("br\"")
            || rest.starts_with("br#\"")
        {
            let start = rest.find('r').unwrap() + 1;
            let hashes = rest[start..].chars().take_while(|c| *c == '#').count();
            let close = format!("\"{}", "#".repeat(hashes));
            let body = start + hashes + 1;
            let end = rest[body..].find(&close).map_or(rest.len(), |e| body + e + close.len());
            i += end;
            out.push_str("\"\"");
        } else if b[i] == b'"' {
            let mut j = i + 1;
            while j < b.len() && b[j] != b'"' {
                j += if b[j] == b'\\' { 2 } else { 1 };
            }
            i = j + 1;
            out.push_str("\"\"");
        } else if b[i] == b'\'' {
            // A character literal ('x', '\n', '\u{..}'), or a lifetime ('a), left as it is.
            let literal = if rest[1..].starts_with('\\') {
                rest[2..].find('\'').map(|e| e + 3)
            } else {
                rest[1..]
                    .chars()
                    .next()
                    .filter(|c| rest[1 + c.len_utf8()..].starts_with('\''))
                    .map(|c| c.len_utf8() + 2)
            };
            match literal {
                Some(n) => {
                    i += n;
                    out.push_str("' '");
                }
                None => {
                    out.push('\'');
                    i += 1;
                }
            }
        } else {
            let c = rest.chars().next().unwrap();
            out.push(c);
            i += c.len_utf8();
        }
    }
    out
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Every path starting at `at` (just after `crate`, `super` or `self` and its `::`), with use
/// groups (`{a::b, c}`) expanded.
fn paths_from(code: &str, at: usize) -> Vec<Vec<String>> {
    fn parse(code: &[char], i: &mut usize) -> Vec<Vec<String>> {
        let skip_space = |i: &mut usize| {
            while *i < code.len() && code[*i].is_whitespace() {
                *i += 1;
            }
        };
        skip_space(i);
        if *i < code.len() && code[*i] == '{' {
            *i += 1;
            let mut all = Vec::new();
            loop {
                skip_space(i);
                if *i >= code.len() || code[*i] == '}' {
                    *i += 1;
                    return all;
                }
                all.extend(parse(code, i));
                skip_space(i);
                if *i < code.len() && code[*i] == ',' {
                    *i += 1;
                }
            }
        }
        let start = *i;
        while *i < code.len() && is_ident(code[*i]) {
            *i += 1;
        }
        let name: String = code[start..*i].iter().collect();
        if name.is_empty() {
            // `*` or something that is not a path: stop here.
            if *i < code.len() && code[*i] == '*' {
                *i += 1;
            }
            return vec![vec![]];
        }
        skip_space(i);
        if code[*i..].starts_with(&[':', ':']) {
            *i += 2;
            parse(code, i)
                .into_iter()
                .map(|mut tail| {
                    tail.insert(0, name.clone());
                    tail
                })
                .collect()
        } else {
            vec![vec![name]]
        }
    }
    let chars: Vec<char> = code[at..].chars().take(4000).collect();
    let mut i = 0;
    parse(&chars, &mut i)
}

/// Module → the modules it names (resolved to the deepest module the path reaches).
fn dependencies() -> BTreeMap<Module, BTreeSet<Module>> {
    let (root, files) = src();
    let modules: BTreeSet<Module> = files.iter().map(|f| module_of(f.strip_prefix(&root).unwrap())).collect();
    let mut deps: BTreeMap<Module, BTreeSet<Module>> = BTreeMap::new();
    for file in &files {
        let rel = file.strip_prefix(&root).unwrap();
        if rel.ends_with("tests.rs") || rel == Path::new("main.rs") {
            continue;
        }
        let me = module_of(rel);
        let code = code_only(&std::fs::read_to_string(file).unwrap());
        let names = deps.entry(me.clone()).or_default();
        for (prefix, base) in
            [("crate::", Vec::new()), ("super::", me[..me.len().saturating_sub(1)].to_vec()), ("self::", me.clone())]
        {
            for (i, _) in code.match_indices(prefix) {
                if i > 0 && code[..i].chars().next_back().is_some_and(is_ident) {
                    continue;
                }
                for tail in paths_from(&code, i + prefix.len()) {
                    let mut path = base.clone();
                    let mut tail = tail.into_iter().peekable();
                    // `super::super::…`
                    while tail.peek().is_some_and(|s| s == "super") {
                        tail.next();
                        path.pop();
                    }
                    path.extend(tail);
                    while !path.is_empty() && !modules.contains(&path) {
                        path.pop();
                    }
                    if path != me {
                        names.insert(path);
                    }
                }
            }
        }
    }
    deps
}

/// Cycles among the modules under one parent: an edge A → B between siblings when anything in
/// A names anything in B.
fn cycles(deps: &BTreeMap<Module, BTreeSet<Module>>) -> Vec<String> {
    // Sibling edges: for a reference from `from` to `to`, the two children of their deepest
    // common ancestor (none when one contains the other).
    let mut edges: BTreeMap<Module, BTreeSet<Module>> = BTreeMap::new();
    for (from, tos) in deps {
        for to in tos {
            let common = from.iter().zip(to).take_while(|(a, b)| a == b).count();
            if common < from.len() && common < to.len() {
                edges.entry(from[..=common].to_vec()).or_default().insert(to[..=common].to_vec());
            }
        }
    }
    let name = |m: &Module| if m.is_empty() { "crate".to_string() } else { m.join("::") };
    let mut found = Vec::new();
    for start in edges.keys() {
        let mut stack: Vec<(Module, Vec<String>)> = vec![(start.clone(), vec![name(start)])];
        let mut seen = BTreeSet::new();
        while let Some((at, path)) = stack.pop() {
            for next in edges.get(&at).into_iter().flatten() {
                if next == start {
                    found.push(format!("{} -> {}", path.join(" -> "), name(next)));
                } else if seen.insert(next.clone()) {
                    let mut longer = path.clone();
                    longer.push(name(next));
                    stack.push((next.clone(), longer));
                }
            }
        }
    }
    found
}

#[test]
fn no_import_cycle_anywhere() {
    let deps = dependencies();
    assert!(deps.len() > 40, "the modules were found: {:?}", deps.keys());
    let nested = deps.keys().filter(|m| m.len() > 1).count();
    assert!(nested > 20, "nested modules were found: {:?}", deps.keys());
    let found = cycles(&deps);
    assert!(found.is_empty(), "import cycles: {found:#?}");
}

/// The checker itself: it sees a cycle between nested siblings, through a use group, and does
/// not take a parent and its child for one.
#[test]
fn the_cycle_check_sees_nested_cycles_and_use_groups() {
    let m = |s: &str| -> Module { s.split("::").map(String::from).collect() };
    let code = code_only(
        "use crate::a::{b::X, c::{self, Y}};\n// crate::z::W\nfn f() { let s = \"crate::q\"; super::d::g(); }\n",
    );
    let got: Vec<Vec<String>> = code.match_indices("crate::").flat_map(|(i, _)| paths_from(&code, i + 7)).collect();
    assert_eq!(got, vec![m("a::b::X"), m("a::c::self"), m("a::c::Y")]);
    assert!(code.contains("super::d::g"));

    let deps = |pairs: &[(&str, &str)]| {
        let mut d: BTreeMap<Module, BTreeSet<Module>> = BTreeMap::new();
        for (a, b) in pairs {
            d.entry(m(a)).or_default().insert(m(b));
        }
        d
    };
    let nested = cycles(&deps(&[("r::framing", "r::format::chafon"), ("r::format::chafon", "r::framing")]));
    assert_eq!(nested, vec!["r::format -> r::framing -> r::format", "r::framing -> r::format -> r::framing"]);
    assert!(cycles(&deps(&[("r", "r::format"), ("r::format", "r")])).is_empty(), "parent and child");
    assert!(cycles(&deps(&[("a::x", "b"), ("b", "a::y")])).len() == 2, "through the top level");
}

/// The string literals of a file's code (normal and raw), test modules included.
fn string_literals(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let b = text.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let rest = &text[i..];
        if rest.starts_with("//") {
            i += rest.find('\n').unwrap_or(rest.len());
        } else if rest.starts_with("r#\"") || rest.starts_with("r\"") {
            let hashes = rest[1..].chars().take_while(|c| *c == '#').count();
            let close = format!("\"{}", "#".repeat(hashes));
            let body = 1 + hashes + 1;
            let end = rest[body..].find(&close).map_or(rest.len() - body, |e| e);
            out.push(rest[body..body + end].to_string());
            i += body + end + close.len();
        } else if b[i] == b'"' && (i == 0 || b[i - 1] != b'\'') {
            let mut j = i + 1;
            while j < b.len() && b[j] != b'"' {
                j += if b[j] == b'\\' { 2 } else { 1 };
            }
            out.push(text[i + 1..j.min(b.len())].to_string());
            i = j + 1;
        } else {
            i += rest.chars().next().unwrap().len_utf8();
        }
    }
    out
}

/// SQL as the store writes it: a statement keyword in capitals.
fn is_sql(literal: &str) -> bool {
    ["SELECT ", "INSERT INTO", "UPDATE ", "DELETE FROM", "PRAGMA ", "CREATE TABLE", "CREATE INDEX", "BEGIN IMMEDIATE"]
        .iter()
        .any(|k| {
            literal.trim_start().starts_with(k)
                || literal.contains(&format!("\n{k}"))
                || literal.contains(&format!(" {k}"))
        })
}

/// Every query lives in `src/store/`: nothing else writes SQL (the watermark rule, the passing
/// state, the schema are said once).
#[test]
fn no_sql_outside_the_store() {
    let (root, files) = src();
    let mut found = Vec::new();
    let mut in_store = 0;
    for file in &files {
        let rel = file.strip_prefix(&root).unwrap();
        let sql: Vec<String> =
            string_literals(&std::fs::read_to_string(file).unwrap()).into_iter().filter(|s| is_sql(s)).collect();
        if rel.starts_with("store") {
            in_store += sql.len();
        } else if !sql.is_empty() {
            found.push(format!("{}: {:?}", rel.display(), sql));
        }
    }
    assert!(in_store > 30, "the store's own queries were found: {in_store}");
    assert!(found.is_empty(), "SQL outside src/store/: {found:#?}");
}
