# slug trace schema: the events an endpoint records and the batch message that carries them.
#
# A `.slog` endpoint log is a file header, then frames, then an index footer (docs/FORMAT.md).
# Each frame's payload is one zstd-compressed `Batch`. A batch is columnar: every field of every
# event kind is one `Data` column, so that values of the same field sit next to each other and
# compress to almost nothing when the pipeline is regular. The per-event structs below
# (`KernelSpan`, `Transfer`, ...) are the row form of the same events: they define each field's
# meaning and type, and are the shape a reader in another language decodes the columns into.
#
# Column encodings (see docs/FORMAT.md for byte-level detail):
#   uvar    unsigned LEB128 varint
#   svar    zigzag-encoded signed LEB128 varint of a wrapping (two's complement) difference
#   u8      one byte per event
#   h128    16 bytes per value, little-endian (low 64 bits first)
#   planes  zigzag values (as svar, without the varint) in byte planes: n length bytes (0..=8,
#           bytes needed per value), then byte 0 of every value with length > 0, then byte 1 of
#           every value with length > 1, ... up to byte 7

@0xfcad0591c08eafb6;

enum EventKind {
  kernelSpan @0;
  transfer @1;
  stepBoundary @2;
  snapshot @3;
  perfSample @4;
  ptChunk @5;
  ebpf @6;
  lostEvents @7;
  marker @8;
  counter @9;
  perfSoftware @10;   # format version 3; versions 1-2 stored these as ebpf
  migration @11;      # format version 4
}

enum Transport {
  local @0;
  shm @1;
  tcp @2;
  mpi @3;
  rdma @4;
}

enum Direction {
  send @0;
  recv @1;
}

enum PerfSampleKind {
  cpuClock @0;        # software timer sample
  taskClock @1;
  cycles @2;
  instructions @3;
  memLoad @4;         # PEBS / IBS load with address, latency weight and data source
  memStore @5;
  branchMiss @6;
  cacheMiss @7;
}

enum EbpfKind {
  syscall @0;         # ns = entry; arg0 = syscall nr, arg1 = return value, arg2 = duration ns
  offCpu @1;          # ns = switched out; arg0 = duration ns, arg1 = reason (bits 0-31 task
                      # state, 0 = preempted; bits 32-63 syscall nr + 1, 0 = none), arg2 = waker tid
  pageFault @2;       # arg0 = address, arg1 = ip, arg2 = error code
  migration @3;       # arg0 = from cpu, arg1 = to cpu, arg2 = 1 if the NUMA node changed
  syscallHistogram @4; # arg0 = syscall nr, arg1 = log2 ns bucket, arg2 = count since the last one
  tcpRetransmit @5;   # tid = the stage thread using the socket; arg0 = local port << 16 | remote port
  tcpDrop @6;         # as tcpRetransmit, arg1 = skb_drop_reason
}


struct Hash128 {
  lo @0 :UInt64;
  hi @1 :UInt64;
}

# ---- Row form of each event kind (field meanings). -------------------------------------------

struct KernelSpan {
  kernel @0 :UInt32;        # interned string id of the kernel name
  layer @1 :UInt32;
  step @2 :UInt64;
  seq @3 :UInt32;           # microbatch (sequence) in flight
  rowStart @4 :UInt32;      # rows [rowStart, rowEnd) this thread computed
  rowEnd @5 :UInt32;
  thread @6 :UInt32;
  startNs @7 :UInt64;
  endNs @8 :UInt64;
  outputHash @9 :Hash128;   # xxh3-128 of the output rows, only when hasOutputHash
  hasOutputHash @10 :Bool;
}

struct Transfer {
  id @0 :UInt64;            # the same id is logged by both ends: happens-before across endpoints
  srcEndpoint @1 :UInt32;
  dstEndpoint @2 :UInt32;
  srcArena @3 :UInt32;
  dstArena @4 :UInt32;
  srcOffset @5 :UInt64;
  dstOffset @6 :UInt64;
  len @7 :UInt64;
  hash @8 :Hash128;         # xxh3-128 of the bytes transferred
  postNs @9 :UInt64;
  completeNs @10 :UInt64;
  transport @11 :Transport;
  direction @12 :Direction;
  payload @13 :Hash128;     # content hash of the stored payload, only when hasPayload
  hasPayload @14 :Bool;
}

