//! A whole checkpoint: the shards (opened and validated in parallel), the name table
//! and the cross-checks between an index and its shards.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use hashbrown::HashTable;
use rayon::prelude::*;

use crate::error::{Error, IndexProblem, Result};
use crate::header::{name_hash, Name, NameArena, TensorEntry};
use crate::index::{parse_index, INDEX_FILE, SINGLE_FILE};
use crate::shard::Shard;
use crate::threads;

/// `(prefix up to "experts.", "gate_up_proj" | "down_proj", per-expert suffix)` for a
/// tensor in transformers' fused expert layout.
fn fused_expert_name(name: &str) -> Option<(&str, &'static str, &'static str)> {
    // Suffix tests only (no substring search): this runs on every tensor name at open.
    const SUFFIXES: [(&str, &str); 6] = [
        (".weight_scale_inv", "weight_scale_inv"),
        ("_scale_inv", "weight_scale_inv"),
        (".weight_scale", "weight_scale"),
        ("_scale", "weight_scale"),
        (".weight", "weight"),
        ("", "weight"),
    ];
    let (stem, suffix) = SUFFIXES.iter().find_map(|&(s, kind)| {
        let stem = name.strip_suffix(s)?;
        stem.ends_with("_proj").then_some((stem, kind))
    })?;
    let (base, proj) = if let Some(b) = stem.strip_suffix("experts.gate_up_proj") {
        (b, "gate_up_proj")
    } else {
        (stem.strip_suffix("experts.down_proj")?, "down_proj")
    };
    if !(base.is_empty() || base.ends_with('.')) {
        return None; // `shared_experts.` is not `experts.`
    }
    Some((base, proj, suffix))
}

#[cfg(test)]
#[test]
fn fused_expert_names() {
    assert_eq!(
        fused_expert_name("model.layers.1.mlp.experts.gate_up_proj"),
        Some(("model.layers.1.mlp.", "gate_up_proj", "weight"))
    );
    assert_eq!(
        fused_expert_name("model.layers.1.mlp.experts.down_proj_scale_inv"),
        Some(("model.layers.1.mlp.", "down_proj", "weight_scale_inv"))
    );
    assert_eq!(
        fused_expert_name("model.layers.1.mlp.shared_experts.down_proj.weight"),
        None
    );
    assert_eq!(
        fused_expert_name("model.layers.1.mlp.experts.0.down_proj.weight"),
        None
    );
    assert_eq!(
        fused_expert_name("experts.down_proj.weight_scale"),
        Some(("", "down_proj", "weight_scale"))
    );
    assert_eq!(
        fused_expert_name("m.experts.gate_up_proj_scale_inv"),
        Some(("m.", "gate_up_proj", "weight_scale_inv"))
    );
    for other in [
        "m.experts.gate_up_proj.bias",
        "m.experts.up_proj",
        "m.experts.down_proj.weight_packed",
        "m.experts.down_proj_weight",
        "m.xexperts.down_proj",
        "m.experts.gate_up_proj.weight_scale_inv.x",
    ] {
        assert_eq!(fused_expert_name(other), None, "{other}");
    }
}

/// Where a tensor lives: shard number and position in that shard's (offset-sorted) table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TensorId {
    pub shard: u32,
    pub index: u32,
}

/// Seconds spent in each stage of [`Checkpoint::open`].
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenTimings {
    /// Mapping and parsing the index.
    pub index: f64,
    /// Opening, parsing and validating every shard header (in parallel).
    pub shards: f64,
    /// Building the name table (and finding tensors stored twice).
    pub names: f64,
    /// Cross-checking the index against the shards.
    pub cross_check: f64,
    pub total: f64,
}

#[derive(Debug)]
pub struct Checkpoint {
    /// Per-stage timings of the open that produced this checkpoint.
    pub timings: OpenTimings,
    /// The directory the checkpoint was opened from, if any.
    pub root: Option<PathBuf>,
    /// The index file, if the checkpoint has one.
    pub index_path: Option<PathBuf>,
    /// `config.json` beside the index or in the directory, as text.
    pub config_json: Option<String>,
    pub shards: Vec<Shard>,
    names: NameTable,
}

/// Name -> [`TensorId`] over the names stored in the shard headers (no copies). Each
/// slot keeps the name's hash, so probing compares integers and touches a name only on
/// a real match. Large tables are split by hash into parts built in parallel (each part
/// small enough to stay in cache while it is filled).
#[derive(Default)]
struct NameTable {
    parts: Vec<HashTable<(u64, TensorId)>>,
    len: usize,
}

