//! The answers the data path sends when it refuses a new flow to a ServicePort that has no
//! endpoint at all, and the per-CPU rate limit on them.
//!
//! Both answers go from the frontend (the address and port the client asked for) back to the
//! client, on the interface the request came in on, with the Ethernet addresses swapped:
//!
//! ```text
//!  TCP SYN   -> Ethernet | IPv4 (20, DF, TTL 64) | TCP (20): RST+ACK, seq 0,
//!               ack = client seq + segment length (SYN and FIN count one each), window 0
//!  UDP       -> Ethernet | IPv4 (20, DF, TTL 64) | ICMP type 3 code 3 (8)
//!               | the client's IPv4 header as received (options included) + 8 bytes of UDP
//! ```
//!
//! The builders here produce the fixed headers with valid checksums; the hooks copy the quote
//! into place and pass its one's-complement sum, which the ICMP checksum covers.

/// State of one CPU's token bucket (the value of the one-entry per-CPU array
/// [`crate::map_names::REJECT_BUCKET`]). Tokens are kept in billionths so that a refill of
/// `rate` tokens per second adds `elapsed_ns * rate` without a division.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RejectBucket {
    /// Tokens available, times 10^9.
    pub nano_tokens: u64,
    /// When the bucket was last refilled (`bpf_ktime_get_ns`); 0 = never used, starts full.
    pub last_ns: u64,
}
const _: () = assert!(core::mem::size_of::<RejectBucket>() == 16);

/// Rejects each CPU may send per second, and its burst, unless the agent is told otherwise
/// (`--reject-rate`).
pub const DEFAULT_REJECT_RATE: u32 = 100;

/// Length of a TCP RST frame: Ethernet, IPv4 without options, TCP without options.
pub const RST_FRAME_LEN: usize = 14 + 20 + 20;
/// Length of the headers before the quote in an ICMP port-unreachable frame.
pub const ICMP_HEADERS_LEN: usize = 14 + 20 + 8;
/// An ICMP error quotes the IP header and this many bytes of what follows it.
pub const ICMP_QUOTE_L4_BYTES: usize = 8;

const IPPROTO_TCP: u8 = 6;
const IPPROTO_ICMP: u8 = 1;
const TTL: u8 = 64;
const TCP_RST_ACK: u8 = 0x14;

/// Adds `data`'s 16-bit words (loaded in native order, as the packet holds them) to a running
/// one's-complement sum. An odd last byte is padded with zero.
#[inline(always)]
pub fn add_words(mut sum: u32, data: &[u8]) -> u32 {
    let mut i = 0;
    while i + 1 < data.len() {
        sum += u16::from_ne_bytes([data[i], data[i + 1]]) as u32;
        i += 2;
    }
    if i < data.len() {
        sum += u16::from_ne_bytes([data[i], 0]) as u32;
    }
    // Folding keeps the sum from overflowing across calls.
    (sum & 0xffff) + (sum >> 16)
}

/// The checksum field for a running sum: folded and complemented, in native order.
#[inline(always)]
pub fn finish(sum: u32) -> u16 {
    let s = (sum & 0xffff) + (sum >> 16);
    let s = (s & 0xffff) + (s >> 16);
    !(s as u16)
}

/// Ethernet (addresses swapped, IPv4) and IPv4 header at `out[..34]`.
#[inline(always)]
fn eth_ip(out: &mut [u8], macs: &[u8; 12], tot_len: u16, proto: u8, src: u32, dst: u32) {
    // The request's source MAC becomes the destination and the other way round.
    out[..6].copy_from_slice(&macs[6..12]);
    out[6..12].copy_from_slice(&macs[..6]);
    out[12] = 0x08;
    out[13] = 0x00;
    let ip = &mut out[14..34];
    ip[0] = 0x45;
    // TOS 0: the answer carries no traffic class of its own.
    ip[1] = 0;
    ip[2..4].copy_from_slice(&tot_len.to_be_bytes());
    // Identification 0 with Don't Fragment, as the kernel's own RSTs.
    ip[4] = 0;
    ip[5] = 0;
    ip[6] = 0x40;
    ip[7] = 0;
    ip[8] = TTL;
    ip[9] = proto;
    ip[10] = 0;
    ip[11] = 0;
    ip[12..16].copy_from_slice(&src.to_ne_bytes());
    ip[16..20].copy_from_slice(&dst.to_ne_bytes());
    let csum = finish(add_words(0, &out[14..34]));
    out[24..26].copy_from_slice(&csum.to_ne_bytes());
}

