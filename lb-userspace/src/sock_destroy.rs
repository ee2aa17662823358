//! Connected UDP sockets of host processes whose backend went away: moved to a live backend, or
//! destroyed when they cannot be moved.
//!
//! connect4 translates a UDP socket's destination once, and the kernel runs no hook for the
//! datagrams of a connected socket, so such a socket would keep sending to a deleted backend
//! forever. After each change of the maps the agent finds those sockets (the socket map records
//! which backend each translated socket was given, [`find_stale`]) and [`move_or_destroy`]s them:
//!
//! - **Move.** The agent finds a process holding the socket (a `/proc/<pid>/fd/*` link
//!   `socket:[<inode>]`, [`find_owners`]), takes a duplicate of that descriptor with
//!   `pidfd_open` + `pidfd_getfd` (CAP_SYS_PTRACE; in a pod, `hostPID`) and `connect()`s it to the
//!   socket's frontend again. The kernel runs the cgroup connect4 hooks of the *socket's* cgroup
//!   (`sk->sk_cgrp_data`, fixed when the socket was created), not the caller's, so lb_sock_connect4
//!   picks a live backend and rewrites the socket map entries exactly as for the application's own
//!   connect. The application keeps its socket and sees no error: its next `send` reaches the new
//!   backend, recvmsg4 and getpeername4 still report the frontend.
//! - **Destroy** (the fallback): the sock_diag `SOCK_DESTROY` request, which for UDP is
//!   `udp_abort()`: the socket gets the error `ECONNABORTED`, reported by its next (or pending)
//!   `send`/`recv`, and is disconnected. An application that connects again to the frontend gets a
//!   live backend, or `ECONNREFUSED`. Used when the frontend is gone, when no owner is found, when
//!   the duplicate is refused, and when connect fails (`ECONNREFUSED`: the frontend has no
//!   endpoints any more). Each case is logged with its reason.
//!
//! A backend "went away" for a socket when its frontend's internal backend list no longer names
//! it: the endpoint was deleted, or is no longer used for new flows (not ready while ready ones
//! exist). Only sockets in the agent's network namespace are found (sock_diag is per
//! namespace), which is the node's: the hooks serve host-network processes.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs, io,
    mem::size_of,
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
};

use aya::maps::{HashMap, Map, MapData, MapError};
use lb_common::{
    map_names, proto,
    service::SCOPE_INTERNAL,
    sock::{SOCK_DIR_FORWARD, SOCK_DIR_REVERSE},
    BackendValue, ServiceKey, ServiceValue, SockKey, SockValue,
};
use tracing::{info, warn};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{op} map {map}: {source}")]
    Map {
        op: &'static str,
        map: &'static str,
        source: Box<MapError>,
    },
    #[error("sock_diag {op}: {source}")]
    Diag { op: &'static str, source: io::Error },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

fn map_err(op: &'static str, map: &'static str) -> impl FnOnce(MapError) -> Error {
    move |source| Error::Map {
        op,
        map,
        source: Box::new(source),
    }
}

/// The socket map, opened from its pin.
pub struct SockMap(HashMap<MapData, SockKey, SockValue>);

impl SockMap {
    pub fn open(bpffs: &Path) -> Result<SockMap> {
        let data = MapData::from_pin(bpffs.join(map_names::SOCK))
            .map_err(map_err("opening the pin of", map_names::SOCK))?;
        let map = HashMap::try_from(Map::LruHashMap(data))
            .map_err(map_err("opening", map_names::SOCK))?;
        Ok(SockMap(map))
    }
}

impl SockMap {
    /// Deletes a stale socket's reverse entry, and its forward entry while that still names the
    /// stale backend (a move of the same socket may have pointed it at a live one already).
    /// Entries already evicted are fine.
    fn forget(&mut self, s: &StaleSocket) {
        let _ = self.0.remove(&s.reverse_key());
        let forward = self.0.get(&s.forward_key(), 0);
        if forward.is_ok_and(|v| (v.addr, v.port) == (s.backend_addr, s.backend_port)) {
            let _ = self.0.remove(&s.forward_key());
        }
    }
}

/// A translated UDP socket whose backend went away.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct StaleSocket {
    pub cookie: u64,
    /// The backend it is connected to (network order, as in the maps).
    pub backend_addr: u32,
    pub backend_port: u16,
    /// The frontend it was connected to.
    pub frontend_addr: u32,
    pub frontend_port: u16,
    /// Whether the frontend still has its internal entry (with or without backends). Without it,
    /// connect4 would leave a connect to the frontend's address untranslated.
    pub frontend_exists: bool,
}

