//! Packet fixtures for flow state, through BPF_PROG_TEST_RUN on the tc program: conntrack across
//! endpoint changes (TCP stays, UDP re-balanced), terminating endpoints, timeouts per TCP state,
//! ClientIP session affinity (hit, refresh, expiry, validity) and hairpin flows. Maps are
//! programmed by the agent's writer; time is moved by ageing the entries' timestamps in the maps.
use std::{collections::BTreeSet, net::Ipv4Addr};

use aya::maps::{HashMap, Map, MapData};
use fixture::{assert_checksums_valid, CLIENT_MAC, NODE_MAC};
use lb_common::{
    conntrack::{
        CT_DIR_FORWARD, CT_DIR_REPLY, CT_FLAG_CLOSING, CT_FLAG_HAIRPIN, CT_FLAG_SEEN_REPLY,
        CT_FLAG_SNAT,
    },
    map_names, proto,
    service::BACKEND_FLAG_TERMINATING,
    AffinityKey, AffinityValue, BackendValue, CtKey,
};
use lb_userspace::{
    conntrack_gc::monotonic_ns,
    dataplane::{AffinityWant, BackendAddr, Desired, DesiredFrontend, FrontendAddr},
};

mod fixture;

const TC_ACT_OK: u32 = 0;
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 10);
const VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
const S: u64 = 1_000_000_000;

fn backend_ip(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 2, n)
}

fn be(n: u8, p: u8) -> BackendAddr {
    BackendAddr {
        addr: backend_ip(n),
        port: 8080,
        proto: p,
        local: true,
    }
}

/// One frontend VIP:port with backends `slots` in its slots and `draining` kept for flows
/// already on them, `terminating` marked terminating, and optional affinity.
struct Spec<'a> {
    port: u16,
    proto: u8,
    slots: &'a [u8],
    draining: &'a [u8],
    terminating: &'a [u8],
    affinity: Option<u32>,
}

impl Default for Spec<'_> {
    fn default() -> Self {
        Spec {
            port: 80,
            proto: proto::TCP,
            slots: &[],
            draining: &[],
            terminating: &[],
            affinity: None,
        }
    }
}

fn desired(specs: &[Spec]) -> Desired {
    // Affinity groups by the first spec's frontend, as the writer does for a ServicePort's
    // ClusterIP.
    let group = FrontendAddr::internal(VIP, specs[0].port, specs[0].proto);
    specs
        .iter()
        .map(|s| {
            (
                FrontendAddr::internal(VIP, s.port, s.proto),
                DesiredFrontend {
                    service_port: format!("test/svc:{}", s.port),
                    backends: s.slots.iter().map(|&n| be(n, s.proto)).collect(),
                    draining: s.draining.iter().map(|&n| be(n, s.proto)).collect(),
                    terminating: s.terminating.iter().map(|&n| be(n, s.proto)).collect(),
                    affinity: s.affinity.map(|t| AffinityWant {
                        timeout_seconds: t,
                        group,
                    }),
                    flags: 0,
                    ..Default::default()
                },
            )
        })
        .collect()
}

fn syn(sport: u16, port: u16) -> Vec<u8> {
    fixture::tcp_packet(
        (CLIENT_MAC, NODE_MAC),
        (CLIENT, sport),
        (VIP, port),
        "S",
        b"",
    )
}

fn ack(sport: u16, port: u16, payload: &[u8]) -> Vec<u8> {
    fixture::tcp_packet(
        (CLIENT_MAC, NODE_MAC),
        (CLIENT, sport),
        (VIP, port),
        "A",
        payload,
    )
}

fn udp(sport: u16, port: u16, payload: &[u8]) -> Vec<u8> {
    fixture::udp_packet(
        (CLIENT_MAC, NODE_MAC),
        (CLIENT, sport),
        (VIP, port),
        payload,
    )
}

fn dst_of(pkt: &[u8]) -> Ipv4Addr {
    Ipv4Addr::from(<[u8; 4]>::try_from(&pkt[30..34]).unwrap())
}

fn src_of(pkt: &[u8]) -> Ipv4Addr {
    Ipv4Addr::from(<[u8; 4]>::try_from(&pkt[26..30]).unwrap())
}

