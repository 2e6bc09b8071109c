//! The raw sockets used to announce a VIP: an `AF_PACKET`/`SOCK_DGRAM` socket for gratuitous ARP
//! and a raw ICMPv6 socket for unsolicited neighbour advertisements.
//!
//! Both are opened once, in [`VipManager::new`](crate::VipManager::new), so that they live in the
//! same network namespace as the netlink connection. Neither receives anything: the packet socket
//! is opened with protocol 0 (no receive hook; the protocol of each frame is given per send in
//! `sockaddr_ll`), and the ICMPv6 socket has an `ICMP6_FILTER` that blocks every type.
//! Sends use `MSG_DONTWAIT`, so they never block the async runtime.

use std::io;
use std::mem;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::packet;

/// `ICMP6_FILTER` socket option of `SOL_ICMPV6` (linux/icmpv6.h); not exported by `libc`.
const ICMP6_FILTER: libc::c_int = 1;

/// The announcement sockets; each one is either open or remembers why it could not be opened.
#[derive(Debug)]
pub(crate) struct Sockets {
    arp: Result<OwnedFd, i32>,
    icmp6: Result<OwnedFd, i32>,
}

impl Sockets {
    /// Opens both sockets in the calling thread's network namespace. Failures are remembered
    /// and reported when an announcement needs the socket (e.g. no IPv6 in this kernel).
    pub(crate) fn open() -> Sockets {
        let errno = |e: io::Error| e.raw_os_error().unwrap_or(libc::EIO);
        Sockets {
            arp: open_packet_socket().map_err(errno),
            icmp6: open_icmp6_socket().map_err(errno),
        }
    }

    /// Sends one gratuitous ARP (`op` = request or reply) for `ip` with sender MAC `mac`, as an
    /// Ethernet broadcast out of interface `ifindex`.
    pub(crate) fn send_arp(
        &self,
        ifindex: u32,
        op: u16,
        mac: [u8; 6],
        ip: Ipv4Addr,
    ) -> io::Result<()> {
        let fd = self
            .arp
            .as_ref()
            .map_err(|e| io::Error::from_raw_os_error(*e))?;
        let payload = packet::gratuitous_arp(op, mac, ip);
        let ifindex = i32::try_from(ifindex)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "ifindex out of range"))?;
        // SAFETY: sockaddr_ll is a plain C struct of integers and byte arrays, for which the
        // all-zero bit pattern is a valid value.
        let mut sll: libc::sockaddr_ll = unsafe { mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as libc::c_ushort;
        sll.sll_protocol = (libc::ETH_P_ARP as u16).to_be();
        sll.sll_ifindex = ifindex;
        sll.sll_halen = 6;
        sll.sll_addr[..6].copy_from_slice(&[0xff; 6]);
        // SAFETY: `fd` is an open socket owned by `self`; `payload` is a live buffer of the
        // length given; `sll` is a fully initialised sockaddr_ll and the length passed is its
        // exact size, so the kernel reads only initialised memory we own.
        let rc = unsafe {
            libc::sendto(
                fd.as_raw_fd(),
                payload.as_ptr().cast(),
                payload.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                (&raw const sll).cast::<libc::sockaddr>(),
                socklen::<libc::sockaddr_ll>(),
            )
        };
        check_sent(rc, payload.len())
    }

    /// Sends one unsolicited neighbour advertisement for `target` with link-layer address
    /// `mac` to ff02::1 out of interface `ifindex`.
    pub(crate) fn send_na(&self, ifindex: u32, mac: [u8; 6], target: Ipv6Addr) -> io::Result<()> {
        let fd = self
            .icmp6
            .as_ref()
            .map_err(|e| io::Error::from_raw_os_error(*e))?;
        let payload = packet::neighbour_advertisement(target, mac);
        // SAFETY: sockaddr_in6 is a plain C struct of integers and byte arrays, for which the
        // all-zero bit pattern is a valid value.
        let mut dst: libc::sockaddr_in6 = unsafe { mem::zeroed() };
        dst.sin6_family = libc::AF_INET6 as libc::sa_family_t;
        dst.sin6_addr.s6_addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1).octets();
        // ff02::1 is link-scoped: the scope id picks the outgoing interface.
        dst.sin6_scope_id = ifindex;
        // SAFETY: `fd` is an open socket owned by `self`; `payload` is a live buffer of the
        // length given; `dst` is a fully initialised sockaddr_in6 and the length passed is its
        // exact size.
        let rc = unsafe {
            libc::sendto(
                fd.as_raw_fd(),
                payload.as_ptr().cast(),
                payload.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                (&raw const dst).cast::<libc::sockaddr>(),
                socklen::<libc::sockaddr_in6>(),
            )
        };
        check_sent(rc, payload.len())
    }
}

fn socklen<T>() -> libc::socklen_t {
    // The socket address structs are a few dozen bytes: always fits.
    mem::size_of::<T>() as libc::socklen_t
}

fn check_sent(rc: libc::ssize_t, expected: usize) -> io::Result<()> {
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    if rc.unsigned_abs() != expected {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            format!("short send: {rc} of {expected} bytes"),
        ));
    }
    Ok(())
}

/// Takes ownership of the descriptor returned by `socket(2)`, or of its error.
fn own(fd: libc::c_int) -> io::Result<OwnedFd> {
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by a successful socket(2) call and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn open_packet_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments; no pointers involved.
    own(unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })
}

fn open_icmp6_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments; no pointers involved.
    let fd = own(unsafe {
        libc::socket(
            libc::AF_INET6,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::IPPROTO_ICMPV6,
        )
    })?;
    // RFC 4861 §7.1.2: receivers drop neighbour discovery packets whose hop limit is not 255.
    setsockopt_int(&fd, libc::IPPROTO_IPV6, libc::IPV6_MULTICAST_HOPS, 255)?;
    setsockopt_int(&fd, libc::IPPROTO_IPV6, libc::IPV6_UNICAST_HOPS, 255)?;
    // Do not loop our own advertisements back to the local stack.
    setsockopt_int(&fd, libc::IPPROTO_IPV6, libc::IPV6_MULTICAST_LOOP, 0)?;
    // Receive nothing: a set bit blocks the ICMPv6 type (ICMP6_FILTER_SETBLOCKALL).
    let block_all = [u32::MAX; 8];
    // SAFETY: `fd` is open; `block_all` is a live [u32; 8] (struct icmp6_filter) and the length
    // passed is its exact size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_ICMPV6,
            ICMP6_FILTER,
            block_all.as_ptr().cast(),
            mem::size_of_val(&block_all) as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

fn setsockopt_int(
    fd: &OwnedFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: `fd` is open; `value` is a live c_int and the length passed is its exact size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&raw const value).cast(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
