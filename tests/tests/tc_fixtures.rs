//! Packet fixtures for the tc program, run through BPF_PROG_TEST_RUN: input bytes in, verdict,
//! output bytes and conntrack side effects out. Maps are filled by the agent's own writer, so
//! these also check that userspace and kernel agree on the layout.
use std::net::Ipv4Addr;

use aya::maps::{Map, MapData};
use fixture::{assert_checksums_valid, CLIENT_MAC, NODE_MAC};
use lb_common::{conntrack::CT_DIR_FORWARD, conntrack::CT_DIR_REPLY, map_names, CtValue};
use lb_userspace::dataplane::{BackendAddr, Desired, DesiredFrontend, FrontendAddr};

mod fixture;

const TC_ACT_OK: u32 = 0;
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 10);
const VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);

fn backend(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 2, last)
}

/// The shared fixture with frontends on [`VIP`] for the tc program.
struct Fixture(fixture::Fixture);

impl std::ops::Deref for Fixture {
    type Target = fixture::Fixture;
    fn deref(&self) -> &fixture::Fixture {
        &self.0
    }
}

impl std::ops::DerefMut for Fixture {
    fn deref_mut(&mut self) -> &mut fixture::Fixture {
        &mut self.0
    }
}

impl Fixture {
    /// Loads the real object with fresh maps and programs one frontend per entry.
    fn new(tag: &str, frontends: &[(u16, u8, &[u8])]) -> Self {
        Fixture(fixture::Fixture::new(tag, &desired(frontends)))
    }

    /// Makes the maps hold exactly these frontends (port, protocol, backend numbers) on the VIP.
    fn program(&mut self, frontends: &[(u16, u8, &[u8])]) {
        self.0.apply(&desired(frontends));
    }

    /// Runs the tc program on one packet: (verdict, output bytes).
    fn run(&mut self, input: &[u8]) -> (u32, Vec<u8>) {
        self.0.run_tc(input)
    }
}

fn desired(frontends: &[(u16, u8, &[u8])]) -> Desired {
    frontends
        .iter()
        .map(|&(port, proto, backends)| {
            (
                FrontendAddr::internal(VIP, port, proto),
                DesiredFrontend {
                    service_port: format!("test/svc:{port}"),
                    backends: backends
                        .iter()
                        .map(|&b| BackendAddr {
                            addr: backend(b),
                            port: 8080,
                            proto,
                            local: true,
                        })
                        .collect(),
                    flags: 0,
                    ..Default::default()
                },
            )
        })
        .collect()
}

fn tcp_syn(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)) -> Vec<u8> {
    tcp(src, dst, true, false, b"")
}

fn tcp(
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
    syn: bool,
    ack: bool,
    payload: &[u8],
) -> Vec<u8> {
    tcp_with_fin(src, dst, syn, ack, false, payload)
}

fn tcp_with_fin(
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
    syn: bool,
    ack: bool,
    fin: bool,
    payload: &[u8],
) -> Vec<u8> {
    let flags: String = [(syn, 'S'), (ack, 'A'), (fin, 'F')]
        .iter()
        .filter(|(on, _)| *on)
        .map(|(_, c)| *c)
        .collect();
    fixture::tcp_packet((CLIENT_MAC, NODE_MAC), src, dst, &flags, payload)
}

fn udp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), payload: &[u8]) -> Vec<u8> {
    fixture::udp_packet((CLIENT_MAC, NODE_MAC), src, dst, payload)
}

#[test]
fn syn_to_cluster_ip_is_dnated_to_the_backend_with_valid_checksums() {
    let mut f = Fixture::new("fx-syn", &[(80, lb_common::proto::TCP, &[1])]);
    let (verdict, out) = f.run(&tcp_syn((CLIENT, 40000), (VIP, 80)));
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(
        out,
        tcp_syn((CLIENT, 40000), (backend(1), 8080)),
        "byte-exact golden packet"
    );
    assert_checksums_valid(&out);
}