impl std::fmt::Debug for NameTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "NameTable({} names in {} parts)",
            self.len,
            self.parts.len()
        )
    }
}

fn entry(shards: &[Shard], id: TensorId) -> &TensorEntry {
    &shards[id.shard as usize].header.tensors[id.index as usize]
}

/// Fewest names worth building a table from in parallel.
const PARALLEL_NAMES: usize = 1 << 14;

/// The part of a name with hash `h` among `parts` (a power of two). Uses bits that
/// hashbrown uses neither for the bucket (low bits) nor for the control byte (top 7).
fn part_of(h: u64, parts: usize) -> usize {
    (h >> 40) as usize & (parts - 1)
}

/// Inserts `(hash, id)` pairs in order; returns the first name seen twice as
/// `(earlier, later)`.
fn fill(
    t: &mut HashTable<(u64, TensorId)>,
    shards: &[Shard],
    items: impl Iterator<Item = (u64, TensorId)>,
) -> std::result::Result<(), (TensorId, TensorId)> {
    for (h, id) in items {
        let name = &entry(shards, id).name;
        if let Some(&(_, prev)) = t.find(h, |&(oh, o)| oh == h && entry(shards, o).name == *name) {
            return Err((prev, id));
        }
        t.insert_unique(h, (h, id), |&(oh, _)| oh);
    }
    Ok(())
}

impl NameTable {
    fn find(&self, shards: &[Shard], name: &str) -> Option<TensorId> {
        let h = name_hash(name);
        self.parts[part_of(h, self.parts.len())]
            .find(h, |&(oh, id)| oh == h && &*entry(shards, id).name == name)
            .map(|&(_, id)| id)
    }

    fn len(&self) -> usize {
        self.len
    }

    /// Inserts every tensor of every shard; returns the first name (in shard order)
    /// found twice. With `parallel` and many names, the parts are built in parallel in
    /// the current rayon pool (the caller installs its own).
    fn build(
        shards: &[Shard],
        parallel: bool,
    ) -> std::result::Result<NameTable, (TensorId, TensorId)> {
        let ids = |s: usize| {
            shards[s]
                .header
                .tensors
                .iter()
                .enumerate()
                .map(move |(i, e)| {
                    let id = TensorId {
                        shard: s as u32,
                        index: i as u32,
                    };
                    (e.hash, id)
                })
        };
        let len: usize = shards.iter().map(|s| s.header.tensors.len()).sum();
        let threads = rayon::current_num_threads();
        if !(parallel && threads > 1 && len >= PARALLEL_NAMES) {
            let mut t = HashTable::with_capacity(len);
            fill(&mut t, shards, (0..shards.len()).flat_map(ids))?;
            return Ok(NameTable {
                parts: vec![t],
                len,
            });
        }
        let n = (threads * 4).next_power_of_two().min(64);
        {
            // Each shard's (hash, id) pairs sorted into the parts, then each part filled
            // from every shard in shard order (so "first duplicate" means what it does
            // sequentially).
            let buckets: Vec<Vec<Vec<(u64, TensorId)>>> = (0..shards.len())
                .into_par_iter()
                .map(|s| {
                    let per = shards[s].header.tensors.len() / n + 16;
                    let mut b = vec![Vec::with_capacity(per); n];
                    ids(s).for_each(|(h, id)| b[part_of(h, n)].push((h, id)));
                    b
                })
                .collect();
            let parts: Vec<_> = (0..n)
                .into_par_iter()
                .map(|p| {
                    let cap = buckets.iter().map(|b| b[p].len()).sum();
                    let mut t = HashTable::with_capacity(cap);
                    fill(
                        &mut t,
                        shards,
                        buckets.iter().flat_map(|b| b[p].iter().copied()),
                    )
                    .map(|()| t)
                })
                .collect();
            let mut tables = Vec::with_capacity(n);
            let mut first: Option<(TensorId, TensorId)> = None;
            for part in parts {
                match part {
                    Ok(t) => tables.push(t),
                    Err((a, b)) => {
                        if first.is_none_or(|(_, f)| (b.shard, b.index) < (f.shard, f.index)) {
                            first = Some((a, b));
                        }
                    }
                }
            }
            match first {
                Some(dup) => Err(dup),
                None => Ok(NameTable { parts: tables, len }),
            }
        }
    }
}

