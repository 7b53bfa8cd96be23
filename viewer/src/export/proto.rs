//! A minimal protobuf wire-format encoder and decoder: just enough for Perfetto's trace messages.
//!
//! Encoding writes fields in the order given; nested messages are built into their own buffer
//! first and written length-delimited. The decoder reads one message level into fields, which the
//! export tests (and `slug export --check`) use to read back what was written.

use crate::error::{Result, ViewerError};

/// Wire type of varint fields.
const VARINT: u64 = 0;
/// Wire type of 64-bit fields.
const FIXED64: u64 = 1;
/// Wire type of length-delimited fields.
const LEN: u64 = 2;
/// Wire type of 32-bit fields.
const FIXED32: u64 = 5;

/// One protobuf message being encoded.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Message {
    buf: Vec<u8>,
}

/// Bytes a varint of `v` takes.
fn varint_len(v: u64) -> usize {
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

fn put_varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

impl Message {
    /// An empty message.
    pub fn new() -> Self {
        Self::default()
    }

    /// Empties the message, keeping its buffer for the next one.
    pub fn clear(&mut self) {
        self.buf.clear();
    }

    /// An embedded message of two fields, a string then a varint, written in place without
    /// building the child first (Perfetto's `DebugAnnotation{name, uint_value}` per slice).
    pub fn string_varint_pair(
        &mut self,
        field: u32,
        f1: u32,
        s: &str,
        f2: u32,
        v: u64,
    ) -> &mut Self {
        let key_len = |f: u32| varint_len(u64::from(f) << 3);
        let len = key_len(f1) + varint_len(s.len() as u64) + s.len() + key_len(f2) + varint_len(v);
        self.key(field, LEN);
        put_varint(&mut self.buf, len as u64);
        self.string(f1, s).varint(f2, v)
    }

    /// The length-delimited key and length that embed this message as `field` of a parent,
    /// for writing a parent's framing straight to an output.
    pub fn framing(&self, field: u32) -> Vec<u8> {
        let mut head = Vec::with_capacity(12);
        put_varint(&mut head, (u64::from(field) << 3) | LEN);
        put_varint(&mut head, self.buf.len() as u64);
        head
    }

    fn key(&mut self, field: u32, wire: u64) {
        put_varint(&mut self.buf, (u64::from(field) << 3) | wire);
    }

    /// A varint field (uint32/uint64/enum/bool, and int64 as two's complement).
    pub fn varint(&mut self, field: u32, v: u64) -> &mut Self {
        self.key(field, VARINT);
        put_varint(&mut self.buf, v);
        self
    }

    /// A signed int64 field (two's complement varint, as protobuf's `int64`).
    pub fn int64(&mut self, field: u32, v: i64) -> &mut Self {
        self.varint(field, v as u64)
    }

    /// A `fixed64` field.
    pub fn fixed64(&mut self, field: u32, v: u64) -> &mut Self {
        self.key(field, FIXED64);
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// A `double` field.
    pub fn double(&mut self, field: u32, v: f64) -> &mut Self {
        self.fixed64(field, v.to_bits())
    }

    /// A `bytes` field.
    pub fn bytes(&mut self, field: u32, v: &[u8]) -> &mut Self {
        self.key(field, LEN);
        put_varint(&mut self.buf, v.len() as u64);
        self.buf.extend_from_slice(v);
        self
    }

    /// A `string` field.
    pub fn string(&mut self, field: u32, v: &str) -> &mut Self {
        self.bytes(field, v.as_bytes())
    }

    /// An embedded message field.
    pub fn message(&mut self, field: u32, m: &Message) -> &mut Self {
        self.bytes(field, &m.buf)
    }

    /// The encoded bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf
    }
}

/// The value of one decoded field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Value<'a> {
    /// A varint.
    Varint(u64),
    /// A 64-bit fixed value.
    Fixed64(u64),
    /// Length-delimited bytes (string, bytes or embedded message).
    Bytes(&'a [u8]),
    /// A 32-bit fixed value.
    Fixed32(u32),
}

impl<'a> Value<'a> {
    /// The number, for varint and fixed fields.
    pub fn as_u64(self) -> Option<u64> {
        match self {
            Value::Varint(v) | Value::Fixed64(v) => Some(v),
            Value::Fixed32(v) => Some(u64::from(v)),
            Value::Bytes(_) => None,
        }
    }

    /// The bytes, for length-delimited fields.
    pub fn as_bytes(self) -> Option<&'a [u8]> {
        match self {
            Value::Bytes(b) => Some(b),
            _ => None,
        }
    }

    /// The text, for string fields holding UTF-8.
    pub fn as_str(self) -> Option<&'a str> {
        std::str::from_utf8(self.as_bytes()?).ok()
    }
}

