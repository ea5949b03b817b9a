//! The node proxy, top to bottom along a connection's path: `outbound` accepts the
//! connections the eBPF programs redirect; `route` decides where each goes (a pure function of
//! one pod-index snapshot); `detect` tells HTTP from other TCP; `http` serves HTTP to Services
//! (per-request balancing, retries, timeouts); `upstream` opens every upstream connection
//! (direct or HBONE through `pool`, the endpoint picker, Service limits) with `balance`
//! choosing endpoints; `idle` copies bytes both ways; `observe` writes each connection's
//! telemetry once into `conns` (live and recent connections), metrics and the access log.
//! `inbound` is the HBONE server and `h2io` HBONE's HTTP/2 streams (both ends); `trace` carries
//! W3C trace context.
pub mod balance;
pub mod caps;
pub mod conns;
pub mod detect;
pub mod h2io;
pub mod http;
pub mod idle;
pub mod inbound;
pub mod observe;
pub mod outbound;
pub mod pool;
pub mod recheck;
pub mod route;
pub mod trace;
pub mod upstream;

#[cfg(test)]
mod tests;
