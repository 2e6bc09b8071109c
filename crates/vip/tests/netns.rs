//! Integration tests in private network namespaces (need root: CAP_SYS_ADMIN for `ip netns`,
//! CAP_NET_ADMIN and CAP_NET_RAW for the code under test).
//!
//! Each test builds its own holder/client namespace pair (see `common::Lab`) and runs the code
//! under test in a thread that has joined the holder namespace.

mod common;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use common::{Lab, eventually};
use tandem_vip::{AnnounceConfig, AnnounceOutcome, VipError, VipManager, VipSpec};

const FAKE_MAC: &str = "02:00:00:00:00:99";

fn spec(addr: &str, prefix: u8) -> VipSpec {
    VipSpec::new(addr.parse::<IpAddr>().expect("valid address"), prefix)
}

/// A quick second burst so tests need not wait 3 s.
fn fast_config(second_burst: Duration) -> AnnounceConfig {
    AnnounceConfig {
        second_burst_delay: Some(second_burst),
        ..AnnounceConfig::default()
    }
}

fn holder_addrs(lab: &Lab, family: &str) -> String {
    lab.holder.ip(&[family, "addr", "show", "dev", "vh"])
}

#[test]
fn ipv4_acquire_and_release_are_idempotent() {
    let lab = Lab::new();
    let vip = lab.v4_addr(100);
    let vip_cidr = lab.v4(100, 24);
    lab.holder.run(|| async {
        let mgr = VipManager::new().await.expect("manager");
        let spec = spec(&vip, 24);

        let report = mgr.acquire(&spec).await.expect("acquire");
        assert_eq!(report.interface, "vh");
        assert!(!report.was_already_present);
        assert!(
            matches!(report.announce, AnnounceOutcome::Sent { packets: 6 }),
            "{report:?}"
        );
        assert!(report.second_burst_scheduled);
        assert!(holder_addrs(&lab, "-4").contains(&vip_cidr));
        assert_eq!(mgr.held_on(&spec).await.expect("held_on"), ["vh"]);

        let again = mgr.acquire(&spec).await.expect("second acquire");
        assert!(again.was_already_present);
        assert_eq!(again.interface, "vh");
        let listing = holder_addrs(&lab, "-4");
        assert_eq!(listing.matches(&vip_cidr).count(), 1, "{listing}");

        let released = mgr.release(&spec).await.expect("release");
        assert_eq!(released.removed_from, ["vh"]);
        assert!(released.cancelled_second_burst);
        assert!(!holder_addrs(&lab, "-4").contains(&vip));
        assert!(mgr.held_on(&spec).await.expect("held_on").is_empty());

        let again = mgr.release(&spec).await.expect("second release");
        assert!(!again.was_present());
        assert!(!again.cancelled_second_burst);

        // With an explicit interface too; announcements off.
        let mut explicit = spec.clone();
        explicit.interface = Some("vh".into());
        explicit.gratuitous_arp = false;
        let report = mgr.acquire(&explicit).await.expect("acquire on vh");
        assert!(matches!(report.announce, AnnounceOutcome::Disabled));
        assert!(!report.second_burst_scheduled);
        assert!(holder_addrs(&lab, "-4").contains(&vip_cidr));
        assert!(mgr.release(&explicit).await.expect("release").was_present());
        assert!(!holder_addrs(&lab, "-4").contains(&vip));
    });
}