#[test]
fn new_flow_creates_forward_and_reply_conntrack_entries() {
    let mut f = Fixture::new("fx-ct", &[(80, lb_common::proto::TCP, &[1])]);
    f.run(&tcp_syn((CLIENT, 40001), (VIP, 80)));
    let entries = f.conntrack_entries();
    assert_eq!(entries.len(), 2, "{entries:?}");
    let net = lb_common::ipv4_to_net;
    let port = lb_common::port_to_net;
    let fwd = entries
        .iter()
        .find(|(k, _)| k.dir == CT_DIR_FORWARD)
        .unwrap();
    assert_eq!(
        (
            fwd.0.src_addr,
            fwd.0.dst_addr,
            fwd.0.src_port,
            fwd.0.dst_port
        ),
        (net(CLIENT), net(VIP), port(40001), port(80))
    );
    assert_eq!(
        (fwd.1.nat_addr, fwd.1.nat_port),
        (net(backend(1)), port(8080))
    );
    let rep = entries.iter().find(|(k, _)| k.dir == CT_DIR_REPLY).unwrap();
    assert_eq!(
        (
            rep.0.src_addr,
            rep.0.dst_addr,
            rep.0.src_port,
            rep.0.dst_port
        ),
        (net(backend(1)), net(CLIENT), port(8080), port(40001))
    );
    assert_eq!((rep.1.nat_addr, rep.1.nat_port), (net(VIP), port(80)));
    assert_eq!(fwd.1.backend_id, rep.1.backend_id);
}

#[test]
fn reply_from_backend_gets_the_cluster_ip_back_as_source() {
    let mut f = Fixture::new("fx-reply", &[(80, lb_common::proto::TCP, &[1])]);
    f.run(&tcp_syn((CLIENT, 40002), (VIP, 80)));
    let synack = tcp((backend(1), 8080), (CLIENT, 40002), true, true, b"");
    let (verdict, out) = f.run(&synack);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, tcp((VIP, 80), (CLIENT, 40002), true, true, b""));
    assert_checksums_valid(&out);
}

#[test]
fn established_flow_stays_on_its_backend() {
    let mut f = Fixture::new("fx-sticky", &[(80, lb_common::proto::TCP, &[1, 2, 3])]);
    let (_, first) = f.run(&tcp_syn((CLIENT, 40003), (VIP, 80)));
    let chosen = Ipv4Addr::from(<[u8; 4]>::try_from(&first[30..34]).unwrap());
    for i in 0..20 {
        let data = tcp(
            (CLIENT, 40003),
            (VIP, 80),
            false,
            true,
            format!("segment {i}").as_bytes(),
        );
        let (_, out) = f.run(&data);
        assert_eq!(
            out,
            tcp(
                (CLIENT, 40003),
                (chosen, 8080),
                false,
                true,
                format!("segment {i}").as_bytes()
            )
        );
        assert_checksums_valid(&out);
    }
    assert_eq!(f.conntrack_entries().len(), 2, "one flow, two entries");
}

#[test]
fn new_flows_spread_over_all_backends() {
    let mut f = Fixture::new("fx-spread", &[(80, lb_common::proto::TCP, &[1, 2, 3])]);
    let mut seen = std::collections::BTreeMap::new();
    for sport in 41000..41060 {
        let (verdict, out) = f.run(&tcp_syn((CLIENT, sport), (VIP, 80)));
        assert_eq!(verdict, TC_ACT_OK);
        let dst = Ipv4Addr::from(<[u8; 4]>::try_from(&out[30..34]).unwrap());
        assert_eq!(
            out,
            tcp_syn((CLIENT, sport), (dst, 8080)),
            "output is one of the golden packets"
        );
        *seen.entry(dst).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 3, "every backend gets flows: {seen:?}");
}

#[test]
fn udp_datagram_to_cluster_ip_is_dnated_and_reply_is_reverse_nated() {
    let mut f = Fixture::new("fx-udp", &[(53, lb_common::proto::UDP, &[4])]);
    let (verdict, out) = f.run(&udp((CLIENT, 5000), (VIP, 53), b"query"));
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, udp((CLIENT, 5000), (backend(4), 8080), b"query"));
    assert_checksums_valid(&out);
    let (verdict, out) = f.run(&udp((backend(4), 8080), (CLIENT, 5000), b"answer"));
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, udp((VIP, 53), (CLIENT, 5000), b"answer"));
    assert_checksums_valid(&out);
}

