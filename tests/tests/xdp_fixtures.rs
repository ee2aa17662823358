//! Packet fixtures for the XDP program on node uplinks (external traffic), run through
//! BPF_PROG_TEST_RUN as if each packet arrived on a real interface of a namespace the test
//! builds, so the program's FIB lookups see real routes and neighbours: input bytes in; verdict,
//! output bytes (MACs included) and conntrack side effects out.
use std::net::Ipv4Addr;

use etherparse::{IpHeaders, Ipv4Header, Ipv4Options, PacketBuilder};
use fixture::{assert_checksums_valid, port_unreachable, quote, tcp_packet, udp_packet, Fixture};
use lb_common::{
    conntrack::{
        CT_DIR_FORWARD, CT_DIR_REPLY, CT_FLAG_EXTERNAL, CT_FLAG_ROUTE_REPLY, CT_FLAG_SNAT,
    },
    ipv4_to_net, net_to_port, port_to_net,
    proto::{TCP, UDP},
    service::{SVC_FLAG_EXTERNAL_FE, SVC_FLAG_MASQUERADE},
    stats::drop_reason,
    CtKey, CtValue,
};
use lb_tests::Netns;
use lb_userspace::dataplane::{BackendAddr, Desired, DesiredFrontend, FrontendAddr};

mod fixture;

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

/// This node's address on its uplink: the NodePort address.
const NODE: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 1);
/// An external client on the same link.
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 10);
const LOCAL_BACKEND: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 1);
const REMOTE_BACKEND: Ipv4Addr = Ipv4Addr::new(198, 18, 3, 1);
const NODEPORT: u16 = 30080;

const UPLINK_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x64, 0x01];
const NODE2_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x64, 0x02];
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x64, 0x0a];

/// The namespace the packets "arrive" in: an uplink `up0` (a veth whose peer stays in the same
/// namespace) with [`NODE`]/24, static neighbours for [`NODE2`] and [`CLIENT`], and a route to
/// the other node's pods via 198.18.100.2 (the other node).
struct Uplink {
    ns: Netns,
    ifindex: u32,
}

impl Uplink {
    fn new(tag: &str) -> Uplink {
        let ns = Netns::new(tag).expect("create the fixture namespace");
        // A node forwards; the FIB helper refuses to answer for an interface that does not.
        ns.sysctl("net.ipv4.ip_forward", "1").unwrap();
        let mac = |m: [u8; 6]| {
            m.iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(":")
        };
        for args in [
            vec!["link", "add", "up0", "type", "veth", "peer", "name", "up0p"],
            vec!["link", "set", "up0", "address", &mac(UPLINK_MAC)],
            vec!["addr", "add", "198.18.100.1/24", "dev", "up0"],
            vec!["link", "set", "up0p", "up"],
            vec!["link", "set", "up0", "up"],
            vec![
                "neigh",
                "replace",
                "198.18.100.2",
                "lladdr",
                &mac(NODE2_MAC),
                "dev",
                "up0",
                "nud",
                "permanent",
            ],
            vec![
                "neigh",
                "replace",
                "198.18.100.10",
                "lladdr",
                &mac(CLIENT_MAC),
                "dev",
                "up0",
                "nud",
                "permanent",
            ],
            vec!["route", "add", "198.18.3.0/24", "via", "198.18.100.2"],
        ] {
            ns.ip(&args).unwrap();
        }
        let ifindex = ns
            .run(|| lb_userspace::attach::ifindex("up0"))
            .expect("up0 exists");
        Uplink { ns, ifindex }
    }

    fn run(&self, f: &mut Fixture, input: &[u8]) -> (u32, Vec<u8>) {
        self.ns.run(|| f.run_xdp(input, self.ifindex))
    }
}

fn backend(addr: Ipv4Addr, proto: u8, local: bool) -> BackendAddr {
    BackendAddr {
        addr,
        port: 8080,
        proto,
        local,
    }
}

/// One NodePort frontend on [`NODE`] for traffic from outside, with these backends and flags.
fn nodeport(port: u16, proto: u8, backends: Vec<BackendAddr>, flags: u16) -> Desired {
    [(
        FrontendAddr::external(NODE, port, proto),
        DesiredFrontend {
            service_port: format!("test/np:{port}"),
            backends,
            flags: SVC_FLAG_EXTERNAL_FE | flags,
            ..Default::default()
        },
    )]
    .into_iter()
    .collect()
}

