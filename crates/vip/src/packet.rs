//! Wire formats of the announcements: ARP (RFC 826 / RFC 5227) and ICMPv6 neighbour
//! advertisement (RFC 4861 §4.4). Pure functions, no I/O.

use std::net::{Ipv4Addr, Ipv6Addr};

/// Length of an Ethernet/IPv4 ARP payload.
pub(crate) const ARP_LEN: usize = 28;
/// Length of a neighbour advertisement with one target link-layer address option.
pub(crate) const NA_LEN: usize = 32;

/// ARP operation: request.
pub(crate) const ARPOP_REQUEST: u16 = 1;
/// ARP operation: reply.
pub(crate) const ARPOP_REPLY: u16 = 2;

/// A gratuitous ARP for `ip` owned by `mac`: sender IP = target IP = `ip`.
///
/// The request form has an all-zero target hardware address (as the kernel's own `arp_notify`
/// does). The reply form has target hardware address = sender hardware address: Linux only
/// treats an ARP *reply* as gratuitous when `tha == sha` (`arp_is_garp()`), and it then lets it
/// override an entry updated less than `locktime` ago.
pub(crate) fn gratuitous_arp(op: u16, mac: [u8; 6], ip: Ipv4Addr) -> [u8; ARP_LEN] {
    let mut p = [0u8; ARP_LEN];
    p[0..2].copy_from_slice(&1u16.to_be_bytes()); // hardware type: Ethernet
    p[2..4].copy_from_slice(&0x0800u16.to_be_bytes()); // protocol type: IPv4
    p[4] = 6; // hardware address length
    p[5] = 4; // protocol address length
    p[6..8].copy_from_slice(&op.to_be_bytes());
    p[8..14].copy_from_slice(&mac); // sender hardware address
    p[14..18].copy_from_slice(&ip.octets()); // sender protocol address
    if op == ARPOP_REPLY {
        p[18..24].copy_from_slice(&mac); // target hardware address
    }
    p[24..28].copy_from_slice(&ip.octets()); // target protocol address
    p
}

/// An unsolicited neighbour advertisement for `target` owned by `mac`: Override flag set,
/// Solicited and Router flags clear, one target link-layer address option. The checksum is left
/// zero: the kernel computes it for raw ICMPv6 sockets.
pub(crate) fn neighbour_advertisement(target: Ipv6Addr, mac: [u8; 6]) -> [u8; NA_LEN] {
    let mut p = [0u8; NA_LEN];
    p[0] = 136; // type: neighbour advertisement
    p[1] = 0; // code
    // p[2..4]: checksum, filled in by the kernel
    p[4] = 0x20; // flags: R=0, S=0, O=1
    p[8..24].copy_from_slice(&target.octets());
    p[24] = 2; // option: target link-layer address
    p[25] = 1; // option length in units of 8 bytes
    p[26..32].copy_from_slice(&mac);
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x02, 0x11, 0x22, 0x33, 0x44, 0x55];

    #[test]
    fn arp_request_layout() {
        let p = gratuitous_arp(ARPOP_REQUEST, MAC, Ipv4Addr::new(10, 1, 2, 3));
        assert_eq!(
            p,
            [
                0, 1, 8, 0, 6, 4, 0, 1, // header, op=request
                2, 0x11, 0x22, 0x33, 0x44, 0x55, 10, 1, 2, 3, // sender
                0, 0, 0, 0, 0, 0, 10, 1, 2, 3, // target
            ]
        );
    }

    #[test]
    fn arp_reply_has_tha_equal_sha() {
        let p = gratuitous_arp(ARPOP_REPLY, MAC, Ipv4Addr::new(192, 168, 0, 9));
        assert_eq!(&p[6..8], &[0, 2]);
        assert_eq!(&p[8..14], &p[18..24]);
        assert_eq!(&p[14..18], &p[24..28]);
    }

    #[test]
    fn na_layout() {
        let target: Ipv6Addr = "fd00::1".parse().expect("valid literal");
        let p = neighbour_advertisement(target, MAC);
        assert_eq!(p[0], 136);
        assert_eq!(p[1], 0);
        assert_eq!(&p[2..4], &[0, 0]);
        assert_eq!(p[4], 0x20);
        assert_eq!(&p[5..8], &[0, 0, 0]);
        assert_eq!(&p[8..24], &target.octets());
        assert_eq!(&p[24..26], &[2, 1]);
        assert_eq!(&p[26..32], &MAC);
    }
}
