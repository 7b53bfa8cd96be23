//! Links over every backend: numbering, bounds, observers, pieces, direct placement, refusals.

use super::ring::{RingRecv, RingSend};
use super::*;
use crate::auth::ClusterKey;
use crate::fabric::{Fabric, FabricLayout, RingSpec};
use crate::transfer::{TransferObserver, content_hash};
use crate::wire::AbortFlag;
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

#[derive(Default)]
struct Seen(Mutex<Vec<(bool, TransferId, u128)>>);

impl TransferObserver for Seen {
    fn posted(&self, t: &Transfer, bytes: &[u8]) {
        self.0
            .lock()
            .expect("lock")
            .push((true, t.id, content_hash(bytes)));
    }
    fn completed(&self, t: &Transfer, bytes: &[u8]) {
        self.0
            .lock()
            .expect("lock")
            .push((false, t.id, content_hash(bytes)));
    }
}

fn ends() -> LinkEnds {
    LinkEnds {
        id: LinkId(0),
        src: EndpointId(0),
        dst: EndpointId(1),
        timeout: Duration::from_secs(10),
    }
}

/// Both ends of ring 0 of a heap fabric with rings of `slots` slots of `capacity` bytes.
fn ring_link(slots: u32, capacity: u64, obs: Observers) -> (Arc<Fabric>, LinkSender, LinkReceiver) {
    let layout = FabricLayout::new(&[RingSpec { slots, capacity }]).expect("layout");
    let fabric = Arc::new(Fabric::heap(layout));
    let (tx, rx) = ring_ends(&fabric, TransportKind::Local, obs);
    (fabric, tx, rx)
}

/// Both ends of ring 0 of `fabric`.
fn ring_ends(
    fabric: &Arc<Fabric>,
    kind: TransportKind,
    obs: Observers,
) -> (LinkSender, LinkReceiver) {
    let send = RingSend::new(fabric.clone(), 0, kind).expect("tx");
    let recv = RingRecv::new(fabric.clone(), 0, kind).expect("rx");
    (
        LinkSender::new(ends(), Box::new(send), obs.clone()),
        LinkReceiver::new(ends(), Box::new(recv), obs),
    )
}

fn tag(step: u32) -> Tag {
    Tag {
        sequence: 0,
        step,
        layer: 1,
    }
}

fn exchange(mut tx: LinkSender, mut rx: LinkReceiver) {
    let src: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
    let mut dst = vec![0u8; 2000];
    for step in 0..3u32 {
        let off = u64::from(step) * 10;
        let sent = tx
            .send(
                Region {
                    arena: ArenaId(5),
                    bytes: &src,
                },
                off,
                500,
                ArenaId(9),
                1000 + off,
                tag(step),
            )
            .expect("send");
        let got = rx
            .recv(&mut RegionMut {
                arena: ArenaId(9),
                bytes: &mut dst,
            })
            .expect("recv");
        assert_eq!(sent.id, got.id);
        assert_eq!(got.id.seq, u64::from(step));
        assert_eq!(got.tag, tag(step));
        assert_eq!(got.src.arena, ArenaId(5));
        assert_eq!(got.src.offset, off);
        assert!(got.complete_ns >= got.post_ns);
        let (o, d) = (off as usize, 1000 + off as usize);
        assert_eq!(&dst[d..d + 500], &src[o..o + 500]);
    }
    assert_eq!(tx.stats().transfers, 3);
    assert_eq!(rx.stats().bytes, 1500);
    // A receiver offering a different arena than the sender addressed gets an error, not bytes.
    tx.send(
        Region {
            arena: ArenaId(5),
            bytes: &src,
        },
        0,
        4,
        ArenaId(9),
        0,
        tag(9),
    )
    .expect("send");
    let wrong = rx.recv(&mut RegionMut {
        arena: ArenaId(8),
        bytes: &mut dst,
    });
    assert!(
        matches!(wrong, Err(TransportError::Protocol { .. })),
        "{wrong:?}"
    );
    // A source range outside the arena is refused before anything moves.
    let oob = tx.send(
        Region {
            arena: ArenaId(5),
            bytes: &src,
        },
        900,
        200,
        ArenaId(9),
        0,
        tag(0),
    );
    assert!(matches!(oob, Err(TransportError::OutOfBounds { .. })));
}

