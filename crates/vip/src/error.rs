//! The error type of this crate.

use std::io;
use std::net::IpAddr;

/// Everything that can go wrong while managing a virtual IP.
///
/// Each variant says which address and which interface were involved (when known), what was
/// being done and, for system errors, the `errno`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VipError {
    /// The [`VipSpec`](crate::VipSpec) itself is unusable (bad prefix, multicast address...).
    #[error("invalid VIP {addr}/{prefix}: {reason}")]
    InvalidSpec {
        /// The VIP.
        addr: IpAddr,
        /// Its prefix length.
        prefix: u8,
        /// What is wrong with it.
        reason: &'static str,
    },

    /// A named interface does not exist in this network namespace.
    #[error("interface {interface:?} does not exist")]
    InterfaceNotFound {
        /// The name that was looked up.
        interface: String,
    },

    /// Interface discovery found no interface with an address in the VIP's subnet.
    #[error(
        "VIP {addr}/{prefix}: no interface has an address in this subnet; \
         configure the interface explicitly or give it an address in the VIP's subnet"
    )]
    NoInterfaceForSubnet {
        /// The VIP.
        addr: IpAddr,
        /// Its prefix length.
        prefix: u8,
    },

    /// Interface discovery found several interfaces with an address in the VIP's subnet.
    #[error(
        "VIP {addr}/{prefix}: several interfaces have an address in this subnet ({}); \
         configure the interface explicitly",
        .candidates.join(", ")
    )]
    AmbiguousInterface {
        /// The VIP.
        addr: IpAddr,
        /// Its prefix length.
        prefix: u8,
        /// The interfaces that matched.
        candidates: Vec<String>,
    },

    /// The VIP's address is already configured on the interface with another prefix length.
    #[error(
        "VIP {addr}/{prefix}: {addr} is already configured on {interface} as \
         {addr}/{existing_prefix}; remove it or fix the configured prefix"
    )]
    PrefixConflict {
        /// The VIP.
        addr: IpAddr,
        /// The prefix length asked for.
        prefix: u8,
        /// The interface carrying the conflicting address.
        interface: String,
        /// The prefix length found on the interface.
        existing_prefix: u8,
    },

    /// A netlink socket could not be opened.
    #[error("cannot open a netlink route socket: {source}")]
    NetlinkSocket {
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// A netlink request failed.
    #[error(
        "netlink: cannot {op}{}: {}",
        context(.addr.as_ref(), .interface.as_deref()),
        describe_netlink(.errno, .source.as_ref())
    )]
    Netlink {
        /// What was being done, e.g. `"add address"`.
        op: &'static str,
        /// The address involved, if any.
        addr: Option<IpAddr>,
        /// The interface involved, if any.
        interface: Option<String>,
        /// The positive `errno` the kernel answered with, if it answered with one.
        errno: Option<i32>,
        /// The underlying error (boxed: it is large).
        #[source]
        source: Box<rtnetlink::Error>,
    },

    /// A raw socket operation (gratuitous ARP / neighbour advertisement) failed.
    #[error("cannot {op} for {addr} on {interface}: {source}")]
    Socket {
        /// What was being done, e.g. `"send gratuitous ARP"`.
        op: &'static str,
        /// The VIP being announced.
        addr: IpAddr,
        /// The interface (name, or `#index` when the name is unknown).
        interface: String,
        /// The `errno`, if the failure came from a system call.
        errno: Option<i32>,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

impl VipError {
    /// The system `errno` behind this error, if there is one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            VipError::Netlink { errno, .. } | VipError::Socket { errno, .. } => *errno,
            VipError::NetlinkSocket { source } => source.raw_os_error(),
            _ => None,
        }
    }

    /// Wraps a netlink error with context.
    pub(crate) fn netlink(
        op: &'static str,
        addr: Option<IpAddr>,
        interface: Option<&str>,
        source: rtnetlink::Error,
    ) -> VipError {
        VipError::Netlink {
            op,
            addr,
            interface: interface.map(str::to_owned),
            errno: netlink_errno(&source),
            source: Box::new(source),
        }
    }

    /// Wraps a socket error with context.
    pub(crate) fn socket(
        op: &'static str,
        addr: IpAddr,
        interface: &str,
        source: io::Error,
    ) -> VipError {
        VipError::Socket {
            op,
            addr,
            interface: interface.to_owned(),
            errno: source.raw_os_error(),
            source,
        }
    }
}

/// The positive errno of a netlink NACK, if `err` is one.
pub(crate) fn netlink_errno(err: &rtnetlink::Error) -> Option<i32> {
    match err {
        rtnetlink::Error::NetlinkError(msg) if msg.raw_code() != 0 => {
            Some(msg.raw_code().saturating_abs())
        }
        _ => None,
    }
}

fn context(addr: Option<&IpAddr>, interface: Option<&str>) -> String {
    match (addr, interface) {
        (Some(a), Some(i)) => format!(" (address {a}, interface {i})"),
        (Some(a), None) => format!(" (address {a})"),
        (None, Some(i)) => format!(" (interface {i})"),
        (None, None) => String::new(),
    }
}

fn describe_netlink(errno: &Option<i32>, source: &rtnetlink::Error) -> String {
    match errno {
        Some(e) => format!("errno {e}: {}", io::Error::from_raw_os_error(*e)),
        None => source.to_string(),
    }
}
