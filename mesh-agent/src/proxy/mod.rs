//! The node proxy. `outbound` accepts the connections the eBPF programs redirect and routes
//! them (same node, HBONE to another node, or plaintext out of the mesh); `pool` holds the
//! HBONE client connections; `inbound` is the HBONE server; `conns` keeps the live and recent
//! connections for the admin API and the access log; `balance` picks Service endpoints and
//! ejects failing ones; `detect` tells HTTP from other TCP; `http` serves HTTP to Services
//! (per-request balancing, retries, timeouts, limits).
pub mod balance;
pub mod conns;
pub mod detect;
pub mod http;
pub mod idle;
pub mod inbound;
pub mod outbound;
pub mod pool;
pub mod trace;
