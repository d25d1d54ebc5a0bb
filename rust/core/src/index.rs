//! `model.safetensors.index.json`: the map from tensor name to shard file.

use std::borrow::Cow;
use std::path::Path;

use crate::error::{Error, IndexProblem, Result};
use crate::json::Scanner;

pub const INDEX_FILE: &str = "model.safetensors.index.json";
pub const SINGLE_FILE: &str = "model.safetensors";

/// The parsed `weight_map`, borrowing from the index text.
#[derive(Debug, Default)]
pub struct WeightMap<'a> {
    /// `(tensor name, position in `files`)` in document order.
    pub entries: Vec<(Cow<'a, str>, u32)>,
    /// Distinct shard file names, sorted.
    pub files: Vec<String>,
}

impl WeightMap<'_> {
    /// The first tensor the index maps to `files[file]` (for error messages).
    pub fn first_tensor_of(&self, file: usize) -> Option<&str> {
        self.entries
            .iter()
            .find(|(_, f)| *f as usize == file)
            .map(|(n, _)| n.as_ref())
    }
}

/// Parses an index document. Only `weight_map` is interpreted; `metadata` and any other
/// member is validated as JSON and otherwise ignored.
pub fn parse_index<'a>(path: &Path, text: &'a str) -> Result<WeightMap<'a>> {
    let bad = |reason: String| Error::index(path, None, IndexProblem::Json, reason);
    let mut map = WeightMap::default();
    let mut have_map = false;
    // Distinct file names in order of first appearance; entries are grouped by shard in
    // practice, so the previous entry's file is checked before searching.
    let mut files: Vec<Cow<'a, str>> = Vec::new();
    let mut last = usize::MAX;
    let mut p = Scanner::new(text);
    p.object(|p, key| {
        if key == "weight_map" {
            if have_map {
                return Err(crate::json::JsonError {
                    pos: p.pos(),
                    msg: "'weight_map' appears twice",
                });
            }
            have_map = true;
            p.object(|p, name| {
                let file = p.string()?;
                if files.get(last) != Some(&file) {
                    last = files.iter().position(|f| *f == file).unwrap_or_else(|| {
                        files.push(file);
                        files.len() - 1
                    });
                }
                map.entries.push((name, last as u32));
                Ok(())
            })
        } else {
            p.skip_value()
        }
    })
    .and_then(|_| p.finish())
    .map_err(|e| bad(format!("malformed index JSON: {e}")))?;
    if !have_map {
        return Err(bad("index has no 'weight_map'".into()));
    }
    // Sort the file list and renumber the entries to match.
    let mut order: Vec<usize> = (0..files.len()).collect();
    order.sort_unstable_by(|&a, &b| files[a].cmp(&files[b]));
    let mut rank = vec![0u32; files.len()];
    for (r, &i) in order.iter().enumerate() {
        rank[i] = r as u32;
    }
    for e in &mut map.entries {
        e.1 = rank[e.1 as usize];
    }
    let files: Vec<String> = order.iter().map(|&i| files[i].to_string()).collect();
    map.files = files;
    for (i, f) in map.files.iter().enumerate() {
        if !is_plain_file_name(f) {
            return Err(Error::index(
                path,
                map.first_tensor_of(i),
                IndexProblem::MissingShard,
                format!("shard name '{f}' is not a plain file name in the index's directory"),
            ));
        }
    }
    Ok(map)
}

/// A shard must live beside the index: no separators, no `..`, not empty.
fn is_plain_file_name(f: &str) -> bool {
    !f.is_empty()
        && f != "."
        && f != ".."
        && !f.contains('/')
        && !f.contains('\\')
        && !f.contains('\0')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_weight_map_and_ignores_metadata() {
        let t = r#"{"metadata": {"total_size": 12, "x": [1, {"y": null}]},
                    "weight_map": {"a": "s2.safetensors", "b": "s1.safetensors", "c": "s2.safetensors"}}"#;
        let m = parse_index(Path::new("i.json"), t).unwrap();
        assert_eq!(m.entries.len(), 3);
        assert_eq!(m.files, vec!["s1.safetensors", "s2.safetensors"]);
    }

    #[test]
    fn rejects_bad_indexes() {
        for t in [
            r#"{"metadata": {}}"#,
            r#"{"weight_map": {"a": 1}}"#,
            r#"{"weight_map": {"a": "../x.safetensors"}}"#,
            r#"{"weight_map": {"a": "/abs.safetensors"}}"#,
            r#"{"weight_map": {}, "weight_map": {}}"#,
            r#"{"weight_map": {"a": "x"}"#,
            "",
        ] {
            assert!(parse_index(Path::new("i.json"), t).is_err(), "{t}");
        }
    }
}
