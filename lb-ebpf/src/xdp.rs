//! XDP on node uplinks: traffic from outside the node to NodePort, LoadBalancer and externalIP
//! frontends, replies of flows this node source-NATed, and ICMP errors about them.
//!
//! - Local backend (or externalTrafficPolicy=Local): DNAT, then `XDP_PASS`; the stack routes the
//!   packet to the pod, and the pod's replies are translated back by tc on its interface.
//! - Backend on another node under Cluster policy: DNAT plus SNAT to this node's address towards
//!   the backend (a FIB lookup with `BPF_FIB_LOOKUP_SRC` picks it), then a second FIB lookup for
//!   the next hop and `XDP_TX` / `bpf_redirect`. Replies come back here, are un-SNATed and
//!   un-DNATed, and leave the same way towards the client.
//! - When the next hop's MAC is not resolved yet (`NO_NEIGH`), the translated packet is handed to
//!   the stack, which resolves it and forwards the packet; the agent sets `accept_local` on the
//!   uplink because such a packet's source is a local address.
//!
//! Checksums are updated by hand (RFC 1624): XDP has no skb, so no checksum helpers, and frames
//! from a NIC carry complete checksums.
use aya_ebpf::{
    bindings::{
        bpf_fib_lookup as FibParams, xdp_action, BPF_FIB_LKUP_RET_FRAG_NEEDED,
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LOOKUP_SRC,
    },
    helpers::{
        bpf_fib_lookup, bpf_redirect, bpf_xdp_adjust_head, bpf_xdp_adjust_tail, bpf_xdp_load_bytes,
        bpf_xdp_store_bytes,
    },
    macros::xdp,
    programs::XdpContext,
};
use lb_common::{csum, proto, stats::drop_reason};

use crate::{
    lb::{self, External, Nat, Verdict},
    maps::count_drop,
    packet::{
        self, Flow, PacketRead, PacketWrite, ETH_HDR_LEN, IP_CSUM_OFF, IP_DST_OFF, IP_SRC_OFF,
    },
    reject::{self, Answer, QUOTE_SHIFT},
};

const AF_INET: u8 = 2;

// Reads and writes go through bpf_xdp_load_bytes / bpf_xdp_store_bytes rather than direct
// packet access: offsets behind IP options are variable, and the verifier cannot prove bounds
// for variable-offset packet pointers in the shape LLVM emits for them.
impl PacketRead for XdpContext {
    #[inline(always)]
    fn read<T: Copy>(&self, offset: usize) -> Option<T> {
        let mut value = core::mem::MaybeUninit::<T>::uninit();
        // SAFETY: the helper writes at most size_of::<T>() bytes into `value` and fails (leaving
        // it unread) when the packet is too short.
        let rc = unsafe {
            bpf_xdp_load_bytes(
                self.ctx,
                offset as u32,
                value.as_mut_ptr() as *mut _,
                core::mem::size_of::<T>() as u32,
            )
        };
        // SAFETY: rc == 0 means all bytes were written; T is plain data.
        (rc == 0).then(|| unsafe { value.assume_init() })
    }
}

impl PacketWrite for XdpContext {
    #[inline(always)]
    fn write<T: Copy>(&self, offset: usize, value: T) -> Option<()> {
        let mut value = value;
        // SAFETY: the helper reads size_of::<T>() bytes from `value` and checks the bounds.
        let rc = unsafe {
            bpf_xdp_store_bytes(
                self.ctx,
                offset as u32,
                &mut value as *mut T as *mut _,
                core::mem::size_of::<T>() as u32,
            )
        };
        (rc == 0).then_some(())
    }
}

/// A pointer to a `T` at `offset` into the packet, if the packet is long enough.
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    match try_lb_xdp(&ctx) {
        Some(action) => action,
        // A failed rewrite leaves a half-translated packet: never let it out.
        None => {
            count_drop(drop_reason::REWRITE_FAILED);
            xdp_action::XDP_DROP
        }
    }
}

