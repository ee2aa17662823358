//! The baselines: kube-proxy's rule layouts for a [`Scenario`], in its iptables mode (loaded with
//! `iptables-restore`) and its nftables mode (loaded with `nft -f`), written the way kube-proxy
//! structures them so that a packet walks the same chains and maps it would.
//!
//! iptables mode (nat table): PREROUTING and OUTPUT jump to KUBE-SERVICES, which has one rule per
//! ClusterIP:port jumping to that port's KUBE-SVC-<hash> chain and, last, a `--dst-type LOCAL`
//! jump to KUBE-NODEPORTS. A KUBE-SVC chain marks traffic from outside the cluster CIDR for
//! masquerading, then picks an endpoint with `statistic --mode random --probability 1/(n-i)`
//! rules jumping to KUBE-SEP-<hash> chains, which DNAT. NodePorts go through KUBE-EXT-<hash>
//! (mark for masquerade, then the KUBE-SVC chain). KUBE-POSTROUTING masquerades marked packets.
//!
//! nftables mode (table `ip kube-proxy`): the `services` chain looks up the verdict map
//! `service-ips` keyed by `daddr . l4proto . dport`, then, for local destinations, the
//! `service-nodeports` map keyed by `l4proto . dport`. A service chain picks an endpoint chain with
//! `numgen random mod n vmap`; endpoint chains DNAT.
//!
//! Chain names carry a hash of the service port name as kube-proxy's do (its hash is a truncated
//! SHA-256 in base32; an FNV hash is used here, which changes nothing for the packet path).
//! The filter-table rules kube-proxy adds (KUBE-FORWARD, reject of Services without endpoints,
//! firewall) are not generated: no benchmarked packet would be affected by them.
use std::fmt::Write as _;

use crate::scenario::{ServicePort, CLUSTER_CIDR, TARGET_PORT};

/// 16 characters of base32 over a 64-bit FNV-1a hash of `s`.
fn hash(s: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::with_capacity(16);
    let mut x = h as u128 | ((h.rotate_left(17) as u128) << 64);
    for _ in 0..16 {
        out.push(ALPHABET[(x & 31) as usize] as char);
        x >>= 5;
    }
    out
}

fn svc_chain(p: &ServicePort) -> String {
    format!("KUBE-SVC-{}", hash(&p.name))
}

fn ext_chain(p: &ServicePort) -> String {
    format!("KUBE-EXT-{}", hash(&p.name))
}

fn sep_chain(p: &ServicePort, ep: std::net::Ipv4Addr) -> String {
    format!("KUBE-SEP-{}", hash(&format!("{}{ep}", p.name)))
}

/// The chain declarations and rules of one service port's own chains (KUBE-SVC, KUBE-SEP-*,
/// KUBE-EXT), and its rules in KUBE-SERVICES and KUBE-NODEPORTS.
#[derive(Default)]
struct IptablesText {
    chains: String,
    rules: String,
    services: String,
    nodeports: String,
}

fn iptables_port(out: &mut IptablesText, p: &ServicePort) {
    let svc = svc_chain(p);
    let _ = writeln!(out.chains, ":{svc} - [0:0]");
    let _ = writeln!(
        out.services,
        "-A KUBE-SERVICES -m comment --comment \"{n} cluster IP\" -m {proto} -p {proto} -d {ip}/32 --dport 80 -j {svc}",
        n = p.name,
        proto = p.proto,
        ip = p.cluster_ip
    );
    let _ = writeln!(
        out.rules,
        "-A {svc} -m comment --comment \"{n} cluster IP\" -m {proto} -p {proto} -d {ip}/32 --dport 80 ! -s {CLUSTER_CIDR} -j KUBE-MARK-MASQ",
        n = p.name,
        proto = p.proto,
        ip = p.cluster_ip
    );
    let n = p.endpoints.len();
    for (i, ep) in p.endpoints.iter().enumerate() {
        let sep = sep_chain(p, *ep);
        let _ = writeln!(out.chains, ":{sep} - [0:0]");
        let left = n - i;
        if left > 1 {
            let _ = writeln!(
                out.rules,
                "-A {svc} -m comment --comment \"{name} -> {ep}:{TARGET_PORT}\" -m statistic --mode random --probability {:.10} -j {sep}",
                1.0 / left as f64,
                name = p.name
            );
        } else {
            let _ = writeln!(
                out.rules,
                "-A {svc} -m comment --comment \"{name} -> {ep}:{TARGET_PORT}\" -j {sep}",
                name = p.name
            );
        }
        let _ = writeln!(
            out.rules,
            "-A {sep} -m comment --comment \"{name}\" -s {ep}/32 -j KUBE-MARK-MASQ\n-A {sep} -m comment --comment \"{name}\" -m {proto} -p {proto} -j DNAT --to-destination {ep}:{TARGET_PORT}",
            name = p.name,
            proto = p.proto
        );
    }
    if let Some(np) = p.node_port {
        let ext = ext_chain(p);
        let _ = writeln!(out.chains, ":{ext} - [0:0]");
        let _ = writeln!(
            out.nodeports,
            "-A KUBE-NODEPORTS -m comment --comment \"{name}\" -m {proto} -p {proto} --dport {np} -j {ext}",
            name = p.name,
            proto = p.proto
        );
        let _ = writeln!(
            out.rules,
            "-A {ext} -m comment --comment \"masquerade traffic for {name} external destinations\" -j KUBE-MARK-MASQ\n-A {ext} -j {svc}",
            name = p.name
        );
    }
}

