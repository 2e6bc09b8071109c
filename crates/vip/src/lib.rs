//! tandem virtual IPs: the adapter that adds and removes a VIP on a local interface,
//! announces it to the LAN, and reports link state. It takes no cluster decisions.
//!
//! - [`VipManager::acquire`] adds the address with netlink (IPv6 with `IFA_F_NODAD`, so it is
//!   usable at once) and announces it: gratuitous ARP for IPv4 (request and reply forms), an
//!   unsolicited neighbour advertisement with the Override flag for IPv6. The announcement is a
//!   burst ([`AnnounceConfig`], default 3 rounds 100 ms apart), repeated once more a few seconds
//!   later (default 3 s) by a task that [`VipManager::release`] (or dropping the manager)
//!   cancels.
//! - [`VipManager::release`] removes the address. Both calls are idempotent.
//! - [`VipManager::link_is_up`] and [`VipManager::watch_link`] report link state
//!   (`IFF_UP`, `IFF_LOWER_UP` and `IFF_RUNNING`, i.e. operstate up or unknown).
//!
//! Everything happens in the network namespace that was current for the thread that called
//! [`VipManager::new`] (netlink and raw sockets are opened there). Needs `CAP_NET_ADMIN` and
//! `CAP_NET_RAW`, and a Tokio runtime.
//!
//! # What the neighbours do with the announcements (Linux receivers)
//!
//! - An existing ARP entry for the VIP (unless static: `PERMANENT`/`NOARP`) is updated to the
//!   new MAC at once by either form, whatever `arp_accept` says: `arp_accept` only governs
//!   whether a gratuitous ARP *creates* a missing entry (off by default, which is harmless: a
//!   host with no entry resolves the VIP afresh with a normal ARP request). The reply form has
//!   target MAC = sender MAC so that Linux counts it as gratuitous and lets it override an
//!   entry updated less than `locktime` (1 s) ago.
//! - An existing IPv6 neighbour entry (unless static or `FAILED`) is updated thanks to the
//!   Override flag. Creating missing entries from unsolicited advertisements is governed by
//!   `accept_untracked_na` (routers only) and, again, not needed.
//! - Both need the receiving interface to be configured: right after a link comes up, the
//!   kernel may take up to 1 s (linkwatch) before IPv6 accepts multicast on it.
//!
//! # Caveat for IPv4 VIPs on an interface without another address in the subnet
//!
//! If the VIP is the first address of its subnet on the interface it becomes the *primary*
//! address, and removing it also removes later addresses of that subnet (secondaries) unless
//! `net.ipv4.conf.<if>.promote_secondaries=1`. With a fixed address in the subnet on the
//! interface (the normal set-up, and the one interface discovery relies on) the VIP is a
//! secondary and this never happens.

#![warn(missing_docs)]

mod error;
mod packet;
mod sockets;

pub use error::VipError;

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::pin::pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use rtnetlink::packet_core::NetlinkPayload;
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::packet_route::address::{
    AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage,
};
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use rtnetlink::{Handle, MulticastGroup};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::error::netlink_errno;
use crate::sockets::Sockets;

/// One virtual IP as configured for a module.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct VipSpec {
    /// The address.
    pub addr: IpAddr,
    /// Its prefix length (1..=32 for IPv4, 1..=128 for IPv6).
    pub prefix: u8,
    /// The interface to put it on; `None` = the interface that has an address in the VIP's
    /// subnet (see [`VipManager::resolve_interface`]).
    pub interface: Option<String>,
    /// Announce the address after adding it: gratuitous ARP for IPv4, unsolicited neighbour
    /// advertisement for IPv6.
    pub gratuitous_arp: bool,
}

impl VipSpec {
    /// A spec with interface discovery and announcements on.
    pub fn new(addr: IpAddr, prefix: u8) -> VipSpec {
        VipSpec {
            addr,
            prefix,
            interface: None,
            gratuitous_arp: true,
        }
    }

