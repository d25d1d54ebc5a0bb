//! `model.safetensors.index.json`: the map from tensor name to shard file.

use std::borrow::Cow;
use std::path::Path;

use hashbrown::hash_map::Entry;
use hashbrown::HashMap;

use crate::error::{Error, IndexProblem, Result};
use crate::json::{JResult, Scanner};

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

/// One parsed stretch of `weight_map` members: entries with chunk-local file numbers.
/// File names are numbered through a hash map, so parsing is linear in entries and
/// distinct shard names (an index may name one shard per tensor).
#[derive(Default)]
struct Members<'a> {
    entries: Vec<(Cow<'a, str>, u32)>,
    files: Vec<Cow<'a, str>>,
    numbers: HashMap<Cow<'a, str>, u32>,
    last: usize,
}

impl<'a> Members<'a> {
    /// Members with room for the entries of `bytes` of text (a member takes at least
    /// `MEMBER_MIN` bytes in practice; room not used is address space, never touched).
    fn with_room(bytes: usize) -> Self {
        Members {
            entries: Vec::with_capacity(bytes / MEMBER_MIN),
            ..Members::default()
        }
    }

    /// The number of `file` in this stretch, assigning the next one to a new name.
    fn number(&mut self, file: Cow<'a, str>) -> u32 {
        let next = self.files.len() as u32;
        match self.numbers.entry(file) {
            Entry::Occupied(e) => *e.get(),
            Entry::Vacant(e) => {
                self.files.push(e.key().clone());
                e.insert(next);
                next
            }
        }
    }
}

impl<'a> Members<'a> {
    /// Reads one `"name": "file"` member.
    fn member(&mut self, p: &mut Scanner<'a>) -> JResult<()> {
        let name = p.string()?;
        p.expect_byte(b':')?;
        let file = p.string()?;
        self.add(name, file);
        Ok(())
    }

    fn add(&mut self, name: Cow<'a, str>, file: Cow<'a, str>) {
        // Entries are grouped by shard in practice: check the previous file first.
        if self.files.get(self.last) != Some(&file) {
            self.last = self.number(file) as usize;
        }
        self.entries.push((name, self.last as u32));
    }

    /// Reads `member "," ... member "}"`; returns the position after the `}`.
    fn last_chunk(mut self, mut p: Scanner<'a>) -> JResult<(Self, usize)> {
        loop {
            self.member(&mut p)?;
            match p.peek() {
                Some(b',') => p.expect_byte(b',')?,
                _ => {
                    p.expect_byte(b'}')?;
                    return Ok((self, p.pos()));
                }
            }
        }
    }

    /// Reads `member "," member "," ... member ","` up to the end of the scanner's window.
    fn chunk(mut self, mut p: Scanner<'a>) -> JResult<Self> {
        loop {
            self.member(&mut p)?;
            p.expect_byte(b',')?;
            p.skip_ws();
            if p.at_end() {
                return Ok(self);
            }
        }
    }
}

/// Positions inside the `weight_map` object (which starts at `open`) where it can be cut
/// into `parts` stretches: each is just after a newline, preceded by `,` and followed by
/// `"`. A raw newline cannot occur inside a JSON string, so such a cut is always between
/// two members; the stretches are then parsed independently.
fn split_points(text: &str, open: usize, parts: usize) -> Vec<usize> {
    let b = text.as_bytes();
    let mut cuts = Vec::new();
    for k in 1..parts {
        let target = open + (b.len() - open) * k / parts;
        let Some(nl) = b[target..]
            .iter()
            .position(|&c| c == b'\n')
            .map(|i| target + i)
        else {
            break;
        };
        let before = b[..nl].iter().rposition(|c| !c.is_ascii_whitespace());
        let after = b[nl..]
            .iter()
            .position(|c| !c.is_ascii_whitespace())
            .map(|i| nl + i);
        let ok = before.is_some_and(|i| b[i] == b',') && after.is_some_and(|i| b[i] == b'"');
        if ok && cuts.last().is_none_or(|&c| c < nl) {
            cuts.push(nl + 1);
        }
    }
    cuts
}

/// Parses the members of `weight_map` (the scanner sits on its `{`), in parallel stretches
/// when the document allows it; falls back to one sequential pass on any error so the
/// message is the precise one.
fn parse_weight_map<'a>(
    p: &mut Scanner<'a>,
    text: &'a str,
    pool: Option<&rayon::ThreadPool>,
) -> JResult<Members<'a>> {
    let start = p.pos();
    let open = start + 1;
    let threads = pool.map_or(1, |p| p.current_num_threads());
    let cuts = if threads > 1 && text.len() - open > PARALLEL_MIN {
        split_points(text, open, threads * 2)
    } else {
        vec![]
    };
    if let (Some(pool), false) = (pool, cuts.is_empty()) {
        // Every stretch but the last ends with a `,`; the last one runs to the `}` that
        // closes `weight_map` and tells where that is. All of them are parsed in parallel.
        let mut bounds = vec![open];
        bounds.extend(&cuts);
        bounds.push(text.len());
        let last = bounds.len() - 2;
        let chunks: JResult<Vec<(Members<'a>, usize)>> = pool.install(|| {
            use rayon::prelude::*;
            bounds
                .par_windows(2)
                .enumerate()
                .map(|(k, w)| {
                    let scan = Scanner::window(text, w[0], w[1]);
                    // the first stretch's entries become the merged list: room for all
                    let room = if k == 0 {
                        text.len() - open
                    } else {
                        w[1] - w[0]
                    };
                    let m = Members::with_room(room);
                    if k == last {
                        m.last_chunk(scan)
                    } else {
                        m.chunk(scan).map(|m| (m, w[1]))
                    }
                })
                .collect()
        });
        if let Ok(chunks) = chunks {
            let end = chunks.last().map_or(open, |c| c.1);
            p.seek(end);
            return Ok(merge(chunks.into_iter().map(|c| c.0).collect()));
        }
    }
    let mut m = Members::with_room(text.len() - open);
    p.object(|p, name| {
        let file = p.string()?;
        m.add(name, file);
        Ok(())
    })?;
    Ok(m)
}

