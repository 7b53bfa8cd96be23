//! Layer plan: which decoder layers each pipeline stage owns.

use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::error::Error;

/// Splits `layers` decoder layers into consecutive stages: stage `s` owns layers
/// `bounds[s]..bounds[s + 1]`; stage 0 also owns the embedding and the last stage the final
/// norm and output head.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerPlan {
    bounds: Vec<usize>,
}

impl LayerPlan {
    /// An even split of `layers` into `stages` (earlier stages take the remainder).
    pub fn even(layers: usize, stages: usize) -> Result<LayerPlan, Error> {
        if stages == 0 {
            return Err(Error::InvalidPlan {
                reason: "stages = 0: a pipeline needs at least one stage".into(),
            });
        }
        if stages > layers {
            return Err(Error::InvalidPlan {
                reason: format!(
                    "stages = {stages} is more than layers = {layers}: every stage needs at least \
                     one layer; use --stages {layers} or fewer, or more --layers"
                ),
            });
        }
        let mut bounds = Vec::with_capacity(stages + 1);
        let (per, extra) = (layers / stages, layers % stages);
        let mut at = 0;
        bounds.push(0);
        for s in 0..stages {
            at += per + usize::from(s < extra);
            bounds.push(at);
        }
        Ok(LayerPlan { bounds })
    }

    /// A plan from explicit boundaries `0 = b0 < b1 < ... < bS = layers`.
    pub fn from_bounds(layers: usize, bounds: Vec<usize>) -> Result<LayerPlan, Error> {
        let ok = bounds.len() >= 2
            && bounds.first() == Some(&0)
            && bounds.last() == Some(&layers)
            && bounds.windows(2).all(|w| w[0] < w[1]);
        if ok {
            Ok(LayerPlan { bounds })
        } else {
            Err(Error::InvalidPlan {
                reason: format!(
                    "bounds {bounds:?} must start at 0, end at layers = {layers} and strictly increase"
                ),
            })
        }
    }

    /// Number of stages.
    pub fn stages(&self) -> usize {
        self.bounds.len() - 1
    }

    /// Total decoder layers.
    pub fn layers(&self) -> usize {
        self.bounds[self.bounds.len() - 1]
    }

    /// Layers owned by `stage` (empty when `stage` is out of range).
    pub fn layers_of(&self, stage: usize) -> Range<usize> {
        match (self.bounds.get(stage), self.bounds.get(stage + 1)) {
            (Some(&a), Some(&b)) => a..b,
            _ => 0..0,
        }
    }

    /// Whether `stage` is the first (owns the embedding, reads token ids).
    pub fn is_first(&self, stage: usize) -> bool {
        stage == 0
    }

    /// Whether `stage` is the last (owns final norm and head, writes token ids).
    pub fn is_last(&self, stage: usize) -> bool {
        stage + 1 == self.stages()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn even_split_covers_every_layer_once() {
        let plan = LayerPlan::even(7, 3).unwrap();
        assert_eq!(plan.layers_of(0), 0..3);
        assert_eq!(plan.layers_of(1), 3..5);
        assert_eq!(plan.layers_of(2), 5..7);
        assert!(plan.is_first(0) && plan.is_last(2) && !plan.is_last(1));
        assert!(LayerPlan::even(2, 3).is_err());
        assert!(LayerPlan::even(2, 0).is_err());
        assert!(LayerPlan::from_bounds(4, vec![0, 2, 2, 4]).is_err());
        assert_eq!(
            LayerPlan::from_bounds(4, vec![0, 1, 4]).unwrap().stages(),
            2
        );
    }
}
