//! Parsing and validation of one safetensors header.
//!
//! Layout of a safetensors file: an 8-byte little-endian header length `N`, `N` bytes
//! of UTF-8 JSON, then the data section. The JSON maps tensor names to
//! `{"dtype", "shape", "data_offsets": [start, end]}` (offsets relative to the data
//! section) plus an optional `"__metadata__"` object of strings.
//!
//! Validation is at least as strict as the reference implementation: a header length
//! cap, UTF-8, strict JSON, no duplicate keys, known dtypes, checked arithmetic for
//! `numel * dtype_size == end - start`, offsets inside the data section, and tensors
//! that tile the data section exactly (no overlap, no gap, no trailing bytes).

use std::borrow::Cow;
use std::path::Path;
use std::sync::Arc;

use crate::dtype::Dtype;
use crate::error::{Error, HeaderProblem, Result};
use crate::json::{JsonError, Scanner};

/// Largest header accepted, as in the reference implementation (100 MB).
pub const MAX_HEADER_LEN: u64 = 100_000_000;

/// The hash used for tensor names everywhere in this crate: foldhash with a seed drawn
/// once per process (stable within the process, unpredictable across processes, so a
/// crafted checkpoint cannot aim for collisions).
pub fn name_hash(name: &str) -> u64 {
    use std::hash::BuildHasher;
    static STATE: std::sync::OnceLock<foldhash::fast::RandomState> = std::sync::OnceLock::new();
    STATE
        .get_or_init(foldhash::fast::RandomState::default)
        .hash_one(name)
}

/// A tensor name: a range of one string shared by all names of a shard, so a shard's
/// hundreds or thousands of names cost one allocation (and one free), not one each.
/// Dereferences to `str`; cloning shares the string.
#[derive(Clone)]
pub struct Name {
    text: Arc<str>,
    start: u32,
    end: u32,
}

/// Collects names into one string, then hands them out as [`Name`]s sharing it.
#[derive(Default)]
pub struct NameArena {
    text: String,
    ranges: Vec<(u32, u32)>,
}

impl NameArena {
    /// An arena with room for `names` names of `bytes` bytes in all.
    pub fn with_capacity(bytes: usize, names: usize) -> NameArena {
        NameArena {
            text: String::with_capacity(bytes),
            ranges: Vec::with_capacity(names),
        }
    }

    /// Adds a name (the next one handed out by [`NameArena::finish`]).
    pub fn push(&mut self, name: &str) {
        let at = |n: usize| u32::try_from(n).expect("the names of one shard fit in 4 GiB");
        let start = at(self.text.len());
        self.text.push_str(name);
        self.ranges.push((start, at(self.text.len())));
    }

    /// The names, in the order they were pushed.
    pub fn finish(self) -> Vec<Name> {
        let text: Arc<str> = Arc::from(self.text);
        self.ranges
            .into_iter()
            .map(|(start, end)| Name {
                text: text.clone(),
                start,
                end,
            })
            .collect()
    }
}

impl std::ops::Deref for Name {
    type Target = str;
    #[inline]
    fn deref(&self) -> &str {
        // SAFETY: `start..end` is the range a whole `&str` was pushed to in `text`
        // (`NameArena::push`, or all of `text` in `From<&str>`), so it lies inside `text`
        // on character boundaries; `text` is never changed after that.
        unsafe {
            self.text
                .get_unchecked(self.start as usize..self.end as usize)
        }
    }
}

impl From<&str> for Name {
    fn from(s: &str) -> Name {
        Name {
            end: u32::try_from(s.len()).expect("a name fits in 4 GiB"),
            text: Arc::from(s),
            start: 0,
        }
    }
}

impl From<String> for Name {
    fn from(s: String) -> Name {
        Name::from(s.as_str())
    }
}

impl PartialEq for Name {
    fn eq(&self, other: &Name) -> bool {
        **self == **other
    }
}

impl Eq for Name {}

impl PartialEq<str> for Name {
    fn eq(&self, other: &str) -> bool {
        **self == *other
    }
}

impl PartialEq<&str> for Name {
    fn eq(&self, other: &&str) -> bool {
        **self == **other
    }
}

impl std::hash::Hash for Name {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        (**self).hash(h)
    }
}

impl std::fmt::Debug for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&**self, f)
    }
}

impl std::fmt::Display for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&**self, f)
    }
}

impl AsRef<str> for Name {
    fn as_ref(&self) -> &str {
        self
    }
}

impl std::borrow::Borrow<str> for Name {
    fn borrow(&self) -> &str {
        self
    }
}

