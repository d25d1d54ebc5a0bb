//! A small, strict JSON scanner for the two documents this crate reads: safetensors
//! headers and `model.safetensors.index.json`.
//!
//! It is a pull parser over a `&str` that borrows strings without escapes (the common
//! case: tensor names, dtypes) and never allocates for structure. It accepts exactly
//! RFC 8259 JSON; integers that this crate needs are parsed as `u64` with overflow
//! checks; anything it does not need (unknown fields, metadata values) is skipped with
//! full validation. Nesting is capped at [`MAX_DEPTH`] so hostile input cannot blow the
//! stack. Every path returns an error instead of panicking; the property tests compare
//! it against `serde_json` and the fuzz test feeds it mutated headers.

use std::borrow::Cow;

/// Deepest nesting accepted by [`Scanner::skip_value`].
pub const MAX_DEPTH: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonError {
    /// Byte offset in the document where the problem was found.
    pub pos: usize,
    pub msg: &'static str,
    /// The document is valid JSON but holds an integer too large for `u64` (callers
    /// report this as an overflow, not as malformed JSON).
    pub overflow: bool,
}

impl std::fmt::Display for JsonError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} at byte {}", self.msg, self.pos)
    }
}

impl JsonError {
    pub fn new(pos: usize, msg: &'static str) -> Self {
        JsonError {
            pos,
            msg,
            overflow: false,
        }
    }
}

pub type JResult<T> = Result<T, JsonError>;

/// Number of leading bytes of `b` that need no attention inside a JSON string: not a
/// quote, not a backslash, not a control character. Sixteen bytes at a time with SSE2
/// on x86-64 (part of that architecture's baseline), eight at a time (SWAR) elsewhere.
#[inline]
fn skip_plain(b: &[u8]) -> usize {
    #[cfg(target_arch = "x86_64")]
    let i = skip_plain_sse2(b);
    #[cfg(not(target_arch = "x86_64"))]
    let i = 0;
    i + skip_plain_swar(&b[i..])
}

/// [`skip_plain`] over whole 16-byte blocks: stops at the first block holding a byte
/// that needs attention (or at the last whole block) and returns that byte's position.
#[cfg(target_arch = "x86_64")]
#[inline]
fn skip_plain_sse2(b: &[u8]) -> usize {
    use std::arch::x86_64::{
        __m128i, _mm_cmpeq_epi8, _mm_loadu_si128, _mm_min_epu8, _mm_movemask_epi8, _mm_or_si128,
        _mm_set1_epi8,
    };
    let mut i = 0;
    while let Some(block) = b.get(i..i + 16) {
        // SAFETY: SSE2 is always present on x86-64; the load reads exactly the 16 bytes
        // of `block` (unaligned loads are allowed by `_mm_loadu_si128`).
        let mask = unsafe {
            let v = _mm_loadu_si128(block.as_ptr().cast::<__m128i>());
            let quote = _mm_cmpeq_epi8(v, _mm_set1_epi8(b'"' as i8));
            let slash = _mm_cmpeq_epi8(v, _mm_set1_epi8(b'\\' as i8));
            // unsigned v <= 0x1f  <=>  min(v, 0x1f) == v
            let ctrl = _mm_cmpeq_epi8(_mm_min_epu8(v, _mm_set1_epi8(0x1f)), v);
            _mm_movemask_epi8(_mm_or_si128(_mm_or_si128(quote, slash), ctrl))
        };
        if mask != 0 {
            return i + mask.trailing_zeros() as usize;
        }
        i += 16;
    }
    i
}

/// [`skip_plain`] eight bytes at a time in a `u64`, then byte by byte.
#[inline]
fn skip_plain_swar(b: &[u8]) -> usize {
    const LO: u64 = 0x0101_0101_0101_0101;
    const HI: u64 = 0x8080_8080_8080_8080;
    let mut i = 0;
    while let Some(chunk) = b.get(i..i + 8) {
        let v = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
        let quote = v ^ (LO * b'"' as u64);
        let slash = v ^ (LO * b'\\' as u64);
        // a byte is flagged when it is zero after the xor, or below 0x20 to begin with
        let hit = (quote.wrapping_sub(LO) & !quote)
            | (slash.wrapping_sub(LO) & !slash)
            | (v.wrapping_sub(LO * 0x20) & !v);
        if hit & HI != 0 {
            break;
        }
        i += 8;
    }
    while let Some(&c) = b.get(i) {
        if c == b'"' || c == b'\\' || c < 0x20 {
            break;
        }
        i += 1;
    }
    i
}

pub struct Scanner<'a> {
    s: &'a str,
    b: &'a [u8],
    pos: usize,
}

