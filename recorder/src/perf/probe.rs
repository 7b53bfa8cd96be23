//! PMU discovery: what `/sys/bus/event_source/devices` says this host can record.
//!
//! Each hardware capability is either a ready-to-open [`PmuEvent`] or the reason it is absent,
//! so the recorder can print one plain line per missing capability and fall back.

use std::path::{Path, PathBuf};

use crate::error::{RecorderError, Result};

/// Where the kernel lists its PMUs.
pub const EVENT_SOURCE_DEVICES: &str = "/sys/bus/event_source/devices";

/// A PMU event resolved to the `perf_event_attr` fields that select it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PmuEvent {
    /// PMU directory name (`intel_pt`, `cpu`, `cpu_core`, `ibs_op`).
    pub pmu: String,
    /// `perf_event_attr.type` (the PMU's `type` file).
    pub ty: u32,
    /// `perf_event_attr.config`.
    pub config: u64,
    /// `perf_event_attr.config1` (PEBS load-latency threshold lives here).
    pub config1: u64,
    /// `perf_event_attr.config2`.
    pub config2: u64,
}

/// A capability: the event to open, or why the host lacks it.
pub type Probed = std::result::Result<PmuEvent, String>;

/// What this host's PMUs offer for recording.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPmus {
    /// The devices directory probed.
    pub root: PathBuf,
    /// The core PMU's micro-architecture name (`caps/pmu_name`, e.g. `skylake`), if listed.
    pub cpu_pmu_name: Option<String>,
    /// Intel Processor Trace.
    pub intel_pt: Probed,
    /// PEBS load-latency samples (the core PMU's `mem-loads` event).
    pub mem_loads: Probed,
    /// PEBS precise store samples (the core PMU's `mem-stores` event).
    pub mem_stores: Probed,
    /// AMD IBS op samples.
    pub ibs_op: Probed,
}

/// Probes the PMUs of this host.
pub fn probe() -> Result<HostPmus> {
    probe_at(Path::new(EVENT_SOURCE_DEVICES))
}

/// Probes the PMUs listed under `root` (a copy of the sysfs layout in tests).
pub fn probe_at(root: &Path) -> Result<HostPmus> {
    // Hybrid Intel parts name their big-core PMU `cpu_core`; PEBS lives there.
    let core = ["cpu", "cpu_core"]
        .into_iter()
        .map(|n| root.join(n))
        .find(|p| p.is_dir());
    let cpu_pmu_name = match &core {
        Some(dir) => read_optional(&dir.join("caps/pmu_name"))?,
        None => None,
    };
    let intel_pt = probe_intel_pt(root)?;
    let mem_loads = probe_core_event(root, core.as_deref(), "mem-loads")?;
    let mem_stores = probe_core_event(root, core.as_deref(), "mem-stores")?;
    let ibs_op = {
        let dir = root.join("ibs_op");
        if dir.is_dir() {
            Ok(PmuEvent {
                pmu: "ibs_op".into(),
                ty: read_type(&dir)?,
                config: 0,
                config1: 0,
                config2: 0,
            })
        } else {
            Err(format!("no {}", dir.display()))
        }
    };
    Ok(HostPmus {
        root: root.to_path_buf(),
        cpu_pmu_name,
        intel_pt,
        mem_loads,
        mem_stores,
        ibs_op,
    })
}

fn probe_intel_pt(root: &Path) -> Result<Probed> {
    let dir = root.join("intel_pt");
    if !dir.is_dir() {
        return Ok(Err(format!("no {}", dir.display())));
    }
    let ty = read_type(&dir)?;
    // Timestamps in the trace let PT packets be placed on the recording's clock.
    let mut config = [0u64; 3];
    if dir.join("format/tsc").exists() {
        apply_term(&dir, "tsc", 1, &mut config)?;
    }
    Ok(Ok(PmuEvent {
        pmu: "intel_pt".into(),
        ty,
        config: config[0],
        config1: config[1],
        config2: config[2],
    }))
}

fn probe_core_event(root: &Path, core: Option<&Path>, name: &str) -> Result<Probed> {
    let Some(dir) = core else {
        return Ok(Err(format!("no core PMU under {}", root.display())));
    };
    let event = dir.join("events").join(name);
    let Some(spec) = read_optional(&event)? else {
        return Ok(Err(format!("no {}", event.display())));
    };
    let mut config = [0u64; 3];
    for term in spec.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        let (key, value) = match term.split_once('=') {
            Some((k, v)) => (k.trim(), parse_num(&event, &spec, v.trim())?),
            None => (term, 1),
        };
        apply_term(dir, key, value, &mut config)?;
    }
    Ok(Ok(PmuEvent {
        pmu: dir
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("cpu")
            .to_string(),
        ty: read_type(dir)?,
        config: config[0],
        config1: config[1],
        config2: config[2],
    }))
}

