//! New flows to a ServicePort without any endpoint are refused from here, as kube-proxy's REJECT
//! rules do: a TCP SYN gets a RST, a UDP datagram an ICMP port unreachable (the hooks build them,
//! see [`lb_common::reject`]). Everything else (other TCP segments, external traffic under
//! externalTrafficPolicy=Local on a node without local endpoints, internalTrafficPolicy=Local
//! without local endpoints) is dropped.
//!
//! Answers are rate-limited per CPU by a token bucket: `REJECT_RATE` tokens per second up to
//! `REJECT_BURST`, both set by the loader before load. A packet over the limit is dropped and
//! counted as `reject_rate_limited`, so a flood to an empty Service costs no more than a drop.
use aya_ebpf::helpers::bpf_ktime_get_ns;
use lb_common::{
    proto,
    reject::{
        icmp_port_unreachable, tcp_rst, DEFAULT_REJECT_RATE, ICMP_HEADERS_LEN, ICMP_QUOTE_L4_BYTES,
        RST_FRAME_LEN,
    },
    service::{SCOPE_EXTERNAL, SVC_FLAG_REJECT_EMPTY},
    stats::drop_reason,
};

use crate::{
    lb::{drop, Verdict},
    maps::{count_drop, REJECT_BUCKET},
    packet::{Flow, PacketRead, ETH_HDR_LEN, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

/// Rejects per second per CPU. Set by the loader (`EbpfLoader::set_global`).
#[no_mangle]
static REJECT_RATE: u32 = DEFAULT_REJECT_RATE;
/// Most rejects a CPU sends back to back. Set by the loader.
#[no_mangle]
static REJECT_BURST: u32 = DEFAULT_REJECT_RATE;

const NS_PER_SEC: u64 = 1_000_000_000;
/// Idle time beyond this adds no more tokens; keeps `elapsed * rate` far from overflowing (the
/// loader caps the rate at a million per second).
const MAX_REFILL_NS: u64 = 10 * NS_PER_SEC;

/// The verdict for a new flow to a frontend whose master entry has no backend slot.
#[inline(always)]
pub fn when_empty(flow: &Flow, scope: u8, svc_flags: u16, record: bool) -> Verdict {
    if svc_flags & SVC_FLAG_REJECT_EMPTY == 0 {
        // Endpoints exist, none this traffic may use (a Local policy): drop.
        let reason = if scope == SCOPE_EXTERNAL {
            drop_reason::NO_LOCAL_BACKEND
        } else {
            drop_reason::NO_BACKEND
        };
        return drop(reason, record);
    }
    let opens_flow = match flow.proto {
        proto::UDP => true,
        proto::TCP => flow.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN,
        _ => false,
    };
    if !opens_flow {
        return drop(drop_reason::NO_BACKEND, record);
    }
    if !record {
        // A trace shows the answer without spending a token.
        return Verdict::Reject;
    }
    if !take_token() {
        count_drop(drop_reason::REJECT_RATE_LIMITED);
        return Verdict::Drop;
    }
    count_drop(drop_reason::REJECTED);
    Verdict::Reject
}

/// Takes one token from this CPU's bucket, refilling it first for the time since its last use.
#[inline(always)]
fn take_token() -> bool {
    let Some(bucket) = REJECT_BUCKET.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: globals the loader may have rewritten before load; read as plain memory.
    let (rate, burst) = unsafe {
        (
            core::ptr::read_volatile(&REJECT_RATE) as u64,
            core::ptr::read_volatile(&REJECT_BURST) as u64,
        )
    };
    let full = burst * NS_PER_SEC;
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: this CPU's copy of a per-CPU array entry; nothing else touches it meanwhile.
    unsafe {
        let tokens = if (*bucket).last_ns == 0 {
            full
        } else {
            let elapsed = now.wrapping_sub((*bucket).last_ns);
            let elapsed = if elapsed > MAX_REFILL_NS {
                MAX_REFILL_NS
            } else {
                elapsed
            };
            let t = (*bucket).nano_tokens + elapsed * rate;
            if t > full {
                full
            } else {
                t
            }
        };
        (*bucket).last_ns = now;
        if tokens < NS_PER_SEC {
            (*bucket).nano_tokens = tokens;
            return false;
        }
        (*bucket).nano_tokens = tokens - NS_PER_SEC;
    }
    true
}

/// An answer, built from the request before the hook reshapes the packet into it.
pub enum Answer {
    /// The whole RST frame: the packet is cut to its length and overwritten.
    Rst([u8; RST_FRAME_LEN]),
    /// The headers of the ICMP error. The hook makes [`QUOTE_SHIFT`] bytes of room in front of
    /// the packet, which moves the request's IPv4 header to where the quote belongs, cuts the
    /// packet after `quote_len` bytes of quote and writes the headers in front.
    Icmp {
        headers: [u8; ICMP_HEADERS_LEN],
        quote_len: usize,
    },
}

/// How far the request's IPv4 header moves to become the quote of the ICMP error.
pub const QUOTE_SHIFT: usize = ICMP_HEADERS_LEN - ETH_HDR_LEN;

/// Longest quote: a 60-byte IPv4 header and 8 bytes of UDP, in 16-bit words.
const MAX_QUOTE_WORDS: usize = (60 + ICMP_QUOTE_L4_BYTES) / 2;

/// Builds the answer to `flow`'s packet (a TCP SYN or a UDP datagram).
#[inline(always)]
pub fn build<P: PacketRead>(pkt: &P, flow: &Flow) -> Option<Answer> {
    let macs: [u8; 12] = pkt.read(0)?;
    let ihl = flow.l4_off - ETH_HDR_LEN;
    if flow.proto == proto::TCP {
        let seq: u32 = pkt.read(flow.l4_off + 4)?;
        let data_off: u8 = pkt.read(flow.l4_off + 12)?;
        let tot_len: u16 = pkt.read(ETH_HDR_LEN + 2)?;
        // Segment length: payload, plus one each for SYN and FIN.
        let payload = (u16::from_be(tot_len) as u32)
            .saturating_sub(ihl as u32 + ((data_off >> 4) as u32) * 4);
        let ctl = (flow.tcp_flags & TCP_SYN != 0) as u32 + (flow.tcp_flags & TCP_FIN != 0) as u32;
        let ack = u32::from_be(seq).wrapping_add(payload + ctl);
        return Some(Answer::Rst(tcp_rst(
            &macs,
            (flow.src_addr, flow.src_port),
            (flow.dst_addr, flow.dst_port),
            ack,
        )));
    }
    let quote_len = ihl + ICMP_QUOTE_L4_BYTES;
    let mut sum = 0u32;
    let mut i = 0;
    while i < MAX_QUOTE_WORDS {
        if i * 2 >= quote_len {
            break;
        }
        let w: u16 = pkt.read(ETH_HDR_LEN + i * 2)?;
        sum += w as u32;
        i += 1;
    }
    Some(Answer::Icmp {
        headers: icmp_port_unreachable(&macs, flow.src_addr, flow.dst_addr, quote_len as u16, sum),
        quote_len,
    })
}
