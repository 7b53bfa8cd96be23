//! Host topology from sysfs: online CPUs, NUMA nodes and distances, caches, huge page pools.
//!
//! The result is the manifest's [`HostTopology`]: replay and migration compare it with the
//! target node's, and the viewer shows where an arena's pages could have landed.

use std::path::{Path, PathBuf};

use slug_schema::{Cache, HostTopology, HugePages, NumaNode};

use crate::error::{RecorderError, Result};

/// This host's name as the kernel reports it (`/proc/sys/kernel/hostname`), `unknown` when
/// it cannot be read: the label of the node in the manifest and in node reports.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// Reads the topology of this host from `/sys`, labelled `node`.
pub fn host_topology(node: &str) -> Result<HostTopology> {
    read_topology(Path::new("/sys"), node)
}

/// Reads the topology below a sysfs root (`/sys`, or a copy of its layout in tests).
///
/// Files a kernel may lack (NUMA without `CONFIG_NUMA`, caches in some VMs, huge pages) leave
/// their part empty; a file that exists but does not parse is an error naming it.
pub fn read_topology(sys: &Path, node: &str) -> Result<HostTopology> {
    let cpu_dir = sys.join("devices/system/cpu");
    let online = parse_cpu_list(
        &cpu_dir.join("online"),
        &read_trimmed(&cpu_dir.join("online"))?,
    )?;
    Ok(HostTopology {
        node: node.to_string(),
        cpus: online.len() as u32,
        numa_nodes: numa_nodes(&sys.join("devices/system/node"))?,
        caches: caches(&cpu_dir, &online)?,
        huge_pages: huge_pages(&sys.join("kernel/mm/hugepages"))?,
    })
}

fn read_trimmed(path: &Path) -> Result<String> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(|e| RecorderError::io(path, e))
}

fn read_optional(path: &Path) -> Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s.trim().to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(RecorderError::io(path, e)),
    }
}

fn bad(path: &Path, content: &str, expected: &'static str) -> RecorderError {
    RecorderError::Sysfs {
        path: path.to_path_buf(),
        content: content.to_string(),
        expected,
    }
}

/// Parses a kernel CPU list (`0-3,8,10-11`; empty means none).
pub fn parse_cpu_list(path: &Path, text: &str) -> Result<Vec<u32>> {
    let mut cpus = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let num = |s: &str| {
            s.parse::<u32>()
                .map_err(|_| bad(path, text, "a CPU list like 0-3,8"))
        };
        match part.split_once('-') {
            Some((lo, hi)) => {
                let (lo, hi) = (num(lo)?, num(hi)?);
                if lo > hi {
                    return Err(bad(path, text, "a CPU list with ascending ranges"));
                }
                cpus.extend(lo..=hi);
            }
            None => cpus.push(num(part)?),
        }
    }
    Ok(cpus)
}

/// Numbered subdirectories `<prefix><n>` of `dir`, sorted by number; none if `dir` is missing.
fn numbered_dirs(dir: &Path, prefix: &str) -> Result<Vec<(u32, PathBuf)>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(RecorderError::io(dir, e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| RecorderError::io(dir, e))?;
        let id = entry
            .file_name()
            .to_str()
            .and_then(|n| n.strip_prefix(prefix))
            .and_then(|n| n.parse::<u32>().ok());
        if let Some(id) = id {
            out.push((id, entry.path()));
        }
    }
    out.sort_unstable_by_key(|(id, _)| *id);
    Ok(out)
}

fn numa_nodes(dir: &Path) -> Result<Vec<NumaNode>> {
    let mut nodes = Vec::new();
    for (id, path) in numbered_dirs(dir, "node")? {
        let list = path.join("cpulist");
        let cpus = parse_cpu_list(&list, &read_trimmed(&list)?)?;
        let dist_path = path.join("distance");
        let dist_text = read_trimmed(&dist_path)?;
        let distances = dist_text
            .split_whitespace()
            .map(|d| {
                d.parse::<u32>()
                    .map_err(|_| bad(&dist_path, &dist_text, "SLIT distances like `10 21`"))
            })
            .collect::<Result<Vec<_>>>()?;
        let meminfo = path.join("meminfo");
        let memory_bytes = match read_optional(&meminfo)? {
            Some(text) => mem_total_bytes(&meminfo, &text)?,
            None => 0,
        };
        nodes.push(NumaNode {
            id,
            cpus,
            memory_bytes,
            distances,
        });
    }
    Ok(nodes)
}

