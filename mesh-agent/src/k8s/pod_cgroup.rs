//! From a pod's UID to its cgroup, as the kubelet lays them out on cgroup v2.
//!
//! The kubelet names a pod's cgroup after its UID and QoS class, in one of two styles:
//!
//! | driver | Guaranteed | Burstable / BestEffort |
//! |---|---|---|
//! | systemd | `kubepods.slice/kubepods-pod<uid_>.slice` | `kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid_>.slice` |
//! | cgroupfs | `kubepods/pod<uid>` | `kubepods/<qos>/pod<uid>` |
//!
//! (`<uid_>`: the UID with `-` replaced by `_`, as systemd unit names require.) The search starts
//! at the agent's cgroup root, which is the kubepods cgroup itself or a cgroup above it; on a
//! hybrid host that is under the cgroup2 mount at `/sys/fs/cgroup/unified`, which the caller
//! resolved already. Every layout is tried, so a wrong QoS guess or driver guess costs nothing.
use std::path::{Path, PathBuf};

const QOS_CLASSES: [&str; 2] = ["burstable", "besteffort"];

/// Candidate cgroup paths (relative to a kubepods root, or to a directory above one) for a pod.
pub fn candidates(uid: &str) -> Vec<PathBuf> {
    let systemd_uid = uid.replace('-', "_");
    let mut out = Vec::with_capacity(6 * 2);
    // Relative to the directory holding the kubepods cgroup.
    let systemd: Vec<PathBuf> =
        std::iter::once(PathBuf::from(format!("kubepods.slice/kubepods-pod{systemd_uid}.slice")))
            .chain(QOS_CLASSES.iter().map(|q| {
                PathBuf::from(format!("kubepods.slice/kubepods-{q}.slice/kubepods-{q}-pod{systemd_uid}.slice"))
            }))
            .collect();
    let cgroupfs: Vec<PathBuf> = std::iter::once(PathBuf::from(format!("kubepods/pod{uid}")))
        .chain(QOS_CLASSES.iter().map(|q| PathBuf::from(format!("kubepods/{q}/pod{uid}"))))
        .collect();
    for p in systemd.iter().chain(&cgroupfs) {
        out.push(p.clone());
    }
    // Relative to the kubepods cgroup itself (the agent's root is `kubepods.slice` or `kubepods`).
    for p in systemd.iter().chain(&cgroupfs) {
        out.push(p.components().skip(1).collect());
    }
    out
}

/// The pod's cgroup below `root`, if it exists yet.
pub fn find(root: &Path, uid: &str) -> Option<PathBuf> {
    if uid.is_empty() || uid.contains('/') || uid.contains("..") {
        return None;
    }
    candidates(uid).into_iter().map(|c| root.join(c)).find(|p| p.is_dir())
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0f9d2c3e-1111-4a2b-9c3d-0123456789ab";

    /// Every layout, created as real directories, is found from the directory above kubepods
    /// and from the kubepods cgroup itself.
    #[test]
    fn finds_every_driver_and_qos_layout_in_real_directories() {
        let u = UID.replace('-', "_");
        let layouts = [
            format!("kubepods.slice/kubepods-pod{u}.slice"),
            format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice"),
            format!("kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice"),
            format!("kubepods/pod{UID}"),
            format!("kubepods/burstable/pod{UID}"),
            format!("kubepods/besteffort/pod{UID}"),
        ];
        for layout in layouts {
            let dir = tempfile::tempdir().unwrap();
            // A container cgroup below the pod's, as a runtime makes.
            std::fs::create_dir_all(dir.path().join(&layout).join("cri-containerd-abc.scope")).unwrap();
            assert_eq!(find(dir.path(), UID), Some(dir.path().join(&layout)), "{layout}");
            let kubepods = dir.path().join(layout.split('/').next().unwrap());
            assert_eq!(find(&kubepods, UID), Some(dir.path().join(&layout)), "{layout} from kubepods");
            assert_eq!(find(dir.path(), "11111111-2222-3333-4444-555555555555"), None);
        }
    }

    #[test]
    fn a_cgroup_that_appears_later_is_found_then() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(find(dir.path(), UID), None);
        let p = dir.path().join(format!("kubepods/burstable/pod{UID}"));
        std::fs::create_dir_all(&p).unwrap();
        assert_eq!(find(dir.path(), UID), Some(p));
    }

    #[test]
    fn hostile_uids_never_escape_the_root() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("kubepods/podx")).unwrap();
        for uid in ["", "../x", "a/b"] {
            assert_eq!(find(&dir.path().join("kubepods"), uid), None, "{uid}");
        }
    }
}