#[inline(always)]
fn try_lb_xdp(ctx: &XdpContext) -> Option<u32> {
    let Some(flow) = packet::parse(ctx) else {
        return icmp_error(ctx);
    };
    let len = (ctx.data_end() - ctx.data()) as u64;
    let verdict = match lb::process_external(&flow, len) {
        External::Done(v) => v,
        External::NeedSnat(pick) => {
            let mut fib = fib_params(ctx, &flow, 0, pick.backend.addr);
            match fib_lookup(ctx, &mut fib, BPF_FIB_LOOKUP_SRC) {
                Fib::Ok | Fib::NoNeigh => {
                    // SAFETY: a plain read of a union field the helper filled in.
                    let node_addr = unsafe { fib.__bindgen_anon_3.ipv4_src };
                    if node_addr == 0 {
                        count_drop(drop_reason::NO_ROUTE);
                        return Some(xdp_action::XDP_DROP);
                    }
                    lb::commit_snat(&flow, &pick, node_addr, len)
                }
                Fib::FragNeeded => {
                    count_drop(drop_reason::MTU_EXCEEDED);
                    return Some(xdp_action::XDP_DROP);
                }
                Fib::Failed => {
                    count_drop(drop_reason::NO_ROUTE);
                    return Some(xdp_action::XDP_DROP);
                }
            }
        }
    };
    match verdict {
        Verdict::Pass => Some(xdp_action::XDP_PASS),
        Verdict::Drop => Some(xdp_action::XDP_DROP),
        Verdict::Reject => answer(ctx, &flow),
        Verdict::Nat(nat) => {
            rewrite(ctx, &flow, &nat)?;
            if nat.transmit {
                let mut fib = fib_params(ctx, &flow, nat.src_addr, nat.dst_addr);
                fib.sport = nat.src_port;
                fib.dport = nat.dst_port;
                Some(transmit(ctx, &mut fib))
            } else {
                Some(xdp_action::XDP_PASS)
            }
        }
    }
}

/// Turns the packet into the answer of [`reject`] and sends it back out of the uplink it came
/// in on (`XDP_TX`), to the MAC it came from.
#[inline(always)]
fn answer(ctx: &XdpContext, flow: &Flow) -> Option<u32> {
    let len = (ctx.data_end() - ctx.data()) as i32;
    match reject::build(ctx, flow)? {
        Answer::Rst(frame) => {
            // SAFETY: the context pointer the kernel passed in; the helper checks the delta.
            if unsafe { bpf_xdp_adjust_tail(ctx.ctx, frame.len() as i32 - len) } != 0 {
                return None;
            }
            ctx.write(0, frame)?;
        }
        Answer::Icmp { headers, quote_len } => {
            // SAFETY: as above; a negative delta grows the packet at the front.
            if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(QUOTE_SHIFT as i32)) } != 0 {
                return None;
            }
            let want = (headers.len() + quote_len) as i32;
            // SAFETY: as above.
            if unsafe { bpf_xdp_adjust_tail(ctx.ctx, want - len - QUOTE_SHIFT as i32) } != 0 {
                return None;
            }
            ctx.write(0, headers)?;
        }
    }
    Some(xdp_action::XDP_TX)
}

/// ICMP errors about flows this node translated: translated back; errors about SNATed flows are
/// sent on to the client from here, the others go up the stack (which routes them to a local
/// client pod).
#[inline(always)]
fn icmp_error(ctx: &XdpContext) -> Option<u32> {
    let Some(e) = packet::parse_icmp_error(ctx) else {
        return Some(xdp_action::XDP_PASS);
    };
    let Some((nat, snat)) = lb::icmp_error(&e) else {
        return Some(xdp_action::XDP_PASS);
    };
    packet::rewrite_icmp_error(ctx, &e, &nat)?;
    if !snat {
        return Some(xdp_action::XDP_PASS);
    }
    let mut fib = new_fib_params(ctx, proto::ICMP, nat.outer_src, nat.outer_dst);
    Some(transmit(ctx, &mut fib))
}