fn malformed(offset: usize, reason: &str) -> ViewerError {
    ViewerError::MalformedExport {
        format: "protobuf",
        offset,
        reason: reason.to_string(),
    }
}

fn get_varint(data: &[u8], pos: &mut usize) -> Result<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *data
            .get(*pos)
            .ok_or_else(|| malformed(*pos, "varint runs past the end"))?;
        *pos += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(malformed(*pos, "varint longer than 10 bytes"))
}

/// Decodes one message level into `(field, value)` pairs, in wire order.
pub fn decode(data: &[u8]) -> Result<Vec<(u32, Value<'_>)>> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < data.len() {
        let key_at = pos;
        let key = get_varint(data, &mut pos)?;
        let field =
            u32::try_from(key >> 3).map_err(|_| malformed(key_at, "field number too large"))?;
        let value = match key & 7 {
            VARINT => Value::Varint(get_varint(data, &mut pos)?),
            FIXED64 => {
                let b = data
                    .get(pos..pos + 8)
                    .ok_or_else(|| malformed(pos, "fixed64 runs past the end"))?;
                pos += 8;
                Value::Fixed64(u64::from_le_bytes(
                    b.try_into().map_err(|_| malformed(pos, "fixed64"))?,
                ))
            }
            LEN => {
                let len = get_varint(data, &mut pos)? as usize;
                let end = pos
                    .checked_add(len)
                    .filter(|e| *e <= data.len())
                    .ok_or_else(|| malformed(pos, "length runs past the end"))?;
                let b = &data[pos..end];
                pos = end;
                Value::Bytes(b)
            }
            FIXED32 => {
                let b = data
                    .get(pos..pos + 4)
                    .ok_or_else(|| malformed(pos, "fixed32 runs past the end"))?;
                pos += 4;
                Value::Fixed32(u32::from_le_bytes(
                    b.try_into().map_err(|_| malformed(pos, "fixed32"))?,
                ))
            }
            _ => return Err(malformed(key_at, "unsupported wire type")),
        };
        out.push((field, value));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_wire_type() {
        let mut inner = Message::new();
        inner.string(2, "gemm");
        let mut m = Message::new();
        m.varint(1, 300)
            .int64(3, -1)
            .fixed64(47, 0xdead_beef)
            .double(5, 1.5)
            .message(11, &inner);
        let fields = decode(m.as_bytes()).expect("decodes");
        assert_eq!(fields[0], (1, Value::Varint(300)));
        assert_eq!(fields[1], (3, Value::Varint(u64::MAX)));
        assert_eq!(fields[2], (47, Value::Fixed64(0xdead_beef)));
        assert_eq!(fields[3].1.as_u64().map(f64::from_bits), Some(1.5));
        let nested = decode(fields[4].1.as_bytes().expect("bytes")).expect("nested decodes");
        assert_eq!(nested[0].1.as_str(), Some("gemm"));
    }

    #[test]
    fn in_place_pairs_and_framing_match_nested_encoding() {
        for v in [0, 1, 127, 128, 300, u64::MAX] {
            let mut child = Message::new();
            child.string(10, "layer").varint(3, v);
            let mut nested = Message::new();
            nested.message(4, &child);
            let mut in_place = Message::new();
            in_place.string_varint_pair(4, 10, "layer", 3, v);
            assert_eq!(in_place, nested, "value {v}");
            let mut framed = Message::new();
            framed.message(1, &child);
            let mut direct = child.framing(1);
            direct.extend_from_slice(child.as_bytes());
            assert_eq!(direct, framed.as_bytes());
        }
    }

    #[test]
    fn known_encoding_of_300() {
        let mut m = Message::new();
        m.varint(1, 300);
        assert_eq!(m.as_bytes(), &[0x08, 0xac, 0x02]);
    }

    #[test]
    fn truncated_input_is_an_error_not_a_panic() {
        assert!(decode(&[0x0a, 0x05, 0x01]).is_err());
        assert!(decode(&[0x08, 0xff]).is_err());
        assert!(decode(&[0x0b]).is_err());
    }
}
