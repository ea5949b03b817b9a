//! Applies the node state to the datapath: every meshed pod whose cgroup exists has its cgroup
//! id in the meshed map, and nothing else does. Runs on every state change and once a second,
//! so a pod whose cgroup appears after it was declared is meshed as soon as the cgroup exists.
use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use mesh_common::{MeshDest, PodPolicy};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    cgroup,
    datapath::Datapath,
    state::{MeshReason, NodeState, PodIndex, PodStatus},
};

/// How often the reconciler re-checks cgroups even when nothing changed.
pub const RESYNC: Duration = Duration::from_secs(1);

pub struct Reconciler {
    pub datapath: Arc<Mutex<Option<Datapath>>>,
    pub policy: PodPolicy,
    /// cgroup id → (pod key, policy), as applied to the map.
    applied: BTreeMap<u64, (String, PodPolicy)>,
    /// Pods whose missing cgroup was already reported (avoid a log line a second).
    missing_reported: HashSet<String>,
    /// Pods whose surplus probe ports were already reported.
    probes_reported: HashSet<String>,
    capture: Capture,
    /// This node's meshed pods' addresses, as applied to `HBONE_PODS`.
    hbone_pods: BTreeSet<std::net::Ipv4Addr>,
}

/// The kernel's capture map, as applied.
struct Capture {
    /// Capture every Service (local mode: no kube-proxy serves Service addresses).
    all_services: bool,
    /// The destinations in the map.
    dests: BTreeSet<MeshDest>,
    /// Destinations that did not fit in the map at the last pass (logged when it changes).
    missing: usize,
}

impl Reconciler {
    pub fn new(datapath: Arc<Mutex<Option<Datapath>>>, policy: PodPolicy, all_services: bool) -> Self {
        // Pinned maps start with the previous agent's entries: the first pass re-applies those
        // still wanted (same id, maybe other flags) and removes the rest.
        // Flags no policy of ours has: re-applied whatever it holds.
        let unknown = PodPolicy { flags: u16::MAX, ..policy };
        let guard = datapath.lock().unwrap_or_else(|p| p.into_inner());
        let inherited: BTreeMap<u64, (String, PodPolicy)> = guard
            .as_ref()
            .map(|dp| dp.meshed_ids().into_iter().map(|id| (id, ("(previous agent)".to_string(), unknown))).collect())
            .unwrap_or_default();
        let dests = guard.as_ref().map(|dp| dp.mesh_destinations().into_iter().collect()).unwrap_or_default();
        drop(guard);
        Reconciler {
            datapath,
            policy,
            applied: inherited,
            missing_reported: HashSet::new(),
            probes_reported: HashSet::new(),
            capture: Capture { all_services, dests, missing: 0 },
            hbone_pods: BTreeSet::new(),
        }
    }

