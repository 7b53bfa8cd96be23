//! Owners of the verbs objects a link uses (through `ibverbs-sys`): the device context with its
//! protection domain, registered buffers, and a reliable-connection queue pair with its
//! completion queue and completion channel. Each is destroyed when dropped, in the order verbs
//! requires (queue pairs and buffers before the protection domain, that before the context).
//!
//! The safe layer of the `ibverbs` 0.9 crate cannot serve here: it registers only memory it
//! allocates itself, posts only sends, creates completion queues without a channel, and keeps
//! its raw handles private, so its objects cannot be mixed with the verbs it lacks (RDMA write
//! with immediate, `ibv_req_notify_cq`, `ibv_get_cq_event`).

use std::ffi::CStr;
use std::io;
use std::ptr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ibverbs_sys as ffi;
use serde::{Deserialize, Serialize};
use slug_transport::link::LinkEnds;
use slug_transport::{AbortFlag, Result, TransportError};

/// Every device's first port: slug uses one port per device.
const PORT: u8 = 1;

/// How long a wait polls the completion queue before it sleeps on the completion channel.
const SPIN: Duration = Duration::from_micros(50);

/// Longest sleep on the completion channel between checks of the abort flag and the deadline.
const NAP_MS: i32 = 20;

/// Environment variable naming the device to use (default: the first one).
pub const DEVICE_ENV: &str = "SLUG_RDMA_DEVICE";

/// Environment variable fixing the GID index (default: a RoCE v2 IPv4 GID, else the first).
pub const GID_ENV: &str = "SLUG_RDMA_GID_INDEX";

/// What a peer needs to connect its queue pair to one of ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QpInfo {
    /// Queue pair number.
    pub qpn: u32,
    /// Port LID (InfiniBand; 0 on RoCE).
    pub lid: u16,
    /// The port GID the queue pair sends from.
    pub gid: [u8; 16],
}

fn verbs_error(what: impl Into<String>, errno: i32) -> TransportError {
    TransportError::io(what, io::Error::from_raw_os_error(errno))
}

/// The error that ends a run that asked for rdma on a host without a usable device.
fn no_device(detail: impl std::fmt::Display) -> TransportError {
    TransportError::NoRdmaDevice(detail.to_string())
}

/// An opened RDMA device: its context, one protection domain and the port facts links need.
#[derive(Debug)]
pub struct Device {
    ctx: *mut ffi::ibv_context,
    pd: *mut ffi::ibv_pd,
    name: String,
    lid: u16,
    mtu: ffi::ibv_mtu,
    gid_index: u8,
    gid: [u8; 16],
}

// SAFETY: libibverbs objects may be used from any thread; every mutation goes through the
// library, which locks what it shares.
unsafe impl Send for Device {}
// SAFETY: as above.
unsafe impl Sync for Device {}

impl Device {
    /// Opens the device named by `SLUG_RDMA_DEVICE`, or the first one, and checks that its
    /// port is active. Fails with "no RDMA device (...); use --transport tcp" when there is none.
    pub fn open() -> Result<Arc<Self>> {
        let wanted = std::env::var(DEVICE_ENV).ok().filter(|w| !w.is_empty());
        let mut n = 0;
        // SAFETY: `n` is a valid out-pointer; the list is freed below.
        let list = unsafe { ffi::ibv_get_device_list(&mut n) };
        if list.is_null() {
            return Err(no_device(format!(
                "ibv_get_device_list: {}",
                io::Error::last_os_error()
            )));
        }
        // SAFETY: the library returned `n` device pointers at `list`.
        let devices = unsafe { std::slice::from_raw_parts(list, n.max(0) as usize) };
        let mut names = Vec::new();
        let mut chosen = None;
        for &d in devices {
            // SAFETY: `d` is a device of the list, whose name is a C string.
            let name = unsafe { CStr::from_ptr(ffi::ibv_get_device_name(d)) }
                .to_string_lossy()
                .into_owned();
            if chosen.is_none() && wanted.as_ref().is_none_or(|w| *w == name) {
                chosen = Some((d, name.clone()));
            }
            names.push(name);
        }
        let opened = match chosen {
            // A context opened from the list stays valid after the list is freed.
            Some((d, name)) => Self::open_device(d, name),
            None if names.is_empty() => Err(no_device("ibv_get_device_list: no devices")),
            None => Err(no_device(format!(
                "{DEVICE_ENV}={} is not one of {}",
                wanted.unwrap_or_default(),
                names.join(", ")
            ))),
        };
        // SAFETY: `list` came from ibv_get_device_list and is freed once.
        unsafe { ffi::ibv_free_device_list(list) };
        opened.map(Arc::new)
    }