/// A tensor shape; up to four dims are stored inline (no allocation).
pub type Shape = smallvec::SmallVec<[u64; 4]>;

/// One tensor of a shard. Offsets are relative to the start of the data section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorEntry {
    pub name: Name,
    /// [`name_hash`] of `name`, computed once while parsing (on the parser's thread).
    pub hash: u64,
    pub dtype: Dtype,
    pub shape: Shape,
    pub start: u64,
    pub end: u64,
}

impl TensorEntry {
    pub fn nbytes(&self) -> u64 {
        self.end - self.start
    }

    pub fn numel(&self) -> u64 {
        // Cannot overflow: validated at parse time.
        self.shape.iter().product()
    }
}

/// A parsed, validated header.
#[derive(Debug, Clone, Default)]
pub struct Header {
    /// Tensors sorted by their position in the data section.
    pub tensors: Vec<TensorEntry>,
    /// The `__metadata__` strings, in file order.
    pub metadata: Vec<(String, String)>,
    /// Absolute file offset of the data section (`8 + N`).
    pub data_start: u64,
    /// Length of the data section in bytes.
    pub data_len: u64,
}

/// Reads the length prefix: returns the header length `N` after checking it against
/// the cap and the file length.
pub fn header_len(file: &Path, prefix: &[u8], file_len: u64) -> Result<u64> {
    if file_len < 8 || prefix.len() < 8 {
        return Err(Error::header(
            file,
            None,
            HeaderProblem::TooSmall,
            format!("file is {file_len} bytes, too small for the 8-byte header length"),
        ));
    }
    let n = u64::from_le_bytes(prefix[..8].try_into().expect("8 bytes"));
    if n > MAX_HEADER_LEN {
        return Err(Error::header(
            file,
            None,
            HeaderProblem::TooLarge,
            format!("header length {n} exceeds the {MAX_HEADER_LEN}-byte cap"),
        ));
    }
    if n.checked_add(8).is_none_or(|end| end > file_len) {
        return Err(Error::header(
            file,
            None,
            HeaderProblem::PastEnd,
            format!("header length {n} runs past the end of the {file_len}-byte file"),
        ));
    }
    Ok(n)
}

/// Parses and validates the JSON header `json` of `file`, whose data section holds
/// `data_len` bytes starting at file offset `data_start`.
pub fn parse_header(file: &Path, json: &[u8], data_start: u64, data_len: u64) -> Result<Header> {
    let text = std::str::from_utf8(json).map_err(|e| {
        Error::header(
            file,
            None,
            HeaderProblem::NotUtf8,
            format!("header is not valid UTF-8 (byte {})", e.valid_up_to()),
        )
    })?;
    if !text.starts_with('{') {
        return Err(Error::header(
            file,
            None,
            HeaderProblem::Json,
            "header does not start with '{'",
        ));
    }
    let mut header = Header {
        // room for the entries (an entry takes ~100 bytes of JSON; fewer reallocations)
        tensors: Vec::with_capacity(json.len() / 96),
        data_start,
        data_len,
        ..Header::default()
    };
    let mut problem: Option<Error> = None;
    // Every name of the shard goes to one string; entries hold a shared empty name
    // until it is complete.
    let mut names = NameArena::with_capacity(json.len() / 2, header.tensors.capacity());
    let unnamed = Name::from("");
    let mut p = Scanner::new(text);
    let mut have_metadata = false;
    let parsed = p.object(|p, key| {
        if key == "__metadata__" {
            if std::mem::replace(&mut have_metadata, true) {
                problem = Some(Error::header(
                    file,
                    None,
                    HeaderProblem::DuplicateKey,
                    "'__metadata__' appears twice",
                ));
                return Err(JsonError::new(p.pos(), "duplicate key"));
            }
            return parse_metadata(p, &mut header.metadata, file, &mut problem);
        }
        match parse_entry(p, file, &key, &unnamed) {
            Ok(entry) => {
                names.push(&key);
                header.tensors.push(entry);
                Ok(())
            }
            Err(EntryError::Json(e)) => Err(e),
            Err(EntryError::Invalid(e)) => {
                problem = Some(e);
                Err(JsonError::new(p.pos(), "invalid entry"))
            }
        }
    });
    if let Some(e) = problem {
        return Err(e);
    }
    parsed
        .and_then(|_| p.finish())
        .map_err(|e| json_error(file, &e))?;
    for (t, name) in header.tensors.iter_mut().zip(names.finish()) {
        t.name = name;
    }
    validate_layout(file, &mut header)?;
    check_unique_names(file, &header)?;
    Ok(header)
}

