//! What the kernel's HBONE steering (`mesh_steer`, see `mesh-ebpf`) needs from the node's
//! network namespace besides the program itself: the interfaces to attach it to, and one
//! policy-routing rule.
//!
//! A packet for an address that is not the node's is forwarded even when a tc program assigned
//! it to a local socket (the kernel drops a forwarded packet that carries a socket). So packets
//! `mesh_steer` assigned carry [`STEER_MARK`], and the rule `fwmark STEER_MARK/STEER_MARK_MASK
//! lookup STEER_TABLE` (priority [`STEER_RULE_PRIORITY`]) sends them to a table whose only route
//! is `local 0.0.0.0/0 dev lo`: local delivery, to the socket they were assigned. Nothing else
//! carries the mark, so nothing else is affected. This is how Cilium sends traffic to its proxy,
//! without iptables. Both are added over rtnetlink, idempotently (an existing rule or route is
//! kept); they stay when the agent exits (harmless without the program: no packet is marked),
//! so a hand-over never has a moment without them.
use std::{ffi::CStr, io};

use mesh_common::{STEER_MARK, STEER_MARK_MASK, STEER_RULE_PRIORITY, STEER_TABLE};

const NLMSG_HDRLEN: usize = 16;
const RTM_NEWROUTE: u16 = 24;
const RTM_NEWRULE: u16 = 32;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const NLMSG_ERROR: u16 = 2;
// fib_rule attributes and action.
const FRA_PRIORITY: u16 = 6;
const FRA_FWMARK: u16 = 10;
const FRA_TABLE: u16 = 15;
const FRA_FWMASK: u16 = 16;
const FR_ACT_TO_TBL: u8 = 1;
// route attributes and values.
const RTA_OIF: u16 = 4;
const RTA_TABLE: u16 = 15;
const RTPROT_STATIC: u8 = 4;
const RT_SCOPE_HOST: u8 = 254;
const RTN_LOCAL: u8 = 2;

/// One rtnetlink request: header, a 12-byte family header (`fib_rule_hdr` and `rtmsg` are both
/// 12 bytes), then `u32` attributes.
fn message(kind: u16, family_header: [u8; 12], attrs: &[(u16, u32)]) -> Vec<u8> {
    let mut m = vec![0u8; NLMSG_HDRLEN];
    m.extend_from_slice(&family_header);
    for (ty, v) in attrs {
        m.extend_from_slice(&8u16.to_ne_bytes());
        m.extend_from_slice(&ty.to_ne_bytes());
        m.extend_from_slice(&v.to_ne_bytes());
    }
    let len = m.len() as u32;
    m[0..4].copy_from_slice(&len.to_ne_bytes());
    m[4..6].copy_from_slice(&kind.to_ne_bytes());
    m[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL).to_ne_bytes());
    m[8..12].copy_from_slice(&1u32.to_ne_bytes());
    m
}

/// Sends one request and reads its acknowledgement; "exists already" is success.
fn request(msg: &[u8]) -> io::Result<()> {
    // SAFETY: plain socket calls on a descriptor this function owns and closes.
    unsafe {
        let fd = libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_ROUTE);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let result = (|| {
            let mut kernel: libc::sockaddr_nl = std::mem::zeroed();
            kernel.nl_family = libc::AF_NETLINK as u16;
            let sent = libc::sendto(
                fd,
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&raw const kernel).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            );
            if sent < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut buf = [0u8; 1024];
            let n = libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0);
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let n = n as usize;
            if n < NLMSG_HDRLEN + 4 || u16::from_ne_bytes([buf[4], buf[5]]) != NLMSG_ERROR {
                return Err(io::Error::other("unexpected rtnetlink answer"));
            }
            let errno = -i32::from_ne_bytes(buf[NLMSG_HDRLEN..NLMSG_HDRLEN + 4].try_into().expect("4 bytes"));
            match errno {
                0 => Ok(()),
                libc::EEXIST => Ok(()),
                e => Err(io::Error::from_raw_os_error(e)),
            }
        })();
        libc::close(fd);
        result
    }
}