/// The chains kube-proxy owns at the top of the nat table and rewrites in every sync.
const IPTABLES_TOP_CHAINS: &str = ":KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n\
     :KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n";

const IPTABLES_TOP_RULES: &str = "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
     -A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n\
     -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n\
     -A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n";

const IPTABLES_NODEPORTS_JUMP: &str = "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n";

/// The nat table in `iptables-restore` format (a full sync: every chain flushed and rewritten).
pub fn iptables_rules(ports: &[ServicePort]) -> String {
    let mut t = IptablesText::default();
    for p in ports {
        iptables_port(&mut t, p);
    }
    format!(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n\
         {IPTABLES_TOP_CHAINS}{chains}\
         -A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
         {IPTABLES_TOP_RULES}{services}{IPTABLES_NODEPORTS_JUMP}{nodeports}{rules}COMMIT\n",
        chains = t.chains,
        services = t.services,
        nodeports = t.nodeports,
        rules = t.rules,
    )
}

/// The input of kube-proxy's partial sync (`iptables-restore --noflush`, the default since
/// Kubernetes 1.27) after one service port's endpoints changed from `old` to `new` (`ports` is
/// the whole new state): the top-level chains are flushed and rewritten for every Service, the
/// changed port's chains are declared (flushed) and rewritten, endpoint chains that went away are
/// declared and deleted; every other Service's chains are left as they are.
pub fn iptables_partial(ports: &[ServicePort], old: &ServicePort, new: &ServicePort) -> String {
    let mut top = IptablesText::default();
    for p in ports {
        iptables_port(&mut top, p);
    }
    let mut changed = IptablesText::default();
    iptables_port(&mut changed, new);
    let mut stale = String::new();
    for ep in &old.endpoints {
        if !new.endpoints.contains(ep) {
            let sep = sep_chain(old, *ep);
            let _ = writeln!(changed.chains, ":{sep} - [0:0]");
            let _ = writeln!(stale, "-X {sep}");
        }
    }
    format!(
        "*nat\n{IPTABLES_TOP_CHAINS}{chains}{IPTABLES_TOP_RULES}{services}{IPTABLES_NODEPORTS_JUMP}\
         {nodeports}{rules}{stale}COMMIT\n",
        chains = changed.chains,
        services = top.services,
        nodeports = top.nodeports,
        rules = changed.rules,
    )
}

/// `script` (one command per line, every object defined on a line before its first use) cut
/// into pieces of at most `max_lines` lines, to be sent as consecutive transactions: the
/// ruleset they leave is the one the whole script leaves.
pub fn split_lines(script: &str, max_lines: usize) -> Vec<String> {
    let lines: Vec<&str> = script.lines().collect();
    lines
        .chunks(max_lines.max(1))
        .map(|c| {
            let mut s = c.join("\n");
            s.push('\n');
            s
        })
        .collect()
}

fn nft_svc(p: &ServicePort) -> String {
    format!(
        "service-{}-{}",
        hash(&p.name),
        p.name.replace(['/', ':'], "-")
    )
}

