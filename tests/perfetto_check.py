#!/usr/bin/env python3
"""Checks a Perfetto trace against Perfetto's own schema.

Decodes TRACE with the compiled protos the `perfetto` PyPI package ships
(perfetto/protos/perfetto/trace/perfetto_trace_pb2.py), inflating `compressed_packets`, and
checks what Perfetto's trace processor relies on:
- no field anywhere is unknown to the schema;
- every track event's sequence cleared its incremental state first, every interned id it uses
  (name, categories, annotation names) was defined on that sequence, its track (explicit or the
  sequence default) has a descriptor, and its timestamp clock is MONOTONIC or a clock a
  snapshot on that sequence defined;
- no thread id names two threads (Perfetto would merge their tracks);
- slices balance on every track: in time order (ties in file order) every end closes a begun
  slice, and none is left open;
- every flow has one start and one end.

Prints one JSON object of counts on stdout. Exit status: 0 all checks pass, 1 a check failed
(the reasons are in "errors"), 77 the perfetto package (or protobuf) is not installed.
"""

import json
import sys
import zlib
from collections import defaultdict

try:
    from perfetto.protos.perfetto.trace import perfetto_trace_pb2 as pb
except Exception as e:  # noqa: BLE001 - any import failure means "cannot check here"
    print(f"perfetto protos unavailable: {e} (pip install perfetto)", file=sys.stderr)
    sys.exit(77)

try:
    from google.protobuf import unknown_fields as _uf

    def unknown_count(msg):
        return len(_uf.UnknownFieldSet(msg))
except ImportError:  # protobuf before 4.22

    def unknown_count(msg):
        return len(msg.UnknownFields())


MONOTONIC = 3
SLICE_BEGIN, SLICE_END, INSTANT, COUNTER = 1, 2, 3, 4
SEQ_INCREMENTAL_STATE_CLEARED = 1


def is_repeated(fd):
    rep = getattr(fd, "is_repeated", None)
    if rep is not None:
        return rep
    return fd.label == fd.LABEL_REPEATED


def check_unknown(msg, path, errors):
    n = unknown_count(msg)
    if n:
        errors.append(f"{path}: {n} unknown field(s)")
    for fd, value in msg.ListFields():
        if fd.message_type is None:
            continue
        if is_repeated(fd):
            for i, v in enumerate(value):
                check_unknown(v, f"{path}.{fd.name}[{i}]", errors)
        else:
            check_unknown(value, f"{path}.{fd.name}", errors)