    fn open_device(d: *mut ffi::ibv_device, name: String) -> Result<Self> {
        // SAFETY: `d` is a listed device.
        let ctx = unsafe { ffi::ibv_open_device(d) };
        if ctx.is_null() {
            return Err(no_device(format!(
                "ibv_open_device {name}: {}",
                io::Error::last_os_error()
            )));
        }
        let mut dev = Self {
            ctx,
            pd: ptr::null_mut(),
            name,
            lid: 0,
            mtu: ffi::IBV_MTU_1024,
            gid_index: 0,
            gid: [0; 16],
        };
        let mut port = ffi::ibv_port_attr::default();
        // SAFETY: the exported ibv_query_port fills the compat prefix of ibv_port_attr.
        let rc = unsafe { ffi::ibv_query_port(ctx, PORT, (&raw mut port).cast()) };
        if rc != 0 {
            return Err(no_device(format!(
                "ibv_query_port {} port {PORT}: {}",
                dev.name,
                io::Error::from_raw_os_error(rc)
            )));
        }
        if port.state != ffi::ibv_port_state::IBV_PORT_ACTIVE {
            return Err(no_device(format!(
                "{} port {PORT} is not active (state {}; {DEVICE_ENV} picks another device)",
                dev.name, port.state
            )));
        }
        dev.lid = port.lid;
        dev.mtu = port.active_mtu;
        (dev.gid_index, dev.gid) = dev.choose_gid(port.gid_tbl_len)?;
        // SAFETY: `ctx` is open.
        dev.pd = unsafe { ffi::ibv_alloc_pd(ctx) };
        if dev.pd.is_null() {
            return Err(TransportError::io(
                format!("ibv_alloc_pd on {}", dev.name),
                io::Error::last_os_error(),
            ));
        }
        Ok(dev)
    }

    /// The GID to send from: `SLUG_RDMA_GID_INDEX`, else the first RoCE v2 GID holding an IPv4
    /// address (routable, what RoCE switches and Soft-RoCE expect), else the first RoCE v2 GID,
    /// else the first valid one (InfiniBand).
    fn choose_gid(&self, table_len: i32) -> Result<(u8, [u8; 16])> {
        let mut entries = Vec::new();
        for index in 0..table_len.clamp(0, 256) as u32 {
            let mut e = ffi::ibv_gid_entry {
                gid: ffi::ibv_gid { raw: [0; 16] },
                gid_index: 0,
                port_num: 0,
                gid_type: 0,
                ndev_ifindex: 0,
            };
            // SAFETY: `e` is a valid entry of the size given; empty entries return an error.
            let rc = unsafe {
                ffi::_ibv_query_gid_ex(
                    self.ctx,
                    u32::from(PORT),
                    index,
                    &mut e,
                    0,
                    size_of::<ffi::ibv_gid_entry>(),
                )
            };
            if rc == 0 {
                // SAFETY: every bit pattern of the union is a valid byte array.
                entries.push((index, e.gid_type, unsafe { e.gid.raw }));
            }
        }
        if let Ok(forced) = std::env::var(GID_ENV) {
            let index: u32 = forced.trim().parse().map_err(|_| {
                TransportError::Config(format!("{GID_ENV}={forced:?} is not a GID index"))
            })?;
            return entries
                .iter()
                .find(|e| e.0 == index)
                .map(|e| (e.0 as u8, e.2))
                .ok_or_else(|| {
                    TransportError::Config(format!(
                        "{GID_ENV}={index}: {} port {PORT} has no valid GID there (valid: {:?})",
                        self.name,
                        entries.iter().map(|e| e.0).collect::<Vec<_>>()
                    ))
                });
        }
        let v2 = |e: &&(u32, u32, [u8; 16])| e.1 == ffi::IBV_GID_TYPE_ROCE_V2;
        let ipv4 = |e: &&(u32, u32, [u8; 16])| e.2[..10] == [0; 10] && e.2[10..12] == [0xff; 2];
        entries
            .iter()
            .filter(v2)
            .find(ipv4)
            .or_else(|| entries.iter().find(v2))
            .or_else(|| entries.first())
            .filter(|e| e.0 < 256)
            .map(|e| (e.0 as u8, e.2))
            .ok_or_else(|| no_device(format!("{} port {PORT} has no valid GID", self.name)))
    }