#[test]
fn packet_to_a_non_service_address_passes_unmodified() {
    let mut f = Fixture::new("fx-pass", &[(80, lb_common::proto::TCP, &[1])]);
    for pkt in [
        tcp_syn((CLIENT, 40004), (Ipv4Addr::new(198, 18, 9, 9), 80)),
        tcp_syn((CLIENT, 40004), (VIP, 81)),
        udp((CLIENT, 40004), (VIP, 80), b"wrong protocol"),
    ] {
        let (verdict, out) = f.run(&pkt);
        assert_eq!(verdict, TC_ACT_OK);
        assert_eq!(out, pkt);
    }
    assert!(
        f.conntrack_entries().is_empty(),
        "no state for traffic we do not balance"
    );
}

#[test]
fn truncated_packet_passes_unmodified() {
    let mut f = Fixture::new("fx-trunc", &[(80, lb_common::proto::TCP, &[1])]);
    let full = tcp_syn((CLIENT, 40005), (VIP, 80));
    // Ethernet + IPv4 + only 10 of the 20 TCP header bytes: the checksum we would fix is missing.
    let truncated = &full[..14 + 20 + 10];
    let (verdict, out) = f.run(truncated);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, truncated);
    assert!(f.conntrack_entries().is_empty());
}

#[test]
fn frontend_without_backends_drops_new_flows() {
    let mut f = Fixture::new("fx-empty", &[(80, lb_common::proto::TCP, &[])]);
    let (verdict, _) = f.run(&tcp_syn((CLIENT, 40006), (VIP, 80)));
    assert_eq!(verdict, 2, "TC_ACT_SHOT");
    assert!(f.conntrack_entries().is_empty());
}

#[test]
fn counters_record_packets_bytes_and_new_flows_per_frontend_and_backend() {
    use aya::maps::PerCpuHashMap;
    use lb_common::TrafficCounters;

    let mut f = Fixture::new("fx-stats", &[(80, lb_common::proto::TCP, &[1])]);
    let syn = tcp_syn((CLIENT, 40007), (VIP, 80));
    let data = tcp((CLIENT, 40007), (VIP, 80), false, true, b"hello");
    let reply = tcp((backend(1), 8080), (CLIENT, 40007), false, true, b"world!");
    let pins = f.bpffs.path().to_path_buf();
    let read = |name: &str| -> Vec<TrafficCounters> {
        let data = MapData::from_pin(pins.join(name)).unwrap();
        let map: PerCpuHashMap<_, u32, TrafficCounters> =
            PerCpuHashMap::try_from(Map::PerCpuHashMap(data)).unwrap();
        map.iter()
            .map(|e| TrafficCounters::sum(e.unwrap().1.iter()))
            .collect()
    };
    // The agent writes no counter entry for a fresh id: the first packet creates it.
    assert!(read(map_names::FRONTEND_STATS).is_empty());
    assert!(read(map_names::BACKEND_STATS).is_empty());
    f.run(&syn);
    f.run(&data);
    f.run(&data);
    f.run(&reply);
    // A packet of another flow to a non-service address counts nowhere.
    f.run(&tcp_syn(
        (CLIENT, 40008),
        (Ipv4Addr::new(198, 18, 9, 9), 80),
    ));

    let expected = TrafficCounters {
        packets_in: 3,
        bytes_in: (syn.len() + 2 * data.len()) as u64,
        packets_out: 1,
        bytes_out: reply.len() as u64,
        new_flows: 1,
    };
    assert_eq!(
        read(map_names::FRONTEND_STATS),
        vec![expected],
        "one frontend"
    );
    assert_eq!(
        read(map_names::BACKEND_STATS),
        vec![expected],
        "one backend"
    );
}

fn dst_of(pkt: &[u8]) -> Ipv4Addr {
    Ipv4Addr::from(<[u8; 4]>::try_from(&pkt[30..34]).unwrap())
}