def main():
    if len(sys.argv) != 2:
        print("usage: perfetto_check.py TRACE", file=sys.stderr)
        sys.exit(2)
    with open(sys.argv[1], "rb") as f:
        data = f.read()
    errors = []
    counts = defaultdict(int)

    packets = []

    def expand(trace, where):
        for i, p in enumerate(trace.packet):
            if p.HasField("compressed_packets"):
                check_unknown(p, f"{where}packet[{i}]", errors)
                counts["compressed_batches"] += 1
                inner = pb.Trace()
                inner.ParseFromString(zlib.decompress(p.compressed_packets))
                expand(inner, f"{where}packet[{i}].compressed.")
            else:
                packets.append((f"{where}packet[{i}]", p))

    top = pb.Trace()
    top.ParseFromString(data)
    check_unknown(top, "trace", [])  # top level: packets are checked one by one below
    expand(top, "")

    tracks = {}
    thread_names = {}
    seqs = defaultdict(
        lambda: {
            "cleared": False,
            "default_track": None,
            "clock": None,
            "incremental": {},
            "absolute": set(),
            "names": {},
            "cats": {},
            "anns": {},
        }
    )
    edges = defaultdict(list)
    flow_starts = defaultdict(int)
    flow_ends = defaultdict(int)
    primary = set()
    slice_names = defaultdict(int)
    for order, (where, p) in enumerate(packets):
        check_unknown(p, where, errors)
        counts["packets"] += 1
        seq_id = p.trusted_packet_sequence_id
        s = seqs[seq_id]
        if p.sequence_flags & SEQ_INCREMENTAL_STATE_CLEARED:
            seqs[seq_id] = s = {
                "cleared": True,
                "default_track": None,
                "clock": None,
                "incremental": {},
                "absolute": set(),
                "names": {},
                "cats": {},
                "anns": {},
            }
        if p.HasField("trace_packet_defaults"):
            d = p.trace_packet_defaults
            s["clock"] = d.timestamp_clock_id if d.HasField("timestamp_clock_id") else None
            if d.HasField("track_event_defaults") and d.track_event_defaults.HasField(
                "track_uuid"
            ):
                s["default_track"] = d.track_event_defaults.track_uuid
        if p.HasField("interned_data"):
            i = p.interned_data
            for e in i.event_names:
                s["names"][e.iid] = e.name
            for e in i.event_categories:
                s["cats"][e.iid] = e.name
            for e in i.debug_annotation_names:
                s["anns"][e.iid] = e.name
        if p.HasField("clock_snapshot"):
            cs = p.clock_snapshot
            if cs.HasField("primary_trace_clock"):
                primary.add(int(cs.primary_trace_clock))
            for c in cs.clocks:
                if c.is_incremental:
                    s["incremental"][c.clock_id] = c.timestamp
                else:
                    s["absolute"].add(c.clock_id)
            continue
        if p.HasField("track_descriptor"):
            t = p.track_descriptor
            if t.uuid in tracks:
                errors.append(f"{where}: track {t.uuid} described twice")
            tracks[t.uuid] = t
            counts["tracks"] += 1
            if t.HasField("thread"):
                th = t.thread
                other = thread_names.setdefault(th.tid, (th.pid, th.thread_name))
                if other != (th.pid, th.thread_name):
                    errors.append(
                        f"{where}: tid {th.tid} names two threads: {other} and "
                        f"{(th.pid, th.thread_name)} (Perfetto would merge them)"
                    )
        if not p.HasField("track_event"):
            continue
        ev = p.track_event
        if not s["cleared"]:
            errors.append(f"{where}: event on sequence {seq_id} before its state was cleared")
        if not p.HasField("timestamp"):
            errors.append(f"{where}: track event without a timestamp")
            continue
        clock = p.timestamp_clock_id if p.HasField("timestamp_clock_id") else s["clock"]
        ts = p.timestamp
        if clock in s["incremental"]:
            s["incremental"][clock] += ts
            ts = s["incremental"][clock]
        elif clock not in (None, MONOTONIC) and clock not in s["absolute"]:
            errors.append(f"{where}: timestamp clock {clock} no snapshot on its sequence defines")
        track = ev.track_uuid if ev.HasField("track_uuid") else s["default_track"]
        if track is None or track not in tracks:
            errors.append(f"{where}: event on undescribed track {track}")
        name = None
        if ev.HasField("name_iid"):
            name = s["names"].get(ev.name_iid)
            if name is None:
                errors.append(f"{where}: name_iid {ev.name_iid} not interned on sequence {seq_id}")
        elif ev.HasField("name"):
            name = ev.name
        for iid in ev.category_iids:
            if iid not in s["cats"]:
                errors.append(f"{where}: category iid {iid} not interned on sequence {seq_id}")
        for a in ev.debug_annotations:
            if a.HasField("name_iid") and a.name_iid not in s["anns"]:
                errors.append(f"{where}: annotation iid {a.name_iid} not interned")
            if a.HasField("name_iid"):
                counts["annotation:" + s["anns"].get(a.name_iid, "?")] += 1
        for f in ev.flow_ids:
            flow_starts[f] += 1
        for f in ev.terminating_flow_ids:
            flow_ends[f] += 1
        if ev.type == SLICE_BEGIN:
            counts["slices"] += 1
            slice_names[name] += 1
            edges[track].append((ts, order, 1))
        elif ev.type == SLICE_END:
            edges[track].append((ts, order, -1))
        elif ev.type == INSTANT:
            counts["instants"] += 1
        elif ev.type == COUNTER:
            counts["counter_values"] += 1
        for c in (s["cats"].get(i) for i in ev.category_iids):
            if c and ev.type in (SLICE_BEGIN, INSTANT):
                counts["category:" + c] += 1

    unbalanced = 0
    for track, es in edges.items():
        es.sort()
        depth = 0
        bad = False
        for _, _, d in es:
            depth += d
            if depth < 0:
                bad = True
        if bad or depth != 0:
            unbalanced += 1
            name = tracks[track].name if track in tracks else track
            errors.append(f"track {name}: slices do not balance (ends at depth {depth})")
    for f, n in flow_starts.items():
        if n != 1 or flow_ends.get(f) != 1:
            errors.append(f"flow {f}: {n} start(s), {flow_ends.get(f, 0)} end(s)")
    for f in flow_ends:
        if f not in flow_starts:
            errors.append(f"flow {f}: ends but never starts")
    if primary != {MONOTONIC}:
        errors.append(f"primary trace clock(s) {sorted(primary)}, expected MONOTONIC (3) only")

    out = dict(counts)
    out["flows"] = len(flow_starts)
    out["primary_clock"] = sorted(primary)
    out["unbalanced_tracks"] = unbalanced
    out["kernel_slices"] = counts.get("category:kernel_span", 0)
    out["errors"] = errors[:50]
    out["error_count"] = len(errors)
    print(json.dumps(out, sort_keys=True))
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
