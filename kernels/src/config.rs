//! Model configuration: the Llama-style decoder's dimensions, presets, and validation.

use serde::{Deserialize, Serialize};

use crate::error::Error;

/// Dimensions and options of the decoder. Every field can be overridden after picking a preset;
/// call [`ModelConfig::validate`] before laying out an arena.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Preset the config started from (`tiny`, `small`, `base`) or `custom`.
    pub name: String,
    /// Decoder layers.
    pub layers: usize,
    /// Model width (hidden size).
    pub dim: usize,
    /// Query heads; must divide `dim`.
    pub heads: usize,
    /// Key/value heads; must divide `heads` (fewer than `heads` is grouped-query attention).
    pub kv_heads: usize,
    /// Hidden width of the SwiGLU MLP.
    pub ffn: usize,
    /// Vocabulary size; at least 256 because prompt bytes are token ids.
    pub vocab: usize,
    /// Context length the KV cache holds per sequence.
    pub max_seq: usize,
    /// RoPE base frequency.
    pub rope_theta: f32,
    /// RMSNorm epsilon.
    pub norm_eps: f32,
    /// Seed the weights are generated from.
    pub seed: u64,
    /// Fused multiply-add in products and dot products. Changes results, so it is part of the
    /// config and of any trace of a run; a node without FMA must refuse an FMA run.
    pub fma: bool,
}

/// Names of the presets, smallest first.
pub const PRESETS: [&str; 3] = ["tiny", "small", "base"];

impl ModelConfig {
    /// A preset: `tiny` (tests, well under a second), `small` (~10M parameters), `base`
    /// (~115M parameters, for benchmarks).
    pub fn preset(name: &str) -> Result<ModelConfig, Error> {
        let (layers, dim, heads, kv_heads, ffn, vocab, max_seq) = match name {
            "tiny" => (2, 64, 4, 2, 176, 256, 128),
            "small" => (6, 384, 6, 2, 1024, 512, 512),
            "base" => (12, 768, 12, 12, 3072, 1024, 1024),
            _ => {
                return Err(Error::UnknownPreset {
                    name: name.to_owned(),
                });
            }
        };
        Ok(ModelConfig {
            name: name.to_owned(),
            layers,
            dim,
            heads,
            kv_heads,
            ffn,
            vocab,
            max_seq,
            rope_theta: 10_000.0,
            norm_eps: 1e-5,
            seed: 0,
            fma: false,
        })
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.dim / self.heads.max(1)
    }

    /// Width of the keys (and values) of one token.
    pub fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim()
    }

    /// Parameters of one decoder layer.
    pub fn layer_parameters(&self) -> u64 {
        let (d, kv, f) = (self.dim as u64, self.kv_dim() as u64, self.ffn as u64);
        2 * d + 2 * d * d + 2 * d * kv + 3 * d * f
    }

    /// Parameters of the whole model (embedding, layers, final norm, output head).
    pub fn parameters(&self) -> u64 {
        let (d, v) = (self.dim as u64, self.vocab as u64);
        v * d + self.layers as u64 * self.layer_parameters() + d + d * v
    }

    /// Refuses impossible configurations, naming the value and why.
    pub fn validate(&self) -> Result<(), Error> {
        let positive = [
            ("layers", self.layers),
            ("dim", self.dim),
            ("heads", self.heads),
            ("kv-heads", self.kv_heads),
            ("ffn", self.ffn),
            ("vocab", self.vocab),
            ("max-seq", self.max_seq),
        ];
        for (field, value) in positive {
            if value == 0 {
                return Err(invalid(field, value, "must be at least 1".into()));
            }
        }
        if !self.dim.is_multiple_of(self.heads) {
            return Err(invalid(
                "heads",
                self.heads,
                format!("must divide dim = {} evenly", self.dim),
            ));
        }
        if !self.heads.is_multiple_of(self.kv_heads) {
            return Err(invalid(
                "kv-heads",
                self.kv_heads,
                format!("must divide heads = {} evenly", self.heads),
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(invalid(
                "heads",
                self.heads,
                format!(
                    "gives head width dim / heads = {}, which must be even for RoPE",
                    self.head_dim()
                ),
            ));
        }
        if self.vocab < 256 {
            return Err(invalid(
                "vocab",
                self.vocab,
                "must be at least 256: prompt bytes are token ids".into(),
            ));
        }
        if self.vocab > u32::MAX as usize {
            return Err(invalid(
                "vocab",
                self.vocab,
                "must fit a u32 token id".into(),
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 1.0) {
            return Err(invalid(
                "rope-theta",
                self.rope_theta,
                "must be finite and above 1".into(),
            ));
        }
        if !(self.norm_eps.is_finite() && self.norm_eps > 0.0) {
            return Err(invalid(
                "norm-eps",
                self.norm_eps,
                "must be finite and above 0".into(),
            ));
        }
        Ok(())
    }
}

fn invalid(field: &'static str, value: impl std::fmt::Display, reason: String) -> Error {
    Error::InvalidConfig {
        field,
        value: value.to_string(),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_validate_and_base_is_at_least_100m() {
        for name in PRESETS {
            ModelConfig::preset(name).unwrap().validate().unwrap();
        }
        assert!(ModelConfig::preset("base").unwrap().parameters() >= 100_000_000);
        assert!(matches!(
            ModelConfig::preset("huge"),
            Err(Error::UnknownPreset { .. })
        ));
    }

    #[test]
    fn impossible_configs_name_the_field() {
        let base = ModelConfig::preset("tiny").unwrap();
        type Change = fn(&mut ModelConfig);
        let cases: [(&str, Change); 6] = [
            ("dim", |c| c.dim = 0),
            ("layers", |c| c.layers = 0),
            ("heads", |c| c.heads = 5),
            ("kv-heads", |c| c.kv_heads = 3),
            ("vocab", |c| c.vocab = 100),
            ("heads", |c| c.heads = 64),
        ];
        for (field, change) in cases {
            let mut c = base.clone();
            change(&mut c);
            let err = c.validate().unwrap_err();
            assert!(
                matches!(&err, Error::InvalidConfig { field: f, .. } if *f == field),
                "{field}: {err}"
            );
        }
    }
}
