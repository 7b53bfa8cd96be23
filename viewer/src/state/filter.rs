//! The `/` filter: which endpoints and events the timeline shows.

use crate::state::event::{EventKind, Names, TraceEvent};
use crate::state::source::EndpointInfo;

/// A parsed filter. Terms are `kind:NAME`, `kernel:TEXT`, `ep:TEXT` or a bare word; every term
/// must match (bare words match a kernel name, an endpoint name or an event label).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    kinds: Vec<EventKind>,
    kernels: Vec<String>,
    endpoints: Vec<String>,
    words: Vec<String>,
    text: String,
}

impl Filter {
    /// Parses the text typed after `/`. Unknown `kind:` names are reported, not ignored.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut f = Filter {
            text: text.trim().to_string(),
            ..Filter::default()
        };
        for term in text.split_whitespace() {
            let lower = term.to_lowercase();
            if let Some(kind) = lower.strip_prefix("kind:") {
                let parsed = EventKind::from_name(kind).ok_or_else(|| {
                    let names: Vec<_> = EventKind::ALL.iter().map(|k| k.name()).collect();
                    format!("unknown kind `{kind}`; kinds are {}", names.join(", "))
                })?;
                f.kinds.push(parsed);
            } else if let Some(k) = lower.strip_prefix("kernel:") {
                f.kernels.push(k.to_string());
            } else if let Some(e) = lower.strip_prefix("ep:") {
                f.endpoints.push(e.to_string());
            } else {
                f.words.push(lower);
            }
        }
        Ok(f)
    }

    /// The text the filter was parsed from, empty when it lets everything through.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Whether the filter lets everything through.
    pub fn is_empty(&self) -> bool {
        self.text.is_empty()
    }

    /// Whether the filter has terms only decoded events can answer (kernel names, words); the
    /// index-drawn overview honours kinds and endpoints only.
    pub fn needs_events(&self) -> bool {
        !self.kernels.is_empty() || !self.words.is_empty()
    }

    /// Whether the endpoint's track is shown.
    pub fn shows_endpoint(&self, ep: &EndpointInfo) -> bool {
        let name = ep.name.to_lowercase();
        let node = ep.node.to_lowercase();
        self.endpoints.iter().all(|e| {
            name.contains(e.as_str()) || node.contains(e.as_str()) || ep.stage.to_string() == *e
        })
    }

    /// Whether the kind passes the `kind:` terms (used to skip frames that hold none of them).
    pub fn shows_kind(&self, kind: EventKind) -> bool {
        self.kinds.is_empty() || self.kinds.contains(&kind)
    }

    /// Whether one event is shown on a track of endpoint `ep` (`names`: the trace's strings).
    pub fn shows_event(&self, ep: &EndpointInfo, names: &Names, ev: &TraceEvent) -> bool {
        if !self.shows_kind(ev.kind()) {
            return false;
        }
        if !self.kernels.is_empty() {
            let TraceEvent::KernelSpan(k) = ev else {
                return false;
            };
            let name = names.get(k.kernel).to_lowercase();
            if !self.kernels.iter().all(|want| name.contains(want.as_str())) {
                return false;
            }
        }
        if self.words.is_empty() {
            return true;
        }
        let label = ev.label(names).to_lowercase();
        let ep_name = ep.name.to_lowercase();
        self.words
            .iter()
            .all(|w| label.contains(w.as_str()) || ep_name.contains(w.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::event::{KernelSpan, StepBoundary};

    fn ep(name: &str) -> EndpointInfo {
        EndpointInfo {
            id: 1,
            name: name.to_string(),
            node: "n0".to_string(),
            stage: 1,
            rank: 1,
        }
    }

    fn kernel(names: &mut Names, name: &str) -> TraceEvent {
        TraceEvent::KernelSpan(KernelSpan {
            start_ns: 0,
            end_ns: 1,
            kernel: names.intern(name),
            step: 0,
            layer: None,
            seq: 0,
            rows: 1,
            output_hash: None,
        })
    }

    #[test]
    fn terms_combine() {
        let f = Filter::parse("kind:kernel_span kernel:gemm").expect("valid filter");
        assert!(f.needs_events());
        assert!(
            !Filter::parse("kind:step_boundary ep:s1")
                .expect("valid")
                .needs_events()
        );
        let mut names = Names::default();
        let (gemm, rmsnorm) = (kernel(&mut names, "gemm_q"), kernel(&mut names, "rmsnorm"));
        assert!(f.shows_event(&ep("n0/s1"), &names, &gemm));
        assert!(!f.shows_event(&ep("n0/s1"), &names, &rmsnorm));
        assert!(!f.shows_event(
            &ep("n0/s1"),
            &names,
            &TraceEvent::StepBoundary(StepBoundary {
                ns: 0,
                step: 1,
                seq: 0
            })
        ));
    }

    #[test]
    fn endpoint_terms_hide_tracks() {
        let f = Filter::parse("ep:s2").expect("valid filter");
        assert!(!f.shows_endpoint(&ep("n0/s1")));
        assert!(f.shows_endpoint(&ep("n0/s2")));
    }

    #[test]
    fn unknown_kind_is_an_error_that_lists_kinds() {
        let err = Filter::parse("kind:bogus").expect_err("bogus kind");
        assert!(err.contains("kernel_span, transfer"), "{err}");
        // The viewer takes exactly the names `slug info` prints: no second spelling.
        assert!(Filter::parse("kind:kernel").is_err());
        for kind in slug_schema::EventKind::ALL {
            assert!(Filter::parse(&format!("kind:{}", kind.name())).is_ok());
        }
    }
}