/// `Node 0 MemTotal:  10971348 kB` → bytes.
fn mem_total_bytes(path: &Path, text: &str) -> Result<u64> {
    let line = text
        .lines()
        .find(|l| l.contains("MemTotal:"))
        .ok_or_else(|| bad(path, text, "a `MemTotal:` line"))?;
    let kb = line
        .split_whitespace()
        .rev()
        .nth(1)
        .and_then(|n| n.parse::<u64>().ok())
        .ok_or_else(|| bad(path, line, "`Node N MemTotal: <n> kB`"))?;
    Ok(kb * 1024)
}

/// `32K`, `266240K`, `2M`, `1G` or a plain byte count → bytes.
fn parse_size(path: &Path, text: &str) -> Result<u64> {
    let (digits, mult) = match text.char_indices().last() {
        Some((i, 'K')) => (&text[..i], 1u64 << 10),
        Some((i, 'M')) => (&text[..i], 1 << 20),
        Some((i, 'G')) => (&text[..i], 1 << 30),
        _ => (text, 1),
    };
    digits
        .parse::<u64>()
        .map(|n| n * mult)
        .map_err(|_| bad(path, text, "a size like 32K"))
}

fn caches(cpu_dir: &Path, online: &[u32]) -> Result<Vec<Cache>> {
    let mut caches: Vec<Cache> = Vec::new();
    for &cpu in online {
        let dir = cpu_dir.join(format!("cpu{cpu}/cache"));
        for (_, index) in numbered_dirs(&dir, "index")? {
            let level_path = index.join("level");
            let level_text = read_trimmed(&level_path)?;
            let level = level_text
                .parse::<u32>()
                .map_err(|_| bad(&level_path, &level_text, "a cache level number"))?;
            let kind = read_trimmed(&index.join("type"))?.to_lowercase();
            // Some VMs list a cache without a size; it tells nothing worth recording.
            let Some(size_text) = read_optional(&index.join("size"))? else {
                continue;
            };
            let size_bytes = parse_size(&index.join("size"), &size_text)?;
            let line_path = index.join("coherency_line_size");
            let line_bytes = match read_optional(&line_path)? {
                Some(t) => t
                    .parse::<u32>()
                    .map_err(|_| bad(&line_path, &t, "a line size in bytes"))?,
                None => 0,
            };
            let shared_path = index.join("shared_cpu_list");
            let shared_by_cpus = match read_optional(&shared_path)? {
                Some(t) => parse_cpu_list(&shared_path, &t)?,
                None => vec![cpu],
            };
            let cache = Cache {
                level,
                kind,
                size_bytes,
                line_bytes,
                shared_by_cpus,
            };
            // Every CPU sharing an instance lists it; keep one entry per instance.
            if !caches.contains(&cache) {
                caches.push(cache);
            }
        }
    }
    caches.sort_by(|a, b| {
        (a.level, &a.kind, &a.shared_by_cpus).cmp(&(b.level, &b.kind, &b.shared_by_cpus))
    });
    Ok(caches)
}

