//! The transfer id a log holds: one `u64` packing the link a transfer crossed and its sequence
//! number on that link, so that both ends of a transfer (and any reader) agree on it.

use std::fmt;

/// Bits of the packed id that hold the sequence number; the link takes the 24 above them.
const SEQ_BITS: u32 = 40;
const SEQ_MASK: u64 = (1 << SEQ_BITS) - 1;

/// A transfer's identity across endpoints: the link (the sending stage's outgoing link) and
/// the transfer's sequence number on it. [`TransferKey::pack`] is what `Transfer::id` holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TransferKey {
    /// The link, 24 bits on disk.
    pub link: u32,
    /// The sequence number on the link, 40 bits on disk.
    pub seq: u64,
}

impl TransferKey {
    /// The id as logs store it: the link in the top 24 bits, the sequence number below
    /// (higher bits of either are dropped: no real run has 2^24 links or 2^40 transfers on one).
    pub fn pack(self) -> u64 {
        u64::from(self.link) << SEQ_BITS | (self.seq & SEQ_MASK)
    }

    /// The key a stored id packs.
    pub fn unpack(id: u64) -> TransferKey {
        TransferKey {
            link: (id >> SEQ_BITS) as u32,
            seq: id & SEQ_MASK,
        }
    }
}

impl fmt::Display for TransferKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "link {} #{}", self.link, self.seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_and_unpack_agree() {
        for key in [
            TransferKey { link: 0, seq: 0 },
            TransferKey { link: 3, seq: 17 },
            TransferKey {
                link: (1 << 24) - 1,
                seq: SEQ_MASK,
            },
        ] {
            assert_eq!(TransferKey::unpack(key.pack()), key);
        }
        assert_eq!(TransferKey { link: 1, seq: 5 }.pack(), 1 << 40 | 5);
        assert_eq!(TransferKey::unpack(2 << 40 | 9).to_string(), "link 2 #9");
    }
}