struct StepBoundary {
  step @0 :UInt64;
  seq @1 :UInt32;
  ns @2 :UInt64;
}

struct Snapshot {
  stage @0 :UInt32;
  step @1 :UInt64;
  id @2 :Hash128;
  bytes @3 :UInt64;
  newBytes @4 :UInt64;      # bytes in chunks not already stored
  chunks @5 :UInt32;
  ns @6 :UInt64;
}

struct PerfSample {
  kind @0 :PerfSampleKind;
  ip @1 :UInt64;
  addr @2 :UInt64;
  weight @3 :UInt64;
  dataSource @4 :UInt64;
  tid @5 :UInt32;
  cpu @6 :UInt32;
  ns @7 :UInt64;
}

struct PtChunk {
  cpu @0 :UInt32;
  auxOffset @1 :UInt64;
  size @2 :UInt64;
  payload @3 :Hash128;      # content hash of the stored AUX bytes
  ns @4 :UInt64;
}

struct EbpfEvent {
  kind @0 :EbpfKind;
  pid @1 :UInt32;
  tid @2 :UInt32;
  cpu @3 :UInt32;
  arg0 @4 :UInt64;
  arg1 @5 :UInt64;
  arg2 @6 :UInt64;
  ns @7 :UInt64;
}

struct SoftwareRecord {   # a perf software record (format version 3)
  kind @0 :UInt8;           # 1 = context switch (arg0 = tid out, arg1 = tid in, arg2 = 1 if it
                            # blocked), 2 = page fault (arg0 = data address, arg1 = ip): the values
                            # versions 1-2 stored under ebpf
  pid @1 :UInt32;
  tid @2 :UInt32;
  cpu @3 :UInt32;
  arg0 @4 :UInt64;
  arg1 @5 :UInt64;
  arg2 @6 :UInt64;
  ns @7 :UInt64;
}

struct LostEvents {
  count @0 :UInt64;
  reason @1 :UInt32;        # interned string id
  fromNs @2 :UInt64;
  toNs @3 :UInt64;
}

struct Marker {
  text @0 :UInt32;          # interned string id
  ns @1 :UInt64;
}

struct Counter {
  name @0 :UInt32;          # interned string id
  value @1 :UInt64;
  ns @2 :UInt64;
}

struct Migration {          # the stage moved between nodes (format version 4)
  stage @0 :UInt32;
  step @1 :UInt64;          # the stage's forward step at which the new node took over
  index @2 :UInt32;         # the move's number in the run (--migrate order, then requests)
  role @3 :UInt8;           # 0 = this endpoint handed the stage off, 1 = it took the stage over
  peer @4 :UInt32;          # the endpoint on the other side of the move
  ns @5 :UInt64;            # when this endpoint's node let go (role 0) or started (role 1)
}

# ---- Columnar batch: the payload of one frame. ------------------------------------------------

struct Batch {
  eventCount @0 :UInt32;
  kinds @1 :Data;           # u8 EventKind per event, in append order
  baseNs @2 :UInt64;        # primary timestamp of the first event
  times @3 :Data;           # planes: primary timestamp minus that of the previous event of the same
                            # kind (the first of each kind: minus baseNs); kernel spans may
                            # instead be relative to the previous span's end (KernelSpanColumns.timeRef),
                            # transfers too (TransferColumns.flags bit 5); step boundaries always are
                            # (format version 2; docs/FORMAT.md 5.2)

  firstStringId @4 :UInt32; # id of strings[0]; ids are dense and assigned in order of interning
  strings @5 :List(Text);

  kernelSpans @6 :KernelSpanColumns;
  transfers @7 :TransferColumns;
  stepBoundaries @8 :StepBoundaryColumns;
  snapshots @9 :SnapshotColumns;
  perfSamples @10 :PerfSampleColumns;
  ptChunks @11 :PtChunkColumns;
  ebpfEvents @12 :EbpfColumns;
  lostEvents @13 :LostEventsColumns;
  markers @14 :MarkerColumns;
  counters @15 :CounterColumns;
  perfSoftware @16 :EbpfColumns; # perf software records (format version 3): the same columns,
                                 # kind holds the SoftwareRecord kind byte
  migrations @17 :MigrationColumns; # format version 4
}

