//! Packet parsing: Ethernet + IPv4 + TCP/UDP into a [`Flow`].
//!
//! Policy for unusual packets (documented in docs/ARCHITECTURE.md): anything that is not IPv4
//! TCP/UDP, any fragment (MF set or a non-zero offset: only the first carries ports, and rewriting
//! it alone would split the datagram), and any packet too short for the headers we would rewrite
//! is passed on unmodified. IP options are allowed: the L4 header is found through IHL. VLAN
//! tags are not parsed (a tagged frame is not IPv4 at offset 12 and passes).
//!
//! ICMP errors (destination unreachable, time exceeded) are parsed by [`parse_icmp_error`]: the
//! embedded header names the flow they are about, which may be one we translated.

/// Ethernet header length; the tc program runs on Ethernet devices (veths).
pub const ETH_HDR_LEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;

pub const IP_CSUM_OFF: usize = ETH_HDR_LEN + 10;
pub const IP_SRC_OFF: usize = ETH_HDR_LEN + 12;
pub const IP_DST_OFF: usize = ETH_HDR_LEN + 16;

/// The fields of one packet that load balancing looks at. Addresses and ports are in network
/// byte order, as in the packet and in the maps.
#[derive(Clone, Copy)]
pub struct Flow {
    pub src_addr: u32,
    pub dst_addr: u32,
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    /// Offset of the L4 header from the start of the packet.
    pub l4_off: usize,
    /// Offset of the L4 checksum from the start of the packet.
    pub l4_csum_off: usize,
    /// The L4 checksum as found; a UDP checksum of zero means "none" and must stay zero.
    pub l4_csum: u16,
    /// TCP flags byte (FIN = 0x01, SYN = 0x02, RST = 0x04, ...); 0 for UDP.
    pub tcp_flags: u8,
}

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// Reads packet bytes at an offset, failing when the packet is too short. Implemented per hook
/// (tc reads through `bpf_skb_load_bytes`, which also handles non-linear buffers).
pub trait PacketRead {
    fn read<T: Copy>(&self, offset: usize) -> Option<T>;
}

/// Writes packet bytes at an offset, failing when the packet is too short.
pub trait PacketWrite {
    fn write<T: Copy>(&self, offset: usize, value: T) -> Option<()>;
}

const ICMP: u8 = 1;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;

/// An ICMP error about a TCP or UDP packet, with the offsets needed to translate it.
#[derive(Clone, Copy)]
pub struct IcmpError {
    /// Outer header addresses, network order.
    pub src_addr: u32,
    pub dst_addr: u32,
    /// Offset of the ICMP header (type, code, checksum).
    pub icmp_off: usize,
    /// Offset of the embedded IPv4 header.
    pub inner_ip_off: usize,
    /// Offset of the embedded L4 header (its ports are the first four bytes).
    pub inner_l4_off: usize,
    /// The embedded packet's 5-tuple, as it was sent (network order).
    pub inner_src_addr: u32,
    pub inner_dst_addr: u32,
    pub inner_src_port: u16,
    pub inner_dst_port: u16,
    pub inner_proto: u8,
}

/// Parses an unfragmented IPv4 ICMP destination-unreachable or time-exceeded message whose
/// embedded packet is IPv4 TCP or UDP with at least its ports quoted (RFC 792 guarantees 8
/// bytes of it). Anything else: `None`.
#[inline(always)]
pub fn parse_icmp_error<P: PacketRead>(pkt: &P) -> Option<IcmpError> {
    let ethertype: u16 = pkt.read(12)?;
    if ethertype != ETH_P_IP.to_be() {
        return None;
    }
    let ver_ihl: u8 = pkt.read(ETH_HDR_LEN)?;
    let ihl = ((ver_ihl & 0x0f) as usize) * 4;
    if ver_ihl >> 4 != 4 || ihl < 20 {
        return None;
    }
    let frag: u16 = pkt.read(ETH_HDR_LEN + 6)?;
    let proto: u8 = pkt.read(ETH_HDR_LEN + 9)?;
    if u16::from_be(frag) & 0x3fff != 0 || proto != ICMP {
        return None;
    }
    let icmp_off = ETH_HDR_LEN + ihl;
    let icmp_type: u8 = pkt.read(icmp_off)?;
    if icmp_type != ICMP_DEST_UNREACH && icmp_type != ICMP_TIME_EXCEEDED {
        return None;
    }
    let inner_ip_off = icmp_off + 8;
    let inner_ver_ihl: u8 = pkt.read(inner_ip_off)?;
    let inner_ihl = ((inner_ver_ihl & 0x0f) as usize) * 4;
    if inner_ver_ihl >> 4 != 4 || inner_ihl < 20 {
        return None;
    }
    let inner_proto: u8 = pkt.read(inner_ip_off + 9)?;
    if inner_proto != lb_common::proto::TCP && inner_proto != lb_common::proto::UDP {
        return None;
    }
    let inner_l4_off = inner_ip_off + inner_ihl;
    Some(IcmpError {
        src_addr: pkt.read(IP_SRC_OFF)?,
        dst_addr: pkt.read(IP_DST_OFF)?,
        icmp_off,
        inner_ip_off,
        inner_l4_off,
        inner_src_addr: pkt.read(inner_ip_off + 12)?,
        inner_dst_addr: pkt.read(inner_ip_off + 16)?,
        inner_src_port: pkt.read(inner_l4_off)?,
        inner_dst_port: pkt.read(inner_l4_off + 2)?,
        inner_proto,
    })
}

