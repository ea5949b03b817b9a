//! Switchyard's node agent: loads the eBPF redirect programs, runs the node proxy and serves
//! the admin API. `main.rs` only parses flags; everything else is here so tests can run it.
pub mod accept;
pub mod admin;
pub mod app;
pub mod authz;
pub mod cgroup;
pub mod check;
pub mod cli;
pub mod config;
pub mod datapath;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzz;
pub mod identity;
pub mod k8s;
pub mod logging;
pub mod metrics;
pub mod otlp;
pub mod proxy;
pub mod reconcile;
pub mod state;
pub mod steer;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod tls;
pub mod workloads;
