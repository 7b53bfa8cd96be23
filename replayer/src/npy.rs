//! Named sections of a stage arena as NumPy `.npy` files (format version 1.0, written here):
//! the KV cache of a layer, a sequence's inbox or outbox, any region of the layout.

use std::io::Write;
use std::path::Path;

use slug_kernels::{Payload, Section, Span, Stage};

use crate::error::{ReplayError, Result};

/// Element type of a dumped tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    /// Little-endian f32 (`<f4`).
    F32,
    /// Little-endian u32 token ids (`<u4`).
    U32,
}

impl Dtype {
    fn descr(self) -> &'static str {
        match self {
            Dtype::F32 => "<f4",
            Dtype::U32 => "<u4",
        }
    }
}

/// A tensor cut out of an arena: shape, element type, little-endian bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    /// What was asked for.
    pub name: String,
    /// Row-major shape.
    pub shape: Vec<usize>,
    /// Element type.
    pub dtype: Dtype,
    /// The elements' bytes.
    pub bytes: Vec<u8>,
}

/// Tensors `--dump` knows besides every layout region name (`layer.3.wq`, `x`, ...):
/// sections (`weights`, `kv_cache`, `activations`, `workspace`), `k.layer.L.seq.S` and
/// `v.layer.L.seq.S` (the filled positions `[position, kv_dim]`), `kv.layer.L` (`[2 x
/// sequences x max_seq x kv_dim]`), `inbox.seq.S` and `outbox.seq.S`.
pub fn tensor(stage: &Stage, name: &str) -> Result<Tensor> {
    let layout = stage.layout();
    let bytes = stage.arena().bytes();
    let c = stage.config();
    let kvd = c.kv_dim();
    let cut = |span: Span, shape: Vec<usize>, dtype: Dtype| Tensor {
        name: name.to_string(),
        shape,
        dtype,
        bytes: bytes[span.byte_range()].to_vec(),
    };
    let box_shape = |payload: Payload| match payload {
        Payload::Tokens => (vec![layout.max_seq], Dtype::U32),
        Payload::Hidden => (vec![layout.max_seq, c.dim], Dtype::F32),
    };
    let number = |s: &str| s.parse::<usize>().ok();
    let parts: Vec<&str> = name.split('.').collect();
    if let Some(section) = Section::ALL.iter().find(|s| s.name() == name) {
        let (offset, len) = layout.section(*section);
        let span = Span {
            offset,
            len: len / 4,
        };
        return Ok(cut(span, vec![span.len], Dtype::F32));
    }
    let local_layer = |l: usize| layout.layers.clone().position(|x| x == l);
    match parts.as_slice() {
        [kv @ ("k" | "v"), "layer", l, "seq", q] => {
            if let (Some(local), Some(seq)) = (number(l).and_then(local_layer), number(q))
                && seq < layout.sequences
            {
                let span = if *kv == "k" {
                    layout.k_cache(local, seq)
                } else {
                    layout.v_cache(local, seq)
                };
                let filled = stage.cursor().positions[seq];
                return Ok(cut(
                    span.prefix(filled * kvd),
                    vec![filled, kvd],
                    Dtype::F32,
                ));
            }
        }
        ["kv", "layer", l] => {
            if let Some(local) = number(l).and_then(local_layer) {
                let block = 2 * layout.sequences * layout.kv_block;
                let span = Span {
                    offset: layout.kv.offset + local * block * 4,
                    len: block,
                };
                let shape = vec![2, layout.sequences, layout.max_seq, kvd];
                // Stored as K then V per sequence: reorder into [K|V, sequence, ...].
                let mut out = Vec::with_capacity(span.bytes());
                for which in 0..2 {
                    for seq in 0..layout.sequences {
                        let s = if which == 0 {
                            layout.k_cache(local, seq)
                        } else {
                            layout.v_cache(local, seq)
                        };
                        out.extend_from_slice(&bytes[s.byte_range()]);
                    }
                }
                return Ok(Tensor {
                    name: name.to_string(),
                    shape,
                    dtype: Dtype::F32,
                    bytes: out,
                });
            }
        }
        [which @ ("inbox" | "outbox"), "seq", q] => {
            if let Some(seq) = number(q).filter(|s| *s < layout.sequences) {
                let (span, payload) = if *which == "inbox" {
                    (layout.inboxes[seq], layout.inbox_payload)
                } else {
                    (layout.outboxes[seq], layout.outbox_payload)
                };
                let (shape, dtype) = box_shape(payload);
                return Ok(cut(span, shape, dtype));
            }
        }
        _ => {}
    }
    // Any region of the layout report, by the name before its parenthesised note, in the
    // shape the model gives it (flat only where it has none).
    if let Some(r) = layout
        .regions
        .iter()
        .find(|r| r.name.split(' ').next() == Some(name))
    {
        let span = Span {
            offset: r.offset,
            len: r.bytes / 4,
        };
        let shape = region_shape(stage, name)
            .filter(|s| s.iter().product::<usize>() == span.len)
            .unwrap_or_else(|| vec![span.len]);
        return Ok(cut(span, shape, Dtype::F32));
    }
    Err(ReplayError::Usage(format!(
        "--dump {name}: stage {} has no such tensor; it knows: {}",
        stage.index(),
        known(stage)
    )))
}

