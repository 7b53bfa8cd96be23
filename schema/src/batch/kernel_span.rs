//! Kernel span columns: one value per span in each, encode and decode side by side.

use super::{
    BatchError, Col, Planes, Prev, next_span_end, put_h128, put_planes, put_svar, put_uvar, zigzag,
};
use crate::event::{KernelSpan, layer_wire};
use crate::trace_capnp::kernel_span_columns;

super::columns!(
    /// The `kernelSpans` group of a batch.
    KernelSpanColumns {
        kernel,
        layer,
        step,
        seq,
        row_start,
        row_len,
        thread,
        duration,
        has_hash,
        hashes,
        /// Per span: 1 when its start is predicted from the previous group's end.
        time_ref,
    }
    scratch {
        /// Zigzag durations, laid out in planes into `duration` at the end of the batch.
        duration_z: Vec<u64>,
    }
);

impl KernelSpanColumns {
    pub(super) fn push(&mut self, e: &KernelSpan, use_end: bool, p: &mut Prev) {
        self.time_ref.push(u8::from(use_end));
        put_uvar(&mut self.kernel, e.kernel.into());
        let layer = layer_wire::encode(e.layer);
        put_uvar(&mut self.layer, layer.into());
        put_svar(&mut self.step, e.step, p.span_step);
        p.span_step = e.step;
        put_uvar(&mut self.seq, e.seq.into());
        // The first row and the thread stay on the wire as zero columns (see `KernelSpan`).
        put_uvar(&mut self.row_start, 0);
        put_svar(&mut self.row_len, e.rows.into(), 0);
        put_uvar(&mut self.thread, 0);
        let duration = e.end_ns.wrapping_sub(e.start_ns);
        let predicted = p.span_duration.replace(e.kernel, layer, duration);
        self.duration_z.push(zigzag(duration, predicted));
        self.has_hash.push(u8::from(e.output_hash.is_some()));
        if let Some(h) = e.output_hash {
            put_h128(&mut self.hashes, h);
        }
    }

    pub(super) fn seal(&mut self) {
        put_planes(&mut self.duration, &self.duration_z);
    }

    pub(super) fn write(&self, mut g: kernel_span_columns::Builder<'_>) {
        g.set_kernel(&self.kernel);
        g.set_layer(&self.layer);
        g.set_step(&self.step);
        g.set_seq(&self.seq);
        g.set_row_start(&self.row_start);
        g.set_row_len(&self.row_len);
        g.set_thread(&self.thread);
        g.set_duration(&self.duration);
        g.set_has_hash(&self.has_hash);
        g.set_hashes(&self.hashes);
        g.set_time_ref(&self.time_ref);
    }
}

/// Reads the `kernelSpans` group back, one span at a time.
pub(super) struct KernelSpanReader<'a> {
    kernel: Col<'a>,
    layer: Col<'a>,
    step: Col<'a>,
    seq: Col<'a>,
    row_start: Col<'a>,
    row_len: Col<'a>,
    thread: Col<'a>,
    duration: Planes<'a>,
    has_hash: Col<'a>,
    hashes: Col<'a>,
    time_ref: Col<'a>,
}

impl<'a> KernelSpanReader<'a> {
    pub(super) fn new(r: kernel_span_columns::Reader<'a>, n: usize) -> Result<Self, BatchError> {
        Ok(KernelSpanReader {
            kernel: Col::new(r.get_kernel()?, "kernelSpans.kernel"),
            layer: Col::new(r.get_layer()?, "kernelSpans.layer"),
            step: Col::new(r.get_step()?, "kernelSpans.step"),
            seq: Col::new(r.get_seq()?, "kernelSpans.seq"),
            row_start: Col::new(r.get_row_start()?, "kernelSpans.rowStart"),
            row_len: Col::new(r.get_row_len()?, "kernelSpans.rowLen"),
            thread: Col::new(r.get_thread()?, "kernelSpans.thread"),
            duration: Planes::new(r.get_duration()?, n, "kernelSpans.duration")?,
            has_hash: Col::new(r.get_has_hash()?, "kernelSpans.hasHash"),
            hashes: Col::new(r.get_hashes()?, "kernelSpans.hashes"),
            time_ref: Col::new(r.get_time_ref()?, "kernelSpans.timeRef"),
        })
    }

    /// Whether the next span's start is predicted from the previous group's end.
    pub(super) fn starts_group(&mut self) -> Result<bool, BatchError> {
        match self.time_ref.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(BatchError::Columns("kernelSpans.timeRef")),
        }
    }

    pub(super) fn next(
        &mut self,
        ns: u64,
        starts_group: bool,
        v2: bool,
        p: &mut Prev,
    ) -> Result<KernelSpan, BatchError> {
        let kernel = self.kernel.u32()?;
        let layer = self.layer.u32()?;
        let step = self.step.svar(p.span_step)?;
        p.span_step = step;
        let seq = self.seq.u32()?;
        let row_start = self.row_start.u32()?;
        let row_end = self.row_len.svar(row_start.into())?;
        let row_end =
            u32::try_from(row_end).map_err(|_| BatchError::Columns("kernelSpans.rowLen"))?;
        // Only older writers filled the thread column; the API has no thread.
        self.thread.u32()?;
        let end_ns = if v2 {
            let predicted = p.span_duration.get(kernel, layer);
            let duration = self.duration.svar(predicted)?;
            p.span_duration.replace(kernel, layer, duration);
            ns.wrapping_add(duration)
        } else {
            self.duration.svar(ns)?
        };
        p.span_end = next_span_end(p.span_end, end_ns, starts_group);
        let output_hash = match self.has_hash.u8()? {
            0 => None,
            1 => Some(self.hashes.h128()?),
            _ => return Err(BatchError::Columns("kernelSpans.hasHash")),
        };
        Ok(KernelSpan {
            kernel,
            layer: layer_wire::decode(layer),
            step,
            seq,
            rows: row_end.wrapping_sub(row_start),
            start_ns: ns,
            end_ns,
            output_hash,
        })
    }

    pub(super) fn finish(&self) -> Result<(), BatchError> {
        for c in [
            &self.kernel,
            &self.layer,
            &self.step,
            &self.seq,
            &self.row_start,
            &self.row_len,
            &self.thread,
            &self.has_hash,
            &self.hashes,
            &self.time_ref,
        ] {
            c.finish()?;
        }
        Ok(())
    }
}
