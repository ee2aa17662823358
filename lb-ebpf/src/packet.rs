//! Packet parsing: Ethernet + IPv4 + TCP/UDP into a [`Flow`].
//!
//! Policy for unusual packets (documented in docs/ARCHITECTURE.md): anything that is not IPv4
//! TCP/UDP, any fragment (MF set or a non-zero offset: only the first carries ports, and rewriting
//! it alone would split the datagram), and any packet too short for the headers we would rewrite
//! is passed on unmodified. IP options are allowed: the L4 header is found through IHL.

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
