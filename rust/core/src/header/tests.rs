//! Unit tests, property tests (round trips, `serde_json` as an oracle for accept/reject)
//! and a bounded mutation fuzz run: malformed headers must produce errors, never panics.

use super::*;
use crate::error::Error;
use proptest::prelude::*;
use std::path::Path;

/// Builds a complete safetensors file image from `(name, dtype, shape)` entries laid
/// out back to back, as the reference writer does.
pub(crate) fn build_file(
    entries: &[(&str, &str, Vec<u64>)],
    metadata: Option<&[(&str, &str)]>,
) -> Vec<u8> {
    let mut json = serde_json::Map::new();
    if let Some(md) = metadata {
        let m: serde_json::Map<_, _> = md
            .iter()
            .map(|(k, v)| (k.to_string(), serde_json::json!(v)))
            .collect();
        json.insert("__metadata__".into(), serde_json::Value::Object(m));
    }
    let mut off = 0u64;
    for (name, dt, shape) in entries {
        let n: u64 = shape.iter().product::<u64>() * Dtype::parse(dt).map_or(1, Dtype::size);
        json.insert(
            name.to_string(),
            serde_json::json!({"dtype": dt, "shape": shape, "data_offsets": [off, off + n]}),
        );
        off += n;
    }
    let mut text = serde_json::to_string(&serde_json::Value::Object(json)).unwrap();
    while !(text.len() + 8).is_multiple_of(8) {
        text.push(' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(text.as_bytes());
    out.extend((0..off).map(|i| (i % 251) as u8));
    out
}

/// The same file image with entries written the way safetensors writers do (keys in
/// `dtype, shape, data_offsets` order, no whitespace), which takes the parser's fast path.
pub(crate) fn build_file_canonical(entries: &[(&str, &str, Vec<u64>)]) -> Vec<u8> {
    let mut text = String::from("{\"__metadata__\":{\"format\":\"pt\"}");
    let mut off = 0u64;
    for (name, dt, shape) in entries {
        let n: u64 = shape.iter().product::<u64>() * Dtype::parse(dt).map_or(1, Dtype::size);
        let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
        text.push_str(&format!(
            ",{}:{{\"dtype\":\"{dt}\",\"shape\":[{}],\"data_offsets\":[{off},{}]}}",
            serde_json::to_string(name).unwrap(),
            dims.join(","),
            off + n
        ));
        off += n;
    }
    text.push('}');
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(text.as_bytes());
    out.extend((0..off).map(|i| (i % 251) as u8));
    out
}

/// Parses a whole in-memory file image the way `Shard::open` does.
pub(crate) fn parse_image(buf: &[u8]) -> Result<Header> {
    let f = Path::new("mem.safetensors");
    let n = header_len(f, &buf[..buf.len().min(8)], buf.len() as u64)?;
    let start = 8 + n as usize;
    parse_header(f, &buf[8..start], start as u64, (buf.len() - start) as u64)
}

fn problem(r: Result<Header>) -> HeaderProblem {
    match r {
        Err(Error::Header { problem, .. }) => problem,
        other => panic!("expected a header error, got {other:?}"),
    }
}

fn raw(json: &str, data_len: usize) -> Vec<u8> {
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(json.as_bytes());
    out.resize(out.len() + data_len, 0);
    out
}

#[test]
fn parses_a_valid_file() {
    let img = build_file(
        &[
            ("a", "BF16", vec![2, 3]),
            ("b", "F8_E4M3", vec![5]),
            ("c", "I32", vec![]),
            ("z", "F32", vec![0, 4]),
        ],
        Some(&[("format", "pt")]),
    );
    let h = parse_image(&img).unwrap();
    assert_eq!(h.tensors.len(), 4);
    let a = h.tensors.iter().find(|t| &*t.name == "a").unwrap();
    assert_eq!(
        (a.dtype, a.shape.as_slice(), a.nbytes()),
        (Dtype::BF16, &[2u64, 3][..], 12)
    );
    assert_eq!(h.metadata, vec![("format".to_string(), "pt".to_string())]);
    assert_eq!(h.data_len, 12 + 5 + 4);
    assert!(h.tensors.windows(2).all(|w| w[0].end <= w[1].start));
}

#[test]
fn each_header_problem_is_reported() {
    let e = |t: &str| t.to_string();
    let cases: Vec<(Vec<u8>, HeaderProblem)> = vec![
        (vec![], HeaderProblem::TooSmall),
        (vec![1, 0, 0], HeaderProblem::TooSmall),
        (
            (MAX_HEADER_LEN + 1).to_le_bytes().to_vec(),
            HeaderProblem::TooLarge,
        ),
        (
            100u64.to_le_bytes().iter().chain(b"{}").copied().collect(),
            HeaderProblem::PastEnd,
        ),
        (raw("{\"a\":\u{1}}", 0), HeaderProblem::Json),
        (
            {
                let mut v = 4u64.to_le_bytes().to_vec();
                v.extend_from_slice(&[b'{', 0xff, 0xfe, b'}']);
                v
            },
            HeaderProblem::NotUtf8,
        ),
        (raw(" {}", 0), HeaderProblem::Json),
        (raw("{} x", 0), HeaderProblem::Json),
        (
            raw(
                r#"{"a":{"dtype":"Q7","shape":[1],"data_offsets":[0,1]}}"#,
                1,
            ),
            HeaderProblem::UnknownDtype,
        ),
        (
            raw(
                r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
                8,
            ),
            HeaderProblem::ShapeBytesMismatch,
        ),
        (
            raw(
                r#"{"a":{"dtype":"U8","shape":[16],"data_offsets":[0,16]}}"#,
                8,
            ),
            HeaderProblem::OutOfBounds,
        ),
        (
            raw(
                r#"{"a":{"dtype":"U8","shape":[0],"data_offsets":[4,0]}}"#,
                8,
            ),
            HeaderProblem::OutOfBounds,
        ),
        (
            raw(
                r#"{"a":{"dtype":"U8","shape":[6],"data_offsets":[0,6]},"b":{"dtype":"U8","shape":[4],"data_offsets":[4,8]}}"#,
                8,
            ),
            HeaderProblem::Overlap,
        ),
        (
            raw(
                r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[4,8]}}"#,
                8,
            ),
            HeaderProblem::Gap,
        ),
        (
            raw(
                r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}"#,
                8,
            ),
            HeaderProblem::Gap,
        ),
        (
            raw(
                r#"{"a":{"dtype":"F32","shape":[4611686018427387904,8],"data_offsets":[0,8]}}"#,
                8,
            ),
            HeaderProblem::Overflow,
        ),
        (
            raw(
                r#"{"a":{"dtype":"U8","shape":[99999999999999999999],"data_offsets":[0,1]}}"#,
                1,
            ),
            HeaderProblem::Overflow,
        ),
        (
            // zero elements, but a dimension no torch / numpy index can hold
            raw(
                r#"{"a":{"dtype":"U8","shape":[0,9223372036854775808],"data_offsets":[0,0]}}"#,
                0,
            ),
            HeaderProblem::Overflow,
        ),
        (
            raw(
                r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#,
                2,
            ),
            HeaderProblem::DuplicateKey,
        ),
        (
            raw(r#"{"a":{"dtype":"U8","shape":[1]}}"#, 1),
            HeaderProblem::Json,
        ),
        (
            raw(
                r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1,2]}}"#,
                1,
            ),
            HeaderProblem::Json,
        ),
        (
            raw(
                r#"{"a":{"dtype":"U8","shape":[-1],"data_offsets":[0,1]}}"#,
                1,
            ),
            HeaderProblem::Json,
        ),
        (raw(r#"{"__metadata__":{"k":1}}"#, 0), HeaderProblem::Json),
    ];
    for (i, (img, want)) in cases.into_iter().enumerate() {
        assert_eq!(
            problem(parse_image(&img)),
            want,
            "case {i}: {}",
            e(&String::from_utf8_lossy(&img))
        );
    }
}