impl StaleSocket {
    fn frontend(&self) -> SocketAddrV4 {
        addr(self.frontend_addr, self.frontend_port)
    }

    fn backend(&self) -> SocketAddrV4 {
        addr(self.backend_addr, self.backend_port)
    }

    /// Cookie and destination, as sock_diag reports a socket still connected to this backend.
    fn connected_key(&self) -> (u64, u32, u16) {
        (self.cookie, self.backend_addr, self.backend_port)
    }

    fn reverse_key(&self) -> SockKey {
        SockKey {
            cookie: self.cookie,
            addr: self.backend_addr,
            port: self.backend_port,
            proto: proto::UDP,
            dir: SOCK_DIR_REVERSE,
        }
    }

    fn forward_key(&self) -> SockKey {
        SockKey {
            cookie: self.cookie,
            addr: self.frontend_addr,
            port: self.frontend_port,
            proto: proto::UDP,
            dir: SOCK_DIR_FORWARD,
        }
    }
}

/// An address of the maps (network order) as a socket address.
fn addr(addr: u32, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from(u32::from_be(addr)), u16::from_be(port))
}

/// The backend ids of a UDP frontend's internal slots; `None` when the frontend has no internal
/// entry any more.
fn internal_backend_ids(
    services: &HashMap<MapData, ServiceKey, ServiceValue>,
    addr: u32,
    port: u16,
) -> Option<BTreeSet<u32>> {
    let master = ServiceKey::new(addr, port, proto::UDP, SCOPE_INTERNAL, 0);
    let m = services.get(&master, 0).ok()?;
    let mut ids = BTreeSet::new();
    for slot in 1..=m.count {
        let key = ServiceKey::new(addr, port, proto::UDP, SCOPE_INTERNAL, slot);
        if let Ok(s) = services.get(&key, 0) {
            ids.insert(s.backend_id);
        }
    }
    Some(ids)
}

/// The UDP sockets in `sockets` whose backend is no longer among their frontend's backends.
pub fn find_stale(
    sockets: &SockMap,
    services: &HashMap<MapData, ServiceKey, ServiceValue>,
    backends: &HashMap<MapData, u32, BackendValue>,
) -> Result<Vec<StaleSocket>> {
    // Frontend -> backend ids of its internal slots (None: no such frontend any more).
    let mut slots: BTreeMap<(u32, u16), Option<BTreeSet<u32>>> = BTreeMap::new();
    let mut out = Vec::new();
    for entry in sockets.0.iter() {
        // Entries can vanish (LRU) while we walk; a failed read is skipped, not fatal.
        let Ok((k, v)) = entry else { continue };
        if k.dir != SOCK_DIR_REVERSE || k.proto != proto::UDP {
            continue;
        }
        let ids = slots
            .entry((v.addr, v.port))
            .or_insert_with(|| internal_backend_ids(services, v.addr, v.port));
        let listed = ids.as_ref().is_some_and(|ids| ids.contains(&v.backend_id));
        let same_backend = backends
            .get(&v.backend_id, 0)
            .is_ok_and(|b| b.addr == k.addr && b.port == k.port);
        if !(listed && same_backend) {
            out.push(StaleSocket {
                cookie: k.cookie,
                backend_addr: k.addr,
                backend_port: k.port,
                frontend_addr: v.addr,
                frontend_port: v.port,
                frontend_exists: ids.is_some(),
            });
        }
    }
    out.sort();
    Ok(out)
}

