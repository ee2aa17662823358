//! Maglev selection through BPF_PROG_TEST_RUN: the real tc program, maps filled by the agent's
//! writer, and the userspace side of the shared flow hash predicting every choice. A packet must
//! land on exactly the backend the table the agent built names for its slot, with the exact
//! bytes of a DNAT to that backend, and land there again when conntrack is cleared.
use std::net::Ipv4Addr;

use fixture::{assert_checksums_valid, tcp_packet, udp_packet, CLIENT_MAC, NODE_MAC};
use lb_common::{
    ipv4_to_net,
    maglev::{MaglevKey, CHUNK_SLOTS, DEFAULT_TABLE_SIZE},
    port_to_net,
    proto::{TCP, UDP},
    service::{SVC_FLAG_CLUSTER_IP, SVC_FLAG_MAGLEV},
    CtKey,
};
use lb_userspace::dataplane::{
    maglev::slot_of, BackendAddr, Dataplane, Desired, DesiredFrontend, FrontendAddr,
};

mod fixture;

const TC_ACT_OK: u32 = 0;
const VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 20);

fn backend(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 2, last)
}

/// One ClusterIP frontend VIP:80 with backends 198.18.2.{1..=n}:8080, Maglev or random.
fn desired(n: u8, proto: u8, maglev: bool) -> Desired {
    [(
        FrontendAddr::internal(VIP, 80, proto),
        DesiredFrontend {
            service_port: "test/maglev:80".into(),
            backends: (1..=n)
                .map(|b| BackendAddr {
                    addr: backend(b),
                    port: 8080,
                    proto,
                    local: true,
                })
                .collect(),
            flags: SVC_FLAG_CLUSTER_IP | if maglev { SVC_FLAG_MAGLEV } else { 0 },
            ..Default::default()
        },
    )]
    .into_iter()
    .collect()
}

/// The backend the maps' Maglev table names for this client and frontend, computed in
/// userspace: the shared flow hash, the slot, the chunk, the backend entry.
fn predicted(f: &fixture::Fixture, client: (Ipv4Addr, u16), proto: u8) -> (u32, Ipv4Addr) {
    let services = f.maps.services().unwrap();
    let master = services
        .iter()
        .find(|(k, _)| *k == FrontendAddr::internal(VIP, 80, proto).key(0))
        .expect("master entry")
        .1;
    let slot = slot_of(
        ipv4_to_net(client.0),
        ipv4_to_net(VIP),
        port_to_net(client.1),
        port_to_net(80),
        proto,
        DEFAULT_TABLE_SIZE,
    );
    let chunks = f.maps.maglev_chunks().unwrap();
    let key = MaglevKey {
        table: master.rev_nat_id,
        chunk: (slot as usize / CHUNK_SLOTS) as u16,
    };
    let chunk = chunks.iter().find(|(k, _)| *k == key).expect("chunk").1;
    let id = chunk.backend_ids[slot as usize % CHUNK_SLOTS];
    let b = f
        .maps
        .backends()
        .unwrap()
        .into_iter()
        .find(|(bid, _)| *bid == id)
        .expect("backend of the slot")
        .1;
    (slot, lb_common::net_to_ipv4(b.addr))
}

fn clear_conntrack(f: &mut fixture::Fixture) {
    let keys: Vec<CtKey> = f.conntrack_entries().into_iter().map(|(k, _)| k).collect();
    for k in keys {
        f.conntrack.remove(&k).unwrap();
    }
}

#[test]
fn maglev_sends_each_flow_to_the_backend_the_userspace_table_predicts() {
    let mut f = fixture::Fixture::new("maglev-fx", &desired(5, TCP, true));
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..40u16 {
        let client = (
            Ipv4Addr::new(198, 18, 1, 10 + (i % 7) as u8),
            40_000 + i * 13,
        );
        let (slot, want) = predicted(&f, client, TCP);
        seen.insert(want);
        let input = tcp_packet((CLIENT_MAC, NODE_MAC), client, (VIP, 80), "S", b"");
        let expected = tcp_packet((CLIENT_MAC, NODE_MAC), client, (want, 8080), "S", b"");
        for round in 0..3 {
            let (verdict, out) = f.run_tc(&input);
            assert_eq!(verdict, TC_ACT_OK);
            assert_eq!(
                out, expected,
                "client {client:?}, slot {slot}, round {round}: DNAT to {want}:8080 exactly"
            );
            assert_checksums_valid(&out);
            // The flow is tracked on that backend; clearing conntrack makes the next run a new
            // flow that must hash to the same slot again.
            let entries = f.conntrack_entries();
            assert_eq!(entries.len(), 2, "forward and reply entries");
            assert!(entries
                .iter()
                .all(|(_, v)| v.nat_addr == ipv4_to_net(want) || v.nat_addr == ipv4_to_net(VIP)));
            clear_conntrack(&mut f);
        }
    }
    assert!(
        seen.len() >= 4,
        "40 tuples over 5 backends reach most of them: {seen:?}"
    );
}

#[test]
fn maglev_udp_choice_survives_conntrack_loss_and_follows_backend_changes() {
    let mut f = fixture::Fixture::new("maglev-fx-udp", &desired(4, UDP, true));
    let client = (Ipv4Addr::new(198, 18, 1, 10), 5353);
    let input = udp_packet((CLIENT_MAC, NODE_MAC), client, (VIP, 80), b"q");
    let (_, first) = predicted(&f, client, UDP);
    let (verdict, out) = f.run_tc(&input);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(
        out,
        udp_packet((CLIENT_MAC, NODE_MAC), client, (first, 8080), b"q")
    );
    clear_conntrack(&mut f);

    // A fifth backend: the table is rewritten by diff; the prediction follows the new table
    // and so does the program.
    f.apply(&desired(5, UDP, true));
    let (_, now) = predicted(&f, client, UDP);
    let (verdict, out) = f.run_tc(&input);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(
        out,
        udp_packet((CLIENT_MAC, NODE_MAC), client, (now, 8080), b"q")
    );
}

#[test]
fn switching_a_frontend_to_random_removes_its_table() {
    let mut f = fixture::Fixture::new("maglev-fx-off", &desired(3, TCP, true));
    assert_eq!(f.maps.maglev_chunks().unwrap().len(), 16);
    f.apply(&desired(3, TCP, false));
    assert!(f.maps.maglev_chunks().unwrap().is_empty());
    // Random selection still serves the frontend.
    let client = (Ipv4Addr::new(198, 18, 1, 10), 41_000);
    let (verdict, out) = f.run_tc(&tcp_packet(
        (CLIENT_MAC, NODE_MAC),
        client,
        (VIP, 80),
        "S",
        b"",
    ));
    assert_eq!(verdict, TC_ACT_OK);
    let dst = Ipv4Addr::new(out[30], out[31], out[32], out[33]);
    assert!((1..=3).map(backend).any(|b| b == dst), "{dst}");
}