#[test]
fn canonical_layout_errors_match_general_ones() {
    // Deviations from the canonical layout fall back to the general parser, which
    // reports the precise problem.
    for (json, want) in [
        (
            r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1,2]}}"#,
            HeaderProblem::Json,
        ),
        (
            r#"{"a":{"dtype":"U8","shape":[1,],"data_offsets":[0,1]}}"#,
            HeaderProblem::Json,
        ),
        (
            r#"{"a":{"dtype":"Q","shape":[1],"data_offsets":[0,1]}}"#,
            HeaderProblem::UnknownDtype,
        ),
        (
            r#"{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,1]}}"#,
            HeaderProblem::ShapeBytesMismatch,
        ),
        (
            r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"dtype":"U8"}}"#,
            HeaderProblem::DuplicateKey,
        ),
        (
            r#"{"a":{"dtype":"U\u0038","shape":[1],"data_offsets":[0,1]}}"#,
            HeaderProblem::Gap,
        ),
    ] {
        let img = raw(json, 2);
        assert_eq!(problem(parse_image(&img)), want, "{json}");
    }
    let ok = parse_image(&raw(
        r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1], "x": [null]}}"#,
        1,
    ))
    .unwrap();
    assert_eq!(ok.tensors[0].dtype, Dtype::U8);
}

#[test]
fn errors_name_file_and_tensor() {
    let img = raw(
        r#"{"bad.t":{"dtype":"Q7","shape":[1],"data_offsets":[0,1]}}"#,
        1,
    );
    let err = parse_image(&img).unwrap_err();
    assert_eq!(err.tensor(), Some("bad.t"));
    let msg = err.to_string();
    assert!(
        msg.contains("mem.safetensors") && msg.contains("bad.t") && msg.contains("Q7"),
        "{msg}"
    );
}