/// Bytes per `weight_map` member assumed when reserving room for the entries: a name,
/// a file name and the punctuation (a tensor name and a shard name are rarely shorter).
const MEMBER_MIN: usize = 32;

/// Smallest `weight_map` worth parsing in parallel (bytes).
const PARALLEL_MIN: usize = 1 << 20;

/// Concatenates stretches in order, renumbering their files into one list.
fn merge<'a>(parts: Vec<Members<'a>>) -> Members<'a> {
    let total = parts.iter().map(|p| p.entries.len()).sum::<usize>();
    let mut parts = parts.into_iter();
    let mut out = parts.next().unwrap_or_default();
    out.entries.reserve_exact(total - out.entries.len());
    for part in parts {
        let remap: Vec<u32> = part.files.into_iter().map(|f| out.number(f)).collect();
        out.entries.extend(
            part.entries
                .into_iter()
                .map(|(n, f)| (n, remap[f as usize])),
        );
    }
    out
}

/// Parses an index document. Only `weight_map` is interpreted; `metadata` and any other
/// member is validated as JSON and otherwise ignored. With a `pool`, a large pretty-printed
/// `weight_map` is parsed in parallel stretches.
pub fn parse_index<'a>(
    path: &Path,
    text: &'a str,
    pool: Option<&rayon::ThreadPool>,
) -> Result<WeightMap<'a>> {
    let bad = |reason: String| Error::index(path, None, IndexProblem::Json, reason);
    let mut members: Option<Members<'a>> = None;
    let mut p = Scanner::new(text);
    p.object(|p, key| {
        if key == "weight_map" {
            if members.is_some() {
                return Err(crate::json::JsonError::new(
                    p.pos(),
                    "'weight_map' appears twice",
                ));
            }
            if p.peek() != Some(b'{') {
                return Err(crate::json::JsonError::new(
                    p.pos(),
                    "'weight_map' must be an object",
                ));
            }
            members = Some(parse_weight_map(p, text, pool)?);
            Ok(())
        } else {
            p.skip_value()
        }
    })
    .and_then(|_| p.finish())
    .map_err(|e| bad(format!("malformed index JSON: {e}")))?;
    let Some(Members { entries, files, .. }) = members else {
        return Err(bad("index has no 'weight_map'".into()));
    };
    // Sort the file list and renumber the entries to match.
    let mut order: Vec<usize> = (0..files.len()).collect();
    order.sort_unstable_by(|&a, &b| files[a].cmp(&files[b]));
    let mut rank = vec![0u32; files.len()];
    for (r, &i) in order.iter().enumerate() {
        rank[i] = r as u32;
    }
    let mut map = WeightMap {
        entries,
        files: order.iter().map(|&i| files[i].to_string()).collect(),
    };
    for e in &mut map.entries {
        e.1 = rank[e.1 as usize];
    }
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
        let m = parse_index(Path::new("i.json"), t, None).unwrap();
        assert_eq!(m.entries.len(), 3);
        assert_eq!(m.files, vec!["s1.safetensors", "s2.safetensors"]);
    }

    /// A pretty-printed index like the ones exporters write, large enough to be split.
    fn big_index(n: usize, trailer: &str) -> String {
        let mut t = String::from("{\n  \"metadata\": {\"total_size\": 1},\n  \"weight_map\": {\n");
        for i in 0..n {
            let sep = if i + 1 < n { "," } else { "" };
            t.push_str(&format!(
                "    \"model.layers.{}.mlp.experts.{i}.w\\u0041\": \"model-{:05}.safetensors\"{sep}\n",
                i / 100,
                i * 7 / n
            ));
        }
        t.push_str("  }");
        t.push_str(trailer);
        t.push_str("\n}\n");
        t
    }

    #[test]
    fn parallel_and_sequential_parses_agree() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        for trailer in [
            "",
            ",\n  \"after\": {\n    \"x\": \"y\",\n    \"z\": [1,\n 2]\n  }",
        ] {
            let t = big_index(40_000, trailer);
            assert!(t.len() > PARALLEL_MIN);
            let seq = parse_index(Path::new("i.json"), &t, None).unwrap();
            let par = parse_index(Path::new("i.json"), &t, Some(&pool)).unwrap();
            assert_eq!(seq.entries, par.entries);
            assert_eq!(seq.files, par.files);
            assert_eq!(seq.files.len(), 7);
            assert_eq!(seq.entries[5].0, "model.layers.0.mlp.experts.5.wA");
        }
        // an error anywhere is reported exactly as the sequential parse reports it
        let t = big_index(40_000, "").replacen("\"model-00003.safetensors\",", "3,", 1);
        let seq = parse_index(Path::new("i.json"), &t, None)
            .unwrap_err()
            .to_string();
        let par = parse_index(Path::new("i.json"), &t, Some(&pool))
            .unwrap_err()
            .to_string();
        assert_eq!(seq, par);
        assert!(split_points(&t, 0, 6).len() >= 4);
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
            assert!(parse_index(Path::new("i.json"), t, None).is_err(), "{t}");
        }
    }
}