/// Why a stale socket was destroyed instead of moved.
#[derive(Debug, thiserror::Error)]
pub enum Fallback {
    #[error("the frontend no longer exists, a connect to it would not be translated")]
    NoFrontend,
    #[error("no process of this PID namespace has the socket open (/proc/<pid>/fd)")]
    NoOwner,
    #[error("{op} of pid {pid} fd {fd}: {source} (CAP_SYS_PTRACE and the host PID namespace are needed)")]
    Duplicate {
        op: &'static str,
        pid: i32,
        fd: i32,
        source: io::Error,
    },
    #[error("connect to the frontend: {0}")]
    Connect(io::Error),
    #[error("connect to the frontend: {0} (the frontend has no endpoints any more)")]
    NoEndpoints(io::Error),
    #[error("connect to the frontend was not given a live backend by connect4")]
    NotTranslated,
}

/// What [`move_or_destroy`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    /// Sockets connected again, to a live backend.
    pub moved: usize,
    /// Sockets destroyed (each logged with the reason it could not be moved).
    pub destroyed: usize,
    /// Stale entries without a connected socket (closed, or unconnected sockets using sendto):
    /// only forgotten in the socket map.
    pub forgotten: usize,
}

/// Moves each socket of `stale` still connected to its old backend to a live backend of its
/// frontend, or destroys it when that is impossible (see the module doc); forgets the stale
/// entries of the socket map. Each socket moved or destroyed is logged.
pub fn move_or_destroy(
    sockets: &mut SockMap,
    services: &HashMap<MapData, ServiceKey, ServiceValue>,
    backends: &HashMap<MapData, u32, BackendValue>,
    stale: &[StaleSocket],
) -> Result<Summary> {
    let mut summary = Summary::default();
    if stale.is_empty() {
        return Ok(summary);
    }
    let diag = Diag::open()?;
    // Sockets still connected to their stale backend: the ones to move. A socket can have
    // other stale entries (earlier connects, sendto), hence the backend in the key.
    let stale_keys: BTreeSet<(u64, u32, u16)> = stale
        .iter()
        .map(|s| (s.cookie, s.backend_addr, s.backend_port))
        .collect();
    let mut connected: BTreeMap<(u64, u32, u16), u32> = BTreeMap::new();
    for (id, inode) in diag.dump_udp4()? {
        let cookie = id.cookie[0] as u64 | (id.cookie[1] as u64) << 32;
        let key = (cookie, id.dst[0], id.dport);
        if stale_keys.contains(&key) {
            connected.insert(key, inode);
        }
    }
    let wanted: BTreeSet<u32> = stale
        .iter()
        .filter(|s| s.frontend_exists)
        .filter_map(|s| connected.get(&s.connected_key()).copied())
        .collect();
    let owners = if wanted.is_empty() {
        BTreeMap::new()
    } else {
        find_owners(Path::new("/proc"), &wanted)
    };

    let mut to_destroy: BTreeMap<u64, (&StaleSocket, Fallback)> = BTreeMap::new();
    for s in stale {
        let Some(inode) = connected.get(&s.connected_key()) else {
            // Closed, or an unconnected socket (sendmsg4 picks again by itself): forget it.
            sockets.forget(s);
            summary.forgotten += 1;
            continue;
        };
        if !s.frontend_exists {
            to_destroy.insert(s.cookie, (s, Fallback::NoFrontend));
            continue;
        }
        let Some(owner) = owners.get(inode) else {
            to_destroy.insert(s.cookie, (s, Fallback::NoOwner));
            continue;
        };
        match move_socket(sockets, services, backends, s, *owner) {
            Ok(to) => {
                // The new backend's reverse entry is connect4's; the old one only if it differs
                // (an endpoint re-added under a new id gets the same address).
                if to != s.backend() {
                    let _ = sockets.0.remove(&s.reverse_key());
                }
                info!(
                    cookie = s.cookie,
                    frontend = %s.frontend(),
                    from = %s.backend(),
                    to = %to,
                    pid = owner.pid,
                    "moved a connected UDP socket of a host process to a live backend"
                );
                summary.moved += 1;
            }
            Err(reason) => {
                to_destroy.insert(s.cookie, (s, reason));
            }
        }
    }
    if to_destroy.is_empty() {
        return Ok(summary);
    }

    // A fresh dump: a connect that went through untranslated changed the socket's destination
    // to the frontend, and SOCK_DESTROY needs the socket's current address.
    for (id, _) in diag.dump_udp4()? {
        let cookie = id.cookie[0] as u64 | (id.cookie[1] as u64) << 32;
        let Some((s, reason)) = to_destroy.get(&cookie) else {
            continue;
        };
        let dst = (id.dst[0], id.dport);
        if dst != (s.backend_addr, s.backend_port) && dst != (s.frontend_addr, s.frontend_port) {
            // The application connected it elsewhere meanwhile: leave it.
            continue;
        }
        match diag.destroy_udp4(&id) {
            Ok(()) => {
                warn!(
                    cookie = s.cookie,
                    frontend = %s.frontend(),
                    backend = %s.backend(),
                    reason = %reason,
                    "destroyed a connected UDP socket of a host process instead of moving it \
                     (the application gets ECONNABORTED and must connect again)"
                );
                summary.destroyed += 1;
            }
            // Closed meanwhile.
            Err(Error::Diag { source, .. }) if source.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(e),
        }
    }
    for (s, _) in to_destroy.values() {
        sockets.forget(s);
    }
    Ok(summary)
}