    /// The device's name (`rxe0`, `mlx5_0`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The device as the run's log names it: `rxe0 (gid index 1)`.
    pub fn describe(&self) -> String {
        format!("{} (gid index {})", self.name, self.gid_index)
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        // SAFETY: every queue pair and buffer holds an Arc of this device, so none is left.
        unsafe {
            if !self.pd.is_null() {
                ffi::ibv_dealloc_pd(self.pd);
            }
            ffi::ibv_close_device(self.ctx);
        }
    }
}

/// A buffer registered with the device once, for its whole life.
#[derive(Debug)]
pub struct Buffer {
    mr: *mut ffi::ibv_mr,
    ptr: *mut u8,
    len: usize,
    _dev: Arc<Device>,
}

// SAFETY: the buffer is owned memory plus a verbs handle (see Device).
unsafe impl Send for Buffer {}

impl Buffer {
    /// Allocates `len` zeroed bytes and registers them; `remote_write` lets the peer's queue
    /// pair write into them.
    pub fn register(dev: &Arc<Device>, len: usize, remote_write: bool) -> Result<Self> {
        let ptr = Box::into_raw(vec![0u8; len.max(1)].into_boxed_slice()).cast::<u8>();
        let mut access = ffi::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE;
        if remote_write {
            access |= ffi::ibv_access_flags::IBV_ACCESS_REMOTE_WRITE;
        }
        // SAFETY: `ptr..ptr+len` is memory this buffer owns until it is deregistered.
        let mr = unsafe { ffi::ibv_reg_mr(dev.pd, ptr.cast(), len.max(1), access.0 as i32) };
        if mr.is_null() {
            let e = io::Error::last_os_error();
            // SAFETY: the box is not registered and was made just above.
            drop(unsafe { Box::from_raw(ptr::slice_from_raw_parts_mut(ptr, len.max(1))) });
            return Err(TransportError::io(
                format!(
                    "register {len} bytes with {} (ibv_reg_mr; raise `ulimit -l` if locked \
                     memory is short)",
                    dev.name
                ),
                e,
            ));
        }
        Ok(Self {
            mr,
            ptr,
            len: len.max(1),
            _dev: dev.clone(),
        })
    }

    /// Bytes registered.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Start address, as the peer writes to it.
    pub fn addr(&self) -> u64 {
        self.ptr as u64
    }

    /// Key a peer writes with.
    pub fn rkey(&self) -> u32 {
        // SAFETY: `mr` is registered.
        unsafe { (*self.mr).rkey }
    }

    fn lkey(&self) -> u32 {
        // SAFETY: `mr` is registered.
        unsafe { (*self.mr).lkey }
    }