/// Two tensors of one shard must not share a name. The names' hashes go into a table
/// (one probe per tensor); names are compared only where hashes are equal.
fn check_unique_names(file: &Path, h: &Header) -> Result<()> {
    let mut seen: hashbrown::HashTable<(u64, u32)> =
        hashbrown::HashTable::with_capacity(h.tensors.len());
    for (i, t) in h.tensors.iter().enumerate() {
        let twin = seen.find(t.hash, |&(oh, o)| {
            oh == t.hash && h.tensors[o as usize].name == t.name
        });
        if twin.is_some() {
            return Err(Error::header(
                file,
                Some(&t.name),
                HeaderProblem::DuplicateKey,
                "key appears twice in the header",
            ));
        }
        seen.insert_unique(t.hash, (t.hash, i as u32), |&(oh, _)| oh);
    }
    Ok(())
}

fn json_error(file: &Path, e: &JsonError) -> Error {
    let problem = if e.overflow {
        HeaderProblem::Overflow
    } else {
        HeaderProblem::Json
    };
    Error::header(file, None, problem, format!("malformed JSON: {e}"))
}

fn parse_metadata(
    p: &mut Scanner<'_>,
    out: &mut Vec<(String, String)>,
    file: &Path,
    problem: &mut Option<Error>,
) -> Result<(), JsonError> {
    if p.peek() == Some(b'n') {
        // `"__metadata__": null` is what some writers emit for "no metadata".
        return p.skip_value();
    }
    let mut keys = hashbrown::HashSet::new();
    p.object(|p, k| {
        if !keys.insert(k.clone()) {
            *problem = Some(Error::header(
                file,
                None,
                HeaderProblem::DuplicateKey,
                format!("metadata key '{k}' appears twice"),
            ));
            return Err(JsonError::new(p.pos(), "duplicate key"));
        }
        let v = p.string()?;
        out.push((k.into_owned(), v.into_owned()));
        Ok(())
    })
}

enum EntryError {
    Json(JsonError),
    Invalid(Error),
}

impl From<JsonError> for EntryError {
    fn from(e: JsonError) -> Self {
        EntryError::Json(e)
    }
}

/// The layout every safetensors writer emits: `{"dtype":"X","shape":[..],"data_offsets":[a,b]}`
/// with no whitespace. Read directly; `None` (with the scanner rewound) on any deviation,
/// and the general parser takes over.
fn parse_canonical<'a>(p: &mut Scanner<'a>) -> Option<(&'a str, Shape, u64, u64)> {
    let start = p.pos();
    let mut go = || -> Option<(&'a str, Shape, u64, u64)> {
        p.skip_ws();
        if !p.eat(b"{\"dtype\":") {
            return None;
        }
        let dtype = p.plain_string()?;
        if !p.eat(b",\"shape\":[") {
            return None;
        }
        let mut shape = Shape::new();
        if !p.eat(b"]") {
            loop {
                shape.push(p.u64().ok()?);
                if p.eat(b"]") {
                    break;
                }
                if !p.eat(b",") {
                    return None;
                }
            }
        }
        if !p.eat(b",\"data_offsets\":[") {
            return None;
        }
        let a = p.u64().ok()?;
        if !p.eat(b",") {
            return None;
        }
        let b = p.u64().ok()?;
        if !p.eat(b"]}") {
            return None;
        }
        Some((dtype, shape, a, b))
    };
    let out = go();
    if out.is_none() {
        p.seek(start);
    }
    out
}

/// One tensor's entry; its `name` field is `unnamed` (the caller names it).
fn parse_entry(
    p: &mut Scanner<'_>,
    file: &Path,
    name: &str,
    unnamed: &Name,
) -> Result<TensorEntry, EntryError> {
    if let Some((dtype, shape, start, end)) = parse_canonical(p) {
        return validate_entry(file, name, unnamed, dtype, shape, start, end);
    }
    let mut dtype: Option<Cow<'_, str>> = None;
    let mut shape: Option<Shape> = None;
    let mut offsets: Option<(u64, u64)> = None;
    let mut dup: Option<String> = None;
    p.object(|p, field| {
        let already = match field.as_ref() {
            "dtype" => dtype.replace(p.string()?).is_some(),
            "shape" => {
                let mut dims = Shape::new();
                p.array(|p| {
                    dims.push(p.u64()?);
                    Ok(())
                })?;
                shape.replace(dims).is_some()
            }
            "data_offsets" => {
                let mut v = [0u64; 2];
                let mut n = 0usize;
                p.array(|p| {
                    let x = p.u64()?;
                    if n < 2 {
                        v[n] = x;
                    }
                    n += 1;
                    Ok(())
                })?;
                if n != 2 {
                    return Err(JsonError::new(
                        p.pos(),
                        "data_offsets must hold exactly two integers",
                    ));
                }
                offsets.replace((v[0], v[1])).is_some()
            }
            _ => {
                p.skip_value()?;
                false
            }
        };
        if already {
            dup = Some(field.into_owned());
        }
        Ok(())
    })?;
    let invalid = |problem, reason: String| {
        EntryError::Invalid(Error::header(file, Some(name), problem, reason))
    };
    if let Some(f) = dup {
        return Err(invalid(
            HeaderProblem::DuplicateKey,
            format!("field '{f}' appears twice"),
        ));
    }
    let (Some(dtype), Some(shape), Some((start, end))) = (dtype, shape, offsets) else {
        return Err(invalid(
            HeaderProblem::Json,
            "entry needs 'dtype', 'shape' and 'data_offsets'".into(),
        ));
    };
    validate_entry(file, name, unnamed, &dtype, shape, start, end)
}