    /// Checks that the address, prefix and interface name are usable for a VIP.
    pub fn validate(&self) -> Result<(), VipError> {
        let invalid = |reason| VipError::InvalidSpec {
            addr: self.addr,
            prefix: self.prefix,
            reason,
        };
        match self.addr {
            IpAddr::V4(a) => {
                if !(1..=32).contains(&self.prefix) {
                    return Err(invalid("an IPv4 prefix length must be 1..=32"));
                }
                if a.is_unspecified() || a.is_broadcast() || a.is_multicast() || a.is_loopback() {
                    return Err(invalid("not a unicast address"));
                }
                if self.prefix <= 30 {
                    let host = u32::from(a) & !mask32(self.prefix);
                    if host == 0 || host == !mask32(self.prefix) {
                        return Err(invalid("the network or broadcast address of its subnet"));
                    }
                }
            }
            IpAddr::V6(a) => {
                if !(1..=128).contains(&self.prefix) {
                    return Err(invalid("an IPv6 prefix length must be 1..=128"));
                }
                if a.is_unspecified() || a.is_multicast() || a.is_loopback() {
                    return Err(invalid("not a unicast address"));
                }
                if a.to_ipv4_mapped().is_some() {
                    return Err(invalid("an IPv4-mapped IPv6 address; use the IPv4 form"));
                }
            }
        }
        if let Some(name) = &self.interface
            && (name.is_empty()
                || name.len() > 15
                || name.contains(['/', ':'])
                || name.contains(char::is_whitespace))
        {
            return Err(invalid(
                "bad interface name (1 to 15 characters, no '/', ':' or space)",
            ));
        }
        Ok(())
    }
}

impl fmt::Display for VipSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)?;
        if let Some(i) = &self.interface {
            write!(f, " on {i}")?;
        }
        Ok(())
    }
}

/// How announcements are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnnounceConfig {
    /// Rounds per burst. Each IPv4 round sends a gratuitous ARP request and a gratuitous ARP
    /// reply; each IPv6 round sends one neighbour advertisement.
    pub count: u32,
    /// Time between rounds.
    pub interval: Duration,
    /// Delay of the second burst after the first one; `None` = no second burst.
    pub second_burst_delay: Option<Duration>,
}

impl Default for AnnounceConfig {
    /// 3 rounds 100 ms apart, and a second burst 3 s later.
    fn default() -> Self {
        AnnounceConfig {
            count: 3,
            interval: Duration::from_millis(100),
            second_burst_delay: Some(Duration::from_secs(3)),
        }
    }
}

/// What became of an announcement burst.
#[derive(Debug)]
#[non_exhaustive]
pub enum AnnounceOutcome {
    /// The spec has `gratuitous_arp = false`.
    Disabled,
    /// Announcing makes no sense on this interface (no Ethernet address, `NOARP`...).
    Skipped {
        /// Why.
        reason: String,
    },
    /// The burst was sent.
    Sent {
        /// Packets sent.
        packets: u32,
    },
    /// Sending failed (the address itself is in place).
    Failed(VipError),
}

/// The result of [`VipManager::acquire`].
#[derive(Debug)]
pub struct AcquireReport {
    /// The interface the VIP is on.
    pub interface: String,
    /// Its index.
    pub ifindex: u32,
    /// The address was already there (nothing was added).
    pub was_already_present: bool,
    /// The first announcement burst.
    pub announce: AnnounceOutcome,
    /// A second burst is scheduled (cancelled by [`VipManager::release`]).
    pub second_burst_scheduled: bool,
}

/// The result of [`VipManager::release`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseReport {
    /// The interfaces the address was removed from (empty: it was not present).
    pub removed_from: Vec<String>,
    /// A pending second announcement burst was cancelled.
    pub cancelled_second_burst: bool,
}

impl ReleaseReport {
    /// The address was present (and is now removed).
    pub fn was_present(&self) -> bool {
        !self.removed_from.is_empty()
    }
}

/// Adds, removes and announces VIPs in one network namespace.
///
/// Dropping the manager stops its netlink connection and cancels pending second bursts; the
/// addresses stay.
pub struct VipManager {
    handle: Handle,
    connection: JoinHandle<()>,
    sockets: Arc<Sockets>,
    announce: AnnounceConfig,
    /// Pending second bursts, by VIP.
    pending: Mutex<HashMap<IpAddr, JoinHandle<()>>>,
}

impl fmt::Debug for VipManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VipManager")
            .field("announce", &self.announce)
            .field("sockets", &self.sockets)
            .finish_non_exhaustive()
    }
}

impl Drop for VipManager {
    fn drop(&mut self) {
        self.connection.abort();
        let pending = self
            .pending
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner);
        for (_, task) in pending.drain() {
            task.abort();
        }
    }
}