/// Maps a small text file read-only (an empty file maps to nothing).
fn map_text_file(path: &Path) -> Result<Option<memmap2::Mmap>> {
    let (file, meta) = crate::shard::open_regular(path)?;
    let len = meta.len();
    if len == 0 {
        return Ok(None);
    }
    // SAFETY: a read-only private map of a file we only read during `open`. If another
    // process truncated the file during that window, reads could fault; index files are
    // written once by the exporter and are small, which makes this an accepted risk
    // (documented in README "Guarantees").
    let map = unsafe {
        memmap2::MmapOptions::new()
            .populate()
            .map_copy_read_only(&file)
    }
    .map_err(|e| Error::io(path, e))?;
    Ok(Some(map))
}

fn text_of<'a>(path: &Path, map: &'a Option<memmap2::Mmap>) -> Result<&'a str> {
    let bytes: &[u8] = map.as_deref().unwrap_or(&[]);
    std::str::from_utf8(bytes).map_err(|e| {
        Error::index(
            path,
            None,
            IndexProblem::Json,
            format!("index is not valid UTF-8 (byte {})", e.valid_up_to()),
        )
    })
}

/// What a user path resolves to before anything is parsed.
struct Layout {
    root: Option<PathBuf>,
    index: Option<PathBuf>,
    shards: Vec<PathBuf>,
}