/// Every name `--dump` takes on `stage`, as patterns over its own layers and sequences.
fn known(stage: &Stage) -> String {
    let layout = stage.layout();
    let layers = &layout.layers;
    let (l, seqs) = (
        format!("{}..{}", layers.start, layers.end),
        format!("0..{}", layout.sequences),
    );
    let own_layer = layers.start;
    let sections: Vec<&str> = Section::ALL.iter().map(|s| s.name()).collect();
    // Region names without their per-layer and per-sequence copies, said once as patterns.
    let mut regions: Vec<String> = Vec::new();
    for r in &layout.regions {
        let Some(n) = r.name.split(' ').next() else {
            continue;
        };
        let n = match n.split('.').collect::<Vec<_>>().as_slice() {
            ["layer", _, w] => format!("layer.L.{w}"),
            ["kv", "layer", _] | ["inbox" | "outbox", "seq", _] => continue,
            _ => n.to_string(),
        };
        if !regions.contains(&n) {
            regions.push(n);
        }
    }
    format!(
        "k.layer.L.seq.S, v.layer.L.seq.S (keys, values: [filled positions, kv_dim]), kv.layer.L \
         ([K|V, sequence, max_seq, kv_dim]), inbox.seq.S, outbox.seq.S, {} and {} (stage {} \
         holds layers L in {l} and sequences S in {seqs}, e.g. k.layer.{own_layer}.seq.0)",
        sections.join(", "),
        regions.join(", "),
        stage.index()
    )
}

/// The shape of layout region `name` as the model uses it: weight matrices `[in, out]`,
/// workspace buffers `[max_seq, width]`, vectors `[len]`; `None` for a name without one.
fn region_shape(stage: &Stage, name: &str) -> Option<Vec<usize>> {
    let c = stage.config();
    let layout = stage.layout();
    let (d, kvd, f, v, t) = (c.dim, c.kv_dim(), c.ffn, c.vocab, layout.max_seq);
    let parts: Vec<&str> = name.split('.').collect();
    Some(match parts.as_slice() {
        ["embed"] => vec![v, d],
        ["rope", "cos" | "sin"] => vec![t, c.head_dim() / 2],
        ["layer", _, "attn_norm" | "ffn_norm"] | ["final_norm"] => vec![d],
        ["layer", _, "wq" | "wo"] => vec![d, d],
        ["layer", _, "wk" | "wv"] => vec![d, kvd],
        ["layer", _, "w_gate" | "w_up"] => vec![d, f],
        ["layer", _, "w_down"] => vec![f, d],
        ["head"] => vec![d, v],
        ["x" | "xb" | "q" | "att" | "proj"] => vec![t, d],
        ["gate" | "up"] => vec![t, f],
        ["logits"] => vec![v],
        ["scores"] => vec![layout.max_threads, layout.work.scores_stride],
        _ => return None,
    })
}

/// The `.npy` bytes of `t`: magic, version 1.0, a header dict padded so the data starts on a
/// 64-byte boundary, then the elements.
pub fn npy_bytes(t: &Tensor) -> Vec<u8> {
    let shape = match t.shape.as_slice() {
        [one] => format!("({one},)"),
        dims => format!(
            "({})",
            dims.iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut header = format!(
        "{{'descr': '{}', 'fortran_order': False, 'shape': {shape}, }}",
        t.dtype.descr()
    );
    // magic (6) + version (2) + header length (2) + header + '\n' is a multiple of 64.
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat(unpadded.next_multiple_of(64) - unpadded));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + t.bytes.len());
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(&t.bytes);
    out
}