# Primary timestamps (startNs, postNs, ns, fromNs) live in Batch.times; each column group holds the
# rest of its kind's fields, one value per event of that kind, in append order.

struct KernelSpanColumns {
  kernel @0 :Data;          # uvar
  layer @1 :Data;           # uvar
  step @2 :Data;            # svar delta from the previous span's step (first: from 0)
  seq @3 :Data;             # uvar
  rowStart @4 :Data;        # uvar
  rowLen @5 :Data;          # svar of rowEnd - rowStart
  thread @6 :Data;          # uvar
  duration @7 :Data;        # planes: endNs - startNs minus that of the previous span with the same
                            # (kernel, layer) in the batch (format version 2)
  hasHash @8 :Data;         # u8 0/1
  hashes @9 :Data;          # h128, one per span with hasHash = 1
  timeRef @10 :Data;        # u8 per span: what its startNs in Batch.times is relative to:
                            # 0 = the previous span's startNs; 1 = groupEnd, the latest endNs of
                            # the spans since the last span with timeRef 1 (that span included).
                            # Both start as baseNs; see docs/FORMAT.md
}

struct TransferColumns {
  id @0 :Data;              # svar delta from the previous transfer's id
  srcEndpoint @1 :Data;     # uvar
  dstEndpoint @2 :Data;     # uvar
  srcArena @3 :Data;        # uvar
  dstArena @4 :Data;        # uvar
  srcOffset @5 :Data;       # uvar
  dstOffset @6 :Data;       # uvar
  len @7 :Data;             # uvar
  hash @8 :Data;            # h128
  duration @9 :Data;        # planes: completeNs - postNs minus that of the previous transfer of the
                            # same direction in the batch (format version 2)
  flags @10 :Data;          # u8: bits 0-2 transport, bit 3 direction (1 = recv), bit 4 hasPayload,
                            # bit 5 postNs relative to groupEnd (format version 2)
  payloads @11 :Data;       # h128, one per transfer with hasPayload
}

struct StepBoundaryColumns {
  step @0 :Data;            # svar delta from the previous boundary's step
  seq @1 :Data;             # uvar
}

struct SnapshotColumns {
  stage @0 :Data;           # uvar
  step @1 :Data;            # uvar
  id @2 :Data;              # h128
  bytes @3 :Data;           # uvar
  newBytes @4 :Data;        # uvar
  chunks @5 :Data;          # uvar
}

struct PerfSampleColumns {
  kind @0 :Data;            # u8 PerfSampleKind
  ip @1 :Data;              # svar delta from the previous sample's ip
  addr @2 :Data;            # svar delta from the previous sample's addr
  weight @3 :Data;          # uvar
  dataSource @4 :Data;      # uvar
  tid @5 :Data;             # uvar
  cpu @6 :Data;             # uvar
}

struct PtChunkColumns {
  cpu @0 :Data;             # uvar
  auxOffset @1 :Data;       # svar delta from the previous chunk's auxOffset
  size @2 :Data;            # uvar
  payload @3 :Data;         # h128
}

struct EbpfColumns {
  kind @0 :Data;            # u8 EbpfKind
  pid @1 :Data;             # uvar
  tid @2 :Data;             # uvar
  cpu @3 :Data;             # uvar
  arg0 @4 :Data;            # uvar
  arg1 @5 :Data;            # uvar
  arg2 @6 :Data;            # uvar
}

struct LostEventsColumns {
  count @0 :Data;           # uvar
  reason @1 :Data;          # uvar string id
  duration @2 :Data;        # svar of toNs - fromNs
}

struct MarkerColumns {
  text @0 :Data;            # uvar string id
}

struct CounterColumns {
  name @0 :Data;            # uvar string id
  value @1 :Data;           # uvar
}

struct MigrationColumns {
  stage @0 :Data;           # uvar
  step @1 :Data;            # uvar
  index @2 :Data;           # uvar
  role @3 :Data;            # u8
  peer @4 :Data;            # uvar
}