/// A TCP RST+ACK frame answering a connection attempt.
///
/// `macs` are the request's first 12 bytes (destination, source); `client` and `frontend` the
/// request's source and destination (address and port, network order); `ack` the client's
/// sequence number plus the segment length, host order.
#[inline(always)]
pub fn tcp_rst(
    macs: &[u8; 12],
    client: (u32, u16),
    frontend: (u32, u16),
    ack: u32,
) -> [u8; RST_FRAME_LEN] {
    let mut f = [0u8; RST_FRAME_LEN];
    eth_ip(&mut f, macs, 40, IPPROTO_TCP, frontend.0, client.0);
    let tcp = &mut f[34..54];
    tcp[0..2].copy_from_slice(&frontend.1.to_ne_bytes());
    tcp[2..4].copy_from_slice(&client.1.to_ne_bytes());
    // Sequence number 0 (RFC 9293: a reset for a segment without ACK).
    tcp[8..12].copy_from_slice(&ack.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = TCP_RST_ACK;
    // Window, checksum and urgent pointer stay 0 until the checksum below.
    let mut pseudo = [0u8; 12];
    pseudo[0..4].copy_from_slice(&frontend.0.to_ne_bytes());
    pseudo[4..8].copy_from_slice(&client.0.to_ne_bytes());
    pseudo[9] = IPPROTO_TCP;
    pseudo[11] = 20;
    let sum = add_words(add_words(0, &pseudo), &f[34..54]);
    let csum = finish(sum);
    f[50..52].copy_from_slice(&csum.to_ne_bytes());
    f
}

/// The headers of an ICMP destination-unreachable / port-unreachable frame about a datagram the
/// client sent to the frontend. The quote (`quote_len` bytes, whose word sum is `quote_sum`, as
/// from [`add_words`]) follows them.
#[inline(always)]
pub fn icmp_port_unreachable(
    macs: &[u8; 12],
    client: u32,
    frontend: u32,
    quote_len: u16,
    quote_sum: u32,
) -> [u8; ICMP_HEADERS_LEN] {
    let mut f = [0u8; ICMP_HEADERS_LEN];
    eth_ip(
        &mut f,
        macs,
        20 + 8 + quote_len,
        IPPROTO_ICMP,
        frontend,
        client,
    );
    // Type 3 (destination unreachable), code 3 (port unreachable); the rest of the header unused.
    f[34] = 3;
    f[35] = 3;
    let csum = finish(add_words(quote_sum, &f[34..42]));
    f[36..38].copy_from_slice(&csum.to_ne_bytes());
    f
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), two u64, no padding (size asserted above).
    unsafe impl aya::Pod for super::RejectBucket {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::csum::compute;

    const MACS: [u8; 12] = [2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 0x0a];

    fn net(a: [u8; 4]) -> u32 {
        u32::from_ne_bytes(a)
    }

    #[test]
    fn rst_has_swapped_addresses_and_valid_checksums() {
        let client = (net([198, 18, 1, 10]), 40000u16.to_be());
        let frontend = (net([198, 19, 0, 10]), 80u16.to_be());
        let f = tcp_rst(&MACS, client, frontend, 1001);
        assert_eq!(&f[..6], &MACS[6..]);
        assert_eq!(&f[6..12], &MACS[..6]);
        assert_eq!(&f[26..30], &[198, 19, 0, 10]);
        assert_eq!(&f[30..34], &[198, 18, 1, 10]);
        assert_eq!(&f[34..38], &[0, 80, 0x9c, 0x40]);
        assert_eq!(&f[38..42], &[0, 0, 0, 0], "seq 0");
        assert_eq!(&f[42..46], &1001u32.to_be_bytes());
        assert_eq!(f[47], 0x14, "RST+ACK");
        // A header whose checksum is right sums to zero.
        assert_eq!(compute(&f[14..34]), 0);
        let mut pseudo = f[26..34].to_vec();
        pseudo.extend_from_slice(&[0, 6, 0, 20]);
        pseudo.extend_from_slice(&f[34..54]);
        assert_eq!(compute(&pseudo), 0);
    }

    #[test]
    fn icmp_checksum_covers_the_quote() {
        let quote: [u8; 28] = core::array::from_fn(|i| (i * 7 + 3) as u8);
        let f = icmp_port_unreachable(
            &MACS,
            net([198, 18, 1, 10]),
            net([198, 19, 0, 10]),
            28,
            add_words(0, &quote),
        );
        assert_eq!(&f[16..18], &56u16.to_be_bytes(), "total length");
        assert_eq!(compute(&f[14..34]), 0);
        let mut icmp = f[34..42].to_vec();
        icmp.extend_from_slice(&quote);
        assert_eq!(compute(&icmp), 0);
        assert_eq!(&f[34..36], &[3, 3]);
    }
}