fn syn(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), macs: ([u8; 6], [u8; 6])) -> Vec<u8> {
    tcp_packet(macs, src, dst, "S", b"")
}

fn find(entries: &[(CtKey, CtValue)], dir: u8) -> (CtKey, CtValue) {
    *entries
        .iter()
        .find(|(k, _)| k.dir == dir)
        .unwrap_or_else(|| panic!("no entry with dir {dir}: {entries:?}"))
}

#[test]
fn nodeport_to_a_local_backend_is_dnated_and_handed_to_the_stack() {
    let up = Uplink::new("xfx-local");
    let mut f = Fixture::new(
        "xfx-local",
        &nodeport(
            NODEPORT,
            TCP,
            vec![backend(LOCAL_BACKEND, TCP, true)],
            SVC_FLAG_MASQUERADE,
        ),
    );
    let macs = (CLIENT_MAC, UPLINK_MAC);
    let (verdict, out) = up.run(&mut f, &syn((CLIENT, 40000), (NODE, NODEPORT), macs));
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(
        out,
        syn((CLIENT, 40000), (LOCAL_BACKEND, 8080), macs),
        "DNAT only: the client's address is kept for a local backend"
    );
    assert_checksums_valid(&out);
    let entries = f.conntrack_entries();
    assert_eq!(entries.len(), 2, "{entries:?}");
    let (_, fwd) = find(&entries, CT_DIR_FORWARD);
    assert_eq!(fwd.flags, CT_FLAG_EXTERNAL | CT_FLAG_ROUTE_REPLY);
    let (rk, rv) = find(&entries, CT_DIR_REPLY);
    assert_eq!(
        (rk.src_addr, rk.dst_addr, rv.nat_addr, rv.nat_port),
        (
            ipv4_to_net(LOCAL_BACKEND),
            ipv4_to_net(CLIENT),
            ipv4_to_net(NODE),
            port_to_net(NODEPORT)
        ),
        "the local backend's reply (tc on its interface) gets the NodePort back"
    );
}

/// Sends a SYN from `client` to the NodePort with a remote backend and returns the SNAT port
/// the program allocated, after checking the output packet byte for byte.
fn snat_syn(up: &Uplink, f: &mut Fixture, client: (Ipv4Addr, u16)) -> u16 {
    let (verdict, out) = up.run(f, &syn(client, (NODE, NODEPORT), (CLIENT_MAC, UPLINK_MAC)));
    assert_eq!(verdict, XDP_TX, "sent back out of the uplink it came in on");
    let entries = f.conntrack_entries();
    let (_, fwd) = entries
        .iter()
        .find(|(k, _)| {
            k.dir == CT_DIR_FORWARD
                && k.src_addr == ipv4_to_net(client.0)
                && k.src_port == port_to_net(client.1)
        })
        .expect("forward entry of the flow");
    assert_eq!(
        fwd.flags,
        CT_FLAG_SNAT | CT_FLAG_EXTERNAL | CT_FLAG_ROUTE_REPLY
    );
    assert_eq!(
        fwd.peer_addr,
        ipv4_to_net(NODE),
        "SNAT to the node's address"
    );
    let snat_port = net_to_port(fwd.peer_port);
    assert!(
        (lb_common::conntrack::SNAT_PORT_MIN..=lb_common::conntrack::SNAT_PORT_MAX)
            .contains(&snat_port),
        "SNAT port {snat_port} in range"
    );
    assert_eq!(
        out,
        syn(
            (NODE, snat_port),
            (REMOTE_BACKEND, 8080),
            (UPLINK_MAC, NODE2_MAC)
        ),
        "DNAT + SNAT, MACs of the next hop towards the other node"
    );
    assert_checksums_valid(&out);
    snat_port
}

fn remote_nodeport(proto: u8) -> Desired {
    nodeport(
        NODEPORT,
        proto,
        vec![backend(REMOTE_BACKEND, proto, false)],
        SVC_FLAG_MASQUERADE,
    )
}