impl<'a> Scanner<'a> {
    pub fn new(s: &'a str) -> Self {
        Scanner {
            s,
            b: s.as_bytes(),
            pos: 0,
        }
    }

    /// A scanner over `s[..end]` starting at byte `pos` (error positions stay relative
    /// to `s`). `pos` and `end` must lie on character boundaries with `pos <= end`.
    pub fn window(s: &'a str, pos: usize, end: usize) -> Self {
        let s = &s[..end];
        Scanner {
            s,
            b: s.as_bytes(),
            pos,
        }
    }

    pub fn pos(&self) -> usize {
        self.pos
    }

    fn err<T>(&self, msg: &'static str) -> JResult<T> {
        Err(JsonError {
            pos: self.pos,
            msg,
            overflow: false,
        })
    }

    pub fn skip_ws(&mut self) {
        while let Some(&c) = self.b.get(self.pos) {
            if matches!(c, b' ' | b'\t' | b'\n' | b'\r') {
                self.pos += 1;
            } else {
                break;
            }
        }
    }

    /// Next non-whitespace byte, not consumed.
    pub fn peek(&mut self) -> Option<u8> {
        self.skip_ws();
        self.b.get(self.pos).copied()
    }

    /// Consumes `c` (after whitespace) or fails.
    pub fn expect_byte(&mut self, c: u8) -> JResult<()> {
        self.expect(c, "unexpected character")
    }

    /// Whether the scanner has consumed its whole window.
    pub fn at_end(&self) -> bool {
        self.pos >= self.b.len()
    }

    /// Moves to `pos`: back to a position from [`Scanner::pos`], or on to one reached by
    /// another scanner over the same text.
    pub fn seek(&mut self, pos: usize) {
        self.pos = pos;
    }

    fn expect(&mut self, c: u8, msg: &'static str) -> JResult<()> {
        if self.peek() == Some(c) {
            self.pos += 1;
            Ok(())
        } else {
            self.err(msg)
        }
    }

    /// Requires that only whitespace remains.
    pub fn finish(&mut self) -> JResult<()> {
        self.skip_ws();
        if self.pos == self.b.len() {
            Ok(())
        } else {
            self.err("trailing characters after the JSON document")
        }
    }