    /// Copies `data` to `offset` (the caller keeps the device off this range meanwhile).
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        assert!(offset + data.len() <= self.len, "write inside the buffer");
        // SAFETY: the range lies inside the owned allocation (checked above).
        unsafe { ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(offset), data.len()) };
    }

    /// Copies `out.len()` bytes at `offset` into `out` (the caller knows the device has
    /// finished writing them: their completion was polled).
    pub fn read(&self, offset: usize, out: &mut [u8]) {
        assert!(offset + out.len() <= self.len, "read inside the buffer");
        // SAFETY: the range lies inside the owned allocation (checked above).
        unsafe { ptr::copy_nonoverlapping(self.ptr.add(offset), out.as_mut_ptr(), out.len()) };
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        // SAFETY: registered once here; the memory is freed only after deregistration.
        unsafe {
            ffi::ibv_dereg_mr(self.mr);
            drop(Box::from_raw(ptr::slice_from_raw_parts_mut(
                self.ptr, self.len,
            )));
        }
    }
}

/// One completion, as the links read it.
#[derive(Debug, Clone, Copy)]
pub struct Completion {
    /// The work request's id.
    pub wr_id: u64,
    /// What completed.
    pub opcode: ffi::ibv_wc_opcode::Type,
    /// Immediate data (host order) of a received write or send with immediate.
    pub imm: Option<u32>,
    /// Bytes received.
    pub len: usize,
}

/// A reliable-connection queue pair with its completion queue and completion channel.
#[derive(Debug)]
pub struct Queue {
    qp: *mut ffi::ibv_qp,
    cq: *mut ffi::ibv_cq,
    channel: *mut ffi::ibv_comp_channel,
    dev: Arc<Device>,
}

// SAFETY: see Device; a Queue is used by one link end at a time.
unsafe impl Send for Queue {}

impl Queue {
    /// A queue pair (in INIT) that can have `send` sends and `recv` receives outstanding.
    pub fn create(dev: &Arc<Device>, send: u32, recv: u32) -> Result<Self> {
        // SAFETY: the context is open.
        let channel = unsafe { ffi::ibv_create_comp_channel(dev.ctx) };
        if channel.is_null() {
            return Err(TransportError::io(
                format!("ibv_create_comp_channel on {}", dev.name),
                io::Error::last_os_error(),
            ));
        }
        let entries = (send + recv + 1) as i32;
        // SAFETY: as above; the channel outlives the CQ (dropped after it).
        let cq = unsafe { ffi::ibv_create_cq(dev.ctx, entries, ptr::null_mut(), channel, 0) };
        if cq.is_null() {
            let e = io::Error::last_os_error();
            // SAFETY: created above, unused.
            unsafe { ffi::ibv_destroy_comp_channel(channel) };
            return Err(TransportError::io(
                format!("ibv_create_cq ({entries} entries) on {}", dev.name),
                e,
            ));
        }
        let mut attr = ffi::ibv_qp_init_attr {
            send_cq: cq,
            recv_cq: cq,
            cap: ffi::ibv_qp_cap {
                max_send_wr: send,
                max_recv_wr: recv,
                max_send_sge: 1,
                max_recv_sge: 1,
                max_inline_data: 0,
            },
            qp_type: ffi::ibv_qp_type::IBV_QPT_RC,
            sq_sig_all: 0,
            ..Default::default()
        };
        // SAFETY: `attr` names this device's CQ.
        let qp = unsafe { ffi::ibv_create_qp(dev.pd, &mut attr) };
        if qp.is_null() {
            let e = io::Error::last_os_error();
            // SAFETY: created above, unused.
            unsafe {
                ffi::ibv_destroy_cq(cq);
                ffi::ibv_destroy_comp_channel(channel);
            }
            return Err(TransportError::io(
                format!("ibv_create_qp on {}", dev.name),
                e,
            ));
        }
        let queue = Self {
            qp,
            cq,
            channel,
            dev: dev.clone(),
        };
        queue.init()?;
        Ok(queue)
    }

