//! tc (TCX) ingress on pod-facing interfaces: traffic from pods to frontends, and replies from
//! local backend pods.
use aya_ebpf::{
    bindings::{
        bpf_fib_lookup as FibParams, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
        BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_OK, TC_ACT_SHOT,
    },
    helpers::{
        bpf_fib_lookup, bpf_redirect, bpf_redirect_neigh, bpf_skb_change_head, bpf_skb_change_tail,
    },
    macros::classifier,
    programs::TcContext,
};
use lb_common::proto;

use crate::{
    lb::{self, Nat, Verdict},
    packet::{self, Flow, PacketRead, PacketWrite, IP_CSUM_OFF, IP_DST_OFF, IP_SRC_OFF},
    reject::{self, Answer, QUOTE_SHIFT},
};

impl PacketRead for TcContext {
    #[inline(always)]
    fn read<T: Copy>(&self, offset: usize) -> Option<T> {
        self.load::<T>(offset).ok()
    }
}

impl PacketWrite for TcContext {
    #[inline(always)]
    fn write<T: Copy>(&self, offset: usize, value: T) -> Option<()> {
        self.store(offset, &value, 0).ok()
    }
}

/// An ICMP error about a translated flow, on its way to the client: translated back so the
/// client recognises its own packet in it. The stack routes it on.
#[inline(always)]
fn icmp_error(ctx: &TcContext) -> Result<i32, i64> {
    if let Some(e) = packet::parse_icmp_error(ctx) {
        if let Some((nat, _)) = lb::icmp_error(&e) {
            packet::rewrite_icmp_error(ctx, &e, &nat).ok_or(-1)?;
        }
    }
    Ok(TC_ACT_OK)
}

#[classifier]
pub fn lb_tc_ingress(ctx: TcContext) -> i32 {
    match try_lb_tc_ingress(&ctx) {
        Ok(action) => action,
        // A failed rewrite leaves a half-translated packet: never let it out.
        Err(_) => {
            crate::maps::count_drop(lb_common::stats::drop_reason::REWRITE_FAILED);
            TC_ACT_SHOT
        }
    }
}

#[inline(always)]
fn try_lb_tc_ingress(ctx: &TcContext) -> Result<i32, i64> {
    let Some(flow) = packet::parse(ctx) else {
        return icmp_error(ctx);
    };
    // SAFETY: `skb` is the context pointer the kernel passed to this program; reading plain
    // fields of it is what the verifier allows for tc programs.
    let (mark, ingress_ifindex) = unsafe { ((*ctx.skb.skb).mark, (*ctx.skb.skb).ingress_ifindex) };
    let record = !(mark == lb_common::TRACE_MARK && ingress_ifindex == 0);
    apply(ctx, &flow, lb::process(&flow, ctx.len() as u64, record))
}

/// Carries out the core's verdict on the packet; both hooks end here. A translated packet is
/// always handed to the stack, which routes it by its new addresses.
#[inline(always)]
fn apply(ctx: &TcContext, flow: &Flow, verdict: Verdict) -> Result<i32, i64> {
    match verdict {
        Verdict::Pass => Ok(TC_ACT_OK),
        Verdict::Drop => Ok(TC_ACT_SHOT),
        Verdict::Reject => answer(ctx, flow),
        Verdict::Nat(nat) => {
            rewrite(
                ctx,
                flow,
                IP_DST_OFF,
                flow.dst_addr,
                nat.dst_addr,
                flow.l4_off + 2,
                flow.dst_port,
                nat.dst_port,
            )?;
            rewrite(
                ctx,
                flow,
                IP_SRC_OFF,
                flow.src_addr,
                nat.src_addr,
                flow.l4_off,
                flow.src_port,
                nat.src_port,
            )?;
            if nat.transmit {
                return Ok(redirect(ctx, flow, &nat));
            }
            Ok(TC_ACT_OK)
        }
    }
}

/// Turns the packet into the answer of [`reject`] and sends it back out of the interface it came
/// in on, i.e. to the pod that sent it.
///
/// The skb may still say CHECKSUM_PARTIAL (veth offload of the pod's checksum): the answer's
/// checksums are complete, and the receiving pod's stack does not recompute a partial one, so
/// the flag is harmless on the way back into the pod.
#[inline(always)]
fn answer(ctx: &TcContext, flow: &Flow) -> Result<i32, i64> {
    let skb = ctx.skb.skb as *mut _;
    match reject::build(ctx, flow).ok_or(-1)? {
        Answer::Rst(frame) => {
            // SAFETY: the context pointer the kernel passed in; the helper checks the length.
            let rc = unsafe { bpf_skb_change_tail(skb, frame.len() as u32, 0) };
            if rc != 0 {
                return Err(rc);
            }
            ctx.store(0, &frame, 0)?;
        }
        Answer::Icmp { headers, quote_len } => {
            // SAFETY: as above; the new room in front is zeroed by the kernel.
            let rc = unsafe { bpf_skb_change_head(skb, QUOTE_SHIFT as u32, 0) };
            if rc != 0 {
                return Err(rc);
            }
            // SAFETY: as above.
            let rc = unsafe { bpf_skb_change_tail(skb, (headers.len() + quote_len) as u32, 0) };
            if rc != 0 {
                return Err(rc);
            }
            ctx.store(0, &headers, 0)?;
        }
    }
    // SAFETY: reading a plain field of the context; bpf_redirect has no preconditions and
    // returns the tc action to use.
    Ok(unsafe { bpf_redirect((*ctx.skb.skb).ifindex, 0) } as i32)
}