#[test]
fn syn_reusing_the_ports_of_a_closed_flow_is_balanced_anew() {
    // Backend 1 stays alive through frontend :81, so only the closing flag can tell that the
    // old entry must not be followed.
    let mut f = Fixture::new(
        "fx-reuse",
        &[
            (80, lb_common::proto::TCP, &[1]),
            (81, lb_common::proto::TCP, &[1]),
        ],
    );
    let (_, first) = f.run(&tcp_syn((CLIENT, 40010), (VIP, 80)));
    assert_eq!(dst_of(&first), backend(1));
    f.run(&tcp_with_fin(
        (CLIENT, 40010),
        (VIP, 80),
        false,
        true,
        true,
        b"",
    ));
    f.program(&[
        (80, lb_common::proto::TCP, &[2]),
        (81, lb_common::proto::TCP, &[1]),
    ]);
    // A retransmitted FIN of the old connection still follows its entry...
    let (_, fin) = f.run(&tcp_with_fin(
        (CLIENT, 40010),
        (VIP, 80),
        false,
        true,
        true,
        b"",
    ));
    assert_eq!(dst_of(&fin), backend(1));
    // ...but a new SYN on the same ports is a new connection.
    let (_, again) = f.run(&tcp_syn((CLIENT, 40010), (VIP, 80)));
    assert_eq!(again, tcp_syn((CLIENT, 40010), (backend(2), 8080)));
}

#[test]
fn retransmitted_syn_of_an_open_flow_keeps_its_backend() {
    let mut f = Fixture::new(
        "fx-resyn",
        &[(80, lb_common::proto::TCP, &[1, 2, 3, 4, 5, 6, 7, 8])],
    );
    let (_, first) = f.run(&tcp_syn((CLIENT, 40011), (VIP, 80)));
    for _ in 0..10 {
        let (_, again) = f.run(&tcp_syn((CLIENT, 40011), (VIP, 80)));
        assert_eq!(again, first);
    }
}

#[test]
fn evicted_reply_entry_is_recreated_by_the_next_forward_packet() {
    let mut f = Fixture::new("fx-evict", &[(80, lb_common::proto::TCP, &[1])]);
    f.run(&tcp_syn((CLIENT, 40012), (VIP, 80)));
    let entries = f.conntrack_entries();
    let (reply_key, _) = entries.iter().find(|(k, _)| k.dir == CT_DIR_REPLY).unwrap();
    let (fwd_key, fwd) = entries
        .iter()
        .find(|(k, _)| k.dir == CT_DIR_FORWARD)
        .unwrap();
    // What LRU eviction of the reply entry alone looks like; an old timestamp makes the next
    // forward packet do its once-a-second check now.
    f.conntrack.remove(reply_key).unwrap();
    f.conntrack
        .insert(
            fwd_key,
            CtValue {
                last_seen_ns: 0,
                ..*fwd
            },
            0,
        )
        .unwrap();
    f.run(&tcp((CLIENT, 40012), (VIP, 80), false, true, b"data"));
    assert_eq!(f.conntrack_entries().len(), 2, "reply entry recreated");
    let (_, out) = f.run(&tcp(
        (backend(1), 8080),
        (CLIENT, 40012),
        false,
        true,
        b"answer",
    ));
    assert_eq!(out, tcp((VIP, 80), (CLIENT, 40012), false, true, b"answer"));
}

#[test]
fn udp_without_checksum_keeps_a_zero_checksum() {
    let mut f = Fixture::new("fx-udp0", &[(53, lb_common::proto::UDP, &[4])]);
    let zero_csum = |mut p: Vec<u8>| {
        p[14 + 20 + 6] = 0;
        p[14 + 20 + 7] = 0;
        p
    };
    let (verdict, out) = f.run(&zero_csum(udp((CLIENT, 5001), (VIP, 53), b"q")));
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(
        out,
        zero_csum(udp((CLIENT, 5001), (backend(4), 8080), b"q"))
    );
}