    /// What the peer needs to connect to this queue pair.
    pub fn info(&self) -> QpInfo {
        QpInfo {
            // SAFETY: `qp` is live.
            qpn: unsafe { (*self.qp).qp_num },
            lid: self.dev.lid,
            gid: self.dev.gid,
        }
    }

    /// Moves the new queue pair to INIT, where receives may be posted and the peer may write
    /// into this side's buffers registered for remote writes.
    fn init(&self) -> Result<()> {
        use ffi::ibv_qp_attr_mask as M;
        let mut init = ffi::ibv_qp_attr {
            qp_state: ffi::ibv_qp_state::IBV_QPS_INIT,
            pkey_index: 0,
            port_num: PORT,
            qp_access_flags: ffi::ibv_access_flags::IBV_ACCESS_REMOTE_WRITE.0,
            ..Default::default()
        };
        let mask = M::IBV_QP_STATE | M::IBV_QP_PKEY_INDEX | M::IBV_QP_PORT | M::IBV_QP_ACCESS_FLAGS;
        self.modify(&mut init, mask, "INIT")
    }

    /// Takes the queue pair through RTR and RTS towards `remote`.
    pub fn connect(&self, remote: &QpInfo) -> Result<()> {
        use ffi::ibv_qp_attr_mask as M;
        let mut rtr = ffi::ibv_qp_attr {
            qp_state: ffi::ibv_qp_state::IBV_QPS_RTR,
            path_mtu: self.dev.mtu,
            dest_qp_num: remote.qpn,
            rq_psn: 0,
            max_dest_rd_atomic: 1,
            min_rnr_timer: 12,
            ah_attr: ffi::ibv_ah_attr {
                dlid: remote.lid,
                is_global: 1,
                port_num: PORT,
                grh: ffi::ibv_global_route {
                    dgid: ffi::ibv_gid { raw: remote.gid },
                    sgid_index: self.dev.gid_index,
                    hop_limit: 64,
                    ..Default::default()
                },
                ..Default::default()
            },
            ..Default::default()
        };
        let mask = M::IBV_QP_STATE
            | M::IBV_QP_AV
            | M::IBV_QP_PATH_MTU
            | M::IBV_QP_DEST_QPN
            | M::IBV_QP_RQ_PSN
            | M::IBV_QP_MAX_DEST_RD_ATOMIC
            | M::IBV_QP_MIN_RNR_TIMER;
        self.modify(&mut rtr, mask, "RTR")?;
        let mut rts = ffi::ibv_qp_attr {
            qp_state: ffi::ibv_qp_state::IBV_QPS_RTS,
            sq_psn: 0,
            timeout: 14,
            retry_cnt: 7,
            // 7: retry for ever while the receiver has no receive posted (it is only slow).
            rnr_retry: 7,
            max_rd_atomic: 1,
            ..Default::default()
        };
        let mask = M::IBV_QP_STATE
            | M::IBV_QP_SQ_PSN
            | M::IBV_QP_TIMEOUT
            | M::IBV_QP_RETRY_CNT
            | M::IBV_QP_RNR_RETRY
            | M::IBV_QP_MAX_QP_RD_ATOMIC;
        self.modify(&mut rts, mask, "RTS")
    }

    fn modify(
        &self,
        attr: &mut ffi::ibv_qp_attr,
        mask: ffi::ibv_qp_attr_mask,
        state: &str,
    ) -> Result<()> {
        // SAFETY: `qp` is live and `attr` is filled for `mask`.
        let rc = unsafe { ffi::ibv_modify_qp(self.qp, attr, mask.0 as i32) };
        if rc != 0 {
            return Err(verbs_error(
                format!(
                    "move queue pair {} on {} to {state} (ibv_modify_qp)",
                    self.info().qpn,
                    self.dev.name
                ),
                rc,
            ));
        }
        Ok(())
    }