/// Rewrites addresses and ports and updates the IP and L4 checksums incrementally.
#[inline(always)]
fn rewrite(ctx: &XdpContext, flow: &Flow, nat: &Nat) -> Option<()> {
    let mut ip_csum: u16 = ctx.read(IP_CSUM_OFF)?;
    let mut l4_csum = flow.l4_csum;
    // A UDP checksum of zero means "no checksum" and must stay zero.
    let fix_l4 = !(flow.proto == proto::UDP && l4_csum == 0);
    if nat.src_addr != flow.src_addr {
        ip_csum = csum::replace32(ip_csum, flow.src_addr, nat.src_addr);
        l4_csum = csum::replace32(l4_csum, flow.src_addr, nat.src_addr);
        ctx.write(IP_SRC_OFF, nat.src_addr)?;
    }
    if nat.dst_addr != flow.dst_addr {
        ip_csum = csum::replace32(ip_csum, flow.dst_addr, nat.dst_addr);
        l4_csum = csum::replace32(l4_csum, flow.dst_addr, nat.dst_addr);
        ctx.write(IP_DST_OFF, nat.dst_addr)?;
    }
    if nat.src_port != flow.src_port {
        l4_csum = csum::replace16(l4_csum, flow.src_port, nat.src_port);
        ctx.write(flow.l4_off, nat.src_port)?;
    }
    if nat.dst_port != flow.dst_port {
        l4_csum = csum::replace16(l4_csum, flow.dst_port, nat.dst_port);
        ctx.write(flow.l4_off + 2, nat.dst_port)?;
    }
    ctx.write(IP_CSUM_OFF, ip_csum)?;
    if fix_l4 {
        if flow.proto == proto::UDP {
            l4_csum = csum::udp_nonzero(l4_csum);
        }
        ctx.write(flow.l4_csum_off, l4_csum)?;
    }
    Some(())
}

enum Fib {
    Ok,
    NoNeigh,
    FragNeeded,
    Failed,
}

#[inline(always)]
fn new_fib_params(ctx: &XdpContext, l4_proto: u8, src: u32, dst: u32) -> FibParams {
    // SAFETY: the struct is plain integers and unions of integers: all zeroes is valid.
    let mut p: FibParams = unsafe { core::mem::zeroed() };
    p.family = AF_INET;
    p.l4_protocol = l4_proto;
    // SAFETY: reading a field of the context the kernel passed in.
    p.ifindex = unsafe { (*ctx.ctx).ingress_ifindex };
    // The IP total length, host order, for the helper's MTU check.
    let tot_len: u16 = ctx.read(ETH_HDR_LEN + 2).unwrap_or(0);
    p.__bindgen_anon_1.tot_len = u16::from_be(tot_len);
    p.__bindgen_anon_3.ipv4_src = src;
    p.__bindgen_anon_4.ipv4_dst = dst;
    p
}

#[inline(always)]
fn fib_params(ctx: &XdpContext, flow: &Flow, src: u32, dst: u32) -> FibParams {
    let mut p = new_fib_params(ctx, flow.proto, src, dst);
    p.sport = flow.src_port;
    p.dport = flow.dst_port;
    p
}

#[inline(always)]
fn fib_lookup(ctx: &XdpContext, p: &mut FibParams, flags: u32) -> Fib {
    // SAFETY: `p` is a valid, writable bpf_fib_lookup of the size passed.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.ctx as *mut _,
            p as *mut FibParams,
            core::mem::size_of::<FibParams>() as i32,
            flags,
        )
    };
    match rc as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => Fib::Ok,
        BPF_FIB_LKUP_RET_NO_NEIGH => Fib::NoNeigh,
        BPF_FIB_LKUP_RET_FRAG_NEEDED => Fib::FragNeeded,
        _ => Fib::Failed,
    }
}

/// Sends a translated packet towards its new destination: MACs from the FIB, out of the same
/// interface (`XDP_TX`) or another one (`bpf_redirect`). Without a resolved next hop the stack
/// forwards it.
#[inline(always)]
fn transmit(ctx: &XdpContext, p: &mut FibParams) -> u32 {
    match fib_lookup(ctx, p, 0) {
        Fib::Ok => {}
        Fib::NoNeigh => return xdp_action::XDP_PASS,
        Fib::FragNeeded => {
            count_drop(drop_reason::MTU_EXCEEDED);
            return xdp_action::XDP_DROP;
        }
        Fib::Failed => {
            count_drop(drop_reason::NO_ROUTE);
            return xdp_action::XDP_DROP;
        }
    }
    let Some(eth) = ptr_at::<[u8; 12]>(ctx, 0) else {
        return xdp_action::XDP_DROP;
    };
    let mut macs = [0u8; 12];
    macs[..6].copy_from_slice(&p.dmac);
    macs[6..].copy_from_slice(&p.smac);
    // SAFETY: `ptr_at` checked the 12 bytes are inside the packet.
    unsafe { eth.write_unaligned(macs) };
    // SAFETY: reading a field of the context the kernel passed in.
    let ingress = unsafe { (*ctx.ctx).ingress_ifindex };
    if p.ifindex == ingress {
        xdp_action::XDP_TX
    } else {
        // SAFETY: bpf_redirect has no preconditions; it returns the XDP action to use.
        unsafe { bpf_redirect(p.ifindex, 0) as u32 }
    }
}
