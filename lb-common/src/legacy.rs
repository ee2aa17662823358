//! Layouts of earlier map versions ([`crate::ABI_VERSION`]), kept so the agent can migrate pins
//! written by an older agent instead of dropping their flows.

/// Version 1 (24 bytes) of the conntrack value: [`crate::CtValue`] without `peer_port`,
/// `peer_addr` and the padding after them. Keys are unchanged.
pub mod v1 {
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub struct CtValue {
        pub backend_id: u32,
        pub rev_nat_id: u16,
        pub flags: u16,
        pub nat_addr: u32,
        pub nat_port: u16,
        pub _pad: u16,
        pub last_seen_ns: u64,
    }
    const _: () = assert!(core::mem::size_of::<CtValue>() == 24);

    impl CtValue {
        /// The same entry in the current layout: a v1 flow has no SNAT, so the peer is empty.
        pub const fn upgrade(self) -> crate::CtValue {
            crate::CtValue {
                backend_id: self.backend_id,
                rev_nat_id: self.rev_nat_id,
                flags: self.flags,
                nat_addr: self.nat_addr,
                nat_port: self.nat_port,
                peer_port: 0,
                peer_addr: 0,
                _pad: 0,
                last_seen_ns: self.last_seen_ns,
            }
        }
    }

    #[cfg(feature = "user")]
    // SAFETY: repr(C), integers only, no implicit padding (size asserted above).
    unsafe impl aya::Pod for CtValue {}
}