impl VipManager {
    /// A manager with the default [`AnnounceConfig`], working in the calling thread's current
    /// network namespace. Must run inside a Tokio runtime.
    pub async fn new() -> Result<VipManager, VipError> {
        VipManager::with_config(AnnounceConfig::default()).await
    }

    /// A manager with the given announcement settings; see [`VipManager::new`].
    ///
    /// Failing to open the announcement sockets (e.g. no `CAP_NET_RAW`, or no IPv6 in the
    /// kernel) is not an error here: announcements then report [`AnnounceOutcome::Failed`].
    pub async fn with_config(announce: AnnounceConfig) -> Result<VipManager, VipError> {
        let (connection, handle, _) =
            rtnetlink::new_connection().map_err(|source| VipError::NetlinkSocket { source })?;
        let connection = tokio::spawn(connection);
        Ok(VipManager {
            handle,
            connection,
            sockets: Arc::new(Sockets::open()),
            announce,
            pending: Mutex::new(HashMap::new()),
        })
    }

    /// The announcement settings.
    pub fn announce_config(&self) -> AnnounceConfig {
        self.announce
    }

    /// The interface the VIP goes on.
    ///
    /// With `spec.interface` set, checks that it exists. Otherwise discovers it: the interface
    /// with an address (other than the VIP) inside the VIP's subnet `addr/prefix`; failing
    /// that, the interface with an address whose own subnet contains the VIP; failing that,
    /// the interface already carrying the VIP. No match, or matches on several interfaces, is
    /// an error.
    pub async fn resolve_interface(&self, spec: &VipSpec) -> Result<String, VipError> {
        self.resolve(spec).await.map(|l| l.name)
    }

    /// Adds the VIP (if absent) and announces it (if `spec.gratuitous_arp`).
    ///
    /// Returns once the address is in place and the first burst is sent; schedules the second
    /// burst, which is skipped if the address is gone by then. A failed announcement does not
    /// fail the call: see [`AcquireReport::announce`].
    pub async fn acquire(&self, spec: &VipSpec) -> Result<AcquireReport, VipError> {
        let link = self.resolve(spec).await?;
        let mut was_already_present = self.present_on(spec, &link).await?;
        if !was_already_present {
            match self.add_address(spec, &link).await {
                Ok(()) => {
                    info!(vip = %spec.addr, prefix = spec.prefix, interface = %link.name, "VIP added")
                }
                // Someone added it between our check and our request.
                Err(e)
                    if e.errno() == Some(libc::EEXIST) && self.present_on(spec, &link).await? =>
                {
                    was_already_present = true;
                }
                Err(e) => return Err(e),
            }
        }
        if was_already_present {
            debug!(vip = %spec.addr, interface = %link.name, "VIP already present");
        }

        let mut second_burst_scheduled = false;
        let announce = if spec.gratuitous_arp {
            self.cancel_pending(spec.addr);
            let outcome = send_burst(
                &self.handle,
                &self.sockets,
                &self.announce,
                spec.addr,
                link.index,
            )
            .await;
            log_outcome(spec.addr, &link.name, &outcome, "first");
            let worth_retrying = matches!(
                outcome,
                AnnounceOutcome::Sent { .. } | AnnounceOutcome::Failed(_)
            );
            if let Some(delay) = self.announce.second_burst_delay
                && worth_retrying
            {
                let task = tokio::spawn(second_burst(
                    self.handle.clone(),
                    Arc::clone(&self.sockets),
                    self.announce,
                    spec.clone(),
                    link.index,
                    link.name.clone(),
                    delay,
                ));
                let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
                if let Some(previous) = pending.insert(spec.addr, task) {
                    previous.abort();
                }
                second_burst_scheduled = true;
            }
            outcome
        } else {
            AnnounceOutcome::Disabled
        };

        Ok(AcquireReport {
            interface: link.name,
            ifindex: link.index,
            was_already_present,
            announce,
            second_burst_scheduled,
        })
    }

    /// Sends one announcement burst for the VIP now (whatever `spec.gratuitous_arp` says),
    /// e.g. to refresh neighbours periodically. Does not check that the address is present.
    pub async fn announce(&self, spec: &VipSpec) -> Result<AnnounceOutcome, VipError> {
        let link = self.resolve(spec).await?;
        Ok(send_burst(
            &self.handle,
            &self.sockets,
            &self.announce,
            spec.addr,
            link.index,
        )
        .await)
    }