/// Where the translation of an ICMP error puts what: the outer addresses and the embedded
/// packet's endpoints (network order). Unchanged fields hold their old values.
#[derive(Clone, Copy)]
pub struct IcmpNat {
    pub outer_src: u32,
    pub outer_dst: u32,
    pub inner_src: (u32, u16),
    pub inner_dst: (u32, u16),
}

/// Rewrites an ICMP error in place, keeping the outer IP checksum, the embedded IP checksum and
/// the ICMP checksum (which covers the embedded header) correct by incremental updates. The
/// embedded L4 checksum is left as quoted: it covers data the error does not carry, and no
/// receiver checks it. Both hooks use this: ICMP checksums are never offloaded.
#[inline(always)]
pub fn rewrite_icmp_error<P: PacketRead + PacketWrite>(
    pkt: &P,
    e: &IcmpError,
    nat: &IcmpNat,
) -> Option<()> {
    use lb_common::csum::{replace16, replace32};
    let icmp_csum_off = e.icmp_off + 2;
    let inner_csum_off = e.inner_ip_off + 10;
    let mut icmp_csum: u16 = pkt.read(icmp_csum_off)?;
    let old_inner_csum: u16 = pkt.read(inner_csum_off)?;
    let mut inner_csum = old_inner_csum;
    // The embedded header: addresses change its own checksum and the ICMP checksum; ports only
    // the ICMP checksum.
    if nat.inner_src.0 != e.inner_src_addr {
        inner_csum = replace32(inner_csum, e.inner_src_addr, nat.inner_src.0);
        icmp_csum = replace32(icmp_csum, e.inner_src_addr, nat.inner_src.0);
        pkt.write(e.inner_ip_off + 12, nat.inner_src.0)?;
    }
    if nat.inner_dst.0 != e.inner_dst_addr {
        inner_csum = replace32(inner_csum, e.inner_dst_addr, nat.inner_dst.0);
        icmp_csum = replace32(icmp_csum, e.inner_dst_addr, nat.inner_dst.0);
        pkt.write(e.inner_ip_off + 16, nat.inner_dst.0)?;
    }
    if nat.inner_src.1 != e.inner_src_port {
        icmp_csum = replace16(icmp_csum, e.inner_src_port, nat.inner_src.1);
        pkt.write(e.inner_l4_off, nat.inner_src.1)?;
    }
    if nat.inner_dst.1 != e.inner_dst_port {
        icmp_csum = replace16(icmp_csum, e.inner_dst_port, nat.inner_dst.1);
        pkt.write(e.inner_l4_off + 2, nat.inner_dst.1)?;
    }
    if inner_csum != old_inner_csum {
        icmp_csum = replace16(icmp_csum, old_inner_csum, inner_csum);
        pkt.write(inner_csum_off, inner_csum)?;
    }
    pkt.write(icmp_csum_off, icmp_csum)?;
    // The outer header: addresses change only its own checksum (ICMP has no pseudo-header).
    let mut ip_csum: u16 = pkt.read(IP_CSUM_OFF)?;
    if nat.outer_src != e.src_addr {
        ip_csum = replace32(ip_csum, e.src_addr, nat.outer_src);
        pkt.write(IP_SRC_OFF, nat.outer_src)?;
    }
    if nat.outer_dst != e.dst_addr {
        ip_csum = replace32(ip_csum, e.dst_addr, nat.outer_dst);
        pkt.write(IP_DST_OFF, nat.outer_dst)?;
    }
    pkt.write(IP_CSUM_OFF, ip_csum)
}

/// Parses an Ethernet/IPv4/TCP-or-UDP packet; `None` means "not ours, pass it on untouched".
#[inline(always)]
pub fn parse<P: PacketRead>(pkt: &P) -> Option<Flow> {
    let ethertype: u16 = pkt.read(12)?;
    if ethertype != ETH_P_IP.to_be() {
        return None;
    }
    let ver_ihl: u8 = pkt.read(ETH_HDR_LEN)?;
    if ver_ihl >> 4 != 4 {
        return None;
    }
    let ihl = ((ver_ihl & 0x0f) as usize) * 4;
    if ihl < 20 {
        return None;
    }
    let frag: u16 = pkt.read(ETH_HDR_LEN + 6)?;
    // MF flag or a fragment offset: see the module comment.
    if u16::from_be(frag) & 0x3fff != 0 {
        return None;
    }
    let proto: u8 = pkt.read(ETH_HDR_LEN + 9)?;
    let src_addr: u32 = pkt.read(IP_SRC_OFF)?;
    let dst_addr: u32 = pkt.read(IP_DST_OFF)?;
    let l4_off = ETH_HDR_LEN + ihl;
    let l4_csum_off = match proto {
        lb_common::proto::TCP => l4_off + 16,
        lb_common::proto::UDP => l4_off + 6,
        _ => return None,
    };
    let src_port: u16 = pkt.read(l4_off)?;
    let dst_port: u16 = pkt.read(l4_off + 2)?;
    // Reading the checksum also proves the header we may rewrite is all there.
    let l4_csum: u16 = pkt.read(l4_csum_off)?;
    let tcp_flags: u8 = if proto == lb_common::proto::TCP {
        pkt.read(l4_off + 13)?
    } else {
        0
    };
    Some(Flow {
        src_addr,
        dst_addr,
        src_port,
        dst_port,
        proto,
        l4_off,
        l4_csum_off,
        l4_csum,
        tcp_flags,
    })
}