#[test]
fn nodeport_to_a_remote_backend_is_snated_and_transmitted() {
    let up = Uplink::new("xfx-snat");
    let mut f = Fixture::new("xfx-snat", &remote_nodeport(TCP));
    let snat_port = snat_syn(&up, &mut f, (CLIENT, 40001));
    let entries = f.conntrack_entries();
    assert_eq!(entries.len(), 2, "{entries:?}");
    let (rk, rv) = find(&entries, CT_DIR_REPLY);
    assert_eq!(
        (rk.src_addr, rk.src_port, rk.dst_addr, rk.dst_port),
        (
            ipv4_to_net(REMOTE_BACKEND),
            port_to_net(8080),
            ipv4_to_net(NODE),
            port_to_net(snat_port)
        ),
        "reply entry keyed by what the backend sends back"
    );
    assert_eq!(
        (rv.nat_addr, rv.nat_port, rv.peer_addr, rv.peer_port),
        (
            ipv4_to_net(NODE),
            port_to_net(NODEPORT),
            ipv4_to_net(CLIENT),
            port_to_net(40001)
        ),
        "reply entry restores the NodePort as source and the client as destination"
    );
    // The flow's next packet takes the same translation from conntrack.
    let (verdict, out) = up.run(
        &mut f,
        &tcp_packet(
            (CLIENT_MAC, UPLINK_MAC),
            (CLIENT, 40001),
            (NODE, NODEPORT),
            "A",
            b"hello",
        ),
    );
    assert_eq!(verdict, XDP_TX);
    assert_eq!(
        out,
        tcp_packet(
            (UPLINK_MAC, NODE2_MAC),
            (NODE, snat_port),
            (REMOTE_BACKEND, 8080),
            "A",
            b"hello"
        )
    );
    assert_eq!(f.conntrack_entries().len(), 2);
}

#[test]
fn reply_from_a_remote_backend_goes_back_to_the_client_from_the_nodeport() {
    let up = Uplink::new("xfx-reply");
    let mut f = Fixture::new("xfx-reply", &remote_nodeport(TCP));
    let snat_port = snat_syn(&up, &mut f, (CLIENT, 40002));
    let synack = tcp_packet(
        (NODE2_MAC, UPLINK_MAC),
        (REMOTE_BACKEND, 8080),
        (NODE, snat_port),
        "SA",
        b"",
    );
    let (verdict, out) = up.run(&mut f, &synack);
    assert_eq!(verdict, XDP_TX);
    assert_eq!(
        out,
        tcp_packet(
            (UPLINK_MAC, CLIENT_MAC),
            (NODE, NODEPORT),
            (CLIENT, 40002),
            "SA",
            b""
        ),
        "the client sees its own flow, from the NodePort"
    );
    assert_checksums_valid(&out);
}

#[test]
fn local_policy_without_a_local_backend_drops() {
    let up = Uplink::new("xfx-local-none");
    // eTP=Local on a node without local endpoints: the external set is empty, no masquerade,
    // and endpoints exist elsewhere (no reject flag).
    let mut f = Fixture::new("xfx-local-none", &nodeport(NODEPORT, TCP, vec![], 0));
    let (verdict, _) = up.run(
        &mut f,
        &syn((CLIENT, 40003), (NODE, NODEPORT), (CLIENT_MAC, UPLINK_MAC)),
    );
    assert_eq!(verdict, XDP_DROP);
    assert_eq!(f.drops(drop_reason::NO_LOCAL_BACKEND), 1);
    assert!(f.conntrack_entries().is_empty());
}

#[test]
fn traffic_to_no_frontend_passes_unmodified() {
    let up = Uplink::new("xfx-pass");
    let mut f = Fixture::new("xfx-pass", &remote_nodeport(TCP));
    for input in [
        // The node's own port 22, another port of the same address.
        syn((CLIENT, 40004), (NODE, 22), (CLIENT_MAC, UPLINK_MAC)),
        // The NodePort, but UDP.
        udp_packet(
            (CLIENT_MAC, UPLINK_MAC),
            (CLIENT, 40004),
            (NODE, NODEPORT),
            b"x",
        ),
    ] {
        let (verdict, out) = up.run(&mut f, &input);
        assert_eq!(verdict, XDP_PASS);
        assert_eq!(out, input);
    }
    assert!(f.conntrack_entries().is_empty());
}

/// A TCP SYN whose IPv4 header carries 4 bytes of options (three NOPs and an end of list).
fn syn_with_options(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)) -> Vec<u8> {
    let mut ip = Ipv4Header::new(
        0,
        64,
        etherparse::IpNumber::TCP,
        src.0.octets(),
        dst.0.octets(),
    )
    .unwrap();
    ip.options = Ipv4Options::try_from(&[1u8, 1, 1, 0][..]).unwrap();
    let mut v = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, UPLINK_MAC)
        .ip(IpHeaders::Ipv4(ip, Default::default()))
        .tcp(src.1, dst.1, 1000, 64240)
        .syn()
        .write(&mut v, b"")
        .unwrap();
    v
}