/// Connects a duplicate of the owner's descriptor to the socket's frontend; connect4 (the
/// socket's cgroup's) picks the backend. Returns the backend it was given.
fn move_socket(
    sockets: &SockMap,
    services: &HashMap<MapData, ServiceKey, ServiceValue>,
    backends: &HashMap<MapData, u32, BackendValue>,
    s: &StaleSocket,
    owner: Owner,
) -> Result<SocketAddrV4, Fallback> {
    let fd = duplicate(owner)?;
    // The descriptor may have been closed and its number reused since /proc was read.
    if socket_cookie(&fd).ok() != Some(s.cookie) {
        return Err(Fallback::NoOwner);
    }
    if let Err(e) = connect(&fd, s.frontend()) {
        return Err(if e.raw_os_error() == Some(libc::ECONNREFUSED) {
            Fallback::NoEndpoints(e)
        } else {
            Fallback::Connect(e)
        });
    }
    // `fd` is closed on return; the application's descriptor keeps the socket open.
    let forward = sockets
        .0
        .get(&s.forward_key(), 0)
        .map_err(|_| Fallback::NotTranslated)?;
    let live = internal_backend_ids(services, s.frontend_addr, s.frontend_port)
        .is_some_and(|ids| ids.contains(&forward.backend_id))
        && backends
            .get(&forward.backend_id, 0)
            .is_ok_and(|b| b.addr == forward.addr && b.port == forward.port);
    if !live {
        return Err(Fallback::NotTranslated);
    }
    Ok(addr(forward.addr, forward.port))
}

/// A process and one of its descriptors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub pid: i32,
    pub fd: i32,
}