    /// Removes the VIP (`addr/prefix`) and cancels its pending second burst.
    ///
    /// With `spec.interface` set, removes it from that interface only (a missing interface
    /// means the address is not present); otherwise from every interface that carries it.
    /// An absent address is not an error.
    pub async fn release(&self, spec: &VipSpec) -> Result<ReleaseReport, VipError> {
        spec.validate()?;
        let cancelled_second_burst = self.cancel_pending(spec.addr);
        let mut report = ReleaseReport {
            removed_from: Vec::new(),
            cancelled_second_burst,
        };
        let Some(entries) = self.exact_entries(spec).await? else {
            return Ok(report);
        };
        for entry in entries {
            let name = self.link_name(entry.index).await;
            let request = self.handle.address().del(entry.delete_message());
            match request.execute().await {
                Ok(()) => {
                    info!(vip = %spec.addr, prefix = spec.prefix, interface = %name, "VIP removed");
                    report.removed_from.push(name);
                }
                Err(e)
                    if matches!(
                        netlink_errno(&e),
                        Some(libc::EADDRNOTAVAIL | libc::ENOENT | libc::ENODEV)
                    ) =>
                {
                    debug!(vip = %spec.addr, interface = %name, "VIP vanished before removal");
                }
                Err(e) => {
                    return Err(VipError::netlink(
                        "remove address",
                        Some(spec.addr),
                        Some(&name),
                        e,
                    ));
                }
            }
        }
        Ok(report)
    }

    /// The interfaces carrying exactly `addr/prefix` (restricted to `spec.interface` if set).
    pub async fn held_on(&self, spec: &VipSpec) -> Result<Vec<String>, VipError> {
        spec.validate()?;
        let mut names = Vec::new();
        for entry in self.exact_entries(spec).await?.unwrap_or_default() {
            names.push(self.link_name(entry.index).await);
        }
        Ok(names)
    }

    /// Whether the interface is usable: administratively up (`IFF_UP`), with carrier
    /// (`IFF_LOWER_UP`) and operationally up or unknown (`IFF_RUNNING`).
    pub async fn link_is_up(&self, interface: &str) -> Result<bool, VipError> {
        link_by_name(&self.handle, interface)
            .await?
            .map(|l| l.is_up())
            .ok_or_else(|| VipError::InterfaceNotFound {
                interface: interface.to_owned(),
            })
    }

    /// Watches the link state of `interface` (as defined by [`VipManager::link_is_up`]).
    ///
    /// A task listens to netlink link notifications (`RTNLGRP_LINK`), so administrative changes
    /// (`ip link set IF down`, deletion) show up within milliseconds, and also polls every
    /// `poll_interval` (at least 10 ms) in case a notification is lost.
    ///
    /// Carrier changes are different: the kernel clears `IFF_LOWER_UP` at once but notifies
    /// (and updates the operstate) from its linkwatch worker, which batches events for up to
    /// 1 s. A `poll_interval` of about 100 ms sees carrier loss within that time; carrier
    /// *return* is reported once the operstate is up again (after linkwatch).
    ///
    /// The interface disappearing reads as down; if it comes back under the same name it is
    /// followed. The task and its netlink socket end when every receiver is dropped (or the
    /// runtime shuts down). Errors if the interface does not exist now.
    pub async fn watch_link(
        &self,
        interface: &str,
        poll_interval: Duration,
    ) -> Result<watch::Receiver<bool>, VipError> {
        let (connection, handle, mut events) =
            rtnetlink::new_multicast_connection(&[MulticastGroup::Link])
                .map_err(|source| VipError::NetlinkSocket { source })?;
        let connection = AbortOnDrop(tokio::spawn(connection));
        let initial =
            link_by_name(&handle, interface)
                .await?
                .ok_or_else(|| VipError::InterfaceNotFound {
                    interface: interface.to_owned(),
                })?;
        let (tx, rx) = watch::channel(initial.is_up());
        let name = interface.to_owned();
        let mut index = initial.index;
        let poll_interval = poll_interval.max(Duration::from_millis(10));
        tokio::spawn(async move {
            let _connection = connection;
            let mut ticker = tokio::time::interval(poll_interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticker.tick().await; // the first tick is immediate
            let mut events_open = true;
            loop {
                tokio::select! {
                    () = tx.closed() => break,
                    event = events.next(), if events_open => match event {
                        Some((msg, _)) => {
                            if !concerns_link(&msg.payload, index, &name) {
                                continue;
                            }
                        }
                        None => {
                            warn!(interface = %name, "netlink link notifications ended; polling only");
                            events_open = false;
                            continue;
                        }
                    },
                    _ = ticker.tick() => {}
                }
                let up = match link_by_name(&handle, &name).await {
                    Ok(Some(link)) => {
                        index = link.index;
                        link.is_up()
                    }
                    Ok(None) => false,
                    Err(e) => {
                        warn!(interface = %name, error = %e, "cannot read link state");
                        continue;
                    }
                };
                tx.send_if_modified(|current| {
                    let changed = *current != up;
                    if changed {
                        info!(interface = %name, up, "link state changed");
                        *current = up;
                    }
                    changed
                });
            }
            debug!(interface = %name, "link watcher stopped");
        });
        Ok(rx)
    }

    /// Aborts the pending second burst for `addr`; true if one was still pending.
    fn cancel_pending(&self, addr: IpAddr) -> bool {
        let task = self
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&addr);
        match task {
            Some(task) => {
                let pending = !task.is_finished();
                task.abort();
                pending
            }
            None => false,
        }
    }