#[test]
fn interface_discovery_and_errors() {
    let lab = Lab::new();
    lab.holder.run(|| async {
        let mgr = VipManager::new().await.expect("manager");

        // An address of vh (10.250.N.1) is in the VIP's /24.
        let in_subnet = spec(&lab.v4_addr(100), 24);
        assert_eq!(
            mgr.resolve_interface(&in_subnet).await.expect("resolve"),
            "vh"
        );
        // The VIP's /28 does not contain .1, but vh's /24 contains the VIP.
        let narrower = spec(&lab.v4_addr(77), 28);
        assert_eq!(
            mgr.resolve_interface(&narrower).await.expect("resolve /28"),
            "vh"
        );
        // IPv6 too.
        let v6 = spec(&lab.v6_addr(0x100), 64);
        assert_eq!(mgr.resolve_interface(&v6).await.expect("resolve v6"), "vh");

        // No local subnet: a clear error, from resolve and from acquire.
        let nowhere = spec("10.251.7.5", 24);
        let err = mgr
            .resolve_interface(&nowhere)
            .await
            .expect_err("no subnet");
        assert!(
            matches!(err, VipError::NoInterfaceForSubnet { .. }),
            "{err:?}"
        );
        let text = err.to_string();
        assert!(
            text.contains("10.251.7.5/24") && text.contains("no interface"),
            "{text}"
        );
        let err = mgr
            .acquire(&nowhere)
            .await
            .expect_err("acquire with no subnet");
        assert!(
            matches!(err, VipError::NoInterfaceForSubnet { .. }),
            "{err:?}"
        );

        // A named interface that does not exist.
        let mut missing = in_subnet.clone();
        missing.interface = Some("nosuch0".into());
        let err = mgr
            .resolve_interface(&missing)
            .await
            .expect_err("missing interface");
        assert!(
            matches!(&err, VipError::InterfaceNotFound { interface } if interface == "nosuch0"),
            "{err:?}"
        );
        assert!(err.to_string().contains("nosuch0"));
        assert!(matches!(
            mgr.acquire(&missing).await,
            Err(VipError::InterfaceNotFound { .. })
        ));
        // Releasing from a missing interface: nothing to do.
        assert!(!mgr.release(&missing).await.expect("release").was_present());

        // Invalid specs.
        assert!(matches!(
            mgr.acquire(&spec(&lab.v4_addr(100), 0)).await,
            Err(VipError::InvalidSpec { .. })
        ));

        // Two interfaces in the subnet: ambiguous, and the error names both.
        // (A veth pair with both ends in the holder: the dummy driver may not be available.)
        lab.holder
            .ip(&["link", "add", "vx", "type", "veth", "peer", "name", "vy"]);
        lab.holder.ip(&["addr", "add", &lab.v4(9, 24), "dev", "vx"]);
        let err = mgr
            .resolve_interface(&in_subnet)
            .await
            .expect_err("ambiguous");
        match &err {
            VipError::AmbiguousInterface { candidates, .. } => {
                let mut c = candidates.clone();
                c.sort();
                assert_eq!(c, ["vh", "vx"]);
            }
            other => panic!("expected AmbiguousInterface, got {other:?}"),
        }
        // An explicit interface settles it.
        let mut explicit = in_subnet.clone();
        explicit.interface = Some("vh".into());
        assert_eq!(
            mgr.resolve_interface(&explicit).await.expect("explicit"),
            "vh"
        );

        // The address already there with another prefix: a conflict, not a silent success.
        lab.holder
            .ip(&["addr", "add", &lab.v4(50, 32), "dev", "vh"]);
        let mut conflicting = spec(&lab.v4_addr(50), 24);
        conflicting.interface = Some("vh".into());
        let err = mgr
            .acquire(&conflicting)
            .await
            .expect_err("prefix conflict");
        assert!(
            matches!(
                err,
                VipError::PrefixConflict {
                    existing_prefix: 32,
                    ..
                }
            ),
            "{err:?}"
        );
    });
}

/// Linux updates an *existing* ARP entry from a gratuitous ARP whatever `arp_accept` says
/// (`arp_accept` only decides whether a missing entry is created), so the client here keeps the
/// default `arp_accept=0`. It holds a stale entry pointing at another MAC (the previous holder)
/// and must switch to the new holder's MAC at once, without waiting for the entry to expire.
/// The second burst is checked the same way.
#[test]
fn gratuitous_arp_repoints_client_neighbour_entry() {
    let lab = Lab::new();
    lab.client.sysctl("net.ipv4.conf.all.arp_accept", "0");
    lab.client.sysctl("net.ipv4.conf.vc.arp_accept", "0");
    let vip = lab.v4_addr(100);
    let stale = |lab: &Lab| {
        lab.client.ip(&[
            "neigh", "replace", &vip, "lladdr", FAKE_MAC, "dev", "vc", "nud", "stale",
        ]);
    };
    stale(&lab);
    assert!(lab.client_neigh(&vip).contains(FAKE_MAC));
    let holder_mac = lab.holder_mac();
    let points_at_holder = || lab.client_neigh(&vip).contains(&holder_mac);

    lab.holder.run(|| async {
        let mgr = VipManager::with_config(fast_config(Duration::from_millis(800)))
            .await
            .expect("manager");
        let report = mgr.acquire(&spec(&vip, 24)).await.expect("acquire");
        assert!(
            matches!(report.announce, AnnounceOutcome::Sent { .. }),
            "{report:?}"
        );
        eventually(
            "client entry to point at the new holder (first burst)",
            Duration::from_secs(3),
            points_at_holder,
            || lab.client_neigh(&vip),
        )
        .await;

        // Make the entry wrong again: the second burst must fix it.
        stale(&lab);
        eventually(
            "client entry to point at the new holder (second burst)",
            Duration::from_secs(5),
            points_at_holder,
            || lab.client_neigh(&vip),
        )
        .await;
        mgr.release(&spec(&vip, 24)).await.expect("release");
    });
}