    /// One pass. Returns the resulting pod index; `None` once the datapath has been taken at
    /// shutdown: the proxy keeps the index it has (connections still draining through it must
    /// keep finding their pods and Services), it must not be replaced by an empty one.
    pub fn apply(&mut self, state: &NodeState) -> Option<PodIndex> {
        let mut guard = self.datapath.lock().unwrap_or_else(|p| p.into_inner());
        let dp = guard.as_mut()?;
        let root = dp.cgroup_root().to_path_buf();
        let mut desired: BTreeMap<u64, (String, PodPolicy)> = BTreeMap::new();
        let mut statuses = Vec::with_capacity(state.pods.len());
        for (key, w) in &state.pods {
            let local_cgroup = w.cgroup.as_deref().filter(|_| w.node == state.node);
            let id = local_cgroup.and_then(|c| cgroup::cgroup_id(c).ok());
            if let Some(cg) = local_cgroup
                && w.meshed
            {
                match id {
                    Some(_) if !cg.starts_with(&root) => {
                        if self.missing_reported.insert(key.clone()) {
                            warn!(pod = %key, cgroup = %cg.display(), root = %root.display(),
                                "pod cgroup is outside the agent's cgroup root; it cannot be meshed");
                        }
                    }
                    Some(id) => {
                        desired.insert(id, (key.clone(), policy_of(self.policy, &mut self.probes_reported, key, w)));
                    }
                    None => {
                        if self.missing_reported.insert(key.clone()) {
                            info!(pod = %key, cgroup = %cg.display(), "waiting for the pod's cgroup to appear");
                        }
                    }
                }
            }
            statuses.push(PodStatus { key: key.clone(), workload: w.clone(), cgroup_id: id, redirected: false });
        }
        // Remove first: a recycled cgroup id must not keep the old pod's entry.
        let gone: Vec<u64> = self.applied.keys().filter(|id| !desired.contains_key(id)).copied().collect();
        for id in gone {
            let entry = self.applied.remove(&id).unwrap_or_default();
            match dp.unmesh(id) {
                Ok(()) => info!(pod = %entry.0, cgroup_id = id, "pod unmeshed"),
                Err(e) => {
                    warn!(pod = %entry.0, error = %e, "cannot unmesh pod; will retry");
                    self.applied.insert(id, entry);
                }
            }
        }
        for (id, entry) in &desired {
            if self.applied.get(id) == Some(entry) {
                continue;
            }
            let (key, policy) = entry;
            match dp.mesh(*id, *policy) {
                Ok(()) => {
                    let reason = state.pods.get(key).map(|w| w.reason).unwrap_or(MeshReason::Namespace);
                    let strict = policy.flags & mesh_common::POD_FLAG_STRICT != 0;
                    info!(pod = %key, cgroup_id = id, ?reason, strict, "pod meshed");
                    self.missing_reported.remove(key);
                    self.applied.insert(*id, entry.clone());
                }
                Err(e) => warn!(pod = %key, error = %e, "cannot mesh pod (map full?); its traffic stays direct"),
            }
        }
        self.missing_reported.retain(|k| state.pods.get(k).is_some_and(|w| w.meshed));
        self.probes_reported.retain(|k| state.pods.contains_key(k));
        for s in &mut statuses {
            s.redirected = s.cgroup_id.is_some_and(|id| self.applied.contains_key(&id));
        }
        let index = PodIndex::new(state, statuses);
        self.capture.sync(dp, &index);
        sync_steering(&mut self.hbone_pods, dp, &index);
        Some(index)
    }

    pub async fn run(
        mut self,
        mut state: watch::Receiver<NodeState>,
        index: watch::Sender<Arc<PodIndex>>,
        stop: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(RESYNC);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let snapshot = state.borrow_and_update().clone();
            let Some(idx) = self.apply(&snapshot) else {
                // Shutting down: keep serving the drain with the last index.
                return;
            };
            index.send_if_modified(|old| {
                let changed = old.nodes != idx.nodes
                    || old.authz != idx.authz
                    || old.authz_reports != idx.authz_reports
                    || old.services != idx.services
                    || old.pods.len() != idx.pods.len()
                    || old.pods.iter().zip(&idx.pods).any(|(a, b)| {
                        a.key != b.key
                            || a.cgroup_id != b.cgroup_id
                            || a.redirected != b.redirected
                            || a.workload != b.workload
                    });
                if changed {
                    *old = Arc::new(idx);
                }
                changed
            });
            tokio::select! {
                _ = stop.cancelled() => return,
                r = state.changed() => if r.is_err() { return },
                _ = tick.tick() => {}
            }
        }
    }
}

