//! The rungs `slug ladder --transport rdma` measures on the device a run would use: raw verbs
//! (RDMA writes with immediate between two queue pairs, nothing else) and slug's rdma link
//! (the same writes plus headers, staging, credits and the link's checks), and whether the
//! device is software emulation, whose numbers say nothing about RDMA hardware.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ibverbs_sys::ibv_wc_opcode;
use slug_transport::fabric::RingSpec;
use slug_transport::link::{LinkEnds, LinkReceiver, LinkSender};
use slug_transport::transfer::{EndpointId, LinkId};
use slug_transport::{AbortFlag, Result};

use crate::verbs::{Buffer, Completion, Device, Queue};

/// The device the ladder measures.
#[derive(Debug)]
pub struct RdmaFabric {
    dev: Arc<Device>,
}

impl RdmaFabric {
    /// Opens the device a run would use (`SLUG_RDMA_DEVICE`, else the first).
    pub fn open() -> Result<Self> {
        Ok(Self {
            dev: Device::open()?,
        })
    }

    /// What the raw row measures, saying so when the device is software emulation: a device
    /// without a bus device behind it in sysfs is Soft-RoCE (rxe) or soft-iWARP (siw).
    pub fn raw_kind(&self) -> String {
        let name = self.dev.name();
        if std::path::Path::new("/sys/class/infiniband")
            .join(name)
            .join("device")
            .exists()
        {
            format!("RDMA write on {name}")
        } else {
            format!("RDMA write on {name} (software emulation)")
        }
    }

    /// `n` writes of `size` bytes with immediate, as ping-pong round trips between two queue
    /// pairs of the device, each waiting for the other's write as links do (spin, then the
    /// completion channel).
    pub fn raw(&self, size: usize, n: u64) -> Result<Duration> {
        let ends = LinkEnds {
            id: LinkId(0),
            src: EndpointId(0),
            dst: EndpointId(1),
            timeout: Duration::from_secs(30),
        };
        let abort = AbortFlag::new();
        let mut a = Queue::create(&self.dev, 4, 2)?;
        let mut b = Queue::create(&self.dev, 4, 2)?;
        let (buf_a, buf_b) = (
            Buffer::register(&self.dev, size, true)?,
            Buffer::register(&self.dev, size, true)?,
        );
        a.connect(&b.info())?;
        b.connect(&a.info())?;
        for q in [&mut a, &mut b] {
            q.post_recv(0)?;
            q.post_recv(1)?;
        }
        let mut done = Vec::new();
        let start = Instant::now();
        for i in 0..n.div_ceil(2) {
            a.post_write_imm(i, &buf_a, 0, size, buf_b.addr(), buf_b.rkey(), i as u32)?;
            arrival(&mut b, &ends, &abort, &mut done)?;
            b.post_write_imm(i, &buf_b, 0, size, buf_a.addr(), buf_a.rkey(), i as u32)?;
            arrival(&mut a, &ends, &abort, &mut done)?;
        }
        Ok(start.elapsed())
    }

    /// Two rdma links on the device, `ends[0]` and `ends[1]`, each a sender and a receiver in
    /// this process with a ring of shape `spec`.
    pub fn links(
        &self,
        ends: [LinkEnds; 2],
        spec: RingSpec,
    ) -> Result<[(LinkSender, LinkReceiver); 2]> {
        Ok([
            crate::link::loopback(&self.dev, ends[0], spec)?,
            crate::link::loopback(&self.dev, ends[1], spec)?,
        ])
    }
}

/// Waits for the peer's next write into `q`'s buffer and reposts its receive (send
/// completions arriving meanwhile are only counted off).
fn arrival(
    q: &mut Queue,
    ends: &LinkEnds,
    abort: &AbortFlag,
    done: &mut Vec<Completion>,
) -> Result<()> {
    let start = Instant::now();
    loop {
        q.wait(ends, "written by the other queue pair", start, abort, done)?;
        let got = done
            .drain(..)
            .filter(|c| c.opcode == ibv_wc_opcode::IBV_WC_RECV_RDMA_WITH_IMM)
            .count();
        for _ in 0..got {
            q.post_recv(0)?;
        }
        if got > 0 {
            return Ok(());
        }
    }
}
