//! cgroup v2 paths and ids: where the cgroup2 hierarchy is mounted, which cgroup the agent
//! attaches to, and the id the kernel reports for a pod's cgroup (`bpf_get_current_cgroup_id`).
use std::{
    os::unix::fs::MetadataExt as _,
    path::{Component, Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup2 filesystem is mounted (looked in /proc/self/mounts); the agent needs cgroup v2")]
    NoCgroup2,
    #[error("cgroup {0} does not exist")]
    Missing(PathBuf),
    #[error("cgroup {path} is not inside the cgroup2 mount {mount}")]
    Outside { path: PathBuf, mount: PathBuf },
    #[error(
        "refusing to attach to the cgroup2 root {0}: a connect hook there would redirect every \
         connection on the machine. Point cgroupRoot at the node's pods subtree (e.g. kubepods)"
    )]
    Root(PathBuf),
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

/// Finds the cgroup2 mount from `/proc/self/mounts` (`/sys/fs/cgroup` on modern nodes,
/// `/sys/fs/cgroup/unified` on hybrid layouts).
pub fn cgroup2_mount() -> Result<PathBuf, CgroupError> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")
        .map_err(|source| CgroupError::Io { path: "/proc/self/mounts".into(), source })?;
    parse_cgroup2_mount(&mounts).ok_or(CgroupError::NoCgroup2)
}

pub fn parse_cgroup2_mount(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_dev, dir, fstype) = (f.next()?, f.next()?, f.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(dir.replace("\\040", " ")))
    })
}

/// Resolves `path` (absolute, or relative to the mount) to an existing cgroup strictly below
/// the cgroup2 root.
pub fn node_cgroup(mount: &Path, path: &Path) -> Result<PathBuf, CgroupError> {
    let full = resolve(mount, path)?;
    if full == mount {
        return Err(CgroupError::Root(full));
    }
    if !full.is_dir() {
        return Err(CgroupError::Missing(full));
    }
    Ok(full)
}

/// Joins and normalises a cgroup path without touching the filesystem; `..` may not escape.
pub fn resolve(mount: &Path, path: &Path) -> Result<PathBuf, CgroupError> {
    let joined = if path.is_absolute() { path.to_path_buf() } else { mount.join(path) };
    let mut out = PathBuf::new();
    for c in joined.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    if !out.starts_with(mount) {
        return Err(CgroupError::Outside { path: out, mount: mount.into() });
    }
    Ok(out)
}

/// The cgroup id of a cgroup v2 directory: its inode number on cgroup2 (kernfs), which is what
/// `bpf_get_current_cgroup_id()` returns for tasks in it.
pub fn cgroup_id(path: &Path) -> Result<u64, CgroupError> {
    std::fs::metadata(path).map(|m| m.ino()).map_err(|source| CgroupError::Io { path: path.into(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_in_hybrid_and_unified_layouts() {
        let hybrid = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\ncgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\ncgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(parse_cgroup2_mount(hybrid), Some("/sys/fs/cgroup/unified".into()));
        let unified = "cgroup2 /sys/fs/cgroup cgroup2 rw,nsdelegate 0 0\n";
        assert_eq!(parse_cgroup2_mount(unified), Some("/sys/fs/cgroup".into()));
        assert_eq!(parse_cgroup2_mount("proc /proc proc rw 0 0\n"), None);
    }

    #[test]
    fn resolve_stays_inside_the_mount() {
        let m = Path::new("/sys/fs/cgroup");
        assert_eq!(resolve(m, Path::new("kubepods/pod1")).unwrap(), m.join("kubepods/pod1"));
        assert!(matches!(resolve(m, Path::new("../../etc")), Err(CgroupError::Outside { .. })));
        assert!(matches!(resolve(m, Path::new("/tmp/x")), Err(CgroupError::Outside { .. })));
        assert_eq!(resolve(m, Path::new("a/../")).unwrap(), m);
    }
}