#[test]
fn ring_link_moves_bytes_by_offset_and_shows_both_ends_to_observers() {
    let seen = Arc::new(Seen::default());
    let (_fabric, tx, rx) = ring_link(2, 512, Observers::none().with(seen.clone()));
    exchange(tx, rx);
    let seen = seen.0.lock().expect("lock");
    // 3 exchanged transfers seen twice each, same hash on both ends, then the 4th's post.
    assert_eq!(seen.len(), 7);
    for pair in seen[..6].chunks(2) {
        assert!(pair[0].0 && !pair[1].0);
        assert_eq!(pair[0].1, pair[1].1);
        assert_eq!(pair[0].2, pair[1].2);
    }
}

#[test]
fn transfers_larger_than_a_slot_travel_in_pieces_and_arrive_whole() {
    let (_fabric, mut tx, mut rx) = ring_link(2, 7, Observers::none());
    let src: Vec<u8> = (0..100u8).collect();
    let sender = std::thread::spawn(move || {
        for len in [0u64, 1, 7, 8, 100] {
            tx.send(
                Region {
                    arena: ArenaId(0),
                    bytes: &src,
                },
                0,
                len,
                ArenaId(0),
                3,
                tag(0),
            )
            .expect("send");
        }
    });
    for len in [0usize, 1, 7, 8, 100] {
        let mut dst = vec![0xffu8; 110];
        let t = rx
            .recv(&mut RegionMut {
                arena: ArenaId(0),
                bytes: &mut dst,
            })
            .expect("recv");
        assert_eq!(t.len, len as u64);
        assert!(dst[..3].iter().all(|&b| b == 0xff));
        assert_eq!(&dst[3..3 + len], &(0..len as u8).collect::<Vec<_>>()[..]);
        assert!(dst[3 + len..].iter().all(|&b| b == 0xff));
    }
    sender.join().expect("sender");
}

#[test]
fn a_waiting_receiver_gets_the_bytes_placed_directly() {
    let (_fabric, mut tx, mut rx) = ring_link(2, 16, Observers::none());
    let receiver = std::thread::spawn(move || {
        let mut got = Vec::new();
        for _ in 0..20 {
            let mut dst = vec![0u8; 300];
            let t = rx
                .recv(&mut RegionMut {
                    arena: ArenaId(2),
                    bytes: &mut dst,
                })
                .expect("recv");
            got.push((t.len, dst));
        }
        (got, rx.stats())
    });
    let src: Vec<u8> = (0..200u8).collect();
    for i in 0..20u64 {
        // Give the receiver time to post: most of these go the direct way.
        std::thread::sleep(Duration::from_millis(2));
        tx.send(
            Region {
                arena: ArenaId(1),
                bytes: &src,
            },
            i,
            100,
            ArenaId(2),
            50 + i,
            tag(0),
        )
        .expect("send");
    }
    let (got, stats) = receiver.join().expect("receiver");
    for (i, (len, dst)) in got.iter().enumerate() {
        assert_eq!(*len, 100);
        assert_eq!(&dst[50 + i..150 + i], &src[i..i + 100]);
        assert!(dst[..50 + i].iter().all(|&b| b == 0));
    }
    assert!(
        stats.direct > 0,
        "no transfer took the direct path: {stats:?}"
    );
    assert_eq!(stats.direct, tx.stats().direct);
}

/// Ends of a heap ring whose sender waits up to `wait` for the receiver before staging.
fn rendezvous_link(
    slots: u32,
    capacity: u64,
    wait: Option<Duration>,
    obs: Observers,
) -> (LinkSender, LinkReceiver) {
    let layout = FabricLayout::new(&[RingSpec { slots, capacity }]).expect("layout");
    let fabric = Arc::new(Fabric::heap(layout));
    let send = RingSend::new(fabric.clone(), 0, TransportKind::Local).expect("tx");
    let send = match wait {
        Some(up_to) => send.wait_for_receiver(up_to),
        None => send,
    };
    let recv = RingRecv::new(fabric, 0, TransportKind::Local).expect("rx");
    (
        LinkSender::new(ends(), Box::new(send), obs.clone()),
        LinkReceiver::new(ends(), Box::new(recv), obs),
    )
}