fn forward_key(sport: u16, port: u16, p: u8) -> CtKey {
    CtKey {
        src_addr: lb_common::ipv4_to_net(CLIENT),
        dst_addr: lb_common::ipv4_to_net(VIP),
        src_port: lb_common::port_to_net(sport),
        dst_port: lb_common::port_to_net(port),
        proto: p,
        dir: CT_DIR_FORWARD,
        _pad: 0,
    }
}

/// Moves every conntrack entry's last packet `secs` seconds into the past (at most back to boot,
/// where the monotonic clock starts).
fn age_conntrack(f: &mut fixture::Fixture, secs: u64) {
    for (k, mut v) in f.conntrack_entries() {
        v.last_seen_ns = v.last_seen_ns.saturating_sub(secs * S);
        f.conntrack.insert(k, v, 0).unwrap();
    }
}

fn new_flows(f: &fixture::Fixture) -> u64 {
    use aya::maps::PerCpuHashMap;
    use lb_common::TrafficCounters;
    let data = MapData::from_pin(f.bpffs.path().join(map_names::FRONTEND_STATS)).unwrap();
    let map: PerCpuHashMap<_, u32, TrafficCounters> =
        PerCpuHashMap::try_from(Map::PerCpuHashMap(data)).unwrap();
    map.iter()
        .map(|e| TrafficCounters::sum(e.unwrap().1.iter()).new_flows)
        .sum()
}

fn affinity_map(f: &fixture::Fixture) -> HashMap<MapData, AffinityKey, AffinityValue> {
    let data = MapData::from_pin(f.bpffs.path().join(map_names::AFFINITY)).unwrap();
    HashMap::try_from(Map::LruHashMap(data)).unwrap()
}

fn backends_map(f: &fixture::Fixture) -> Vec<(u32, BackendValue)> {
    let data = MapData::from_pin(f.bpffs.path().join(map_names::BACKENDS)).unwrap();
    let map: HashMap<_, u32, BackendValue> = HashMap::try_from(Map::HashMap(data)).unwrap();
    let mut v: Vec<_> = map.iter().map(|e| e.unwrap()).collect();
    v.sort();
    v
}

#[test]
fn tcp_flow_keeps_its_backend_when_the_backend_leaves_the_service() {
    let spec = |slots| Spec {
        slots,
        ..Default::default()
    };
    let mut f = fixture::Fixture::new("fx-tcp-stay", &desired(&[spec(&[1])]));
    let (_, out) = f.run_tc(&syn(40000, 80));
    assert_eq!(dst_of(&out), backend_ip(1));
    // Backend 1 is deleted outright; backend 2 takes its place.
    f.apply(&desired(&[spec(&[2])]));
    assert!(
        backends_map(&f)
            .iter()
            .all(|(_, b)| b.addr != lb_common::ipv4_to_net(backend_ip(1))),
        "backend 1 is gone from the map"
    );
    let before = f.conntrack_entries();
    let (verdict, out) = f.run_tc(&ack(40000, 80, b"more"));
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(
        out,
        fixture::tcp_packet(
            (CLIENT_MAC, NODE_MAC),
            (CLIENT, 40000),
            (backend_ip(1), 8080),
            "A",
            b"more"
        ),
        "the established connection still goes to backend 1"
    );
    assert_checksums_valid(&out);
    assert_eq!(f.conntrack_entries(), before, "conntrack untouched");
    // A new connection goes to the new backend.
    let (_, out) = f.run_tc(&syn(40001, 80));
    assert_eq!(dst_of(&out), backend_ip(2));
}

#[test]
fn udp_flow_is_rebalanced_when_its_backend_is_deleted() {
    let spec = |slots| Spec {
        proto: proto::UDP,
        slots,
        ..Default::default()
    };
    let mut f = fixture::Fixture::new("fx-udp-move", &desired(&[spec(&[1])]));
    let (_, out) = f.run_tc(&udp(40000, 80, b"one"));
    assert_eq!(dst_of(&out), backend_ip(1));
    f.apply(&desired(&[spec(&[2])]));
    let (verdict, out) = f.run_tc(&udp(40000, 80, b"two"));
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(
        out,
        fixture::udp_packet(
            (CLIENT_MAC, NODE_MAC),
            (CLIENT, 40000),
            (backend_ip(2), 8080),
            b"two"
        )
    );
    let fwd = f
        .conntrack
        .get(&forward_key(40000, 80, proto::UDP), 0)
        .unwrap();
    assert_eq!(fwd.nat_addr, lb_common::ipv4_to_net(backend_ip(2)));
    assert_eq!(
        new_flows(&f),
        2,
        "the second datagram counted as a new flow"
    );
}