/// Inserts four NOP option bytes into the IPv4 header (IHL 6) and fixes length and checksum.
fn with_ip_options(pkt: &[u8]) -> Vec<u8> {
    let mut out = pkt[..34].to_vec();
    out.extend_from_slice(&[1, 1, 1, 1]);
    out.extend_from_slice(&pkt[34..]);
    out[14] = 0x46;
    let total = u16::from_be_bytes([out[16], out[17]]) + 4;
    out[16..18].copy_from_slice(&total.to_be_bytes());
    out[24..26].copy_from_slice(&[0, 0]);
    let header = etherparse::Ipv4HeaderSlice::from_slice(&out[14..38])
        .unwrap()
        .to_header();
    out[24..26].copy_from_slice(&header.calc_header_checksum().to_be_bytes());
    out
}

#[test]
fn packet_with_ip_options_is_translated_through_ihl() {
    let mut f = Fixture::new("fx-opts", &[(80, lb_common::proto::TCP, &[1])]);
    let (verdict, out) = f.run(&with_ip_options(&tcp_syn((CLIENT, 40013), (VIP, 80))));
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(
        out,
        with_ip_options(&tcp_syn((CLIENT, 40013), (backend(1), 8080)))
    );
    assert_checksums_valid(&out);
}

#[test]
fn fragments_pass_unmodified() {
    let mut f = Fixture::new("fx-frag", &[(80, lb_common::proto::TCP, &[1])]);
    let with_frag = |more_fragments: bool, offset: u16| {
        let mut p = tcp_syn((CLIENT, 40014), (VIP, 80));
        let field = (if more_fragments { 0x2000 } else { 0 }) | offset;
        p[20..22].copy_from_slice(&field.to_be_bytes());
        p
    };
    for pkt in [
        with_frag(true, 0),
        with_frag(false, 100),
        with_frag(true, 7),
    ] {
        let (verdict, out) = f.run(&pkt);
        assert_eq!(verdict, TC_ACT_OK);
        assert_eq!(out, pkt, "fragments are passed on as they are");
    }
    assert!(f.conntrack_entries().is_empty());
}

#[test]
fn icmp_error_from_a_local_backend_reaches_the_client_with_the_cluster_ip() {
    let mut f = Fixture::new("fx-icmp", &[(53, lb_common::proto::UDP, &[1])]);
    let query = udp((CLIENT, 5353), (VIP, 53), b"query");
    let (_, sent) = f.run(&query);
    // The backend's stack answers "port unreachable" to the client, quoting what it got.
    let error = fixture::port_unreachable(
        (NODE_MAC, CLIENT_MAC),
        backend(1),
        CLIENT,
        &fixture::quote(&sent),
    );
    let (verdict, out) = f.run(&error);
    assert_eq!(verdict, TC_ACT_OK);
    // The client must get an error from the ClusterIP quoting its own datagram; the quoted UDP
    // checksum stays as the backend saw it.
    let mut want_quote = fixture::quote(&query);
    let at = want_quote.len() - 2;
    want_quote[at..].copy_from_slice(&sent[40..42]);
    let want = fixture::port_unreachable((NODE_MAC, CLIENT_MAC), VIP, CLIENT, &want_quote);
    assert_eq!(out, want, "byte-exact translated ICMP error");
    assert_checksums_valid(&out);
}

// ---- Services without endpoints: rejects -------------------------------------------------------

const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

/// One frontend on the VIP with no backend and the given flags.
fn empty_frontend(port: u16, proto: u8, flags: u16) -> lb_userspace::dataplane::Desired {
    [(
        FrontendAddr::internal(VIP, port, proto),
        DesiredFrontend {
            service_port: format!("test/empty:{port}"),
            backends: Vec::new(),
            flags,
            source_ranges: Vec::new(),
            ..Default::default()
        },
    )]
    .into_iter()
    .collect()
}

/// Keeps the calling thread on one CPU: the reject rate limit is per CPU, and BPF_PROG_TEST_RUN
/// runs the program on the caller's CPU.
fn pin_to_one_cpu() {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; the calls only read and write it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        assert_eq!(
            libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set),
            0
        );
        let cpu = (0..libc::CPU_SETSIZE as usize)
            .find(|&c| libc::CPU_ISSET(c, &set))
            .expect("an allowed CPU");
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(cpu, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set),
            0,
            "pin the test thread to CPU {cpu}"
        );
    }
}