/// Sends a translated packet towards its destination without the stack's input routing: a FIB
/// lookup from the interface it came in on, then a redirect with the MACs the FIB gave, or
/// `bpf_redirect_neigh` when the next hop is not resolved yet (the kernel resolves it). Without
/// a route the packet goes to the stack, which reports it.
#[inline(always)]
fn redirect(ctx: &TcContext, flow: &Flow, nat: &Nat) -> i32 {
    // SAFETY: the struct is plain integers and unions of integers: all zeroes is valid.
    let mut p: FibParams = unsafe { core::mem::zeroed() };
    p.family = 2; // AF_INET
    p.l4_protocol = flow.proto;
    p.sport = nat.src_port;
    p.dport = nat.dst_port;
    // SAFETY: reading plain fields of the context the kernel passed in.
    let (ifindex, len) = unsafe { ((*ctx.skb.skb).ingress_ifindex, (*ctx.skb.skb).len) };
    p.ifindex = ifindex;
    p.__bindgen_anon_1.tot_len = (len as usize).saturating_sub(packet::ETH_HDR_LEN) as u16;
    p.__bindgen_anon_3.ipv4_src = nat.src_addr;
    p.__bindgen_anon_4.ipv4_dst = nat.dst_addr;
    // SAFETY: `p` is a valid, writable bpf_fib_lookup of the size passed.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.skb.skb as *mut _,
            &mut p,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    };
    match rc as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => {
            let mut macs = [0u8; 12];
            macs[..6].copy_from_slice(&p.dmac);
            macs[6..].copy_from_slice(&p.smac);
            if ctx.store(0, &macs, 0).is_err() {
                return TC_ACT_SHOT;
            }
            // SAFETY: bpf_redirect has no preconditions; it returns the tc action to use.
            unsafe { bpf_redirect(p.ifindex, 0) as i32 }
        }
        BPF_FIB_LKUP_RET_NO_NEIGH => {
            // SAFETY: a null parameter block asks the kernel to resolve the next hop itself.
            unsafe { bpf_redirect_neigh(p.ifindex, core::ptr::null_mut(), 0, 0) as i32 }
        }
        _ => TC_ACT_OK,
    }
}

/// Rewrites one address and one port and fixes both checksums incrementally. The kernel helpers
/// know the skb's checksum state (including CHECKSUM_PARTIAL from veth offload), which is why tc
/// uses them rather than recomputing by hand.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn rewrite(
    ctx: &TcContext,
    flow: &Flow,
    addr_off: usize,
    old_addr: u32,
    new_addr: u32,
    port_off: usize,
    old_port: u16,
    new_port: u16,
) -> Result<(), i64> {
    // A UDP checksum of zero means "no checksum" and must stay zero.
    let fix_l4 = !(flow.proto == proto::UDP && flow.l4_csum == 0);
    let mangled_0 = if flow.proto == proto::UDP {
        BPF_F_MARK_MANGLED_0 as u64
    } else {
        0
    };
    if old_addr != new_addr {
        if fix_l4 {
            ctx.l4_csum_replace(
                flow.l4_csum_off,
                old_addr as u64,
                new_addr as u64,
                BPF_F_PSEUDO_HDR as u64 | mangled_0 | 4,
            )?;
        }
        ctx.l3_csum_replace(IP_CSUM_OFF, old_addr as u64, new_addr as u64, 4)?;
        ctx.store(addr_off, &new_addr, 0)?;
    }
    if old_port != new_port {
        if fix_l4 {
            ctx.l4_csum_replace(
                flow.l4_csum_off,
                old_port as u64,
                new_port as u64,
                mangled_0 | 2,
            )?;
        }
        ctx.store(port_off, &new_port, 0)?;
    }
    Ok(())
}

/// tc (TCX) egress on pod-facing interfaces: replies on their way into a client pod. Replies from
/// a backend on this node were already translated at that backend's ingress and pass here
/// untouched; replies from backends on other nodes enter through the uplink, where nothing
/// translates them, and get their frontend back here.
#[classifier]
pub fn lb_tc_egress(ctx: TcContext) -> i32 {
    match try_lb_tc_egress(&ctx) {
        Ok(action) => action,
        Err(_) => {
            crate::maps::count_drop(lb_common::stats::drop_reason::REWRITE_FAILED);
            TC_ACT_SHOT
        }
    }
}

#[inline(always)]
fn try_lb_tc_egress(ctx: &TcContext) -> Result<i32, i64> {
    let Some(flow) = packet::parse(ctx) else {
        return icmp_error(ctx);
    };
    apply(ctx, &flow, lb::process_reply(&flow, ctx.len() as u64))
}
