//! Deterministic replay of one stage or the whole pipeline, verification and first-divergence reports.