/// With `arp_accept=1` a gratuitous ARP also creates a missing entry.
#[test]
fn gratuitous_arp_creates_entry_when_client_accepts() {
    let lab = Lab::new();
    lab.client.sysctl("net.ipv4.conf.all.arp_accept", "1");
    let vip = lab.v4_addr(101);
    assert!(lab.client_neigh(&vip).is_empty());
    let holder_mac = lab.holder_mac();
    lab.holder.run(|| async {
        let mgr = VipManager::new().await.expect("manager");
        mgr.acquire(&spec(&vip, 24)).await.expect("acquire");
        eventually(
            "client to learn the VIP from the gratuitous ARP",
            Duration::from_secs(3),
            || lab.client_neigh(&vip).contains(&holder_mac),
            || lab.client_neigh(&vip),
        )
        .await;
        mgr.release(&spec(&vip, 24)).await.expect("release");
    });
}

/// Release cancels the second burst. To tell "cancelled" from "skipped because the address is
/// gone", the address is put back by hand after the release: a surviving task would announce
/// it. Proving that something does NOT happen needs waiting past the delay.
#[test]
fn release_cancels_second_burst() {
    let lab = Lab::new();
    let vip = lab.v4_addr(102);
    let delay = Duration::from_millis(400);
    lab.holder.run(|| async {
        let mgr = VipManager::with_config(fast_config(delay))
            .await
            .expect("manager");
        let report = mgr.acquire(&spec(&vip, 24)).await.expect("acquire");
        assert!(report.second_burst_scheduled);
        let released = mgr.release(&spec(&vip, 24)).await.expect("release");
        assert!(released.cancelled_second_burst);

        lab.holder
            .ip(&["addr", "add", &lab.v4(102, 24), "dev", "vh"]);
        lab.client.ip(&[
            "neigh", "replace", &vip, "lladdr", FAKE_MAC, "dev", "vc", "nud", "stale",
        ]);
        tokio::time::sleep(delay * 3).await;
        let entry = lab.client_neigh(&vip);
        assert!(
            entry.contains(FAKE_MAC),
            "a second burst was sent after release: {entry}"
        );

        // Dropping the manager also cancels a pending burst.
        let mgr2 = VipManager::with_config(fast_config(delay))
            .await
            .expect("manager");
        let report = mgr2.acquire(&spec(&vip, 24)).await.expect("re-acquire");
        assert!(report.was_already_present && report.second_burst_scheduled);
        drop(mgr2);
        lab.client.ip(&[
            "neigh", "replace", &vip, "lladdr", FAKE_MAC, "dev", "vc", "nud", "stale",
        ]);
        tokio::time::sleep(delay * 3).await;
        let entry = lab.client_neigh(&vip);
        assert!(
            entry.contains(FAKE_MAC),
            "a second burst outlived the manager: {entry}"
        );
        drop(mgr);
    });
}

