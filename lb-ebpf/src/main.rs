//! Kernel programs of the load balancer.
//!
//! Each program is a thin entry that parses the packet into a [`packet::Flow`], asks the shared
//! load-balancing core ([`lb::process`]) what to do with it, and applies the answer with the
//! rewrite primitives of its own hook. The core never touches the packet, so the tc program of today
//! and the XDP program of the external-traffic path share it unchanged. The host-process socket
//! hooks ([`sock`]) use its service lookup and backend choice on socket addresses instead of
//! packets.
#![no_std]
#![no_main]

mod lb;
mod maglev;
mod maps;
mod packet;
mod reject;
mod sock;
mod source_ranges;
mod tc;
mod xdp;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that could reach a panic, so this is never executed.
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