    async fn resolve(&self, spec: &VipSpec) -> Result<LinkInfo, VipError> {
        spec.validate()?;
        if let Some(name) = &spec.interface {
            return link_by_name(&self.handle, name).await?.ok_or_else(|| {
                VipError::InterfaceNotFound {
                    interface: name.clone(),
                }
            });
        }
        let entries = dump_addresses(&self.handle).await?;
        let others = || entries.iter().filter(|e| e.addr != spec.addr);
        // 1. an address inside the VIP's subnet;
        let mut indices: Vec<u32> = others()
            .filter(|e| same_subnet(e.addr, spec.addr, spec.prefix))
            .map(|e| e.index)
            .collect();
        // 2. an address whose subnet contains the VIP;
        if indices.is_empty() {
            indices = others()
                .filter(|e| same_subnet(e.addr, spec.addr, e.prefix))
                .map(|e| e.index)
                .collect();
        }
        // 3. the VIP itself.
        if indices.is_empty() {
            indices = entries
                .iter()
                .filter(|e| e.addr == spec.addr)
                .map(|e| e.index)
                .collect();
        }
        indices.sort_unstable();
        indices.dedup();
        match indices.as_slice() {
            [] => Err(VipError::NoInterfaceForSubnet {
                addr: spec.addr,
                prefix: spec.prefix,
            }),
            [index] => link_by_index(&self.handle, *index).await?.ok_or_else(|| {
                VipError::InterfaceNotFound {
                    interface: format!("#{index}"),
                }
            }),
            many => {
                let mut candidates = Vec::with_capacity(many.len());
                for index in many {
                    candidates.push(self.link_name(*index).await);
                }
                Err(VipError::AmbiguousInterface {
                    addr: spec.addr,
                    prefix: spec.prefix,
                    candidates,
                })
            }
        }
    }

    /// Whether `spec.addr/spec.prefix` is on `link`; the address with another prefix there is
    /// a [`VipError::PrefixConflict`].
    async fn present_on(&self, spec: &VipSpec, link: &LinkInfo) -> Result<bool, VipError> {
        let entries = dump_addresses(&self.handle).await?;
        let mut same_addr = entries
            .iter()
            .filter(|e| e.index == link.index && e.addr == spec.addr)
            .peekable();
        let Some(first) = same_addr.peek().map(|e| e.prefix) else {
            return Ok(false);
        };
        if same_addr.any(|e| e.prefix == spec.prefix) {
            return Ok(true);
        }
        Err(VipError::PrefixConflict {
            addr: spec.addr,
            prefix: spec.prefix,
            interface: link.name.clone(),
            existing_prefix: first,
        })
    }

