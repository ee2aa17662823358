//! Socket-level load balancing for processes in the node's own network namespace (cgroup v2
//! sock_addr hooks). The hooks translate the address a socket calls `connect()`/`sendmsg()` with,
//! so no packet of these flows is ever rewritten and conntrack is not involved; what they remember
//! is per socket, in one LRU map:
//!
//! ```text
//!  sock  LRU_HASH SockKey{cookie, addr, port, proto, dir} -> SockValue{addr, port, backend_id, rev_nat_id}
//!          dir FORWARD: socket + frontend -> the backend it was given (sendmsg4 reuses it)
//!          dir REVERSE: socket + backend  -> the frontend to report (recvmsg4, getpeername4)
//! ```
//!
//! The cookie is `bpf_get_socket_cookie()`, unique per socket for the life of the kernel, so
//! entries of closed sockets are never matched again and simply age out of the LRU.

/// Key of the socket map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct SockKey {
    /// The socket's cookie.
    pub cookie: u64,
    /// FORWARD: the frontend address; REVERSE: the backend address. Network order.
    pub addr: u32,
    /// The port that goes with `addr`, network order.
    pub port: u16,
    /// IP protocol number ([`crate::proto`]).
    pub proto: u8,
    /// [`SOCK_DIR_FORWARD`] or [`SOCK_DIR_REVERSE`].
    pub dir: u8,
}
const _: () = assert!(core::mem::size_of::<SockKey>() == 16);

/// Socket + frontend -> backend.
pub const SOCK_DIR_FORWARD: u8 = 0;
/// Socket + backend -> frontend.
pub const SOCK_DIR_REVERSE: u8 = 1;

/// Value of the socket map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SockValue {
    /// FORWARD: the backend address; REVERSE: the frontend address. Network order.
    pub addr: u32,
    /// The backend the socket was given (both directions), to notice that it was deleted.
    pub backend_id: u32,
    /// The port that goes with `addr`, network order.
    pub port: u16,
    /// The frontend's rev-NAT id (both directions): which frontend counters the flow is under.
    pub rev_nat_id: u16,
}
const _: () = assert!(core::mem::size_of::<SockValue>() == 12);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: both types are repr(C), contain only integers and have no implicit padding
    // (checked by the size assertions above), so any bit pattern is a valid value.
    unsafe impl aya::Pod for super::SockKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SockValue {}
}