#[test]
fn syn_to_a_service_without_endpoints_is_answered_with_a_reset_to_the_pod() {
    use lb_common::{service::SVC_FLAG_REJECT_EMPTY, stats::drop_reason};
    let mut f = Fixture(fixture::Fixture::new(
        "fx-rej-rst",
        &empty_frontend(80, lb_common::proto::TCP, SVC_FLAG_REJECT_EMPTY),
    ));
    let (verdict, out) = f.run(&tcp_syn((CLIENT, 40100), (VIP, 80)));
    assert_eq!(
        verdict, TC_ACT_REDIRECT,
        "sent back out of the pod's interface"
    );
    // RST+ACK from the ClusterIP, seq 0, ack = the SYN's seq (1000) + 1, no payload, back to
    // the pod's MAC.
    let ip = etherparse::Ipv4Header::new(
        20,
        64,
        etherparse::IpNumber::TCP,
        VIP.octets(),
        CLIENT.octets(),
    )
    .unwrap();
    let mut tcp = etherparse::TcpHeader::new(80, 40100, 0, 0);
    tcp.rst = true;
    tcp.ack = true;
    tcp.acknowledgment_number = 1001;
    let mut want = Vec::new();
    etherparse::PacketBuilder::ethernet2(NODE_MAC, CLIENT_MAC)
        .ip(etherparse::IpHeaders::Ipv4(ip, Default::default()))
        .tcp_header(tcp)
        .write(&mut want, &[])
        .unwrap();
    assert_eq!(out, want, "byte-exact RST");
    assert_checksums_valid(&out);
    assert_eq!(f.drops(drop_reason::REJECTED), 1);
    assert_eq!(f.drops(drop_reason::NO_BACKEND), 0);
    assert!(
        f.conntrack_entries().is_empty(),
        "a refused flow leaves no state"
    );
}

#[test]
fn udp_to_a_service_without_endpoints_gets_a_port_unreachable_quoting_it() {
    use lb_common::{service::SVC_FLAG_REJECT_EMPTY, stats::drop_reason};
    let mut f = Fixture(fixture::Fixture::new(
        "fx-rej-icmp",
        &empty_frontend(53, lb_common::proto::UDP, SVC_FLAG_REJECT_EMPTY),
    ));
    for (i, input) in [
        udp(
            (CLIENT, 40101),
            (VIP, 53),
            b"a datagram longer than the quote",
        ),
        // IP options are quoted too: the whole header as received.
        with_ip_options(&udp((CLIENT, 40102), (VIP, 53), b"q")),
    ]
    .into_iter()
    .enumerate()
    {
        let (verdict, out) = f.run(&input);
        assert_eq!(verdict, TC_ACT_REDIRECT, "case {i}");
        let want =
            fixture::port_unreachable((NODE_MAC, CLIENT_MAC), VIP, CLIENT, &fixture::quote(&input));
        assert_eq!(out, want, "case {i}: byte-exact ICMP port unreachable");
        assert_checksums_valid(&out);
    }
    assert_eq!(f.drops(drop_reason::REJECTED), 2);
    assert!(f.conntrack_entries().is_empty());
}

#[test]
fn only_connection_attempts_are_answered_other_segments_are_dropped() {
    use lb_common::{service::SVC_FLAG_REJECT_EMPTY, stats::drop_reason};
    let mut f = Fixture(fixture::Fixture::new(
        "fx-rej-ack",
        &empty_frontend(80, lb_common::proto::TCP, SVC_FLAG_REJECT_EMPTY),
    ));
    let (verdict, _) = f.run(&tcp((CLIENT, 40103), (VIP, 80), false, true, b"data"));
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(f.drops(drop_reason::NO_BACKEND), 1);
    assert_eq!(f.drops(drop_reason::REJECTED), 0);
}

#[test]
fn empty_frontend_without_the_reject_flag_drops() {
    // Endpoints exist elsewhere but none this traffic may use (internalTrafficPolicy=Local).
    use lb_common::stats::drop_reason;
    let mut f = Fixture(fixture::Fixture::new(
        "fx-rej-noflag",
        &empty_frontend(80, lb_common::proto::TCP, 0),
    ));
    let (verdict, _) = f.run(&tcp_syn((CLIENT, 40104), (VIP, 80)));
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(f.drops(drop_reason::NO_BACKEND), 1);
    assert_eq!(f.drops(drop_reason::REJECTED), 0);
}