    fn post(&mut self, wr: &mut ffi::ibv_send_wr, what: &str) -> Result<()> {
        let mut bad = ptr::null_mut();
        // SAFETY: `qp` is live; ibv_post_send is an inline call through the context's ops,
        // and `wr` (with its scatter list) lives for the call.
        let rc = unsafe {
            let ctx = (*self.qp).context;
            match (*ctx).ops.post_send {
                Some(post) => post(self.qp, wr, &mut bad),
                None => libc::ENOSYS,
            }
        };
        if rc != 0 {
            return Err(verbs_error(
                format!("post {what} on {} (ibv_post_send)", self.dev.name),
                rc,
            ));
        }
        Ok(())
    }

    /// Posts an RDMA write with immediate `imm` of `len` bytes at `offset` of `local` to
    /// `remote_addr` (key `rkey`) of the peer; its completion carries `wr_id`.
    #[allow(clippy::too_many_arguments)]
    pub fn post_write_imm(
        &mut self,
        wr_id: u64,
        local: &Buffer,
        offset: usize,
        len: usize,
        remote_addr: u64,
        rkey: u32,
        imm: u32,
    ) -> Result<()> {
        assert!(offset + len <= local.len, "write from inside the buffer");
        let mut sge = ffi::ibv_sge {
            addr: local.addr() + offset as u64,
            length: len as u32,
            lkey: local.lkey(),
        };
        let mut wr = ffi::ibv_send_wr {
            wr_id,
            sg_list: &mut sge,
            num_sge: 1,
            opcode: ffi::ibv_wr_opcode::IBV_WR_RDMA_WRITE_WITH_IMM,
            send_flags: ffi::ibv_send_flags::IBV_SEND_SIGNALED.0,
            ..Default::default()
        };
        wr.__bindgen_anon_1.imm_data = imm.to_be();
        wr.wr.rdma = ffi::ibv_send_wr__bindgen_ty_2__bindgen_ty_1 { remote_addr, rkey };
        self.post(&mut wr, "an RDMA write with immediate")
    }

    /// Posts a send of no bytes with immediate `imm` (a credit message).
    pub fn post_send_imm(&mut self, wr_id: u64, imm: u32) -> Result<()> {
        let mut wr = ffi::ibv_send_wr {
            wr_id,
            num_sge: 0,
            opcode: ffi::ibv_wr_opcode::IBV_WR_SEND_WITH_IMM,
            send_flags: ffi::ibv_send_flags::IBV_SEND_SIGNALED.0,
            ..Default::default()
        };
        wr.__bindgen_anon_1.imm_data = imm.to_be();
        self.post(&mut wr, "a send with immediate")
    }

    /// Posts a receive of no bytes: it takes one write with immediate or one empty send.
    pub fn post_recv(&mut self, wr_id: u64) -> Result<()> {
        let mut wr = ffi::ibv_recv_wr {
            wr_id,
            next: ptr::null_mut(),
            sg_list: ptr::null_mut(),
            num_sge: 0,
        };
        let mut bad = ptr::null_mut();
        // SAFETY: as in `post`.
        let rc = unsafe {
            let ctx = (*self.qp).context;
            match (*ctx).ops.post_recv {
                Some(post) => post(self.qp, &mut wr, &mut bad),
                None => libc::ENOSYS,
            }
        };
        if rc != 0 {
            return Err(verbs_error(
                format!("post a receive on {} (ibv_post_recv)", self.dev.name),
                rc,
            ));
        }
        Ok(())
    }