#[test]
fn ip_options_are_kept_and_the_packet_translated() {
    let up = Uplink::new("xfx-opts");
    let mut f = Fixture::new(
        "xfx-opts",
        &nodeport(
            NODEPORT,
            TCP,
            vec![backend(LOCAL_BACKEND, TCP, true)],
            SVC_FLAG_MASQUERADE,
        ),
    );
    let input = syn_with_options((CLIENT, 40005), (NODE, NODEPORT));
    assert_eq!(input[14] & 0x0f, 6, "IHL 6: the header has options");
    let (verdict, out) = up.run(&mut f, &input);
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(
        out,
        syn_with_options((CLIENT, 40005), (LOCAL_BACKEND, 8080))
    );
    assert_checksums_valid(&out);
}

#[test]
fn fragments_pass_unmodified_and_leave_no_state() {
    let up = Uplink::new("xfx-frag");
    let mut f = Fixture::new(
        "xfx-frag",
        &nodeport(
            NODEPORT,
            UDP,
            vec![backend(LOCAL_BACKEND, UDP, true)],
            SVC_FLAG_MASQUERADE,
        ),
    );
    // The first fragment of a UDP datagram to the NodePort: MF set, offset 0, ports present.
    let mut ip = Ipv4Header::new(
        0,
        64,
        etherparse::IpNumber::UDP,
        CLIENT.octets(),
        NODE.octets(),
    )
    .unwrap();
    ip.more_fragments = true;
    let mut first = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, UPLINK_MAC)
        .ip(IpHeaders::Ipv4(ip, Default::default()))
        .udp(40006, NODEPORT)
        .write(&mut first, &[7u8; 64])
        .unwrap();
    let (verdict, out) = up.run(&mut f, &first);
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(out, first);
    assert!(f.conntrack_entries().is_empty());
}

#[test]
fn icmp_error_about_a_snated_flow_reaches_the_client_translated() {
    let up = Uplink::new("xfx-icmp");
    let mut f = Fixture::new("xfx-icmp", &remote_nodeport(UDP));
    let client_pkt = udp_packet(
        (CLIENT_MAC, UPLINK_MAC),
        (CLIENT, 5000),
        (NODE, NODEPORT),
        b"ping",
    );
    let (verdict, sent) = up.run(&mut f, &client_pkt);
    assert_eq!(verdict, XDP_TX);
    let snat_port = u16::from_be_bytes([sent[34], sent[35]]);
    // The backend's node answers "port unreachable" to the SNAT address, quoting what it got.
    let error = port_unreachable((NODE2_MAC, UPLINK_MAC), REMOTE_BACKEND, NODE, &quote(&sent));
    let (verdict, out) = up.run(&mut f, &error);
    assert_eq!(verdict, XDP_TX, "sent on to the client from here");
    // What the client must get: an error from the NodePort address quoting its own datagram.
    // The quoted UDP checksum is left as the backend saw it (nothing checks it).
    let mut want_quote = quote(&client_pkt);
    let csum_at = want_quote.len() - 2;
    want_quote[csum_at..].copy_from_slice(&sent[40..42]);
    let want = port_unreachable((UPLINK_MAC, CLIENT_MAC), NODE, CLIENT, &want_quote);
    assert_eq!(out, want, "byte-exact translated ICMP error");
    assert_checksums_valid(&out);
    assert_eq!(
        snat_port,
        net_to_port(find(&f.conntrack_entries(), CT_DIR_FORWARD).1.peer_port)
    );
}

#[test]
fn many_clients_sharing_a_source_port_get_distinct_snat_ports() {
    let up = Uplink::new("xfx-ports");
    let mut f = Fixture::new("xfx-ports", &remote_nodeport(TCP));
    let mut ports = std::collections::BTreeSet::new();
    for i in 0..200u32 {
        let client = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 101, 0)) + i);
        let (verdict, out) = up.run(
            &mut f,
            &syn((client, 40000), (NODE, NODEPORT), (CLIENT_MAC, UPLINK_MAC)),
        );
        assert_eq!(verdict, XDP_TX, "client {client}");
        ports.insert(u16::from_be_bytes([out[34], out[35]]));
    }
    assert_eq!(ports.len(), 200, "every flow its own SNAT port");
    assert_eq!(f.conntrack_entries().len(), 400);
}

// ---- Services without endpoints, source ranges -------------------------------------------------