    async fn add_address(&self, spec: &VipSpec, link: &LinkInfo) -> Result<(), VipError> {
        let mut request = self
            .handle
            .address()
            .add(link.index, spec.addr, spec.prefix);
        if spec.addr.is_ipv6() {
            // No duplicate address detection: usable at once, never left "tentative".
            let message = request.message_mut();
            message.header.flags |= AddressHeaderFlags::Nodad;
            message
                .attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        request
            .execute()
            .await
            .map_err(|e| VipError::netlink("add address", Some(spec.addr), Some(&link.name), e))
    }

    /// The addresses equal to `addr/prefix`, restricted to `spec.interface` if set; `None` if
    /// that interface does not exist.
    async fn exact_entries(&self, spec: &VipSpec) -> Result<Option<Vec<AddrEntry>>, VipError> {
        let only = match &spec.interface {
            Some(name) => match link_by_name(&self.handle, name).await? {
                Some(link) => Some(link.index),
                None => return Ok(None),
            },
            None => None,
        };
        let entries = dump_addresses(&self.handle).await?;
        Ok(Some(
            entries
                .into_iter()
                .filter(|e| e.addr == spec.addr && e.prefix == spec.prefix)
                .filter(|e| only.is_none_or(|i| i == e.index))
                .collect(),
        ))
    }

    /// The name of interface `index`, or `#index` if it cannot be read.
    async fn link_name(&self, index: u32) -> String {
        match link_by_index(&self.handle, index).await {
            Ok(Some(link)) => link.name,
            _ => format!("#{index}"),
        }
    }
}

/// Sends one burst of announcements for `addr` out of interface `ifindex`.
async fn send_burst(
    handle: &Handle,
    sockets: &Sockets,
    config: &AnnounceConfig,
    addr: IpAddr,
    ifindex: u32,
) -> AnnounceOutcome {
    if config.count == 0 {
        return AnnounceOutcome::Skipped {
            reason: "the announcement count is 0".to_owned(),
        };
    }
    let link = match link_by_index(handle, ifindex).await {
        Ok(Some(link)) => link,
        Ok(None) => {
            return AnnounceOutcome::Failed(VipError::InterfaceNotFound {
                interface: format!("#{ifindex}"),
            });
        }
        Err(e) => return AnnounceOutcome::Failed(e),
    };
    if link.flags.contains(LinkFlags::Noarp) {
        return AnnounceOutcome::Skipped {
            reason: format!(
                "interface {} does not use ARP/neighbour discovery",
                link.name
            ),
        };
    }
    let Some(mac) = link.mac.filter(|m| *m != [0; 6]) else {
        return AnnounceOutcome::Skipped {
            reason: format!("interface {} has no Ethernet address", link.name),
        };
    };
    let mut packets = 0;
    for round in 0..config.count {
        if round > 0 {
            tokio::time::sleep(config.interval).await;
        }
        let sent = match addr {
            IpAddr::V4(ip) => sockets
                .send_arp(ifindex, packet::ARPOP_REQUEST, mac, ip)
                .and_then(|()| sockets.send_arp(ifindex, packet::ARPOP_REPLY, mac, ip))
                .map(|()| 2)
                .map_err(|e| VipError::socket("send gratuitous ARP", addr, &link.name, e)),
            IpAddr::V6(ip) => sockets.send_na(ifindex, mac, ip).map(|()| 1).map_err(|e| {
                VipError::socket(
                    "send unsolicited neighbour advertisement",
                    addr,
                    &link.name,
                    e,
                )
            }),
        };
        match sent {
            Ok(n) => packets += n,
            Err(e) => return AnnounceOutcome::Failed(e),
        }
    }
    AnnounceOutcome::Sent { packets }
}

/// The delayed second burst; skipped if the address has gone meanwhile.
async fn second_burst(
    handle: Handle,
    sockets: Arc<Sockets>,
    config: AnnounceConfig,
    spec: VipSpec,
    ifindex: u32,
    interface: String,
    delay: Duration,
) {
    tokio::time::sleep(delay).await;
    match dump_addresses(&handle).await {
        Ok(entries)
            if entries
                .iter()
                .any(|e| e.index == ifindex && e.addr == spec.addr && e.prefix == spec.prefix) => {}
        Ok(_) => {
            debug!(vip = %spec.addr, "VIP gone; second announcement skipped");
            return;
        }
        Err(e) => {
            warn!(vip = %spec.addr, error = %e, "second announcement skipped");
            return;
        }
    }
    let outcome = send_burst(&handle, &sockets, &config, spec.addr, ifindex).await;
    log_outcome(spec.addr, &interface, &outcome, "second");
}

fn log_outcome(addr: IpAddr, interface: &str, outcome: &AnnounceOutcome, burst: &str) {
    match outcome {
        AnnounceOutcome::Sent { packets } => {
            debug!(vip = %addr, interface, packets, burst, "VIP announced");
        }
        AnnounceOutcome::Skipped { reason } => {
            debug!(vip = %addr, interface, reason, burst, "VIP announcement skipped");
        }
        AnnounceOutcome::Failed(e) => {
            warn!(vip = %addr, interface, error = %e, burst, "VIP announcement failed");
        }
        AnnounceOutcome::Disabled => {}
    }
}

/// Whether a netlink notification is about the link `index` / `name`.
fn concerns_link(payload: &NetlinkPayload<RouteNetlinkMessage>, index: u32, name: &str) -> bool {
    match payload {
        NetlinkPayload::InnerMessage(
            RouteNetlinkMessage::NewLink(m) | RouteNetlinkMessage::DelLink(m),
        ) => {
            m.header.index == index
                || m.attributes
                    .iter()
                    .any(|a| matches!(a, LinkAttribute::IfName(n) if n == name))
        }
        // Overrun or other trouble: re-read to be safe.
        NetlinkPayload::Error(_) | NetlinkPayload::Overrun(_) => true,
        _ => false,
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What we need to know about a link.
#[derive(Debug, Clone)]
struct LinkInfo {
    index: u32,
    name: String,
    flags: LinkFlags,
    mac: Option<[u8; 6]>,
}

impl LinkInfo {
    fn from_message(msg: LinkMessage) -> LinkInfo {
        let mut name = String::new();
        let mut mac = None;
        for attr in msg.attributes {
            match attr {
                LinkAttribute::IfName(n) => name = n,
                LinkAttribute::Address(bytes) => mac = <[u8; 6]>::try_from(bytes).ok(),
                _ => {}
            }
        }
        LinkInfo {
            index: msg.header.index,
            name,
            flags: msg.header.flags,
            mac,
        }
    }

    fn is_up(&self) -> bool {
        self.flags
            .contains(LinkFlags::Up | LinkFlags::LowerUp | LinkFlags::Running)
    }
}

async fn link_by_name(handle: &Handle, name: &str) -> Result<Option<LinkInfo>, VipError> {
    let stream = handle.link().get().match_name(name).execute();
    match pin!(stream).try_next().await {
        Ok(link) => Ok(link.map(LinkInfo::from_message)),
        Err(e) if netlink_errno(&e) == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(VipError::netlink("read link", None, Some(name), e)),
    }
}

async fn link_by_index(handle: &Handle, index: u32) -> Result<Option<LinkInfo>, VipError> {
    let stream = handle.link().get().match_index(index).execute();
    match pin!(stream).try_next().await {
        Ok(link) => Ok(link.map(LinkInfo::from_message)),
        Err(e) if netlink_errno(&e) == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(VipError::netlink(
            "read link",
            None,
            Some(&format!("#{index}")),
            e,
        )),
    }
}

/// One address of one interface.
#[derive(Debug, Clone)]
struct AddrEntry {
    index: u32,
    addr: IpAddr,
    prefix: u8,
    message: AddressMessage,
}

impl AddrEntry {
    fn from_message(message: AddressMessage) -> Option<AddrEntry> {
        // IFA_LOCAL is the local address (IFA_ADDRESS is the peer on point-to-point links);
        // IPv6 usually sends only IFA_ADDRESS.
        let mut local = None;
        let mut address = None;
        for attr in &message.attributes {
            match attr {
                AddressAttribute::Local(a) => local = Some(*a),
                AddressAttribute::Address(a) => address = Some(*a),
                _ => {}
            }
        }
        Some(AddrEntry {
            index: message.header.index,
            addr: local.or(address)?,
            prefix: message.header.prefix_len,
            message,
        })
    }

    /// A minimal RTM_DELADDR message naming exactly this address.
    fn delete_message(&self) -> AddressMessage {
        let mut message = AddressMessage::default();
        message.header.family = self.message.header.family;
        message.header.prefix_len = self.message.header.prefix_len;
        message.header.scope = self.message.header.scope;
        message.header.index = self.message.header.index;
        message.attributes = self
            .message
            .attributes
            .iter()
            .filter(|a| matches!(a, AddressAttribute::Local(_) | AddressAttribute::Address(_)))
            .cloned()
            .collect();
        message
    }
}

async fn dump_addresses(handle: &Handle) -> Result<Vec<AddrEntry>, VipError> {
    let messages: Vec<AddressMessage> = handle
        .address()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(|e| VipError::netlink("list addresses", None, None, e))?;
    Ok(messages
        .into_iter()
        .filter_map(AddrEntry::from_message)
        .collect())
}

fn mask32(prefix: u8) -> u32 {
    match prefix {
        0 => 0,
        p => u32::MAX << (32 - u32::from(p.min(32))),
    }
}

fn mask128(prefix: u8) -> u128 {
    match prefix {
        0 => 0,
        p => u128::MAX << (128 - u32::from(p.min(128))),
    }
}

/// Whether `a` and `b` are in the same `prefix`-long subnet (false across families).
fn same_subnet(a: IpAddr, b: IpAddr, prefix: u8) -> bool {
    match (a, b) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            let m = mask32(prefix);
            u32::from(a) & m == u32::from(b) & m
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            let m = mask128(prefix);
            u128::from(a) & m == u128::from(b) & m
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("valid literal")
    }

    /// Compile-time check: the manager can be shared and its futures spawned on a
    /// multi-threaded runtime.
    #[allow(dead_code)]
    fn manager_and_futures_are_send(mgr: &VipManager, spec: &VipSpec) {
        fn is_send<T: Send>(_: T) {}
        fn is_sync<T: Sync>() {}
        is_sync::<VipManager>();
        is_send(VipManager::new());
        is_send(mgr.resolve_interface(spec));
        is_send(mgr.acquire(spec));
        is_send(mgr.announce(spec));
        is_send(mgr.release(spec));
        is_send(mgr.held_on(spec));
        is_send(mgr.link_is_up("eth0"));
        is_send(mgr.watch_link("eth0", Duration::from_secs(1)));
    }

    #[test]
    fn subnets() {
        assert!(same_subnet(ip("10.0.0.1"), ip("10.0.0.200"), 24));
        assert!(!same_subnet(ip("10.0.1.1"), ip("10.0.0.200"), 24));
        assert!(same_subnet(ip("10.0.1.1"), ip("10.0.0.200"), 16));
        assert!(same_subnet(ip("10.0.0.1"), ip("10.0.0.1"), 32));
        assert!(same_subnet(ip("1.2.3.4"), ip("200.0.0.1"), 0));
        assert!(same_subnet(ip("fd00::1"), ip("fd00::ffff"), 64));
        assert!(!same_subnet(ip("fd00:0:0:1::1"), ip("fd00::1"), 64));
        assert!(same_subnet(ip("fd00::1"), ip("fd00::1"), 128));
        assert!(!same_subnet(ip("10.0.0.1"), ip("::ffff:10.0.0.1"), 8));
    }

    #[test]
    fn validation() {
        let ok = |a: &str, p| VipSpec::new(ip(a), p).validate().is_ok();
        assert!(ok("10.0.0.5", 24));
        assert!(ok("10.0.0.5", 32));
        assert!(ok("10.0.0.0", 31));
        assert!(ok("fd00::5", 64));
        assert!(!ok("10.0.0.5", 0));
        assert!(!ok("10.0.0.5", 33));
        assert!(!ok("10.0.0.0", 24));
        assert!(!ok("10.0.0.255", 24));
        assert!(!ok("224.0.0.1", 24));
        assert!(!ok("127.0.0.2", 8));
        assert!(!ok("0.0.0.0", 24));
        assert!(!ok("fd00::5", 129));
        assert!(!ok("ff02::1", 64));
        assert!(!ok("::1", 128));
        assert!(!ok("::ffff:10.0.0.5", 120));
        let mut spec = VipSpec::new(ip("10.0.0.5"), 24);
        spec.interface = Some("a-name-that-is-too-long".into());
        assert!(matches!(spec.validate(), Err(VipError::InvalidSpec { .. })));
        spec.interface = Some("eth0".into());
        assert!(spec.validate().is_ok());
    }

    #[test]
    fn error_messages_have_context() {
        let e = VipError::netlink(
            "add address",
            Some(ip("10.0.0.5")),
            Some("eth0"),
            rtnetlink::Error::RequestFailed,
        );
        let text = e.to_string();
        assert!(text.contains("add address"), "{text}");
        assert!(text.contains("10.0.0.5"), "{text}");
        assert!(text.contains("eth0"), "{text}");
        let e = VipError::AmbiguousInterface {
            addr: ip("10.0.0.5"),
            prefix: 24,
            candidates: vec!["eth0".into(), "eth1".into()],
        };
        assert!(e.to_string().contains("eth0, eth1"));
    }
}