    /// Reads a string; borrowed when it holds no escape sequence.
    pub fn string(&mut self) -> JResult<Cow<'a, str>> {
        self.expect(b'"', "expected a string")?;
        let start = self.pos;
        // Fast path: skip ordinary bytes eight at a time, then look at the special one.
        self.pos = start + skip_plain(&self.b[start..]);
        match self.b.get(self.pos) {
            None => return self.err("unterminated string"),
            Some(b'"') => {
                let out = &self.s[start..self.pos];
                self.pos += 1;
                return Ok(Cow::Borrowed(out));
            }
            Some(b'\\') => {}
            Some(_) => return self.err("control character in string"),
        }
        // Slow path: unescape.
        let mut out = String::with_capacity(self.pos - start + 16);
        out.push_str(&self.s[start..self.pos]);
        loop {
            let run = self.pos;
            self.pos = run + skip_plain(&self.b[run..]);
            match self.b.get(self.pos) {
                None => return self.err("unterminated string"),
                Some(b'"') | Some(b'\\') => {}
                Some(_) => return self.err("control character in string"),
            }
            out.push_str(&self.s[run..self.pos]);
            if self.b[self.pos] == b'"' {
                self.pos += 1;
                return Ok(Cow::Owned(out));
            }
            // a backslash
            self.pos += 1;
            let Some(&e) = self.b.get(self.pos) else {
                return self.err("unterminated escape");
            };
            self.pos += 1;
            match e {
                b'"' => out.push('"'),
                b'\\' => out.push('\\'),
                b'/' => out.push('/'),
                b'b' => out.push('\u{8}'),
                b'f' => out.push('\u{c}'),
                b'n' => out.push('\n'),
                b'r' => out.push('\r'),
                b't' => out.push('\t'),
                b'u' => {
                    let hi = self.hex4()?;
                    let c = if (0xD800..0xDC00).contains(&hi) {
                        if self.b.get(self.pos) != Some(&b'\\')
                            || self.b.get(self.pos + 1) != Some(&b'u')
                        {
                            return self.err("lone high surrogate in \\u escape");
                        }
                        self.pos += 2;
                        let lo = self.hex4()?;
                        if !(0xDC00..0xE000).contains(&lo) {
                            return self.err("invalid low surrogate in \\u escape");
                        }
                        0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00)
                    } else if (0xDC00..0xE000).contains(&hi) {
                        return self.err("lone low surrogate in \\u escape");
                    } else {
                        hi
                    };
                    match char::from_u32(c) {
                        Some(ch) => out.push(ch),
                        None => return self.err("invalid \\u escape"),
                    }
                }
                _ => return self.err("invalid escape character"),
            }
        }
    }

    fn hex4(&mut self) -> JResult<u32> {
        let mut v = 0u32;
        for _ in 0..4 {
            let Some(&c) = self.b.get(self.pos) else {
                return self.err("truncated \\u escape");
            };
            let d = match c {
                b'0'..=b'9' => c - b'0',
                b'a'..=b'f' => c - b'a' + 10,
                b'A'..=b'F' => c - b'A' + 10,
                _ => return self.err("invalid hex digit in \\u escape"),
            };
            v = v * 16 + d as u32;
            self.pos += 1;
        }
        Ok(v)
    }

    /// Consumes `lit` if the input continues with exactly those bytes (no whitespace
    /// skipping); returns whether it did.
    #[inline]
    pub fn eat(&mut self, lit: &[u8]) -> bool {
        if self.b[self.pos..].starts_with(lit) {
            self.pos += lit.len();
            true
        } else {
            false
        }
    }

    /// Reads a string with no escapes and no whitespace before it, if that is what comes
    /// next; otherwise consumes nothing and returns `None`.
    #[inline]
    pub fn plain_string(&mut self) -> Option<&'a str> {
        if self.b.get(self.pos) != Some(&b'"') {
            return None;
        }
        let start = self.pos + 1;
        let end = start + skip_plain(&self.b[start..]);
        if self.b.get(end) != Some(&b'"') {
            return None;
        }
        self.pos = end + 1;
        Some(&self.s[start..end])
    }

    /// Reads a non-negative integer that fits in `u64` (no sign, fraction or exponent).
    pub fn u64(&mut self) -> JResult<u64> {
        self.skip_ws();
        let start = self.pos;
        let mut v: u64 = 0;
        while let Some(&c) = self.b.get(self.pos) {
            if !c.is_ascii_digit() {
                break;
            }
            v = match v
                .checked_mul(10)
                .and_then(|v| v.checked_add((c - b'0') as u64))
            {
                Some(v) => v,
                None => {
                    return Err(JsonError {
                        pos: self.pos,
                        msg: "integer does not fit in 64 bits",
                        overflow: true,
                    })
                }
            };
            self.pos += 1;
        }
        if self.pos == start {
            return self.err("expected a non-negative integer");
        }
        if self.b[start] == b'0' && self.pos - start > 1 {
            return Err(JsonError::new(start, "leading zero in integer"));
        }
        if matches!(self.b.get(self.pos), Some(b'.' | b'e' | b'E')) {
            return self.err("expected an integer, found a fraction or exponent");
        }
        Ok(v)
    }

    /// Iterates over an object's members: `f` is called with each key and must consume
    /// exactly one value. Duplicate keys are the caller's business.
    pub fn object(
        &mut self,
        mut f: impl FnMut(&mut Self, Cow<'a, str>) -> JResult<()>,
    ) -> JResult<()> {
        self.expect(b'{', "expected an object")?;
        if self.peek() == Some(b'}') {
            self.pos += 1;
            return Ok(());
        }
        loop {
            let key = self.string()?;
            self.expect(b':', "expected ':' after object key")?;
            f(self, key)?;
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b'}') => {
                    self.pos += 1;
                    return Ok(());
                }
                _ => return self.err("expected ',' or '}' in object"),
            }
        }
    }

    /// Iterates over an array's elements: `f` must consume exactly one value.
    pub fn array(&mut self, mut f: impl FnMut(&mut Self) -> JResult<()>) -> JResult<()> {
        self.expect(b'[', "expected an array")?;
        if self.peek() == Some(b']') {
            self.pos += 1;
            return Ok(());
        }
        loop {
            f(self)?;
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b']') => {
                    self.pos += 1;
                    return Ok(());
                }
                _ => return self.err("expected ',' or ']' in array"),
            }
        }
    }

    /// Validates and skips any JSON value.
    pub fn skip_value(&mut self) -> JResult<()> {
        self.skip_value_at(0)
    }

    fn skip_value_at(&mut self, depth: usize) -> JResult<()> {
        if depth >= MAX_DEPTH {
            return self.err("JSON nested too deeply");
        }
        match self.peek() {
            Some(b'"') => self.string().map(drop),
            Some(b'{') => self.object(|s, _| s.skip_value_at(depth + 1)),
            Some(b'[') => self.array(|s| s.skip_value_at(depth + 1)),
            Some(b't') => self.literal("true"),
            Some(b'f') => self.literal("false"),
            Some(b'n') => self.literal("null"),
            Some(b'-' | b'0'..=b'9') => self.number(),
            _ => self.err("expected a JSON value"),
        }
    }

    fn literal(&mut self, lit: &'static str) -> JResult<()> {
        if self.b[self.pos..].starts_with(lit.as_bytes()) {
            self.pos += lit.len();
            Ok(())
        } else {
            self.err("invalid literal")
        }
    }

    fn digits(&mut self) -> usize {
        let start = self.pos;
        while matches!(self.b.get(self.pos), Some(b'0'..=b'9')) {
            self.pos += 1;
        }
        self.pos - start
    }

    fn number(&mut self) -> JResult<()> {
        if self.b.get(self.pos) == Some(&b'-') {
            self.pos += 1;
        }
        let first = self.pos;
        let n = self.digits();
        if n == 0 {
            return self.err("invalid number");
        }
        if self.b[first] == b'0' && n > 1 {
            return self.err("leading zero in number");
        }
        if self.b.get(self.pos) == Some(&b'.') {
            self.pos += 1;
            if self.digits() == 0 {
                return self.err("invalid fraction");
            }
        }
        if matches!(self.b.get(self.pos), Some(b'e' | b'E')) {
            self.pos += 1;
            if matches!(self.b.get(self.pos), Some(b'+' | b'-')) {
                self.pos += 1;
            }
            if self.digits() == 0 {
                return self.err("invalid exponent");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn skip_ok(s: &str) -> bool {
        let mut p = Scanner::new(s);
        p.skip_value().is_ok() && p.finish().is_ok()
    }

    #[test]
    fn strings_and_escapes() {
        let mut p = Scanner::new(r#""a\"b\\c\/\n\u00e9\ud83d\ude00""#);
        assert_eq!(p.string().unwrap(), "a\"b\\c/\né😀");
        let mut p = Scanner::new(r#""plain.name""#);
        assert!(matches!(p.string().unwrap(), Cow::Borrowed("plain.name")));
        for bad in [
            r#""abc"#,
            r#""\x""#,
            r#""\ud800""#,
            r#""\udc00x""#,
            "\"a\u{1}\"",
            r#""\u12""#,
        ] {
            assert!(Scanner::new(bad).string().is_err(), "{bad}");
        }
    }

    #[test]
    fn skip_plain_finds_every_special_byte() {
        for len in 0..40 {
            for at in 0..len {
                for special in [b'"', b'\\', 0u8, 0x1f, b'\n'] {
                    let mut v = vec![b'a'; len];
                    v[at] = special;
                    assert_eq!(skip_plain(&v), at, "len {len} at {at} byte {special}");
                }
                let mut v = vec![0xC3u8; len]; // high bytes are ordinary
                v[at] = b'"';
                assert_eq!(skip_plain(&v), at);
                for ordinary in [b' ', 0x7f, 0x80, 0xff, b'/'] {
                    let mut v = vec![ordinary; len];
                    v[at] = 0x1f;
                    assert_eq!(skip_plain(&v), at, "len {len} at {at} among {ordinary}");
                }
            }
            assert_eq!(skip_plain(&vec![b'x'; len]), len);
        }
    }

    #[test]
    fn integers() {
        assert_eq!(
            Scanner::new("18446744073709551615").u64().unwrap(),
            u64::MAX
        );
        for bad in ["18446744073709551616", "-1", "01", "1.0", "1e3", "", "x"] {
            assert!(Scanner::new(bad).u64().is_err(), "{bad}");
        }
    }

    #[test]
    fn skip_matches_serde_on_samples() {
        let samples = [
            "{}",
            "[]",
            "[1,2,3]",
            r#"{"a":[true,false,null,-0.5e+3,"x"]}"#,
            "01",
            "[1,]",
            "{\"a\" 1}",
            "1.",
            "-",
            "[1 2]",
            "{\"a\":1,}",
            "tru",
            "\"\\u0000\"",
            "[-0]",
            "1E5",
        ];
        for s in samples {
            let ours = skip_ok(s);
            let serde = serde_json::from_str::<serde_json::Value>(s).is_ok();
            assert_eq!(ours, serde, "{s}");
        }
    }

    #[test]
    fn depth_is_bounded() {
        let deep = "[".repeat(100_000);
        assert!(!skip_ok(&deep));
        let ok = format!("{}{}", "[".repeat(MAX_DEPTH - 1), "]".repeat(MAX_DEPTH - 1));
        assert!(skip_ok(&ok));
    }
}