#[test]
fn flows_to_a_terminating_endpoint_drain_there_while_new_flows_avoid_it() {
    for p in [proto::TCP, proto::UDP] {
        let mut f = fixture::Fixture::new(
            "fx-drain",
            &desired(&[Spec {
                proto: p,
                slots: &[1],
                ..Default::default()
            }]),
        );
        let first = if p == proto::TCP {
            syn(40000, 80)
        } else {
            udp(40000, 80, b"a")
        };
        let next = if p == proto::TCP {
            ack(40000, 80, b"b")
        } else {
            udp(40000, 80, b"b")
        };
        assert_eq!(dst_of(&f.run_tc(&first).1), backend_ip(1));
        // Backend 1 terminates: out of the slots, kept as draining and flagged.
        f.apply(&desired(&[Spec {
            proto: p,
            slots: &[2],
            draining: &[1],
            terminating: &[1],
            ..Default::default()
        }]));
        let flagged: Vec<u8> = backends_map(&f)
            .iter()
            .map(|(_, b)| b.flags & BACKEND_FLAG_TERMINATING)
            .collect();
        assert_eq!(flagged, vec![BACKEND_FLAG_TERMINATING, 0], "proto {p}");
        for _ in 0..5 {
            assert_eq!(dst_of(&f.run_tc(&next).1), backend_ip(1), "proto {p}");
        }
        for sport in 41000..41010 {
            let pkt = if p == proto::TCP {
                syn(sport, 80)
            } else {
                udp(sport, 80, b"new")
            };
            assert_eq!(dst_of(&f.run_tc(&pkt).1), backend_ip(2), "proto {p}");
        }
    }
}

#[test]
fn tcp_timeouts_follow_the_flow_state() {
    let mut f = fixture::Fixture::new(
        "fx-ct-timeout",
        &desired(&[Spec {
            slots: &[1],
            ..Default::default()
        }]),
    );
    let reply = |sport: u16, flags: &str| {
        fixture::tcp_packet(
            (NODE_MAC, CLIENT_MAC),
            (backend_ip(1), 8080),
            (CLIENT, sport),
            flags,
            b"",
        )
    };
    // SYN never answered: expired after 60 s, so the next packet is a new flow.
    f.run_tc(&syn(40000, 80));
    age_conntrack(&mut f, 59);
    f.run_tc(&ack(40000, 80, b""));
    assert_eq!(
        new_flows(&f),
        1,
        "59 s after an unanswered SYN the flow lives"
    );
    age_conntrack(&mut f, 61);
    f.run_tc(&ack(40000, 80, b""));
    assert_eq!(
        new_flows(&f),
        2,
        "61 s after an unanswered SYN the flow expired"
    );

    // Answered: the reply entry is marked and the flow lives for hours.
    f.run_tc(&syn(40001, 80));
    f.run_tc(&reply(40001, "SA"));
    let flows = f.conntrack_entries();
    let r = flows
        .iter()
        .find(|(k, _)| k.dir == CT_DIR_REPLY && k.dst_port == lb_common::port_to_net(40001))
        .unwrap();
    assert_ne!(r.1.flags & CT_FLAG_SEEN_REPLY, 0, "reply entry marked");
    age_conntrack(&mut f, 600);
    f.run_tc(&ack(40001, 80, b""));
    assert_eq!(
        new_flows(&f),
        3,
        "ten minutes idle do not expire an established flow"
    );

    // Closing: 10 s.
    f.run_tc(&syn(40002, 80));
    f.run_tc(&reply(40002, "SA"));
    f.run_tc(&fixture::tcp_packet(
        (CLIENT_MAC, NODE_MAC),
        (CLIENT, 40002),
        (VIP, 80),
        "AF",
        b"",
    ));
    let closing = f
        .conntrack
        .get(&forward_key(40002, 80, proto::TCP), 0)
        .unwrap();
    assert_ne!(closing.flags & CT_FLAG_CLOSING, 0);
    let before = new_flows(&f);
    age_conntrack(&mut f, 11);
    f.run_tc(&ack(40002, 80, b""));
    assert_eq!(
        new_flows(&f),
        before + 1,
        "a closing flow expires after 10 s"
    );
}