#[test]
fn a_sender_waits_for_a_late_receiver_and_copies_each_transfer_once() {
    const LEN: usize = 256 << 10;
    let seen = Arc::new(Seen::default());
    // Slots of 16 KiB: staged, each transfer would be 16 pieces copied in and out again.
    let (mut tx, mut rx) = rendezvous_link(
        16,
        16 << 10,
        Some(Duration::from_secs(10)),
        Observers::none().with(seen.clone()),
    );
    let receiver = std::thread::spawn(move || {
        let mut dst = vec![0u8; LEN + 8];
        let mut got = Vec::new();
        for _ in 0..4 {
            // Arrive after the sender: it has to wait for this receiver's post.
            std::thread::sleep(Duration::from_millis(5));
            rx.recv(&mut RegionMut {
                arena: ArenaId(1),
                bytes: &mut dst,
            })
            .expect("recv");
            got.push(dst[8..].to_vec());
        }
        (got, rx.stats())
    });
    let src: Vec<u8> = (0..LEN + 4).map(|i| (i * 7 % 251) as u8).collect();
    for i in 0..4u64 {
        let region = Region {
            arena: ArenaId(0),
            bytes: &src,
        };
        let t = tx
            .send(region, i, LEN as u64, ArenaId(1), 8, tag(i as u32))
            .expect("send");
        assert_eq!(t.id.seq, i);
    }
    let (got, stats) = receiver.join().expect("receiver");
    for (i, bytes) in got.iter().enumerate() {
        assert!(bytes[..] == src[i..i + LEN], "transfer {i} arrived changed");
    }
    // Every transfer went straight into the receiver's arena, and both ends saw it.
    assert_eq!((stats.transfers, stats.direct), (4, 4), "{stats:?}");
    assert_eq!(tx.stats().direct, 4);
    // The two ends run on their own threads, so a transfer's receive may be observed before
    // its send: each end's observations are checked in order, not their interleaving.
    let seen = seen.0.lock().expect("lock");
    assert_eq!(seen.len(), 8);
    let (sent, received): (Vec<&(bool, TransferId, u128)>, Vec<_>) = seen.iter().partition(|s| s.0);
    assert_eq!((sent.len(), received.len()), (4, 4));
    for (i, (s, r)) in sent.iter().zip(&received).enumerate() {
        assert_eq!((s.1.seq, r.1.seq), (i as u64, i as u64));
        assert_eq!(s.2, content_hash(&src[i..i + LEN]));
        assert_eq!(s.2, r.2);
    }
}

#[test]
fn a_sender_stages_when_no_receiver_comes_within_its_wait() {
    const LEN: usize = 1 << 20;
    let src: Vec<u8> = (0..LEN).map(|i| (i % 253) as u8).collect();
    let mut dst = vec![0u8; LEN];
    // The default wait (about the time staging takes) and a zero one: nobody receives while
    // the sender sends, so the transfer is staged in the ring, whole, and taken from there.
    for wait in [None, Some(Duration::ZERO)] {
        let (mut tx, mut rx) = rendezvous_link(16, 64 << 10, wait, Observers::none());
        let region = Region {
            arena: ArenaId(0),
            bytes: &src,
        };
        tx.send(region, 0, LEN as u64, ArenaId(0), 0, tag(0))
            .expect("send");
        dst.fill(0);
        rx.recv(&mut RegionMut {
            arena: ArenaId(0),
            bytes: &mut dst,
        })
        .expect("recv");
        assert!(dst == src, "the staged transfer arrived changed");
        assert_eq!((tx.stats().direct, rx.stats().direct), (0, 0));
    }
}

