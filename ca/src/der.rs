//! A minimal, strict DER writer and reader: just what Wicket's certificates need.
//!
//! The writer appends tag-length-value triples to a `Vec<u8>`; the reader walks
//! a byte slice and never panics on malformed input (every failure is a
//! [`DerError`]). Only definite lengths up to 4 length bytes are supported.

use std::fmt;

pub const TAG_INTEGER: u8 = 0x02;
pub const TAG_BIT_STRING: u8 = 0x03;
pub const TAG_OCTET_STRING: u8 = 0x04;
pub const TAG_OID: u8 = 0x06;
pub const TAG_UTF8_STRING: u8 = 0x0c;
pub const TAG_BOOLEAN: u8 = 0x01;
pub const TAG_UTC_TIME: u8 = 0x17;
pub const TAG_GENERALIZED_TIME: u8 = 0x18;
pub const TAG_SEQUENCE: u8 = 0x30;
pub const TAG_SET: u8 = 0x31;

/// Why a DER value could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DerError(pub &'static str);

impl fmt::Display for DerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

/// Appends `tag`, the DER length of `content_len`, and nothing else.
pub fn write_header(out: &mut Vec<u8>, tag: u8, content_len: usize) {
    out.push(tag);
    if content_len < 0x80 {
        out.push(content_len as u8);
    } else {
        let bytes = (content_len as u64).to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (8 - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
}

/// Appends a whole TLV.
pub fn write_tlv(out: &mut Vec<u8>, tag: u8, content: &[u8]) {
    write_header(out, tag, content.len());
    out.extend_from_slice(content);
}

/// Appends a TLV whose content is produced by `f` (written to a scratch buffer first).
pub fn write_nested(out: &mut Vec<u8>, tag: u8, f: impl FnOnce(&mut Vec<u8>)) {
    let mut inner = Vec::with_capacity(64);
    f(&mut inner);
    write_tlv(out, tag, &inner);
}

/// Appends a non-negative INTEGER from big-endian magnitude bytes.
pub fn write_unsigned_integer(out: &mut Vec<u8>, magnitude: &[u8]) {
    let trimmed = {
        let skip = magnitude.iter().take_while(|b| **b == 0).count();
        &magnitude[skip.min(magnitude.len().saturating_sub(1))..]
    };
    if trimmed.is_empty() {
        write_tlv(out, TAG_INTEGER, &[0]);
    } else if trimmed[0] & 0x80 != 0 {
        write_header(out, TAG_INTEGER, trimmed.len() + 1);
        out.push(0);
        out.extend_from_slice(trimmed);
    } else {
        write_tlv(out, TAG_INTEGER, trimmed);
    }
}

/// Encodes an OBJECT IDENTIFIER's content octets from arcs (the first two arcs
/// follow X.690: 40 * a0 + a1). Arcs may be as wide as u128 (2.25.<uuid>).
pub fn oid_content(arcs: &[u128]) -> Vec<u8> {
    let mut out = Vec::with_capacity(24);
    let push_base128 = |mut v: u128, out: &mut Vec<u8>| {
        let mut tmp = [0u8; 19];
        let mut i = tmp.len();
        loop {
            i -= 1;
            tmp[i] = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                break;
            }
        }
        let n = tmp.len();
        for (k, b) in tmp[i..].iter().enumerate() {
            out.push(if i + k + 1 < n { b | 0x80 } else { *b });
        }
    };
    match arcs {
        [a0, a1, rest @ ..] => {
            push_base128(a0 * 40 + a1, &mut out);
            for a in rest {
                push_base128(*a, &mut out);
            }
        }
        [a0] => push_base128(a0 * 40, &mut out),
        [] => {}
    }
    out
}

/// A cursor over DER bytes.
#[derive(Clone, Copy)]
pub struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Reads one TLV and returns (tag, content).
    pub fn read_any(&mut self) -> Result<(u8, &'a [u8]), DerError> {
        let (&tag, rest) = self
            .data
            .split_first()
            .ok_or(DerError("truncated: no tag"))?;
        let (&first, mut rest) = rest.split_first().ok_or(DerError("truncated: no length"))?;
        let len = if first < 0x80 {
            first as usize
        } else {
            let n = (first & 0x7f) as usize;
            if n == 0 || n > 4 {
                return Err(DerError("unsupported length encoding"));
            }
            if rest.len() < n {
                return Err(DerError("truncated length"));
            }
            let (len_bytes, after) = rest.split_at(n);
            if len_bytes[0] == 0 {
                return Err(DerError("non-minimal length"));
            }
            rest = after;
            let len = len_bytes
                .iter()
                .fold(0usize, |acc, b| (acc << 8) | *b as usize);
            if len < 0x80 {
                return Err(DerError("non-minimal length"));
            }
            len
        };
        if rest.len() < len {
            return Err(DerError("truncated content"));
        }
        let (content, after) = rest.split_at(len);
        self.data = after;
        Ok((tag, content))
    }

    /// Reads one TLV that must carry `tag`.
    pub fn read(&mut self, tag: u8) -> Result<&'a [u8], DerError> {
        let (t, content) = self.read_any()?;
        if t != tag {
            return Err(DerError("unexpected tag"));
        }
        Ok(content)
    }

    pub fn read_utf8(&mut self) -> Result<&'a str, DerError> {
        let content = self.read(TAG_UTF8_STRING)?;
        std::str::from_utf8(content).map_err(|_| DerError("invalid UTF-8"))
    }

    /// Reads a non-negative INTEGER that fits in 63 bits (minimal DER only).
    pub fn read_u63(&mut self) -> Result<i64, DerError> {
        let content = self.read(TAG_INTEGER)?;
        let (first, rest) = content.split_first().ok_or(DerError("empty INTEGER"))?;
        if first & 0x80 != 0 {
            return Err(DerError("negative INTEGER"));
        }
        if *first == 0 && rest.first().is_some_and(|b| b & 0x80 == 0) {
            return Err(DerError("INTEGER not minimally encoded"));
        }
        let magnitude = if *first == 0 && !rest.is_empty() {
            rest
        } else {
            content
        };
        if magnitude.len() > 8 || (magnitude.len() == 8 && magnitude[0] & 0x80 != 0) {
            return Err(DerError("INTEGER too large"));
        }
        Ok(magnitude.iter().fold(0i64, |n, b| (n << 8) | i64::from(*b)))
    }

    /// Reads a SEQUENCE OF UTF8String.
    pub fn read_utf8_seq(&mut self) -> Result<Vec<String>, DerError> {
        let mut inner = Reader::new(self.read(TAG_SEQUENCE)?);
        let mut out = Vec::new();
        while !inner.is_empty() {
            out.push(inner.read_utf8()?.to_owned());
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn oid_matches_known_encodings() {
        // 1.2.840.10045.4.3.2 (ecdsa-with-SHA256)
        assert_eq!(
            oid_content(&[1, 2, 840, 10045, 4, 3, 2]),
            vec![0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02]
        );
        // 2.5.4.3 (commonName)
        assert_eq!(oid_content(&[2, 5, 4, 3]), vec![0x55, 0x04, 0x03]);
    }

    #[test]
    fn integers_are_minimal_and_positive() {
        let mut out = Vec::new();
        write_unsigned_integer(&mut out, &[0, 0, 0x80]);
        assert_eq!(out, vec![0x02, 0x02, 0x00, 0x80]);
        out.clear();
        write_unsigned_integer(&mut out, &[0, 0]);
        assert_eq!(out, vec![0x02, 0x01, 0x00]);
    }

    #[test]
    fn rejects_non_minimal_and_truncated() {
        assert!(Reader::new(&[0x30, 0x81, 0x05, 1, 2, 3, 4, 5])
            .read_any()
            .is_err());
        assert!(Reader::new(&[0x30, 0x05, 1, 2]).read_any().is_err());
        assert!(Reader::new(&[0x30]).read_any().is_err());
        assert!(Reader::new(&[0x30, 0x85, 1, 1, 1, 1, 1])
            .read_any()
            .is_err());
    }

    #[test]
    fn small_integers_read_back_only_when_minimal_and_in_range() {
        let read = |bytes: &[u8]| Reader::new(bytes).read_u63();
        assert_eq!(read(&[0x02, 0x01, 0x00]).unwrap(), 0);
        assert_eq!(read(&[0x02, 0x02, 0x00, 0x80]).unwrap(), 128);
        assert!(read(&[0x02, 0x02, 0x00, 0x7f]).is_err(), "not minimal");
        assert!(read(&[0x02, 0x01, 0x80]).is_err(), "negative");
        assert!(read(&[0x02, 0x00]).is_err(), "empty");
        assert!(
            read(&[0x02, 0x09, 0x00, 0x80, 0, 0, 0, 0, 0, 0, 0]).is_err(),
            "over 63 bits"
        );
    }

    proptest! {
        #[test]
        fn u63_round_trips(n in 0i64..=i64::MAX) {
            let mut out = Vec::new();
            write_unsigned_integer(&mut out, &n.to_be_bytes());
            let mut r = Reader::new(&out);
            prop_assert_eq!(r.read_u63().unwrap(), n);
            prop_assert!(r.is_empty());
        }

        #[test]
        fn reader_never_panics(data in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut r = Reader::new(&data);
            while let Ok((_, _)) = r.read_any() {}
        }

        #[test]
        fn tlv_round_trips(tag in any::<u8>(), content in proptest::collection::vec(any::<u8>(), 0..600)) {
            let mut out = Vec::new();
            write_tlv(&mut out, tag, &content);
            let mut r = Reader::new(&out);
            let (t, c) = r.read_any().unwrap();
            prop_assert_eq!(t, tag);
            prop_assert_eq!(c, &content[..]);
            prop_assert!(r.is_empty());
        }
    }
}
