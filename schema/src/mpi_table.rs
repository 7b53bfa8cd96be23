//! The `mpi` table of `manifest.json`: how an MPI recording's transfers travelled (the
//! communicator, and per link the ranks at its ends and its message tags), so a reader can
//! name the communicator, tag and ranks of every `mpi` transfer event from its link and length.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use crate::trace::{EndpointInfo, MAX_ENDPOINTS};

/// Longest communicator name a manifest may hold.
pub const MAX_COMMUNICATOR: usize = 256;

/// The MPI wiring of a recording made with `--transport mpi`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MpiTable {
    /// The communicator every link's messages used (`MPI_COMM_WORLD`).
    pub communicator: String,
    /// Transfers of at most this many bytes travelled as one message (header and bytes
    /// together, tag `header_tag`); larger ones as a header message, then the payload with
    /// tag `payload_tag`.
    pub inline_limit: u64,
    /// One entry per link.
    pub links: Vec<MpiLink>,
}

/// One link of an MPI recording.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MpiLink {
    /// The link (as in the transfer id, [`crate::TransferKey::link`]).
    pub link: u32,
    /// Rank that sent on it.
    pub source_rank: u32,
    /// Rank that received on it.
    pub dest_rank: u32,
    /// Tag of its header messages (and of inline transfers).
    pub header_tag: u32,
    /// Tag of its payload messages.
    pub payload_tag: u32,
}

/// How one transfer travelled over MPI ([`MpiTable::transfer`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MpiTransfer<'a> {
    /// The communicator.
    pub communicator: &'a str,
    /// Sending rank.
    pub source_rank: u32,
    /// Receiving rank.
    pub dest_rank: u32,
    /// Tag of the transfer's first (header) message.
    pub tag: u32,
    /// Tag of its payload message, when it was not inline.
    pub payload_tag: Option<u32>,
}

impl MpiTable {
    /// How the transfer of `len` bytes on `link` travelled; `None` when the table has no
    /// such link.
    pub fn transfer(&self, link: u32, len: u64) -> Option<MpiTransfer<'_>> {
        let l = self.links.iter().find(|l| l.link == link)?;
        Some(MpiTransfer {
            communicator: &self.communicator,
            source_rank: l.source_rank,
            dest_rank: l.dest_rank,
            tag: l.header_tag,
            payload_tag: (len > self.inline_limit).then_some(l.payload_tag),
        })
    }

    /// Checks the table against the manifest's `endpoints` (a manifest is untrusted input):
    /// bounded sizes, valid MPI tags, unique links and tags, and ranks that are endpoints'
    /// ranks. The error says what is wrong.
    pub fn check(&self, endpoints: &[EndpointInfo]) -> Result<(), String> {
        let c = &self.communicator;
        if c.is_empty() || c.len() > MAX_COMMUNICATOR || c.chars().any(char::is_control) {
            return Err(format!(
                "names a communicator that is empty, longer than {MAX_COMMUNICATOR} bytes or \
                 holds control characters ({} bytes)",
                c.len()
            ));
        }
        if self.links.len() > MAX_ENDPOINTS {
            return Err(format!(
                "lists {} links, more than the {MAX_ENDPOINTS} a slug trace may hold",
                self.links.len()
            ));
        }
        let ranks: HashSet<u32> = endpoints.iter().map(|e| e.rank).collect();
        let mut links = HashSet::new();
        let mut tags = HashSet::new();
        for l in &self.links {
            let at = format!("link {}", l.link);
            if !links.insert(l.link) {
                return Err(format!("lists {at} twice"));
            }
            for rank in [l.source_rank, l.dest_rank] {
                if !ranks.contains(&rank) {
                    return Err(format!(
                        "says {at} joins rank {rank}, which no endpoint of the manifest has"
                    ));
                }
            }
            if l.source_rank == l.dest_rank {
                return Err(format!(
                    "says {at} goes from rank {} to itself",
                    l.source_rank
                ));
            }
            for tag in [l.header_tag, l.payload_tag] {
                if tag > i32::MAX as u32 {
                    return Err(format!("gives {at} tag {tag}, which is not an MPI tag"));
                }
                if !tags.insert(tag) {
                    return Err(format!(
                        "gives {at} tag {tag}, which another message kind or link also has"
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(rank: u32) -> EndpointInfo {
        EndpointInfo {
            id: rank,
            node: format!("rank {rank} on h"),
            host: "h".into(),
            rank,
            stage: rank,
            log: crate::Trace::log_path_for(rank),
            continues: None,
            steps: None,
        }
    }

    fn table() -> MpiTable {
        MpiTable {
            communicator: "MPI_COMM_WORLD".into(),
            inline_limit: 4096,
            links: (0..2)
                .map(|l| MpiLink {
                    link: l,
                    source_rank: l,
                    dest_rank: (l + 1) % 2,
                    header_tag: 2 * l,
                    payload_tag: 2 * l + 1,
                })
                .collect(),
        }
    }

    #[test]
    fn a_transfer_s_tags_follow_from_its_link_and_length() {
        let t = table();
        let small = t.transfer(1, 4096).unwrap();
        assert_eq!(
            (small.communicator, small.source_rank, small.dest_rank),
            ("MPI_COMM_WORLD", 1, 0)
        );
        assert_eq!((small.tag, small.payload_tag), (2, None));
        let large = t.transfer(1, 4097).unwrap();
        assert_eq!((large.tag, large.payload_tag), (2, Some(3)));
        assert!(t.transfer(2, 1).is_none());
    }

    #[test]
    fn inconsistent_tables_are_refused_with_the_reason() {
        let eps = [endpoint(0), endpoint(1)];
        assert_eq!(table().check(&eps), Ok(()));
        let bad = |f: fn(&mut MpiTable)| {
            let mut t = table();
            f(&mut t);
            t.check(&eps).unwrap_err()
        };
        assert!(bad(|t| t.communicator.clear()).contains("communicator"));
        assert!(bad(|t| t.communicator = "x".repeat(MAX_COMMUNICATOR + 1)).contains("longer"));
        assert!(bad(|t| t.links[1].link = 0).contains("link 0 twice"));
        assert!(bad(|t| t.links[0].dest_rank = 7).contains("rank 7"));
        assert!(bad(|t| t.links[0].dest_rank = 0).contains("to itself"));
        assert!(bad(|t| t.links[0].payload_tag = u32::MAX).contains("not an MPI tag"));
        assert!(bad(|t| t.links[1].header_tag = 1).contains("tag 1"));
        assert!(
            bad(|t| {
                let l = t.links[0].clone();
                t.links = vec![l; MAX_ENDPOINTS + 1];
            })
            .contains("more than")
        );
    }
}