fn resolve_layout(paths: &[PathBuf]) -> Result<Layout> {
    let first = match paths {
        [] => {
            return Err(Error::InvalidArgument {
                reason: "no checkpoint path given".into(),
            })
        }
        [one] => one,
        many => {
            for p in many {
                let m = std::fs::metadata(p).map_err(|e| Error::io(p, e))?;
                if m.is_dir() {
                    return Err(Error::Unsupported {
                        file: p.clone(),
                        reason: "a list of paths must name shard files, not directories".into(),
                    });
                }
            }
            return Ok(Layout {
                root: None,
                index: None,
                shards: many.to_vec(),
            });
        }
    };
    let meta = std::fs::metadata(first).map_err(|e| Error::io(first, e))?;
    if meta.is_dir() {
        let index = first.join(INDEX_FILE);
        if index.is_file() {
            return Ok(Layout {
                root: Some(first.clone()),
                index: Some(index),
                shards: vec![],
            });
        }
        let single = first.join(SINGLE_FILE);
        if single.is_file() {
            return Ok(Layout {
                root: Some(first.clone()),
                index: None,
                shards: vec![single],
            });
        }
        // No index and no single file: a folder of shards, sorted by name (the shard
        // list path cross-checks them for duplicates).
        let mut shards: Vec<PathBuf> = std::fs::read_dir(first)
            .map_err(|e| Error::io(first, e))?
            .filter_map(|d| d.ok().map(|d| d.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors") && p.is_file())
            .collect();
        if shards.is_empty() {
            return Err(Error::NotFound {
                file: first.clone(),
                looked_for: Some(format!(
                    "no checkpoint here: looked for {INDEX_FILE}, {SINGLE_FILE} or *.safetensors shards"
                )),
            });
        }
        shards.sort();
        return Ok(Layout {
            root: Some(first.clone()),
            index: None,
            shards,
        });
    }
    let is_index = first
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.ends_with(".index.json"));
    if is_index {
        return Ok(Layout {
            root: first.parent().map(Path::to_path_buf),
            index: Some(first.clone()),
            shards: vec![],
        });
    }
    Ok(Layout {
        root: None,
        index: None,
        shards: vec![first.clone()],
    })
}

impl Checkpoint {
    /// Opens a checkpoint: a directory (with an index or a single `model.safetensors`),
    /// an index file, a single shard, or a list of shard files. Every shard is mapped and
    /// its header parsed and validated in parallel on `threads` threads.
    pub fn open(paths: &[PathBuf], threads: Option<usize>) -> Result<Checkpoint> {
        let start = std::time::Instant::now();
        let mut timings = OpenTimings::default();
        let mut lap = start;
        let mut stage = |slot: &mut f64| {
            let now = std::time::Instant::now();
            *slot = (now - lap).as_secs_f64();
            lap = now;
        };
        let pool = threads::pool(threads)?;
        let mut layout = resolve_layout(paths)?;
        // The index is mapped, not read: its pages come from the page cache without
        // being copied into fresh (zeroed, faulted-in) memory.
        let index_map = match &layout.index {
            Some(p) => Some(map_text_file(p)?),
            None => None,
        };
        let index = match (&layout.index, &index_map) {
            (Some(p), Some(m)) => Some(parse_index(p, text_of(p, m)?, Some(&pool))?),
            (Some(p), None) => Some(parse_index(p, "", None)?),
            _ => None,
        };
        if let (Some(ix), Some(ip)) = (&index, &layout.index) {
            let dir = ip.parent().unwrap_or(Path::new("."));
            for (i, f) in ix.files.iter().enumerate() {
                let path = dir.join(f);
                if !path.is_file() {
                    return Err(Error::index(
                        &path,
                        ix.first_tensor_of(i),
                        IndexProblem::MissingShard,
                        format!("shard named by {} does not exist", ip.display()),
                    ));
                }
                layout.shards.push(path);
            }
        }
        stage(&mut timings.index);
        let shards: Vec<Shard> = pool.install(|| {
            layout
                .shards
                .par_iter()
                .map(|p| Shard::open(p))
                .collect::<Result<Vec<_>>>()
        })?;
        stage(&mut timings.shards);
        let names = pool
            .install(|| NameTable::build(&shards, true))
            .map_err(|(a, b)| {
                let name = &entry(&shards, a).name;
                let file = &shards[b.shard as usize].path;
                Error::index(
                    layout.index.as_deref().unwrap_or(file),
                    Some(name),
                    IndexProblem::DuplicateTensor,
                    format!(
                        "stored in two shards: {} and {}",
                        shards[a.shard as usize].path.display(),
                        file.display()
                    ),
                )
            })?;
        stage(&mut timings.names);
        let config_dir = layout.root.clone();
        let ckpt = Checkpoint {
            timings,
            root: layout.root,
            index_path: layout.index,
            config_json: None,
            shards,
            names,
        };
        if let Some(ix) = &index {
            ckpt.check_index(ix, &pool)?;
        }
        drop(index);
        stage(&mut timings.cross_check);
        let config_json = match config_dir.map(|d| d.join("config.json")) {
            Some(c) if c.is_file() => {
                Some(std::fs::read_to_string(&c).map_err(|e| Error::io(&c, e))?)
            }
            _ => None,
        };
        let mut ckpt = Checkpoint {
            config_json,
            timings,
            ..ckpt
        };
        pool.install(|| ckpt.split_fused_experts())?;
        ckpt.timings.total = start.elapsed().as_secs_f64();
        Ok(ckpt)
    }

    /// A checkpoint of tensors handed over in memory, read in place (no file, no copy):
    /// what `update_from_tensors` plans against. `label` stands for the file in errors.
    /// Names must be unique; transformers' fused expert tensors are split like a file's.
    ///
    /// # Safety
    /// As [`Shard::from_memory`]: every region stays valid and unchanged until the
    /// checkpoint is released ([`Checkpoint::release`]) or dropped.
    pub unsafe fn from_memory(
        label: &str,
        tensors: Vec<crate::shard::MemTensor>,
        keep: Box<dyn std::any::Any + Send + Sync>,
        on_device: bool,
    ) -> Result<Checkpoint> {
        // SAFETY: forwarded to our caller (see above).
        let shards = vec![unsafe { Shard::from_memory(label, tensors, keep, on_device)? }];
        let names = NameTable::build(&shards, false).map_err(|(a, _)| Error::InvalidArgument {
            reason: format!("{label}: tensor '{}' given twice", entry(&shards, a).name),
        })?;
        let mut ckpt = Checkpoint {
            timings: OpenTimings::default(),
            root: None,
            index_path: None,
            config_json: None,
            shards,
            names,
        };
        ckpt.split_fused_experts()?;
        Ok(ckpt)
    }

    /// Lets go of the memory of a [`Checkpoint::from_memory`] checkpoint (later reads
    /// fail; names, dtypes and shapes stay for plans built against it).
    pub fn release(&self) {
        self.shards.iter().for_each(Shard::release);
    }

    /// transformers' fused expert layout (`save_original_format=False`) holds all experts
    /// of a layer in one 3-D tensor: `mlp.experts.gate_up_proj` `[E, 2I, H]` (each
    /// expert's gate rows, then its up rows), `mlp.experts.down_proj` `[E, H, I]`, and
    /// for FP8 `..._scale_inv` `[E, rows/br, cols/bc]`. Each such tensor is presented as
    /// the per-expert tensors of the original layout (`experts.{e}.gate_proj.weight`, ...),
    /// views of the same bytes, so every rule, the planner, hashing and updates see one
    /// naming. Returns how many fused tensors were split.
    pub fn split_fused_experts(&mut self) -> Result<usize> {
        let mut split = 0;
        // (one name scan per shard; on many shards in parallel, in the caller's pool)
        let has_fused = |s: &Shard| {
            s.header
                .tensors
                .iter()
                .any(|e| fused_expert_name(&e.name).is_some())
        };
        let fused: Vec<bool> = if self.shards.len() > 1 {
            self.shards.par_iter().map(has_fused).collect()
        } else {
            self.shards.iter().map(has_fused).collect()
        };
        for (shard, fused) in self.shards.iter_mut().zip(fused) {
            let path = shard.path.clone();
            let tensors = &mut shard.header.tensors;
            if !fused {
                continue;
            }
            let mut out = Vec::with_capacity(tensors.len());
            // the new per-expert names share one string: (position in `out`, name)
            let mut names = NameArena::default();
            let mut named = Vec::new();
            let unnamed = Name::from("");
            let mut name = String::new();
            for e in tensors.drain(..) {
                let Some((base, proj, suffix)) = fused_expert_name(&e.name) else {
                    out.push(e);
                    continue;
                };
                let bad = |why: String| Error::Unsupported {
                    file: path.clone(),
                    reason: format!(
                        "tensor '{}' (transformers' fused expert layout): {why}",
                        e.name
                    ),
                };
                if e.shape.len() != 3 || e.shape[0] == 0 {
                    return Err(bad(format!(
                        "expected [experts, rows, cols], found {:?}",
                        e.shape.as_slice()
                    )));
                }
                let (n, rows, cols) = (e.shape[0], e.shape[1], e.shape[2]);
                let parts: &[&str] = if proj == "gate_up_proj" {
                    &["gate_proj", "up_proj"]
                } else {
                    &["down_proj"]
                };
                let k = parts.len() as u64;
                if rows % k != 0 {
                    return Err(bad(format!(
                        "{rows} rows cannot be split into gate and up halves (a block straddles them)"
                    )));
                }
                let part_rows = rows / k;
                let part_bytes = part_rows * cols * e.dtype.size();
                for x in 0..n {
                    for (j, part) in parts.iter().enumerate() {
                        name.clear();
                        write!(name, "{base}experts.{x}.{part}.{suffix}").expect("to a String");
                        names.push(&name);
                        named.push(out.len());
                        let start = e.start + (x * k + j as u64) * part_bytes;
                        out.push(TensorEntry {
                            hash: name_hash(&name),
                            name: unnamed.clone(),
                            dtype: e.dtype,
                            shape: [part_rows, cols].into_iter().collect(),
                            start,
                            end: start + part_bytes,
                        });
                    }
                }
                split += 1;
            }
            for (at, name) in named.into_iter().zip(names.finish()) {
                out[at].name = name;
            }
            *tensors = out;
        }
        if split > 0 {
            self.names = NameTable::build(&self.shards, rayon::current_thread_index().is_some()).map_err(|(a, _)| Error::Unsupported {
                file: self.display_path(),
                reason: format!(
                    "tensor '{}' is stored both per expert and in transformers' fused expert layout",
                    entry(&self.shards, a).name
                ),
            })?;
        }
        Ok(split)
    }

    /// Every index entry must be in the shard it names, and every shard tensor must be
    /// listed (exactly once) in the index. The entries are grouped by the shard they
    /// name and each shard is checked against a table of its own names (small enough to
    /// stay in cache), shards in parallel. Of several problems, the one reported is the
    /// first in index order, then the first unlisted tensor in shard order.
    fn check_index(
        &self,
        ix: &crate::index::WeightMap<'_>,
        pool: &rayon::ThreadPool,
    ) -> Result<()> {
        let index_path = self.index_path.as_deref().expect("index present");
        // Counting sort of the entries by shard (document order kept within a shard).
        // Shards were opened in the order of the index's sorted file list.
        let mut bounds = vec![0usize; self.shards.len() + 1];
        for (_, f) in &ix.entries {
            bounds[*f as usize + 1] += 1;
        }
        for s in 0..self.shards.len() {
            bounds[s + 1] += bounds[s];
        }
        let mut next = bounds.clone();
        let mut by_shard = vec![0u32; ix.entries.len()];
        for (k, (_, f)) in ix.entries.iter().enumerate() {
            by_shard[next[*f as usize]] = k as u32;
            next[*f as usize] += 1;
        }
        // Per shard: the first bad entry (its position in the index) or the first
        // tensor the index does not list.
        enum Problem {
            Entry(u32, Error),
            Unlisted(usize),
        }
        let check_shard = |s: usize| -> Option<Problem> {
            let tensors = &self.shards[s].header.tensors;
            let mut local: HashTable<(u64, u32)> = HashTable::with_capacity(tensors.len());
            for (i, e) in tensors.iter().enumerate() {
                // names within a shard are unique (checked when its header was parsed)
                local.insert_unique(e.hash, (e.hash, i as u32), |&(h, _)| h);
            }
            let mut listed = vec![false; tensors.len()];
            let shard_path = &self.shards[s].path;
            for &k in &by_shard[bounds[s]..bounds[s + 1]] {
                let name = &ix.entries[k as usize].0;
                let h = name_hash(name);
                let found = local.find(h, |&(oh, i)| oh == h && &*tensors[i as usize].name == name);
                let problem = match found {
                    Some(&(_, i)) if !listed[i as usize] => {
                        listed[i as usize] = true;
                        continue;
                    }
                    Some(_) => Error::index(
                        index_path,
                        Some(name),
                        IndexProblem::Json,
                        "the tensor is listed twice in weight_map",
                    ),
                    None => match self.names.find(&self.shards, name) {
                        Some(id) => Error::index(
                            shard_path,
                            Some(name),
                            IndexProblem::TensorNotInShard,
                            format!(
                                "the index maps the tensor to this shard, but it is stored in {}",
                                self.shards[id.shard as usize].path.display()
                            ),
                        ),
                        None => Error::index(
                            shard_path,
                            Some(name),
                            IndexProblem::TensorNotInShard,
                            "the index maps the tensor to this shard, but the shard does not hold it",
                        ),
                    },
                };
                return Some(Problem::Entry(k, problem));
            }
            listed.iter().position(|l| !l).map(Problem::Unlisted)
        };
        let problems: Vec<(usize, Problem)> = pool.install(|| {
            (0..self.shards.len())
                .into_par_iter()
                .filter_map(|s| check_shard(s).map(|p| (s, p)))
                .collect()
        });
        let first_entry = problems
            .iter()
            .filter_map(|(_, p)| match p {
                Problem::Entry(k, _) => Some(*k),
                Problem::Unlisted(_) => None,
            })
            .min();
        for (s, p) in problems {
            match p {
                Problem::Entry(k, e) if Some(k) == first_entry => return Err(e),
                Problem::Unlisted(i) if first_entry.is_none() => {
                    let shard = &self.shards[s];
                    return Err(Error::index(
                        &shard.path,
                        Some(&shard.header.tensors[i].name),
                        IndexProblem::TensorNotInIndex,
                        format!(
                            "the shard holds the tensor but {} does not list it",
                            index_path.display()
                        ),
                    ));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The path errors about the checkpoint as a whole should name.
    pub fn display_path(&self) -> PathBuf {
        self.index_path
            .clone()
            .or_else(|| self.root.clone())
            .or_else(|| self.shards.first().map(|s| s.path.clone()))
            .unwrap_or_default()
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn find(&self, name: &str) -> Option<TensorId> {
        self.names.find(&self.shards, name)
    }

    /// Looks a tensor up, or fails with [`Error::MissingTensor`].
    pub fn get(&self, name: &str) -> Result<(TensorId, &TensorEntry)> {
        match self.find(name) {
            Some(id) => Ok((id, self.entry(id))),
            None => Err(Error::MissingTensor {
                file: self.display_path(),
                tensor: name.to_owned(),
                hint: None,
            }),
        }
    }

    pub fn entry(&self, id: TensorId) -> &TensorEntry {
        entry(&self.shards, id)
    }

    pub fn shard(&self, id: TensorId) -> &Shard {
        &self.shards[id.shard as usize]
    }

    /// Every tensor, shard by shard, in storage order.
    pub fn iter(&self) -> impl Iterator<Item = (TensorId, &TensorEntry)> {
        self.shards.iter().enumerate().flat_map(|(s, sh)| {
            sh.header.tensors.iter().enumerate().map(move |(i, e)| {
                (
                    TensorId {
                        shard: s as u32,
                        index: i as u32,
                    },
                    e,
                )
            })
        })
    }

    /// Total bytes of tensor data.
    pub fn data_bytes(&self) -> u64 {
        self.shards.iter().map(|s| s.header.data_len).sum()
    }
}