/// HBONE steering follows the node: its meshed pods' addresses in `HBONE_PODS` (`applied` is
/// what the map holds), and the program on every interface (new ones included).
fn sync_steering(applied: &mut BTreeSet<std::net::Ipv4Addr>, dp: &mut Datapath, index: &PodIndex) {
    {
        if !dp.steering().is_on() {
            return;
        }
        dp.steer_interfaces();
        let wanted: BTreeSet<std::net::Ipv4Addr> =
            index.pods.iter().filter(|p| index.is_local(p) && p.workload.meshed).map(|p| p.workload.ip).collect();
        for ip in wanted.difference(applied).copied().collect::<Vec<_>>() {
            match dp.add_hbone_pod(ip) {
                Ok(()) => {
                    applied.insert(ip);
                }
                Err(e) => {
                    warn!(pod_ip = %ip, error = %e, "cannot steer HBONE to this pod (map full?); ztunnel-style HBONE to it will not reach the agent")
                }
            }
        }
        for ip in applied.difference(&wanted).copied().collect::<Vec<_>>() {
            match dp.remove_hbone_pod(ip) {
                Ok(()) => {
                    applied.remove(&ip);
                }
                Err(e) => warn!(pod_ip = %ip, error = %e, "cannot stop steering HBONE to this pod; will retry"),
            }
        }
    }
}

/// The kernel's policy for meshed pod `key`: strict, fail-closed, its probe ports (the
/// first [`mesh_common::MAX_PROBE_PORTS`]; more are reported once and not admitted).
fn policy_of(base: PodPolicy, reported: &mut HashSet<String>, key: &str, w: &crate::state::Workload) -> PodPolicy {
    let fail = if w.fail_closed { mesh_common::POD_FLAG_FAIL_CLOSED } else { 0 };
    let capture = if w.capture_all { mesh_common::POD_FLAG_CAPTURE_ALL } else { 0 };
    let strict = match w.mtls_mode {
        crate::state::MtlsMode::Strict => mesh_common::POD_FLAG_STRICT,
        crate::state::MtlsMode::Permissive => 0,
    };
    let mut probe_ports = [0u16; mesh_common::MAX_PROBE_PORTS];
    for (slot, port) in probe_ports.iter_mut().zip(&w.probe_ports) {
        *slot = port.to_be();
    }
    if w.probe_ports.len() > mesh_common::MAX_PROBE_PORTS && reported.insert(key.to_string()) {
        warn!(pod = %key, ports = ?w.probe_ports, kept = mesh_common::MAX_PROBE_PORTS,
            "more probe ports than the kernel keeps per pod; a strict pod refuses probes on the others");
    }
    PodPolicy { flags: fail | strict | capture, probe_ports, ..base }
}

impl Capture {
    /// Makes the kernel's capture map hold exactly the destinations the mesh serves: new ones
    /// first, then the stale ones go (a destination in both states is never uncaptured).
    fn sync(&mut self, dp: &mut Datapath, index: &PodIndex) {
        let wanted: BTreeSet<MeshDest> = index
            .mesh_destinations(self.all_services)
            .into_iter()
            .map(|(ip, port)| MeshDest::new(u32::from_ne_bytes(ip.octets()), port.to_be()))
            .collect();
        let mut missing = 0;
        for d in wanted.difference(&self.dests).copied().collect::<Vec<_>>() {
            match dp.add_mesh_destination(d) {
                Ok(()) => {
                    self.dests.insert(d);
                }
                Err(_) => missing += 1,
            }
        }
        for d in self.dests.difference(&wanted).copied().collect::<Vec<_>>() {
            match dp.remove_mesh_destination(&d) {
                Ok(()) => {
                    self.dests.remove(&d);
                }
                Err(e) => warn!(error = %e, "cannot remove a destination from the capture map; will retry"),
            }
        }
        if missing != self.missing {
            if missing > 0 {
                warn!(
                    missing,
                    capacity = mesh_common::MAX_MESH_DESTS,
                    "capture map full: connections to these mesh destinations are not captured (they go direct; strict pods drop them)"
                );
            } else {
                info!("capture map: every mesh destination fits again");
            }
            self.missing = missing;
        }
    }
}
