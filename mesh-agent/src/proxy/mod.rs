//! The node proxy. `outbound` accepts the connections the eBPF programs redirect and forwards
//! them to where the pod meant to go; `conns` keeps the live and recent connections for the
//! admin API and the access log.
pub mod conns;
pub mod outbound;