/// Writes `t` to `path` as `.npy`.
pub fn write_npy(t: &Tensor, path: &Path) -> Result<()> {
    let write = |e| ReplayError::Write {
        path: path.to_path_buf(),
        cause: e,
    };
    let mut f = std::fs::File::create(path).map_err(write)?;
    f.write_all(&npy_bytes(t)).map_err(write)?;
    f.sync_all().map_err(write)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses an `.npy` file the way NumPy does: magic, version, header dict, data length.
    fn parse(bytes: &[u8]) -> (String, Vec<usize>, &[u8]) {
        assert_eq!(&bytes[..6], b"\x93NUMPY");
        assert_eq!(&bytes[6..8], &[1, 0]);
        let hlen = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        assert_eq!((10 + hlen) % 64, 0, "data is 64-byte aligned");
        let header = std::str::from_utf8(&bytes[10..10 + hlen]).unwrap();
        assert!(header.ends_with('\n'));
        assert!(header.contains("'fortran_order': False"));
        let descr = header.split("'descr': '").nth(1).unwrap();
        let descr = descr[..descr.find('\'').unwrap()].to_string();
        let shape = header.split("'shape': (").nth(1).unwrap();
        let shape: Vec<usize> = shape[..shape.find(')').unwrap()]
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| s.parse().unwrap())
            .collect();
        (descr, shape, &bytes[10 + hlen..])
    }

    #[test]
    fn header_round_trips_shape_dtype_and_data() {
        for shape in [vec![3usize], vec![2, 3], vec![2, 1, 4, 2]] {
            let n: usize = shape.iter().product();
            let values: Vec<f32> = (0..n).map(|i| i as f32 * 0.5).collect();
            let t = Tensor {
                name: "t".into(),
                shape: shape.clone(),
                dtype: Dtype::F32,
                bytes: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            };
            let bytes = npy_bytes(&t);
            let (descr, got_shape, data) = parse(&bytes);
            assert_eq!(descr, "<f4");
            assert_eq!(got_shape, shape);
            let back: Vec<f32> = data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            assert_eq!(back, values);
        }
    }

    #[test]
    fn stage_tensors_have_their_layout_shapes() {
        let mut c = slug_kernels::ModelConfig::preset("tiny").unwrap();
        c.layers = 2;
        let plan = slug_kernels::LayerPlan::even(2, 2).unwrap();
        let pool = slug_kernels::ThreadPool::new(1).unwrap();
        let mut stage = Stage::new(&c, &plan, 1, 2, &pool).unwrap();
        let kvd = c.kv_dim();
        stage.set_position(1, 3).unwrap();
        let k = tensor(&stage, "k.layer.1.seq.1").unwrap();
        assert_eq!(k.shape, vec![3, kvd]);
        assert_eq!(k.bytes.len(), 3 * kvd * 4);
        let kv = tensor(&stage, "kv.layer.1").unwrap();
        assert_eq!(kv.shape, vec![2, 2, c.max_seq, kvd]);
        let out = tensor(&stage, "outbox.seq.0").unwrap();
        assert_eq!(
            (out.shape.clone(), out.dtype),
            (vec![c.max_seq], Dtype::U32)
        );
        for (name, shape) in [
            ("layer.1.wq", vec![c.dim, c.dim]),
            ("layer.1.wk", vec![c.dim, kvd]),
            ("layer.1.w_down", vec![c.ffn, c.dim]),
            ("layer.1.ffn_norm", vec![c.dim]),
            ("head", vec![c.dim, c.vocab]),
            ("x", vec![c.max_seq, c.dim]),
            ("gate", vec![c.max_seq, c.ffn]),
            ("logits", vec![c.vocab]),
        ] {
            let t = tensor(&stage, name).unwrap();
            assert_eq!(t.shape, shape, "{name}");
            assert_eq!(t.bytes.len(), shape.iter().product::<usize>() * 4, "{name}");
        }
        let err = tensor(&stage, "k.layer.0.seq.0").unwrap_err().to_string();
        for needle in [
            "no such tensor",
            "layers L in 1..2",
            "sequences S in 0..2",
            "k.layer.1.seq.0",
            "kv.layer.L",
            "outbox.seq.S",
            "layer.L.w_down",
            "head",
            "logits",
            "weights",
        ] {
            assert!(err.contains(needle), "{needle}: {err}");
        }
    }
}
