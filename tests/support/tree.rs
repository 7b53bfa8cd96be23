//! A directory tree's exact state (names, kinds, contents, link targets), to prove a command
//! left it untouched.

use std::collections::BTreeMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};

/// Every entry under `dir` (links not followed): a file's length and content hash, a link's
/// target, a directory as "dir".
pub fn state(dir: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let rel = path.strip_prefix(root).unwrap().to_path_buf();
        let ty = entry.file_type().unwrap();
        if ty.is_symlink() {
            out.insert(
                rel,
                format!("link -> {:?}", std::fs::read_link(&path).unwrap()),
            );
        } else if ty.is_dir() {
            out.insert(rel, "dir".into());
            walk(root, &path, out);
        } else {
            let bytes = std::fs::read(&path).unwrap();
            let mut h = DefaultHasher::new();
            bytes.hash(&mut h);
            out.insert(rel, format!("{} bytes, {:x}", bytes.len(), h.finish()));
        }
    }
}