#[test]
fn ipv6_acquire_with_nodad_sends_neighbour_advertisement() {
    let lab = Lab::new();
    let vip = lab.v6_addr(0x100);
    let vip_cidr = lab.v6(0x100, 64);
    // The client has a stale entry pointing elsewhere; the Override flag must repoint it.
    lab.client.ip(&[
        "-6", "neigh", "replace", &vip, "lladdr", FAKE_MAC, "dev", "vc", "nud", "stale",
    ]);
    let holder_mac = lab.holder_mac();
    lab.holder.run(|| async {
        let mgr = VipManager::new().await.expect("manager");
        let spec = spec(&vip, 64);
        let report = mgr.acquire(&spec).await.expect("acquire");
        assert_eq!(report.interface, "vh");
        assert!(!report.was_already_present);
        assert!(
            matches!(report.announce, AnnounceOutcome::Sent { packets: 3 }),
            "{report:?}"
        );

        let listing = holder_addrs(&lab, "-6");
        let line = listing
            .lines()
            .find(|l| l.contains(&vip_cidr))
            .unwrap_or_else(|| panic!("VIP missing: {listing}"));
        assert!(line.contains("nodad"), "{line}");
        assert!(!line.contains("tentative"), "{line}");

        eventually(
            "client IPv6 neighbour entry to point at the new holder",
            Duration::from_secs(3),
            || lab.client_neigh(&vip).contains(&holder_mac),
            || lab.client_neigh(&vip),
        )
        .await;
        // Usable at once (no DAD wait): a tentative address cannot be bound.
        let addr: IpAddr = vip.parse().expect("valid address");
        std::net::UdpSocket::bind((addr, 0)).expect("bind to the VIP right after acquire");

        assert!(mgr.acquire(&spec).await.expect("again").was_already_present);
        assert_eq!(
            mgr.release(&spec).await.expect("release").removed_from,
            ["vh"]
        );
        assert!(!holder_addrs(&lab, "-6").contains(&vip_cidr));
        assert!(
            !mgr.release(&spec)
                .await
                .expect("release again")
                .was_present()
        );
    });
}

#[test]
fn link_state_and_watcher_follow_link_changes() {
    let lab = Lab::new();
    lab.holder.run(|| async {
        let mgr = VipManager::new().await.expect("manager");
        assert!(mgr.link_is_up("vh").await.expect("link_is_up"));
        assert!(matches!(
            mgr.link_is_up("nosuch0").await,
            Err(VipError::InterfaceNotFound { .. })
        ));
        assert!(matches!(
            mgr.watch_link("nosuch0", Duration::from_secs(1)).await,
            Err(VipError::InterfaceNotFound { .. })
        ));

        // A long poll interval: only netlink notifications can be fast enough.
        let mut rx = mgr
            .watch_link("vh", Duration::from_secs(30))
            .await
            .expect("watch");
        assert!(*rx.borrow_and_update());

        // Administrative changes are notified at once (typically well under 10 ms; the
        // latency is printed). The clock starts once `ip` has returned.
        let within = Duration::from_millis(300);

        lab.holder.ip(&["link", "set", "vh", "down"]);
        expect_state(&mut rx, "vh down", false, within).await;
        assert!(!mgr.link_is_up("vh").await.expect("link_is_up"));

        lab.holder.ip(&["link", "set", "vh", "up"]);
        expect_state(&mut rx, "vh up", true, Duration::from_secs(3)).await;
        assert!(mgr.link_is_up("vh").await.expect("link_is_up"));

        // Carrier loss: the peer going down takes LOWER_UP away from vh at once, but the kernel
        // may batch the notification for up to 1 s (linkwatch), so a watcher that must see it
        // sooner polls too.
        let mut fast = mgr
            .watch_link("vh", Duration::from_millis(50))
            .await
            .expect("watch");
        assert!(*fast.borrow_and_update());
        lab.client.ip(&["link", "set", "vc", "down"]);
        expect_state(&mut fast, "carrier loss (polling)", false, within).await;
        assert!(!mgr.link_is_up("vh").await.expect("link_is_up"));
        // Both watchers agree eventually (the notification comes within ~1 s).
        expect_state(
            &mut rx,
            "carrier loss (notified)",
            false,
            Duration::from_secs(5),
        )
        .await;
        lab.client.ip(&["link", "set", "vc", "up"]);
        // IFF_RUNNING (operstate) comes back through linkwatch too: allow for its batching.
        expect_state(&mut rx, "carrier back", true, Duration::from_secs(5)).await;
        expect_state(
            &mut fast,
            "carrier back (polling)",
            true,
            Duration::from_secs(5),
        )
        .await;
        drop(fast);

        // The interface disappearing reads as down.
        lab.holder.ip(&["link", "del", "vh"]);
        expect_state(&mut rx, "vh deleted", false, within).await;
    });
}

/// Waits until the watcher reports `up`, at most `within`; prints the latency.
async fn expect_state(
    rx: &mut tokio::sync::watch::Receiver<bool>,
    what: &str,
    up: bool,
    within: Duration,
) {
    let start = Instant::now();
    tokio::time::timeout(within, rx.wait_for(|v| *v == up))
        .await
        .unwrap_or_else(|_| panic!("watcher did not see {what} within {within:?}"))
        .expect("watcher alive");
    eprintln!("watcher saw {what} after {:?}", start.elapsed());
}