#[test]
fn rejects_past_the_per_cpu_limit_are_dropped_and_counted() {
    use lb_common::{service::SVC_FLAG_REJECT_EMPTY, stats::drop_reason};
    pin_to_one_cpu();
    // No refill: this CPU may answer exactly `burst` times.
    let burst = 3;
    let mut f = Fixture(fixture::Fixture::with_reject_limit(
        "fx-rej-limit",
        &empty_frontend(80, lb_common::proto::TCP, SVC_FLAG_REJECT_EMPTY),
        lb_userspace::loader::RejectLimit { per_sec: 0, burst },
    ));
    let verdicts: Vec<u32> = (0..burst + 2)
        .map(|i| f.run(&tcp_syn((CLIENT, 40110 + i as u16), (VIP, 80))).0)
        .collect();
    assert_eq!(
        verdicts,
        vec![
            TC_ACT_REDIRECT,
            TC_ACT_REDIRECT,
            TC_ACT_REDIRECT,
            TC_ACT_SHOT,
            TC_ACT_SHOT
        ]
    );
    assert_eq!(f.drops(drop_reason::REJECTED), burst as u64);
    assert_eq!(f.drops(drop_reason::REJECT_RATE_LIMITED), 2);
}

// ---- loadBalancerSourceRanges ------------------------------------------------------------------

#[test]
fn lb_frontend_takes_new_flows_only_from_its_source_ranges() {
    use lb_common::{
        service::{SVC_FLAG_EXTERNAL_FE, SVC_FLAG_SOURCE_RANGES},
        stats::drop_reason,
    };
    let outsider = Ipv4Addr::new(198, 18, 9, 10);
    let d: lb_userspace::dataplane::Desired = [(
        FrontendAddr::internal(VIP, 443, lb_common::proto::TCP),
        DesiredFrontend {
            service_port: "test/lb:443".into(),
            backends: vec![BackendAddr {
                addr: backend(1),
                port: 8080,
                proto: lb_common::proto::TCP,
                local: true,
            }],
            flags: SVC_FLAG_EXTERNAL_FE | SVC_FLAG_SOURCE_RANGES,
            source_ranges: vec![
                "198.18.1.0/24".parse().unwrap(),
                "198.18.5.5/32".parse().unwrap(),
            ],
            ..Default::default()
        },
    )]
    .into_iter()
    .collect();
    let mut f = Fixture(fixture::Fixture::new("fx-srcrange", &d));

    let (verdict, out) = f.run(&tcp_syn((CLIENT, 40120), (VIP, 443)));
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(
        out,
        tcp_syn((CLIENT, 40120), (backend(1), 8080)),
        "inside: DNATed"
    );
    assert_eq!(f.conntrack_entries().len(), 2);

    let (verdict, _) = f.run(&tcp_syn((outsider, 40121), (VIP, 443)));
    assert_eq!(verdict, TC_ACT_SHOT, "outside: dropped");
    assert_eq!(f.drops(drop_reason::SOURCE_RANGE), 1);
    assert_eq!(
        f.conntrack_entries().len(),
        2,
        "no state for the refused flow"
    );

    // A /32 entry matches exactly that address.
    let (verdict, _) = f.run(&tcp_syn((Ipv4Addr::new(198, 18, 5, 5), 40122), (VIP, 443)));
    assert_eq!(verdict, TC_ACT_OK);
    let (verdict, _) = f.run(&tcp_syn((Ipv4Addr::new(198, 18, 5, 6), 40123), (VIP, 443)));
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(f.drops(drop_reason::SOURCE_RANGE), 2);

    // Clearing the list opens the frontend to everyone.
    let mut open = d.clone();
    for fe in open.values_mut() {
        fe.flags &= !SVC_FLAG_SOURCE_RANGES;
        fe.source_ranges.clear();
    }
    f.apply(&open);
    let (verdict, _) = f.run(&tcp_syn((outsider, 40124), (VIP, 443)));
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(f.drops(drop_reason::SOURCE_RANGE), 2);
}