#[test]
fn conntrack_gc_deletes_expired_flows_only() {
    let mut f = fixture::Fixture::new(
        "fx-ct-gc",
        &desired(&[Spec {
            slots: &[1],
            ..Default::default()
        }]),
    );
    f.run_tc(&syn(40000, 80));
    f.run_tc(&fixture::tcp_packet(
        (NODE_MAC, CLIENT_MAC),
        (backend_ip(1), 8080),
        (CLIENT, 40000),
        "SA",
        b"",
    ));
    age_conntrack(&mut f, 120);
    // A second flow, fresh and unanswered.
    f.run_tc(&syn(40001, 80));
    // The first (established, 120 s idle) lives; ageing more expires only unanswered ones.
    let mut map = lb_userspace::conntrack_gc::open(f.bpffs.path()).unwrap();
    let sweep = lb_userspace::conntrack_gc::sweep(&mut map).unwrap();
    assert_eq!((sweep.scanned, sweep.deleted), (4, 0));
    age_conntrack(&mut f, 61);
    let sweep = lb_userspace::conntrack_gc::sweep(&mut map).unwrap();
    assert_eq!((sweep.scanned, sweep.deleted), (4, 2));
    let left: Vec<u16> = f
        .conntrack_entries()
        .iter()
        .map(|(k, _)| {
            lb_common::net_to_port(if k.dir == CT_DIR_FORWARD {
                k.src_port
            } else {
                k.dst_port
            })
        })
        .collect();
    assert_eq!(
        left,
        vec![40000, 40000],
        "the established flow's two entries stay"
    );
}

fn affinity_spec(slots: &'static [u8], terminating: &'static [u8]) -> Spec<'static> {
    Spec {
        slots,
        terminating,
        affinity: Some(100),
        ..Default::default()
    }
}

#[test]
fn session_affinity_sends_a_clients_new_connections_to_one_backend() {
    let mut f = fixture::Fixture::new("fx-aff-hit", &desired(&[affinity_spec(&[1, 2, 3], &[])]));
    let chosen: BTreeSet<Ipv4Addr> = (40000..40030)
        .map(|sport| dst_of(&f.run_tc(&syn(sport, 80)).1))
        .collect();
    assert_eq!(
        chosen.len(),
        1,
        "every connection on one backend: {chosen:?}"
    );
    let entries: Vec<_> = affinity_map(&f).iter().map(|e| e.unwrap()).collect();
    assert_eq!(entries.len(), 1);
    let (k, v) = entries[0];
    assert_eq!(k.client_addr, lb_common::ipv4_to_net(CLIENT));
    assert_ne!(k.group, 0);
    assert_eq!(
        v.backend_addr,
        lb_common::ipv4_to_net(*chosen.first().unwrap())
    );
    let age = monotonic_ns() - v.last_used_ns;
    assert!(
        age < 5 * S,
        "refreshed by the last connection ({age} ns ago)"
    );
}

/// Points the client's affinity entry at backend `n`, last used `age` seconds ago.
fn set_affinity(f: &fixture::Fixture, n: u8, age: u64) {
    let mut map = affinity_map(f);
    let (k, _) = map.iter().next().unwrap().unwrap();
    let (id, b) = backends_map(f)
        .into_iter()
        .find(|(_, b)| b.addr == lb_common::ipv4_to_net(backend_ip(n)))
        .unwrap();
    let v = AffinityValue {
        backend_id: id,
        backend_addr: b.addr,
        backend_port: b.port,
        _pad: 0,
        _pad2: 0,
        last_used_ns: monotonic_ns().saturating_sub(age * S),
    };
    map.insert(k, v, 0).unwrap();
}

