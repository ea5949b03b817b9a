//! The node proxy. `outbound` accepts the connections the eBPF programs redirect and routes
//! them (same node, HBONE to another node, or plaintext out of the mesh); `pool` holds the
//! HBONE client connections; `inbound` is the HBONE server; `conns` keeps the live and recent
//! connections for the admin API and the access log; `balance` picks Service endpoints.
pub mod balance;
pub mod conns;
pub mod idle;
pub mod inbound;
pub mod outbound;
pub mod pool;
