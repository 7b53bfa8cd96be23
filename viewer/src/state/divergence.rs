//! The replay divergence report `slug view --divergence` reads, and where it lands on the timeline.
//!
//! The report is one JSON object written by `slug replay` when verification fails:
//!
//! ```json
//! {
//!   "endpoint": "node0/s1",     // endpoint name `<node>/s<stage>`, or its manifest id (number)
//!   "step": 12,                 // step in which the first difference was seen
//!   "layer": 3,                 // model layer, or null when the difference is not in a layer
//!   "kernel": "gemm",           // kernel that produced the differing output, or null
//!   "transfer_id": 4711,        // transfer whose content differed, or null
//!   "offset": 96,               // index of the first differing element
//!   "expected": "0x3f800000",   // recorded value (any JSON value; shown as written)
//!   "got": "0x3f800001",        // replayed value (any JSON value)
//!   "later_differing": 17       // how many further elements/transfers differed after it
//! }
//! ```

use std::path::Path;

use serde::Deserialize;

use crate::error::{Result, ViewerError};
use crate::state::source::EndpointInfo;

/// Which endpoint diverged: by name or by manifest id.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum EndpointRef {
    /// Endpoint id, as in the manifest.
    Id(u32),
    /// Endpoint name (`n0/s1`).
    Name(String),
}

/// The first divergence a replay found.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct Divergence {
    /// Endpoint whose output differed.
    pub endpoint: EndpointRef,
    /// Step of the first difference.
    pub step: u64,
    /// Layer, when known.
    #[serde(default)]
    pub layer: Option<u32>,
    /// Kernel, when known.
    #[serde(default)]
    pub kernel: Option<String>,
    /// Transfer whose content differed, when the difference was seen on a link.
    #[serde(default)]
    pub transfer_id: Option<u64>,
    /// Index of the first differing element.
    #[serde(default)]
    pub offset: Option<u64>,
    /// The recorded value.
    #[serde(default)]
    pub expected: serde_json::Value,
    /// The replayed value.
    #[serde(default)]
    pub got: serde_json::Value,
    /// Number of later differences.
    #[serde(default)]
    pub later_differing: u64,
}

impl Divergence {
    /// Reads and parses a report file.
    pub fn read(path: &Path) -> Result<Self> {
        let unreadable = |reason: String| ViewerError::DivergenceUnreadable {
            path: path.to_path_buf(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| unreadable(e.to_string()))?;
        serde_json::from_str(&text).map_err(|e| unreadable(e.to_string()))
    }

    /// Resolves the endpoint against the trace's endpoints.
    pub fn endpoint_index(&self, endpoints: &[EndpointInfo]) -> Option<usize> {
        match &self.endpoint {
            EndpointRef::Id(id) => endpoints.iter().position(|e| e.id == *id),
            EndpointRef::Name(n) => endpoints.iter().position(|e| e.name == *n),
        }
    }

    /// One line for the banner: where and what.
    pub fn summary(&self, endpoint_name: &str) -> String {
        let mut s = format!("first divergence: {endpoint_name} step {}", self.step);
        if let Some(l) = self.layer {
            s.push_str(&format!(" layer {l}"));
        }
        if let Some(k) = &self.kernel {
            s.push_str(&format!(" kernel {k}"));
        }
        if let Some(t) = self.transfer_id {
            s.push_str(&format!(" transfer #{t}"));
        }
        if let Some(o) = self.offset {
            s.push_str(&format!(" @{o}"));
        }
        s.push_str(&format!(
            ": expected {} got {} ({} later differ)",
            self.expected, self.got, self.later_differing
        ));
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_shape() {
        let d: Divergence = serde_json::from_str(
            r#"{"endpoint":"n0/s1","step":12,"layer":3,"kernel":"gemm","transfer_id":4711,
                "offset":96,"expected":"0x3f800000","got":"0x3f800001","later_differing":17}"#,
        )
        .expect("documented shape parses");
        assert_eq!(d.endpoint, EndpointRef::Name("n0/s1".into()));
        assert_eq!(d.transfer_id, Some(4711));
        let s = d.summary("n0/s1");
        assert!(
            s.contains("step 12 layer 3 kernel gemm transfer #4711 @96"),
            "{s}"
        );
    }

    #[test]
    fn endpoint_by_id_or_name() {
        let eps = crate::state::fixture::endpoints(3);
        let by_id: Divergence =
            serde_json::from_str(r#"{"endpoint": 2, "step": 0}"#).expect("parses");
        assert_eq!(by_id.endpoint_index(&eps), Some(2));
        let by_name: Divergence =
            serde_json::from_str(r#"{"endpoint": "n0/s1", "step": 0}"#).expect("parses");
        assert_eq!(by_name.endpoint_index(&eps), Some(1));
        let unknown: Divergence =
            serde_json::from_str(r#"{"endpoint": 9, "step": 0}"#).expect("parses");
        assert_eq!(unknown.endpoint_index(&eps), None);
    }

    #[test]
    fn missing_file_names_the_path() {
        let err = Divergence::read(Path::new("/nonexistent/report.json")).expect_err("no file");
        assert!(err.to_string().contains("/nonexistent/report.json"));
    }
}