fn arb_entries() -> impl Strategy<Value = Vec<(String, &'static str, Vec<u64>)>> {
    let dtype = prop::sample::select(Dtype::ALL.iter().map(|d| d.as_str()).collect::<Vec<_>>());
    let name = "[a-z_.0-9\u{e9}\"\\\\/ ]{1,24}";
    prop::collection::vec((name, dtype, prop::collection::vec(0u64..6, 0..4)), 0..12).prop_map(
        |mut v| {
            v.sort_by(|a, b| a.0.cmp(&b.0));
            v.dedup_by(|a, b| a.0 == b.0);
            v
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Any well-formed file parses back to exactly what was written.
    #[test]
    fn round_trip(entries in arb_entries()) {
        let refs: Vec<(&str, &str, Vec<u64>)> = entries.iter().map(|(n, d, s)| (n.as_str(), *d, s.clone())).collect();
        let img = build_file(&refs, Some(&[("format", "pt")]));
        let h = parse_image(&img).unwrap();
        prop_assert_eq!(h.tensors.len(), entries.len());
        for (n, d, s) in &entries {
            let t = h.tensors.iter().find(|t| &*t.name == n.as_str()).unwrap();
            prop_assert_eq!(t.dtype.as_str(), *d);
            prop_assert_eq!(t.shape.as_slice(), s.as_slice());
        }
    }

    /// The fast path (canonical key order) and the general path agree exactly.
    #[test]
    fn canonical_and_general_paths_agree(entries in arb_entries()) {
        let refs: Vec<(&str, &str, Vec<u64>)> = entries.iter().map(|(n, d, s)| (n.as_str(), *d, s.clone())).collect();
        let fast = parse_image(&build_file_canonical(&refs)).unwrap();
        let general = parse_image(&build_file(&refs, Some(&[("format", "pt")]))).unwrap();
        prop_assert_eq!(fast.tensors, general.tensors);
        prop_assert_eq!(fast.metadata, general.metadata);
    }

    /// Whatever bytes replace the header, parsing returns (never panics), and it only
    /// accepts text that serde_json also accepts as JSON.
    #[test]
    fn never_panics_and_never_accepts_invalid_json(json in ".{0,200}", data in 0usize..64) {
        let img = raw(&json, data);
        if parse_image(&img).is_ok() {
            prop_assert!(serde_json::from_str::<serde_json::Value>(&json).is_ok());
        }
    }
}

/// A deterministic xorshift generator so the fuzz run is bounded and reproducible.
struct XorShift(u64);
impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Bounded fuzz: thousands of random mutations (byte flips, insertions, deletions,
/// splices of JSON tokens, length-prefix edits) of valid headers. Every outcome must be
/// `Ok` or a typed error; a panic fails the test. Accepted mutants must also satisfy the
/// layout invariants.
#[test]
fn fuzz_mutated_headers() {
    let seeds = [
        build_file(
            &[
                ("a", "BF16", vec![2, 3]),
                ("b", "F8_E4M3", vec![5]),
                ("c", "I64", vec![1]),
            ],
            Some(&[("format", "pt")]),
        ),
        build_file(
            &[(
                "model.layers.0.mlp.experts.7.gate_proj.weight_packed",
                "I32",
                vec![4, 2],
            )],
            None,
        ),
        build_file(
            &[
                ("x", "F8_E8M0", vec![3, 3]),
                ("y", "BOOL", vec![0]),
                ("z", "U64", vec![2]),
            ],
            None,
        ),
    ];
    let tokens: [&[u8]; 14] = [
        b"{",
        b"}",
        b"[",
        b"]",
        b",",
        b":",
        b"\"",
        b"\\u",
        b"-1",
        b"18446744073709551616",
        b"null",
        b"1e9",
        b"\"F32\"",
        b"\xff",
    ];
    let mut rng = XorShift(0x9E3779B97F4A7C15);
    let (mut ok, mut err) = (0usize, 0usize);
    for round in 0..20_000 {
        let mut img = seeds[round % seeds.len()].clone();
        for _ in 0..1 + rng.below(4) {
            let at = rng.below(img.len());
            match rng.below(6) {
                0 => img[at] ^= 1 << rng.below(8),
                1 => img[at] = rng.next() as u8,
                2 => {
                    img.remove(at);
                }
                3 => img.insert(at, rng.next() as u8),
                4 => {
                    let t = tokens[rng.below(tokens.len())];
                    let at = 8 + rng.below(img.len().saturating_sub(8));
                    img.splice(at..at, t.iter().copied());
                }
                _ => img[rng.below(8)] = rng.next() as u8,
            }
        }
        match parse_image(&img) {
            Ok(h) => {
                ok += 1;
                let mut covered = 0;
                for t in &h.tensors {
                    assert_eq!(t.start, covered);
                    assert_eq!(t.end - t.start, t.numel() * t.dtype.size());
                    covered = t.end;
                }
                assert_eq!(covered, h.data_len);
            }
            Err(Error::Header { .. }) => err += 1,
            Err(other) => panic!("unexpected error kind: {other:?}"),
        }
    }
    assert!(
        err > 10_000,
        "mutations should mostly be rejected ({ok} ok, {err} errors)"
    );
}