fn validate_entry(
    file: &Path,
    name: &str,
    unnamed: &Name,
    dtype: &str,
    shape: Shape,
    start: u64,
    end: u64,
) -> Result<TensorEntry, EntryError> {
    let invalid = |problem, reason: String| {
        EntryError::Invalid(Error::header(file, Some(name), problem, reason))
    };
    let Some(dt) = Dtype::parse(dtype) else {
        return Err(invalid(
            HeaderProblem::UnknownDtype,
            format!("unknown dtype '{dtype}'"),
        ));
    };
    // every dimension must be an index torch and numpy can hold (i64), even when another
    // dimension is zero and the product fits
    if let Some(d) = shape.iter().find(|&&d| d > i64::MAX as u64) {
        return Err(invalid(
            HeaderProblem::Overflow,
            format!("dimension {d} of shape {shape:?} exceeds 2^63 - 1"),
        ));
    }
    let nbytes = shape
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .and_then(|n| n.checked_mul(dt.size()));
    let Some(nbytes) = nbytes else {
        return Err(invalid(
            HeaderProblem::Overflow,
            format!("shape {shape:?} of {dt} overflows 64-bit byte count"),
        ));
    };
    if end < start {
        return Err(invalid(
            HeaderProblem::OutOfBounds,
            format!("data_offsets [{start}, {end}] are reversed"),
        ));
    }
    if end - start != nbytes {
        return Err(invalid(
            HeaderProblem::ShapeBytesMismatch,
            format!(
                "shape {shape:?} of {dt} needs {nbytes} bytes but data_offsets [{start}, {end}] span {}",
                end - start
            ),
        ));
    }
    Ok(TensorEntry {
        name: unnamed.clone(),
        hash: name_hash(name),
        dtype: dt,
        shape,
        start,
        end,
    })
}

/// Sorts tensors by offset and checks they tile `[0, data_len)` exactly.
fn validate_layout(file: &Path, h: &mut Header) -> Result<()> {
    if let Some(t) = h.tensors.iter().find(|t| t.end > h.data_len) {
        return Err(Error::header(
            file,
            Some(&t.name),
            HeaderProblem::OutOfBounds,
            format!(
                "data_offsets [{}, {}] end past the {}-byte data section",
                t.start, t.end, h.data_len
            ),
        ));
    }
    // (usually in order already: writers put the header in data order)
    if !h.tensors.is_sorted_by_key(|t| (t.start, t.end)) {
        h.tensors.sort_unstable_by_key(|t| (t.start, t.end));
    }
    let mut covered = 0u64;
    let mut prev: Option<&TensorEntry> = None;
    for t in &h.tensors {
        if t.start < covered {
            let other = prev.map(|p| &*p.name).unwrap_or("?");
            return Err(Error::header(
                file,
                Some(&t.name),
                HeaderProblem::Overlap,
                format!(
                    "bytes [{}, {}) overlap tensor '{other}' which ends at {covered}",
                    t.start, t.end
                ),
            ));
        }
        if t.start > covered {
            return Err(Error::header(
                file,
                Some(&t.name),
                HeaderProblem::Gap,
                format!(
                    "bytes [{covered}, {}) of the data section belong to no tensor",
                    t.start
                ),
            ));
        }
        covered = t.end;
        prev = Some(t);
    }
    if covered != h.data_len {
        return Err(Error::header(
            file,
            None,
            HeaderProblem::Gap,
            format!(
                "bytes [{covered}, {}) at the end of the data section belong to no tensor",
                h.data_len
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