fn nft_ext(p: &ServicePort) -> String {
    format!(
        "external-{}-{}",
        hash(&p.name),
        p.name.replace(['/', ':'], "-")
    )
}

fn nft_ep(p: &ServicePort, ep: std::net::Ipv4Addr) -> String {
    format!(
        "endpoint-{}-{}-{ep}",
        hash(&format!("{}{ep}", p.name)),
        p.name.replace(['/', ':'], "-")
    )
}

const NFT_TABLE: &str = "ip kube-proxy";

/// The commands that (re)build one service port's service chain and endpoint chains, as
/// kube-proxy's nftables mode writes them.
fn nft_service(out: &mut String, p: &ServicePort) {
    let svc = nft_svc(p);
    let _ = writeln!(out, "add chain {NFT_TABLE} {svc}");
    for ep in &p.endpoints {
        let chain = nft_ep(p, *ep);
        let _ = writeln!(
            out,
            "add chain {NFT_TABLE} {chain}\nadd rule {NFT_TABLE} {chain} ip saddr {ep} jump mark-for-masquerade\nadd rule {NFT_TABLE} {chain} meta l4proto {proto} dnat to {ep}:{TARGET_PORT}",
            proto = p.proto
        );
    }
    let _ = writeln!(
        out,
        "add rule {NFT_TABLE} {svc} ip daddr {ip} {proto} dport 80 ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade",
        ip = p.cluster_ip,
        proto = p.proto
    );
    let vmap: Vec<String> = p
        .endpoints
        .iter()
        .enumerate()
        .map(|(i, ep)| format!("{i} : goto {}", nft_ep(p, *ep)))
        .collect();
    let _ = writeln!(
        out,
        "add rule {NFT_TABLE} {svc} numgen random mod {} vmap {{ {} }}",
        p.endpoints.len(),
        vmap.join(", ")
    );
}

/// The whole `ip kube-proxy` table for `nft -f`.
pub fn nft_rules(ports: &[ServicePort]) -> String {
    let mut out = String::new();
    let _ = write!(
        out,
        "add table {NFT_TABLE}\n\
         add chain {NFT_TABLE} nat-prerouting {{ type nat hook prerouting priority -100 ; }}\n\
         add chain {NFT_TABLE} nat-output {{ type nat hook output priority -100 ; }}\n\
         add chain {NFT_TABLE} nat-postrouting {{ type nat hook postrouting priority 100 ; }}\n\
         add chain {NFT_TABLE} mark-for-masquerade\n\
         add rule {NFT_TABLE} mark-for-masquerade mark set mark or 0x4000\n\
         add chain {NFT_TABLE} masquerading\n\
         add rule {NFT_TABLE} masquerading mark and 0x4000 == 0 return\n\
         add rule {NFT_TABLE} masquerading mark set mark xor 0x4000\n\
         add rule {NFT_TABLE} masquerading masquerade fully-random\n\
         add chain {NFT_TABLE} services\n\
         add chain {NFT_TABLE} nodeports\n\
         add map {NFT_TABLE} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; }}\n\
         add map {NFT_TABLE} service-nodeports {{ type inet_proto . inet_service : verdict ; }}\n"
    );
    for p in ports {
        nft_service(&mut out, p);
        if p.node_port.is_some() {
            let ext = nft_ext(p);
            let _ = writeln!(
                out,
                "add chain {NFT_TABLE} {ext}\nadd rule {NFT_TABLE} {ext} jump mark-for-masquerade\nadd rule {NFT_TABLE} {ext} goto {}",
                nft_svc(p)
            );
        }
    }
    // Map elements after the chains they jump to.
    let mut ips = Vec::new();
    let mut nps = Vec::new();
    for p in ports {
        ips.push(format!(
            "{} . {} . 80 : goto {}",
            p.cluster_ip,
            p.proto,
            nft_svc(p)
        ));
        if let Some(np) = p.node_port {
            nps.push(format!("{} . {np} : goto {}", p.proto, nft_ext(p)));
        }
    }
    for chunk in ips.chunks(1000) {
        let _ = writeln!(
            out,
            "add element {NFT_TABLE} service-ips {{ {} }}",
            chunk.join(", ")
        );
    }
    if !nps.is_empty() {
        let _ = writeln!(
            out,
            "add element {NFT_TABLE} service-nodeports {{ {} }}",
            nps.join(", ")
        );
    }
    let _ = write!(
        out,
        "add rule {NFT_TABLE} services ip daddr . meta l4proto . th dport vmap @service-ips\n\
         add rule {NFT_TABLE} services fib daddr type local ip daddr != 127.0.0.0/8 jump nodeports\n\
         add rule {NFT_TABLE} nodeports meta l4proto . th dport vmap @service-nodeports\n\
         add rule {NFT_TABLE} nat-prerouting jump services\n\
         add rule {NFT_TABLE} nat-output jump services\n\
         add rule {NFT_TABLE} nat-postrouting jump masquerading\n"
    );
    out
}