#[test]
fn a_repointed_link_keeps_its_numbering_counters_and_observers() {
    let seen = Arc::new(Seen::default());
    let (_old, mut tx, mut rx) = ring_link(4, 64, Observers::none().with(seen.clone()));
    let layout = FabricLayout::new(&[RingSpec {
        slots: 4,
        capacity: 64,
    }]);
    let new = Arc::new(Fabric::heap(layout.expect("layout")));
    let src: Vec<u8> = (0..64u8).collect();
    let mut dst = vec![0u8; 64];
    let mut step = |tx: &mut LinkSender, rx: &mut LinkReceiver, i: u8| {
        let region = Region {
            arena: ArenaId(0),
            bytes: &src,
        };
        tx.send(region, u64::from(i), 8, ArenaId(0), 0, tag(u32::from(i)))
            .expect("send");
        let got = rx
            .recv(&mut RegionMut {
                arena: ArenaId(0),
                bytes: &mut dst,
            })
            .expect("recv");
        assert_eq!(&dst[..8], &src[usize::from(i)..usize::from(i) + 8]);
        got.id.seq
    };
    assert_eq!(
        (step(&mut tx, &mut rx, 0), step(&mut tx, &mut rx, 1)),
        (0, 1)
    );
    // Both ends move to another fabric at a step boundary; nothing is in flight.
    tx.flush().expect("flush");
    let shm = TransportKind::Shm;
    drop(tx.repoint(Box::new(RingSend::new(new.clone(), 0, shm).expect("send"))));
    drop(rx.repoint(Box::new(RingRecv::new(new, 0, shm).expect("recv"))));
    assert_eq!((tx.next_seq(), rx.next_seq()), (2, 2));
    assert_eq!(step(&mut tx, &mut rx, 2), 2);
    assert_eq!((tx.stats().transfers, rx.stats().bytes), (3, 24));
    let seen = seen.0.lock().expect("lock");
    let ids: Vec<u64> = seen.iter().map(|s| s.1.seq).collect();
    assert_eq!(ids, [0, 0, 1, 1, 2, 2]);
    // Numbering is checked across the move: a receiver resumed elsewhere refuses a gap.
    drop(seen);
    rx.resume_at(7);
    let region = Region {
        arena: ArenaId(0),
        bytes: &src,
    };
    tx.send(region, 0, 8, ArenaId(0), 0, tag(3)).expect("send");
    let gap = rx.recv(&mut RegionMut {
        arena: ArenaId(0),
        bytes: &mut dst,
    });
    assert!(
        matches!(&gap, Err(TransportError::Protocol { detail, .. }) if detail.contains("7 was due")),
        "{gap:?}"
    );
}

#[test]
fn tcp_link_moves_bytes_and_refuses_the_wrong_stage_and_integrity() {
    for integrity in [LinkIntegrity::Mac, LinkIntegrity::None] {
        let key = ClusterKey::from_bytes(b"tcp-link-test-key-0123").expect("key");
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let abort = AbortFlag::new();
        let refusals = Arc::new(Mutex::new(Vec::new()));
        let (k2, a2, r2) = (key.clone(), abort.clone(), refusals.clone());
        let server = std::thread::spawn(move || {
            let log = |e: &TransportError| r2.lock().expect("lock").push(e.to_string());
            LinkReceiver::accept_tcp(
                &listener,
                &k2,
                integrity,
                ends(),
                Observers::none(),
                &a2,
                &log,
            )
        });
        let mut wrong = ends();
        wrong.src = EndpointId(3);
        let refused =
            LinkSender::connect_tcp(&addr, &key, integrity, wrong, Observers::none(), &abort);
        match refused {
            Err(TransportError::Refused { reason, .. }) => {
                assert!(reason.contains("wrong stage"), "{reason}")
            }
            other => panic!("expected refusal, got {other:?}"),
        }
        let other = match integrity {
            LinkIntegrity::Mac => LinkIntegrity::None,
            LinkIntegrity::None => LinkIntegrity::Mac,
        };
        let refused =
            LinkSender::connect_tcp(&addr, &key, other, ends(), Observers::none(), &abort);
        match refused {
            Err(TransportError::Refused { reason, .. }) => {
                assert!(reason.contains("integrity mismatch"), "{reason}")
            }
            other => panic!("expected refusal, got {other:?}"),
        }
        let tx = LinkSender::connect_tcp(&addr, &key, integrity, ends(), Observers::none(), &abort)
            .expect("tx");
        let rx = server.join().expect("server").expect("rx");
        assert_eq!(refusals.lock().expect("lock").len(), 2);
        assert!(tx.clock().is_some() && rx.clock().is_some());
        exchange(tx, rx);
    }
}
