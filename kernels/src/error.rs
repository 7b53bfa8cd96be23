//! The one error type of `slug-kernels`: every refusal names the value at fault and what to do.

/// Everything that can go wrong in `slug-kernels`.
///
/// Bad configurations are refused before any memory is mapped or any weight is written.
/// Kernel shape errors carry only `&'static str` and integers so that building one never
/// allocates (kernels run under a zero-allocation contract).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A model dimension or option is impossible (zero, not divisible, out of range).
    #[error("model config: {field} = {value} is invalid: {reason}")]
    InvalidConfig {
        /// The configuration field (as spelled on the command line, e.g. `heads`).
        field: &'static str,
        /// The value that was given, printed.
        value: String,
        /// Why it is refused and what would be accepted.
        reason: String,
    },
    /// The model preset name is not one of the known presets.
    #[error("unknown model preset `{name}`: choose one of tiny, small, base")]
    UnknownPreset {
        /// The name that was given.
        name: String,
    },
    /// A layer plan cannot be built (more stages than layers, bad bounds).
    #[error("layer plan: {reason}")]
    InvalidPlan {
        /// What is wrong with the plan and how to fix it.
        reason: String,
    },
    /// The arena a stage needs is larger than the memory this machine has available.
    #[error(
        "stage arena needs {needed} bytes ({needed_mib} MiB) but MemAvailable is {available} bytes \
         ({available_mib} MiB): use a smaller model (--dim, --layers, --max-seq, --vocab) or more stages"
    )]
    ArenaTooLarge {
        /// Bytes the arena(s) would need.
        needed: u64,
        /// `needed` in MiB, for the message.
        needed_mib: u64,
        /// Bytes the kernel reports as available (`/proc/meminfo` `MemAvailable`).
        available: u64,
        /// `available` in MiB, for the message.
        available_mib: u64,
    },
    /// The size of an arena does not fit in this machine's address space.
    #[error("arena size overflows usize while laying out `{what}`: the model is far too large")]
    SizeOverflow {
        /// The region being laid out when the overflow happened.
        what: &'static str,
    },
    /// Mapping the anonymous memory for an arena failed.
    #[error("cannot map a {bytes}-byte anonymous arena: {source}")]
    Map {
        /// Size of the requested map.
        bytes: usize,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// More threads were asked for than this machine can sensibly run.
    #[error(
        "{asked} threads per stage asked for, more than the limit of {limit} (4 x the {cpus} CPUs \
         of this machine, at least 64); use --threads {cpus} or fewer"
    )]
    ThreadLimit {
        /// Threads asked for (a flag or a trace's recorded configuration).
        asked: usize,
        /// The limit.
        limit: usize,
        /// CPUs of this machine.
        cpus: usize,
    },
    /// A worker thread of the pool could not be started.
    #[error("cannot start thread pool worker {index}: {source}")]
    ThreadSpawn {
        /// Index of the worker that failed.
        index: usize,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// The requested instruction set is not available on this CPU.
    #[error("instruction set {isa} is not available on this CPU: choose one of {available}")]
    IsaUnavailable {
        /// The instruction set that was asked for.
        isa: &'static str,
        /// The instruction sets this CPU has, comma-separated.
        available: String,
    },
    /// The run asks for fused multiply-add but this CPU has no FMA unit.
    #[error(
        "the model config says fma = true but this CPU has no fused multiply-add: \
         run with fma = false (results then differ from an FMA run) or on a CPU with FMA"
    )]
    FmaUnavailable,
    /// A kernel was handed a buffer whose length does not match the shape it was told.
    #[error("kernel {kernel}: {what} has {got} elements, expected {expected}")]
    Shape {
        /// The kernel that refused.
        kernel: &'static str,
        /// Which argument is wrong.
        what: &'static str,
        /// Elements the shape requires.
        expected: usize,
        /// Elements the buffer has.
        got: usize,
    },
    /// A kernel was handed a row range outside its shape.
    #[error("kernel {kernel}: rows {start}..{end} are outside 0..{rows}")]
    RowRange {
        /// The kernel that refused.
        kernel: &'static str,
        /// Start of the given range.
        start: usize,
        /// End of the given range.
        end: usize,
        /// Number of rows the shape has.
        rows: usize,
    },
    /// A token id is not below the vocabulary size.
    #[error("token id {token} is out of range: the vocabulary has {vocab} tokens")]
    TokenOutOfRange {
        /// The offending token id.
        token: u32,
        /// Vocabulary size.
        vocab: usize,
    },
    /// A sequence index is not below the number of sequences the stage was built for.
    #[error("sequence {seq} does not exist: the stage holds {sequences} sequences")]
    NoSuchSequence {
        /// The requested sequence.
        seq: usize,
        /// Sequences the arena holds.
        sequences: usize,
    },
    /// A forward step would run past the context the KV cache was sized for.
    #[error(
        "sequence {seq}: {n_tokens} more tokens at position {position} exceed max_seq = {max_seq}: \
         use a shorter prompt, fewer --tokens, or a larger --max-seq"
    )]
    ContextFull {
        /// The sequence.
        seq: usize,
        /// Its current position.
        position: usize,
        /// Tokens asked for.
        n_tokens: usize,
        /// The context length of the KV cache.
        max_seq: usize,
    },
    /// An inbox or outbox was accessed as the wrong payload (token ids vs hidden states).
    #[error(
        "stage {stage} {which} holds {holds}, not {asked}: token ids enter stage 0 and leave the \
         last stage; hidden states flow between the others"
    )]
    WrongPayload {
        /// The stage.
        stage: usize,
        /// `inbox` or `outbox`.
        which: &'static str,
        /// What the box holds.
        holds: &'static str,
        /// What the caller asked for.
        asked: &'static str,
    },
    /// A forward step was asked for zero tokens.
    #[error("a forward step needs at least one token")]
    NoTokens,
    /// The pool has more threads than the stage's workspace was laid out for.
    #[error(
        "pool has {threads} threads but the stage workspace was laid out for {max_threads}: \
         build the stage with the pool it will run on"
    )]
    TooManyThreads {
        /// Threads in the pool used for this call.
        threads: usize,
        /// Threads the stage was laid out for.
        max_threads: usize,
    },
    /// A snapshot being restored does not match the stage it is restored into.
    #[error("cannot restore: {what} has {got}, the stage has {expected}")]
    RestoreMismatch {
        /// What does not match (arena bytes, sequence count).
        what: &'static str,
        /// Size or count in the stage.
        expected: usize,
        /// Size or count in the snapshot.
        got: usize,
    },
}