#[test]
fn nodeport_without_endpoints_answers_a_syn_with_a_reset_out_of_the_uplink() {
    use lb_common::service::SVC_FLAG_REJECT_EMPTY;
    let up = Uplink::new("xfx-rej-rst");
    let mut f = Fixture::new(
        "xfx-rej-rst",
        &nodeport(
            NODEPORT,
            TCP,
            vec![],
            SVC_FLAG_MASQUERADE | SVC_FLAG_REJECT_EMPTY,
        ),
    );
    let (verdict, out) = up.run(
        &mut f,
        &syn((CLIENT, 40200), (NODE, NODEPORT), (CLIENT_MAC, UPLINK_MAC)),
    );
    assert_eq!(verdict, XDP_TX, "straight back out of the uplink");
    let ip = Ipv4Header::new(
        20,
        64,
        etherparse::IpNumber::TCP,
        NODE.octets(),
        CLIENT.octets(),
    )
    .unwrap();
    let mut tcp = etherparse::TcpHeader::new(NODEPORT, 40200, 0, 0);
    tcp.rst = true;
    tcp.ack = true;
    tcp.acknowledgment_number = 1001;
    let mut want = Vec::new();
    PacketBuilder::ethernet2(UPLINK_MAC, CLIENT_MAC)
        .ip(IpHeaders::Ipv4(ip, Default::default()))
        .tcp_header(tcp)
        .write(&mut want, &[])
        .unwrap();
    assert_eq!(
        out, want,
        "byte-exact RST from the NodePort to the client's MAC"
    );
    assert_checksums_valid(&out);
    assert_eq!(f.drops(drop_reason::REJECTED), 1);
    assert!(f.conntrack_entries().is_empty());
}

#[test]
fn udp_nodeport_without_endpoints_answers_with_a_port_unreachable() {
    use lb_common::service::SVC_FLAG_REJECT_EMPTY;
    let up = Uplink::new("xfx-rej-icmp");
    let mut f = Fixture::new(
        "xfx-rej-icmp",
        &nodeport(
            NODEPORT,
            UDP,
            vec![],
            SVC_FLAG_MASQUERADE | SVC_FLAG_REJECT_EMPTY,
        ),
    );
    let input = udp_packet(
        (CLIENT_MAC, UPLINK_MAC),
        (CLIENT, 40201),
        (NODE, NODEPORT),
        b"some question",
    );
    let (verdict, out) = up.run(&mut f, &input);
    assert_eq!(verdict, XDP_TX);
    let want = port_unreachable((UPLINK_MAC, CLIENT_MAC), NODE, CLIENT, &quote(&input));
    assert_eq!(out, want, "byte-exact ICMP port unreachable");
    assert_checksums_valid(&out);
    assert_eq!(f.drops(drop_reason::REJECTED), 1);
}

#[test]
fn lb_ip_drops_new_flows_from_outside_its_source_ranges() {
    use lb_common::service::SVC_FLAG_SOURCE_RANGES;
    let up = Uplink::new("xfx-srcrange");
    let d: Desired = [(
        FrontendAddr::external(NODE, 443, TCP),
        DesiredFrontend {
            service_port: "test/lb:443".into(),
            backends: vec![backend(LOCAL_BACKEND, TCP, true)],
            flags: SVC_FLAG_EXTERNAL_FE | SVC_FLAG_SOURCE_RANGES,
            source_ranges: vec!["198.18.100.0/28".parse().unwrap()],
            ..Default::default()
        },
    )]
    .into_iter()
    .collect();
    let mut f = Fixture::new("xfx-srcrange", &d);
    let macs = (CLIENT_MAC, UPLINK_MAC);
    // 198.18.100.10 is inside 198.18.100.0/28.
    let (verdict, out) = up.run(&mut f, &syn((CLIENT, 40202), (NODE, 443), macs));
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(out, syn((CLIENT, 40202), (LOCAL_BACKEND, 8080), macs));
    // 198.18.100.20 is not.
    let outsider = Ipv4Addr::new(198, 18, 100, 20);
    let input = syn((outsider, 40203), (NODE, 443), macs);
    let (verdict, _) = up.run(&mut f, &input);
    assert_eq!(verdict, XDP_DROP);
    assert_eq!(f.drops(drop_reason::SOURCE_RANGE), 1);
    assert_eq!(
        f.conntrack_entries().len(),
        2,
        "only the allowed flow's entries"
    );
}