/// The incremental transaction kube-proxy's nftables mode sends when one service port's
/// endpoints change from `old` to `new`: new endpoint chains, the service chain rewritten, the
/// endpoint chains that went away deleted.
pub fn nft_change(old: &ServicePort, new: &ServicePort) -> String {
    let mut out = String::new();
    let svc = nft_svc(new);
    let _ = writeln!(out, "flush chain {NFT_TABLE} {svc}");
    let mut body = String::new();
    nft_service(&mut body, new);
    // Endpoint chains that exist already are flushed before being refilled.
    for ep in &new.endpoints {
        if old.endpoints.contains(ep) {
            let _ = writeln!(out, "flush chain {NFT_TABLE} {}", nft_ep(new, *ep));
        }
    }
    out.push_str(&body);
    for ep in &old.endpoints {
        if !new.endpoints.contains(ep) {
            let _ = writeln!(out, "delete chain {NFT_TABLE} {}", nft_ep(old, *ep));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::Scenario;
    use std::net::Ipv4Addr;

    fn scenario() -> Scenario {
        Scenario {
            services: 3,
            endpoints_per_service: 3,
            target_endpoints: vec![Ipv4Addr::new(198, 18, 2, 1), Ipv4Addr::new(198, 18, 2, 2)],
        }
    }

    #[test]
    fn iptables_layout_has_kube_proxy_chains_and_probabilities() {
        let rules = iptables_rules(&scenario().ports(None));
        // One KUBE-SERVICES rule per service port (4) plus the NodePorts jump, which is last.
        let services: Vec<&str> = rules
            .lines()
            .filter(|l| l.starts_with("-A KUBE-SERVICES"))
            .collect();
        assert_eq!(services.len(), 5);
        assert!(services[4].contains("--dst-type LOCAL -j KUBE-NODEPORTS"));
        assert!(rules.contains("--probability 0.3333333333"));
        assert!(rules.contains("--probability 0.5000000000"));
        assert_eq!(
            rules.matches("-j DNAT --to-destination").count(),
            3 + 3 + 2 + 2
        );
        assert_eq!(rules.matches("-A KUBE-NODEPORTS").count(), 2);
        assert!(rules.ends_with("COMMIT\n"));
    }

    #[test]
    fn iptables_partial_sync_rewrites_top_chains_and_only_the_changed_service() {
        let s = scenario();
        let old = &s.ports(None)[0];
        let now = s.ports(Some((0, 5)));
        let text = iptables_partial(&now, old, &now[0]);
        // Every service port keeps its KUBE-SERVICES rule; only Service 0's chains are declared.
        assert_eq!(text.matches("-A KUBE-SERVICES").count(), 5);
        assert_eq!(text.matches(":KUBE-SVC-").count(), 1);
        assert!(text.contains(&format!(":{} - [0:0]", svc_chain(&now[0]))));
        assert!(!text.contains(&format!(":{}", svc_chain(&now[1]))));
        // The endpoint that went away: declared, then deleted; the new one is written.
        let gone = old
            .endpoints
            .iter()
            .find(|e| !now[0].endpoints.contains(e))
            .unwrap();
        let sep = sep_chain(old, *gone);
        assert!(text.contains(&format!(":{sep} - [0:0]")));
        assert!(text.contains(&format!("-X {sep}\n")));
        assert!(text.contains("--to-destination 198.19.120.5:8080"));
        assert!(!text.contains("PREROUTING"));
        assert!(text.ends_with("COMMIT\n"));
    }

    #[test]
    fn split_lines_keeps_every_line_in_order() {
        let script = nft_rules(&scenario().ports(None));
        let parts = split_lines(&script, 7);
        assert!(parts.len() > 1);
        assert!(parts.iter().all(|p| p.lines().count() <= 7));
        assert_eq!(parts.concat(), script);
    }

    fn output(ns: &lb_tests::Netns, program: &str, args: &[&str]) -> String {
        let out = ns.cmd(program).args(args).output().unwrap();
        assert!(out.status.success(), "{program} {args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    }

    /// Needs root (namespaces, nftables): the table filled in pieces is the table one
    /// transaction makes.
    #[test]
    fn nft_script_loaded_in_pieces_gives_the_same_table() {
        let s = Scenario {
            services: 300,
            endpoints_per_service: 3,
            target_endpoints: vec![Ipv4Addr::new(198, 18, 2, 1)],
        };
        let script = nft_rules(&s.ports(None));
        let whole = lb_tests::Netns::new("kp-nft-whole").expect("a network namespace (root)");
        let pieces = lb_tests::Netns::new("kp-nft-pieces").expect("a network namespace (root)");
        crate::e2e::load_rules(&whole, "nft", &["-f"], &script).unwrap();
        for piece in split_lines(&script, 97) {
            crate::e2e::load_rules(&pieces, "nft", &["-f"], &piece).unwrap();
        }
        let list = ["list", "table", "ip", "kube-proxy"];
        let a = output(&whole, "nft", &list);
        assert_eq!(a.matches("numgen random mod 3 vmap").count(), 299);
        assert_eq!(a, output(&pieces, "nft", &list));
    }

    /// Every chain's rules, in order, from `iptables-save -t nat` (counters and comments aside).
    fn nat_chains(ns: &lb_tests::Netns) -> std::collections::BTreeMap<String, Vec<String>> {
        let mut chains = std::collections::BTreeMap::new();
        for line in output(ns, "iptables-save", &["-t", "nat"]).lines() {
            if let Some(decl) = line.strip_prefix(':') {
                let name = decl.split_whitespace().next().unwrap().to_owned();
                chains.entry(name).or_insert_with(Vec::new);
            } else if let Some(rule) = line.strip_prefix("-A ") {
                let (chain, rest) = rule.split_once(' ').unwrap();
                chains
                    .entry(chain.to_owned())
                    .or_insert_with(Vec::new)
                    .push(rest.to_owned());
            }
        }
        chains
    }

    /// Needs root (namespaces, iptables): a full restore followed by partial syncs leaves the nat
    /// table a full restore of the final state makes.
    #[test]
    fn iptables_partial_syncs_give_the_full_restores_table() {
        let s = scenario();
        let incremental = lb_tests::Netns::new("kp-ipt-incr").expect("a network namespace (root)");
        let full = lb_tests::Netns::new("kp-ipt-full").expect("a network namespace (root)");
        let mut current = s.ports(None);
        crate::e2e::load_rules(
            &incremental,
            "iptables-restore",
            &[],
            &iptables_rules(&current),
        )
        .unwrap();
        for (c, svc) in [(1u32, 0usize), (2, 2), (3, 0)] {
            // Only the changed Service's port takes the new endpoints (the others keep theirs).
            let i = current.iter().position(|p| p.index == svc).unwrap();
            let old = std::mem::replace(&mut current[i], s.ports(Some((svc, c)))[i].clone());
            let text = iptables_partial(&current, &old, &current[i]);
            crate::e2e::load_rules(&incremental, "iptables-restore", &["--noflush"], &text)
                .unwrap();
        }
        crate::e2e::load_rules(&full, "iptables-restore", &[], &iptables_rules(&current)).unwrap();
        let a = nat_chains(&incremental);
        assert!(a.keys().filter(|k| k.starts_with("KUBE-SEP-")).count() >= 10);
        assert_eq!(a, nat_chains(&full));
    }

    #[test]
    fn nft_layout_has_verdict_maps_and_numgen() {
        let s = scenario();
        let rules = nft_rules(&s.ports(None));
        assert!(rules.contains("numgen random mod 3 vmap"));
        assert!(rules.contains("numgen random mod 2 vmap"));
        assert!(rules.contains("udp . 32000 : goto external-"));
        let old = &s.ports(None)[0];
        let new = &s.ports(Some((0, 5)))[0];
        let change = nft_change(old, new);
        assert_eq!(change.matches("delete chain").count(), 1);
        assert!(change.contains("198.19.120.5"));
    }
}