/// Places `value` into the config words as the PMU's `format/<key>` file says
/// (`config:0-7`, `config1:0-15`, `config:0-7,32-35`).
fn apply_term(pmu: &Path, key: &str, value: u64, config: &mut [u64; 3]) -> Result<()> {
    let path = pmu.join("format").join(key);
    let spec = std::fs::read_to_string(&path).map_err(|e| RecorderError::io(&path, e))?;
    let spec = spec.trim();
    let bad = || RecorderError::Sysfs {
        path: path.clone(),
        content: spec.to_string(),
        expected: "a format like config:0-7 or config1:0-15",
    };
    let (word, ranges) = spec.split_once(':').ok_or_else(bad)?;
    let slot = match word {
        "config" => 0,
        "config1" => 1,
        "config2" => 2,
        _ => return Err(bad()),
    };
    let mut rest = value;
    for range in ranges.split(',') {
        let (lo, hi) = match range.split_once('-') {
            Some((lo, hi)) => (lo.parse::<u32>(), hi.parse::<u32>()),
            None => (range.parse::<u32>(), range.parse::<u32>()),
        };
        let (Ok(lo), Ok(hi)) = (lo, hi) else {
            return Err(bad());
        };
        if lo > hi || hi > 63 {
            return Err(bad());
        }
        let width = hi - lo + 1;
        let mask = if width == 64 {
            u64::MAX
        } else {
            (1u64 << width) - 1
        };
        config[slot] |= (rest & mask) << lo;
        rest = rest.checked_shr(width).unwrap_or(0);
    }
    Ok(())
}

fn parse_num(path: &Path, spec: &str, v: &str) -> Result<u64> {
    let parsed = match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => v.parse::<u64>(),
    };
    parsed.map_err(|_| RecorderError::Sysfs {
        path: path.to_path_buf(),
        content: spec.to_string(),
        expected: "terms like event=0xcd,umask=0x1,ldlat=3",
    })
}

fn read_type(pmu: &Path) -> Result<u32> {
    let path = pmu.join("type");
    let text = std::fs::read_to_string(&path).map_err(|e| RecorderError::io(&path, e))?;
    text.trim()
        .parse::<u32>()
        .map_err(|_| RecorderError::Sysfs {
            path,
            content: text.trim().to_string(),
            expected: "a PMU type number",
        })
}

fn read_optional(path: &Path) -> Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s.trim().to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(RecorderError::io(path, e)),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn write(root: &Path, rel: &str, text: &str) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, format!("{text}\n")).unwrap();
    }

    /// A Skylake-like host: intel_pt plus a core PMU with PEBS memory events.
    pub(crate) fn skylake(root: &Path) {
        write(root, "intel_pt/type", "8");
        write(root, "intel_pt/format/tsc", "config:10");
        write(root, "cpu/type", "4");
        write(root, "cpu/caps/pmu_name", "skylake");
        write(root, "cpu/format/event", "config:0-7");
        write(root, "cpu/format/umask", "config:8-15");
        write(root, "cpu/format/ldlat", "config1:0-15");
        write(root, "cpu/events/mem-loads", "event=0xcd,umask=0x1,ldlat=3");
        write(root, "cpu/events/mem-stores", "event=0xd0,umask=0x82");
    }

    #[test]
    fn intel_host_resolves_pt_and_pebs_events() {
        let dir = tempfile::tempdir().unwrap();
        skylake(dir.path());
        let p = probe_at(dir.path()).unwrap();
        assert_eq!(p.cpu_pmu_name.as_deref(), Some("skylake"));
        let pt = p.intel_pt.unwrap();
        assert_eq!((pt.ty, pt.config), (8, 1 << 10));
        let loads = p.mem_loads.unwrap();
        assert_eq!((loads.ty, loads.config, loads.config1), (4, 0x01cd, 3));
        assert_eq!(p.mem_stores.unwrap().config, 0x82d0);
        assert!(p.ibs_op.unwrap_err().contains("ibs_op"));
    }

    #[test]
    fn amd_host_has_ibs_and_no_pebs() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "cpu/type", "4");
        write(dir.path(), "ibs_op/type", "11");
        let p = probe_at(dir.path()).unwrap();
        assert_eq!(p.ibs_op.unwrap().ty, 11);
        assert!(p.mem_loads.unwrap_err().contains("events/mem-loads"));
        assert!(p.intel_pt.unwrap_err().contains("intel_pt"));
    }

    #[test]
    fn split_format_fields_and_bad_specs() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "cpu/type", "4");
        write(dir.path(), "cpu/format/event", "config:0-7,32-35");
        write(dir.path(), "cpu/events/mem-loads", "event=0x1cd");
        let p = probe_at(dir.path()).unwrap();
        assert_eq!(p.mem_loads.unwrap().config, 0xcd | 1 << 32);
        write(dir.path(), "cpu/format/event", "bogus");
        assert!(matches!(
            probe_at(dir.path()),
            Err(RecorderError::Sysfs { .. })
        ));
    }

    #[test]
    fn this_host_probes_without_error() {
        let p = probe().unwrap();
        eprintln!("this host: {p:?}");
        if let Ok(pt) = &p.intel_pt {
            assert!(pt.ty > 5, "dynamic PMU types start after the fixed ones");
        }
    }
}