/// For each socket inode of `inodes`, the first descriptor found that refers to it, from the
/// `socket:[<inode>]` links of `<proc>/<pid>/fd/*`. Processes and descriptors that vanish while
/// they are read, or cannot be read, are skipped. Stops once every inode has an owner.
pub fn find_owners(proc: &Path, inodes: &BTreeSet<u32>) -> BTreeMap<u32, Owner> {
    let mut found = BTreeMap::new();
    let Ok(pids) = fs::read_dir(proc) else {
        return found;
    };
    for pid in pids.flatten() {
        let Some(pid) = pid.file_name().to_str().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(fds) = fs::read_dir(proc.join(pid.to_string()).join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Some(num) = fd.file_name().to_str().and_then(|f| f.parse::<i32>().ok()) else {
                continue;
            };
            let Ok(link) = fs::read_link(fd.path()) else {
                continue;
            };
            let Some(inode) = socket_inode(&link) else {
                continue;
            };
            if inodes.contains(&inode) && !found.contains_key(&inode) {
                found.insert(inode, Owner { pid, fd: num });
                if found.len() == inodes.len() {
                    return found;
                }
            }
        }
    }
    found
}

/// The inode of a `/proc/<pid>/fd/*` link to a socket (`socket:[12345]`).
fn socket_inode(link: &Path) -> Option<u32> {
    link.to_str()?
        .strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// A duplicate, in this process, of another process's descriptor (pidfd_getfd, Linux 5.6).
fn duplicate(owner: Owner) -> Result<OwnedFd, Fallback> {
    let failed = |op| Fallback::Duplicate {
        op,
        pid: owner.pid,
        fd: owner.fd,
        source: io::Error::last_os_error(),
    };
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, owner.pid, 0) };
    if pidfd < 0 {
        return Err(failed("pidfd_open"));
    }
    // SAFETY: a fresh descriptor nothing else owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
    // SAFETY: pidfd_getfd takes a pidfd, a descriptor number of that process and flags, and
    // returns a new descriptor (close-on-exec) or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), owner.fd, 0) };
    if fd < 0 {
        return Err(failed("pidfd_getfd"));
    }
    // SAFETY: a fresh descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The socket cookie of a descriptor (SO_COOKIE), as sock_diag and the BPF programs report it.
