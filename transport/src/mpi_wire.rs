//! How the MPI link backend (crate `slug-mpi`) puts transfers on the wire, kept here with no
//! MPI dependency so the recorder can describe an MPI recording's messages in its manifest
//! (communicator, ranks, tags) from the same definitions the backend sends with.

/// The communicator every link uses.
pub const COMMUNICATOR: &str = "MPI_COMM_WORLD";

/// Largest transfer that travels inside its header's message: about Open MPI's shared-memory
/// eager limit, below which a second message costs more than copying the bytes once on each
/// side (the model's decode activations are this small). Larger payloads go straight between
/// the arenas in a message of their own (MPI's single-copy path for large messages).
pub const INLINE: usize = 4 << 10;

/// MPI tag of link `link`'s headers (and inline transfers); its payloads use the next tag.
pub fn header_tag(link: u32) -> i32 {
    2 * link as i32
}

/// MPI tag of link `link`'s payloads.
pub fn payload_tag(link: u32) -> i32 {
    header_tag(link) + 1
}

/// Ranks at the ends of link `link` of a run of `stages` ranks (rank r runs stage r): it goes
/// from rank `link` to the next rank, wrapping to 0.
pub fn link_ranks(stages: u32, link: u32) -> (u32, u32) {
    (link, (link + 1) % stages.max(1))
}