fn huge_pages(dir: &Path) -> Result<Vec<HugePages>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(RecorderError::io(dir, e)),
    };
    let mut pools = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| RecorderError::io(dir, e))?;
        let kb = entry
            .file_name()
            .to_str()
            .and_then(|n| n.strip_prefix("hugepages-"))
            .and_then(|n| n.strip_suffix("kB"))
            .and_then(|n| n.parse::<u64>().ok());
        let Some(kb) = kb else { continue };
        let count = |file: &str| -> Result<u64> {
            let path = entry.path().join(file);
            let text = read_trimmed(&path)?;
            text.parse::<u64>()
                .map_err(|_| bad(&path, &text, "a page count"))
        };
        pools.push(HugePages {
            page_bytes: kb * 1024,
            total: count("nr_hugepages")?,
            free: count("free_hugepages")?,
        });
    }
    pools.sort_by_key(|p| p.page_bytes);
    Ok(pools)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(root: &Path, rel: &str, text: &str) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, format!("{text}\n")).unwrap();
    }

    #[test]
    fn cpu_lists_parse_ranges_and_singles() {
        let p = Path::new("online");
        assert_eq!(
            parse_cpu_list(p, "0-3,8,10-11").unwrap(),
            [0, 1, 2, 3, 8, 10, 11]
        );
        assert_eq!(parse_cpu_list(p, "").unwrap(), Vec::<u32>::new());
        assert!(parse_cpu_list(p, "3-1").is_err());
        assert!(parse_cpu_list(p, "x").is_err());
    }

    #[test]
    fn a_two_node_host_is_read_completely() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write(root, "devices/system/cpu/online", "0-3");
        for cpu in 0..4 {
            let c = format!("devices/system/cpu/cpu{cpu}/cache");
            write(root, &format!("{c}/index0/level"), "1");
            write(root, &format!("{c}/index0/type"), "Data");
            write(root, &format!("{c}/index0/size"), "48K");
            write(root, &format!("{c}/index0/coherency_line_size"), "64");
            write(
                root,
                &format!("{c}/index0/shared_cpu_list"),
                &cpu.to_string(),
            );
            write(root, &format!("{c}/index1/level"), "3");
            write(root, &format!("{c}/index1/type"), "Unified");
            write(root, &format!("{c}/index1/size"), "32M");
            write(root, &format!("{c}/index1/coherency_line_size"), "64");
            let l3 = if cpu < 2 { "0-1" } else { "2-3" };
            write(root, &format!("{c}/index1/shared_cpu_list"), l3);
        }
        for (n, cpus, dist) in [(0, "0-1", "10 21"), (1, "2-3", "21 10")] {
            write(root, &format!("devices/system/node/node{n}/cpulist"), cpus);
            write(root, &format!("devices/system/node/node{n}/distance"), dist);
            write(
                root,
                &format!("devices/system/node/node{n}/meminfo"),
                &format!("Node {n} MemTotal:       1024 kB\nNode {n} MemFree: 1 kB"),
            );
        }
        write(
            root,
            "kernel/mm/hugepages/hugepages-2048kB/nr_hugepages",
            "16",
        );
        write(
            root,
            "kernel/mm/hugepages/hugepages-2048kB/free_hugepages",
            "4",
        );

        let t = read_topology(root, "n0").unwrap();
        assert_eq!(t.cpus, 4);
        assert_eq!(t.numa_nodes.len(), 2);
        assert_eq!(t.numa_nodes[1].cpus, [2, 3]);
        assert_eq!(t.numa_nodes[1].distances, [21, 10]);
        assert_eq!(t.numa_nodes[0].memory_bytes, 1 << 20);
        // Four private L1s and two shared L3s.
        assert_eq!(t.caches.iter().filter(|c| c.level == 1).count(), 4);
        let l3: Vec<_> = t.caches.iter().filter(|c| c.level == 3).collect();
        assert_eq!(l3.len(), 2);
        assert_eq!(l3[1].shared_by_cpus, [2, 3]);
        assert_eq!(l3[0].size_bytes, 32 << 20);
        assert_eq!(l3[0].kind, "unified");
        assert_eq!(
            t.huge_pages,
            [HugePages {
                page_bytes: 2 << 20,
                total: 16,
                free: 4
            }]
        );

        write(root, "devices/system/node/node1/distance", "21 far");
        let err = read_topology(root, "n0").unwrap_err();
        assert!(err.to_string().contains("node1/distance"), "{err}");
    }

    #[test]
    fn this_host_is_described_consistently() {
        let t = host_topology("here").unwrap();
        let online = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
        assert!(t.cpus >= online, "{} online CPUs, {online} usable", t.cpus);
        for node in &t.numa_nodes {
            assert_eq!(node.distances.len(), t.numa_nodes.len());
            assert_eq!(
                node.distances[node.id as usize], 10,
                "local SLIT distance is 10"
            );
        }
        let numa_cpus: usize = t.numa_nodes.iter().map(|n| n.cpus.len()).sum();
        assert!(t.numa_nodes.is_empty() || numa_cpus == t.cpus as usize);
        for cache in &t.caches {
            assert!((1..=4).contains(&cache.level) && cache.size_bytes > 0);
        }
        for pool in &t.huge_pages {
            assert!(pool.page_bytes.is_power_of_two() && pool.free <= pool.total);
        }
        // The manifest stores it as JSON.
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(serde_json::from_str::<HostTopology>(&json).unwrap(), t);
    }
}