    /// Takes the completions ready now (none is an answer); a failed one is an error naming
    /// its status.
    pub fn poll(&mut self, ends: &LinkEnds, out: &mut Vec<Completion>) -> Result<()> {
        let mut wcs = [ffi::ibv_wc::default(); 16];
        loop {
            // SAFETY: `cq` is live; ibv_poll_cq is inline through the context's ops.
            let n = unsafe {
                let ctx = (*self.cq).context;
                match (*ctx).ops.poll_cq {
                    Some(poll) => poll(self.cq, wcs.len() as i32, wcs.as_mut_ptr()),
                    None => -1,
                }
            };
            if n < 0 {
                return Err(TransportError::LinkBroken {
                    link: ends.name(),
                    detail: format!("ibv_poll_cq failed on {}", self.dev.name),
                });
            }
            for wc in &wcs[..n as usize] {
                if let Some((status, vendor)) = wc.error() {
                    // SAFETY: the library returns a static C string for every status.
                    let text = unsafe { CStr::from_ptr(ffi::ibv_wc_status_str(status)) };
                    return Err(TransportError::LinkBroken {
                        link: ends.name(),
                        detail: format!(
                            "RDMA work request {} failed: {} (status {status}, vendor error \
                             {vendor:#x}); the peer's queue pair is gone or refused the access",
                            wc.wr_id(),
                            text.to_string_lossy()
                        ),
                    });
                }
                out.push(Completion {
                    wr_id: wc.wr_id(),
                    opcode: wc.opcode(),
                    imm: wc.imm_data().map(u32::from_be),
                    len: wc.len(),
                });
            }
            if (n as usize) < wcs.len() {
                return Ok(());
            }
        }
    }

    /// Waits until at least one completion is ready and takes them into `out`: polls for a
    /// short spin, then sleeps on the completion channel, waking to check `abort` and the
    /// link's deadline (`start + ends.timeout`). `what` names the awaited thing for a timeout.
    pub fn wait(
        &mut self,
        ends: &LinkEnds,
        what: &'static str,
        start: Instant,
        abort: &AbortFlag,
        out: &mut Vec<Completion>,
    ) -> Result<()> {
        let spin_end = Instant::now() + SPIN;
        loop {
            self.poll(ends, out)?;
            if !out.is_empty() {
                return Ok(());
            }
            if Instant::now() >= spin_end {
                break;
            }
            std::hint::spin_loop();
        }
        loop {
            // Armed before the last poll, so a completion arriving in between still wakes us.
            // SAFETY: `cq` is live; ibv_req_notify_cq is inline through the context's ops.
            let rc = unsafe {
                let ctx = (*self.cq).context;
                match (*ctx).ops.req_notify_cq {
                    Some(arm) => arm(self.cq, 0),
                    None => libc::ENOSYS,
                }
            };
            if rc != 0 {
                return Err(verbs_error(
                    format!("arm the completion queue on {}", self.dev.name),
                    rc,
                ));
            }
            self.poll(ends, out)?;
            if !out.is_empty() {
                return Ok(());
            }
            if abort.raised() {
                return Err(TransportError::Aborted {
                    reason: format!("run aborted while link {} waited", ends.name()),
                });
            }
            if start.elapsed() >= ends.timeout {
                return Err(TransportError::Timeout {
                    link: ends.name(),
                    what,
                    waited_ms: start.elapsed().as_millis() as u64,
                });
            }
            // SAFETY: the channel is live; its fd is only polled here.
            let mut fd = libc::pollfd {
                fd: unsafe { (*self.channel).fd },
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let ready = unsafe { libc::poll(&mut fd, 1, NAP_MS) };
            if ready > 0 {
                let mut cq = ptr::null_mut();
                let mut ctx = ptr::null_mut();
                // SAFETY: the fd is readable, so an event is queued and this does not block.
                if unsafe { ffi::ibv_get_cq_event(self.channel, &mut cq, &mut ctx) } == 0 {
                    // SAFETY: `cq` is the event's (our) CQ; every event is acknowledged.
                    unsafe { ffi::ibv_ack_cq_events(cq, 1) };
                }
            }
        }
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        // SAFETY: destroyed once, queue pair first; every event got was acknowledged.
        unsafe {
            ffi::ibv_destroy_qp(self.qp);
            ffi::ibv_destroy_cq(self.cq);
            ffi::ibv_destroy_comp_channel(self.channel);
        }
    }
}