fn socket_cookie(fd: &OwnedFd) -> io::Result<u64> {
    let mut cookie = 0u64;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `cookie`.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            &mut cookie as *mut u64 as *mut libc::c_void,
            &mut len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// connect(2) of an IPv4 socket.
fn connect(fd: &OwnedFd, to: SocketAddrV4) -> io::Result<()> {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: to.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*to.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: `sin` is a valid sockaddr_in, alive for the call.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            &sin as *const libc::sockaddr_in as *const libc::sockaddr,
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;

/// `struct inet_diag_sockid`; ports and addresses in network order.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct SockId {
    sport: u16,
    dport: u16,
    src: [u32; 4],
    dst: [u32; 4],
    ifindex: u32,
    cookie: [u32; 2],
}

/// `struct nlmsghdr` + `struct inet_diag_req_v2`.
#[repr(C)]
struct Request {
    len: u32,
    kind: u16,
    flags: u16,
    seq: u32,
    pid: u32,
    family: u8,
    protocol: u8,
    ext: u8,
    _pad: u8,
    states: u32,
    id: SockId,
}

// The sum of the field sizes: no padding, so every byte of a Request is initialised.
const _: () = assert!(size_of::<Request>() == 16 + 8 + 48);

/// A NETLINK_SOCK_DIAG socket.
struct Diag(OwnedFd);

impl Diag {
    fn open() -> Result<Diag> {
        // SAFETY: plain socket(2); the descriptor is owned below.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                NETLINK_SOCK_DIAG,
            )
        };
        if fd < 0 {
            return Err(Error::Diag {
                op: "socket",
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: a fresh descriptor nothing else owns.
        Ok(Diag(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn send(&self, kind: u16, flags: u16, id: SockId, op: &'static str) -> Result<()> {
        let req = Request {
            len: size_of::<Request>() as u32,
            kind,
            flags,
            seq: 1,
            pid: 0,
            family: libc::AF_INET as u8,
            protocol: libc::IPPROTO_UDP as u8,
            ext: 0,
            _pad: 0,
            states: !0,
            id,
        };
        // SAFETY: `Request` is repr(C) plain old data without padding (asserted at its
        // definition) and every field is set above, so all its bytes are initialised.
        let bytes = unsafe {
            std::slice::from_raw_parts(&req as *const Request as *const u8, size_of::<Request>())
        };
        crate::netlink::send(&self.0, bytes).map_err(|source| Error::Diag { op, source })
    }

    /// Reads netlink messages, handing each payload of type other than DONE/ERROR to `each`,
    /// until DONE or an ERROR message (an error code of 0 is an ACK: done).
    fn receive(&self, op: &'static str, mut each: impl FnMut(&[u8])) -> Result<()> {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            let n = crate::netlink::recv(&self.0, &mut buf)
                .map_err(|source| Error::Diag { op, source })?;
            let mut msgs = &buf[..n];
            while msgs.len() >= 16 {
                let len = u32::from_ne_bytes(msgs[0..4].try_into().expect("4 bytes")) as usize;
                let kind = u16::from_ne_bytes(msgs[4..6].try_into().expect("2 bytes"));
                if len < 16 || len > msgs.len() {
                    break;
                }
                match kind {
                    NLMSG_DONE => return Ok(()),
                    NLMSG_ERROR => {
                        let code = i32::from_ne_bytes(msgs[16..20].try_into().expect("4 bytes"));
                        if code == 0 {
                            return Ok(());
                        }
                        return Err(Error::Diag {
                            op,
                            source: io::Error::from_raw_os_error(-code),
                        });
                    }
                    _ => each(&msgs[16..len]),
                }
                msgs = msgs.get((len + 3) & !3..).unwrap_or(&[]);
            }
        }
    }

    /// Every IPv4 UDP socket of this network namespace, with its inode.
    fn dump_udp4(&self) -> Result<Vec<(SockId, u32)>> {
        self.send(
            SOCK_DIAG_BY_FAMILY,
            NLM_F_REQUEST | NLM_F_DUMP,
            SockId::default(),
            "dumping UDP sockets",
        )?;
        let mut out = Vec::new();
        self.receive("dumping UDP sockets", |payload| {
            // struct inet_diag_msg: family, state, timer, retrans, the socket id, then expires,
            // rqueue, wqueue, uid and inode (u32 each).
            let inode_at = 4 + size_of::<SockId>() + 16;
            if payload.len() >= inode_at + 4 {
                // SAFETY: the bytes after the first four are a `struct inet_diag_sockid`, a
                // plain-integer struct for which any bit pattern is valid; read unaligned.
                let id = unsafe { (payload.as_ptr().add(4) as *const SockId).read_unaligned() };
                let inode = u32::from_ne_bytes(
                    payload[inode_at..inode_at + 4].try_into().expect("4 bytes"),
                );
                out.push((id, inode));
            }
        })?;
        Ok(out)
    }

    /// Destroys the UDP socket `id` names (its cookie must match).
    fn destroy_udp4(&self, id: &SockId) -> Result<()> {
        self.send(
            SOCK_DESTROY,
            NLM_F_REQUEST | NLM_F_ACK,
            *id,
            "destroying a UDP socket",
        )?;
        self.receive("destroying a UDP socket", |_| {})
    }
}

#[cfg(test)]
mod tests {
    use std::{
        net::UdpSocket,
        os::{fd::AsFd, unix::fs::MetadataExt},
    };

    use super::*;

    fn inode_of(s: &UdpSocket) -> u32 {
        let fd = s.as_fd().try_clone_to_owned().unwrap();
        fs::File::from(fd).metadata().unwrap().ino() as u32
    }

    #[test]
    fn find_owners_finds_a_socket_of_this_process_in_proc() {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let inode = inode_of(&socket);
        let owners = find_owners(Path::new("/proc"), &BTreeSet::from([inode]));
        let owner = owners.get(&inode).expect("this process's socket found");
        assert_eq!(owner.pid, std::process::id() as i32);
        // The first descriptor found refers to the socket (the one bound above, or the clone
        // inode_of made and dropped already).
        let link = fs::read_link(format!("/proc/self/fd/{}", owner.fd)).unwrap();
        assert_eq!(socket_inode(&link), Some(inode));
    }

    #[test]
    fn find_owners_skips_what_is_not_a_process_or_a_socket_and_stops_at_the_first_hit() {
        let root = std::env::temp_dir().join(format!("lb-find-owners-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        for dir in ["12/fd", "30/fd", "40", "self/fd"] {
            fs::create_dir_all(root.join(dir)).unwrap();
        }
        let link = |path: &str, target: &str| {
            std::os::unix::fs::symlink(target, root.join(path)).unwrap();
        };
        link("12/fd/3", "/dev/null");
        link("12/fd/4", "socket:[1001]");
        link("12/fd/x", "socket:[1002]");
        link("30/fd/7", "socket:[1002]");
        link("30/fd/8", "socket:[1001]");
        link("self/fd/9", "socket:[1003]");
        // 40 has no fd directory (a process that exited, or a kernel thread we cannot read).
        let owners = find_owners(&root, &BTreeSet::from([1001, 1002, 1003, 1004]));
        let _ = fs::remove_dir_all(&root);
        assert_eq!(owners.get(&1002), Some(&Owner { pid: 30, fd: 7 }));
        // 1001 is open in 12 and 30; whichever the directory order gives first.
        assert!(matches!(
            owners.get(&1001),
            Some(Owner { pid: 12, fd: 4 }) | Some(Owner { pid: 30, fd: 8 })
        ));
        assert_eq!(owners.get(&1003), None, "not a pid directory");
        assert_eq!(owners.get(&1004), None);
    }

    #[test]
    fn socket_inode_reads_only_socket_links() {
        assert_eq!(socket_inode(Path::new("socket:[4026]")), Some(4026));
        assert_eq!(socket_inode(Path::new("pipe:[4026]")), None);
        assert_eq!(socket_inode(Path::new("/tmp/socket:[1]")), None);
        assert_eq!(socket_inode(Path::new("socket:[x]")), None);
    }

    #[test]
    fn a_duplicate_from_pidfd_getfd_reconnects_the_owner_s_socket() {
        let app = UdpSocket::bind("127.0.0.1:0").unwrap();
        let old = UdpSocket::bind("127.0.0.1:0").unwrap();
        let new = UdpSocket::bind("127.0.0.1:0").unwrap();
        app.connect(old.local_addr().unwrap()).unwrap();
        let owners = find_owners(Path::new("/proc"), &BTreeSet::from([inode_of(&app)]));
        let owner = *owners.values().next().expect("owner found");
        let dup = duplicate(owner).expect("pidfd_getfd of this process");
        let cookie = socket_cookie(&app.as_fd().try_clone_to_owned().unwrap()).unwrap();
        assert_eq!(socket_cookie(&dup).unwrap(), cookie);
        let std::net::SocketAddr::V4(to) = new.local_addr().unwrap() else {
            unreachable!()
        };
        connect(&dup, to).unwrap();
        drop(dup);
        // The application's descriptor is still open and now sends to the new peer.
        assert_eq!(app.peer_addr().unwrap(), new.local_addr().unwrap());
        app.send(b"x").unwrap();
        let mut buf = [0u8; 4];
        new.set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
        assert_eq!(new.recv(&mut buf).unwrap(), 1);
    }

    #[test]
    fn duplicate_of_a_process_that_does_not_exist_is_refused() {
        // pid_max is at most 2^22: this pid never exists.
        let err = duplicate(Owner {
            pid: 1 << 23,
            fd: 0,
        })
        .unwrap_err();
        assert!(
            matches!(
                err,
                Fallback::Duplicate {
                    op: "pidfd_open",
                    ..
                }
            ),
            "{err}"
        );
    }
}
