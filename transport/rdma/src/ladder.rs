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

    /// Two queue pairs of the device connected to each other, each with a registered buffer
    /// of `size` bytes the other writes into: the raw row's ping-pong ends.
    pub fn raw_pair(&self, size: usize) -> Result<(RawEnd, RawEnd)> {
        let end = || -> Result<RawEnd> {
            let mut queue = Queue::create(&self.dev, 4, 2)?;
            queue.post_recv(0)?;
            queue.post_recv(1)?;
            Ok(RawEnd {
                queue,
                buf: Buffer::register(&self.dev, size, true)?,
                peer: (0, 0),
                sent: 0,
                done: Vec::new(),
            })
        };
        let (mut a, mut b) = (end()?, end()?);
        a.queue.connect(&b.queue.info())?;
        b.queue.connect(&a.queue.info())?;
        a.peer = (b.buf.addr(), b.buf.rkey());
        b.peer = (a.buf.addr(), a.buf.rkey());
        Ok((a, b))
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

/// One end of the raw row's ping-pong: a queue pair and the buffer its peer writes into.
#[derive(Debug)]
pub struct RawEnd {
    queue: Queue,
    buf: Buffer,
    /// Address and key of the peer's buffer.
    peer: (u64, u32),
    sent: u64,
    done: Vec<Completion>,
}

impl RawEnd {
    /// One ping-pong step: the first end writes its whole buffer into the peer's and waits
    /// for the peer's write back; the other end the reverse. Waits as links do (spin, then
    /// the completion channel).
    pub fn step(&mut self, first: bool) -> Result<()> {
        if first {
            self.write()?;
            self.arrival()
        } else {
            self.arrival()?;
            self.write()
        }
    }

    fn write(&mut self) -> Result<()> {
        let len = self.buf.len();
        self.queue.post_write_imm(
            self.sent,
            &self.buf,
            0,
            len,
            self.peer.0,
            self.peer.1,
            self.sent as u32,
        )?;
        self.sent += 1;
        Ok(())
    }

    /// Waits for the peer's next write and reposts its receive (send completions arriving
    /// meanwhile are only taken off the queue).
    fn arrival(&mut self) -> Result<()> {
        let ends = LinkEnds {
            id: LinkId(0),
            src: EndpointId(0),
            dst: EndpointId(1),
            timeout: Duration::from_secs(30),
        };
        let start = Instant::now();
        loop {
            self.queue.wait(
                &ends,
                "written by the other queue pair",
                start,
                &AbortFlag::new(),
                &mut self.done,
            )?;
            let got = self
                .done
                .drain(..)
                .filter(|c| c.opcode == ibv_wc_opcode::IBV_WC_RECV_RDMA_WITH_IMM)
                .count();
            for _ in 0..got {
                self.queue.post_recv(0)?;
            }
            if got > 0 {
                return Ok(());
            }
        }
    }
}