#[test]
fn session_affinity_expires_after_its_timeout() {
    let mut f = fixture::Fixture::new("fx-aff-exp", &desired(&[affinity_spec(&[1, 2, 3], &[])]));
    f.run_tc(&syn(40000, 80));
    // Within the timeout the entry wins every time.
    for sport in 41000..41020 {
        set_affinity(&f, 3, 99);
        assert_eq!(dst_of(&f.run_tc(&syn(sport, 80)).1), backend_ip(3));
    }
    // Past it, the choice is random again (backend 3 thirty times in a row: chance 3^-30).
    let mut elsewhere = 0;
    for sport in 42000..42030 {
        set_affinity(&f, 3, 101);
        if dst_of(&f.run_tc(&syn(sport, 80)).1) != backend_ip(3) {
            elsewhere += 1;
        }
    }
    assert!(elsewhere > 0, "an expired entry must not pin the client");
}

#[test]
fn session_affinity_never_returns_to_a_terminating_or_removed_backend() {
    let mut f = fixture::Fixture::new("fx-aff-term", &desired(&[affinity_spec(&[1, 2], &[])]));
    f.run_tc(&syn(40000, 80));
    set_affinity(&f, 1, 0);
    // Backend 1 terminates (still serving, no longer in the slots).
    f.apply(&desired(&[Spec {
        draining: &[1],
        ..affinity_spec(&[2], &[1])
    }]));
    for sport in 41000..41010 {
        assert_eq!(dst_of(&f.run_tc(&syn(sport, 80)).1), backend_ip(2));
    }
    // The entry now names backend 2; backend 2 is removed and 3 added.
    f.apply(&desired(&[affinity_spec(&[3], &[])]));
    for sport in 42000..42010 {
        assert_eq!(dst_of(&f.run_tc(&syn(sport, 80)).1), backend_ip(3));
    }
}

#[test]
fn session_affinity_is_shared_by_the_frontends_of_a_service_port() {
    let mut f = fixture::Fixture::new(
        "fx-aff-group",
        &desired(&[
            Spec {
                port: 80,
                ..affinity_spec(&[1, 2, 3], &[])
            },
            Spec {
                port: 30080,
                ..affinity_spec(&[1, 2, 3], &[])
            },
        ]),
    );
    let first = dst_of(&f.run_tc(&syn(40000, 80)).1);
    for sport in 41000..41020 {
        assert_eq!(dst_of(&f.run_tc(&syn(sport, 30080)).1), first);
    }
    assert_eq!(affinity_map(&f).iter().count(), 1, "one entry for both");
}

#[test]
fn hairpin_flow_is_source_natted_to_the_frontend_and_back() {
    // The client pod is also the only backend.
    let me = backend_ip(1);
    let mut f = fixture::Fixture::new(
        "fx-hairpin",
        &desired(&[Spec {
            slots: &[1],
            ..Default::default()
        }]),
    );
    let out_syn = fixture::tcp_packet((CLIENT_MAC, NODE_MAC), (me, 40000), (VIP, 80), "S", b"");
    let (_, out) = f.run_tc(&out_syn);
    // The MACs depend on the FIB of the namespace the test runs in: compare from the IP header.
    assert_eq!(
        out[14..],
        fixture::tcp_packet((CLIENT_MAC, NODE_MAC), (VIP, 40000), (me, 8080), "S", b"")[14..],
        "from the frontend address with the client's port, to the pod itself"
    );
    assert_checksums_valid(&out);
    let flows = f.conntrack_entries();
    assert_eq!(flows.len(), 2);
    for (_, v) in &flows {
        assert_eq!(
            v.flags & (CT_FLAG_SNAT | CT_FLAG_HAIRPIN),
            CT_FLAG_SNAT | CT_FLAG_HAIRPIN
        );
    }
    // The pod answers the frontend address; the answer goes back as frontend -> client.
    let answer = fixture::tcp_packet((CLIENT_MAC, NODE_MAC), (me, 8080), (VIP, 40000), "SA", b"");
    let (_, out) = f.run_tc(&answer);
    assert_eq!(
        out[14..],
        fixture::tcp_packet((CLIENT_MAC, NODE_MAC), (VIP, 80), (me, 40000), "SA", b"")[14..]
    );
    assert_eq!(src_of(&out), VIP);
    assert_checksums_valid(&out);
}