/// Adds the rule and the local route (see the module docs), unless they exist.
pub fn ensure_routing() -> io::Result<()> {
    // fib_rule_hdr: family, dst_len, src_len, tos, table, res1, res2, action, flags (u32).
    let mut rule = [0u8; 12];
    rule[0] = libc::AF_INET as u8;
    rule[7] = FR_ACT_TO_TBL;
    request(&message(
        RTM_NEWRULE,
        rule,
        &[
            (FRA_PRIORITY, STEER_RULE_PRIORITY),
            (FRA_FWMARK, STEER_MARK),
            (FRA_FWMASK, STEER_MARK_MASK),
            (FRA_TABLE, STEER_TABLE),
        ],
    ))
    .map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("adding the rule fwmark {STEER_MARK:#x}/{STEER_MARK_MASK:#x} lookup {STEER_TABLE}: {e}"),
        )
    })?;
    // rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags (u32).
    let mut route = [0u8; 12];
    route[0] = libc::AF_INET as u8;
    route[5] = RTPROT_STATIC;
    route[6] = RT_SCOPE_HOST;
    route[7] = RTN_LOCAL;
    let lo = interface_index(c"lo").ok_or_else(|| io::Error::other("no loopback interface"))?;
    request(&message(RTM_NEWROUTE, route, &[(RTA_TABLE, STEER_TABLE), (RTA_OIF, lo)])).map_err(|e| {
        io::Error::new(e.kind(), format!("adding the route local 0.0.0.0/0 dev lo table {STEER_TABLE}: {e}"))
    })
}

fn interface_index(name: &CStr) -> Option<u32> {
    // SAFETY: a NUL-terminated name.
    let i = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (i != 0).then_some(i)
}

/// The interfaces `mesh_steer` goes on: every interface of this network namespace but
/// loopback, by index and name. HBONE from other nodes arrives on the uplinks (or tunnel
/// devices) and pods' replies on their bridge or veths; attaching to all of them needs no
/// knowledge of the CNI, and a packet that is neither costs two map lookups.
pub fn interfaces() -> io::Result<Vec<(u32, String)>> {
    // SAFETY: if_nameindex returns an array terminated by a zero entry, freed below.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return Err(io::Error::last_os_error());
        }
        let mut out = Vec::new();
        let mut p = list;
        while (*p).if_index != 0 {
            let name = CStr::from_ptr((*p).if_name).to_string_lossy().into_owned();
            if name != "lo" {
                out.push(((*p).if_index, name));
            }
            p = p.add(1);
        }
        libc::if_freenameindex(list);
        Ok(out)
    }
}

/// Marks a listening socket `IP_TRANSPARENT`: connections assigned to it by `mesh_steer` are
/// addressed to pods, not to the node, and the kernel answers them from the pod's address only
/// for a transparent socket. Needs `CAP_NET_ADMIN`.
pub fn set_transparent(fd: std::os::fd::RawFd) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: setsockopt with a valid int option.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_IP,
            libc::IP_TRANSPARENT,
            (&raw const on).cast(),
            std::mem::size_of::<libc::c_int>() as u32,
        )
    };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// Lets a socket bound to an address and port 0 pick its port at `connect()`, by the whole
/// 4-tuple (`IP_BIND_ADDRESS_NO_PORT`): transparent connections from one remote pod's address
/// do not use up ports per address.
pub fn set_bind_address_no_port(fd: std::os::fd::RawFd) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: setsockopt with a valid int option.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&raw const on).cast(),
            std::mem::size_of::<libc::c_int>() as u32,
        )
    };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rule_request_is_laid_out_as_rtnetlink_reads_it() {
        let m = message(RTM_NEWRULE, [2, 0, 0, 0, 0, 0, 0, FR_ACT_TO_TBL, 0, 0, 0, 0], &[(FRA_FWMARK, 0x1508)]);
        assert_eq!(m.len(), 16 + 12 + 8);
        assert_eq!(u32::from_ne_bytes(m[0..4].try_into().unwrap()), 36, "length covers everything");
        assert_eq!(u16::from_ne_bytes(m[4..6].try_into().unwrap()), RTM_NEWRULE);
        assert_eq!(&m[28..30], &8u16.to_ne_bytes(), "attribute length");
        assert_eq!(&m[30..32], &FRA_FWMARK.to_ne_bytes());
        assert_eq!(&m[32..36], &0x1508u32.to_ne_bytes());
    }

    #[test]
    fn loopback_is_never_an_interface_to_steer_on() {
        assert!(interfaces().unwrap().iter().all(|(_, n)| n != "lo"));
    }
}
