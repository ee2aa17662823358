//! Connected UDP sockets of host processes whose backend went away.
//!
//! connect4 translates a UDP socket's destination once, and the kernel runs no hook for the
//! datagrams of a connected socket, so such a socket would keep sending to a deleted backend
//! forever. After each change of the maps the agent finds those sockets (the socket map records
//! which backend each translated socket was given) and destroys them with the sock_diag
//! `SOCK_DESTROY` request, which for UDP is `udp_abort()`: the socket gets the error
//! `ECONNABORTED`, reported by its next (or pending) `send`/`recv`, and is disconnected. An
//! application that connects again to the frontend gets a live backend from connect4.
//!
//! A backend "went away" for a socket when its frontend's internal backend list no longer names
//! it: the endpoint was deleted, or is no longer used for new flows (not ready while ready ones
//! exist). Only sockets in the agent's network namespace are found (sock_diag is per
//! namespace), which is the node's: the hooks serve host-network processes.
use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    mem::size_of,
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
}

/// The UDP sockets in `sockets` whose backend is no longer among their frontend's backends.
pub fn find_stale(
    sockets: &SockMap,
    services: &HashMap<MapData, ServiceKey, ServiceValue>,
    backends: &HashMap<MapData, u32, BackendValue>,
) -> Result<Vec<StaleSocket>> {
    // Frontend -> backend ids of its internal slots (None: no such frontend any more).
    let mut slots: BTreeMap<(u32, u16), BTreeSet<u32>> = BTreeMap::new();
    let mut out = Vec::new();
    for entry in sockets.0.iter() {
        // Entries can vanish (LRU) while we walk; a failed read is skipped, not fatal.
        let Ok((k, v)) = entry else { continue };
        if k.dir != SOCK_DIR_REVERSE || k.proto != proto::UDP {
            continue;
        }
        let fe = (v.addr, v.port);
        let ids = slots.entry(fe).or_insert_with(|| {
            let mut ids = BTreeSet::new();
            let master = ServiceKey::new(v.addr, v.port, proto::UDP, SCOPE_INTERNAL, 0);
            if let Ok(m) = services.get(&master, 0) {
                for slot in 1..=m.count {
                    let key = ServiceKey::new(v.addr, v.port, proto::UDP, SCOPE_INTERNAL, slot);
                    if let Ok(s) = services.get(&key, 0) {
                        ids.insert(s.backend_id);
                    }
                }
            }
            ids
        });
        let listed = ids.contains(&v.backend_id);
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
            });
        }
    }
    out.sort();
    Ok(out)
}

/// Destroys the sockets of `stale` that still exist in this network namespace and forgets all of
/// `stale` in the socket map. Returns how many sockets were destroyed.
pub fn destroy(sockets: &mut SockMap, stale: &[StaleSocket]) -> Result<usize> {
    if stale.is_empty() {
        return Ok(0);
    }
    let wanted: BTreeMap<u64, (u32, u16)> = stale
        .iter()
        .map(|s| (s.cookie, (s.backend_addr, s.backend_port)))
        .collect();
    let diag = Diag::open()?;
    let mut destroyed = 0;
    for id in diag.dump_udp4()? {
        let cookie = id.cookie[0] as u64 | (id.cookie[1] as u64) << 32;
        if wanted.get(&cookie) == Some(&(id.dst[0], id.dport)) {
            match diag.destroy_udp4(&id) {
                Ok(()) => destroyed += 1,
                // Closed meanwhile.
                Err(Error::Diag { source, .. }) if source.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(e),
            }
        }
    }
    for s in stale {
        for key in [
            SockKey {
                cookie: s.cookie,
                addr: s.backend_addr,
                port: s.backend_port,
                proto: proto::UDP,
                dir: SOCK_DIR_REVERSE,
            },
            SockKey {
                cookie: s.cookie,
                addr: s.frontend_addr,
                port: s.frontend_port,
                proto: proto::UDP,
                dir: SOCK_DIR_FORWARD,
            },
        ] {
            // Already evicted is fine; the forward entry may point at a newer backend only if
            // the socket reconnected, which a destroyed socket cannot have done yet.
            let _ = sockets.0.remove(&key);
        }
    }
    Ok(destroyed)
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
        // SAFETY: sends the bytes of `req`, alive for the call; the kernel is the default
        // destination of a netlink socket.
        let rc = unsafe {
            libc::send(
                self.0.as_raw_fd(),
                &req as *const Request as *const libc::c_void,
                size_of::<Request>(),
                0,
            )
        };
        if rc < 0 {
            return Err(Error::Diag {
                op,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Reads netlink messages, handing each payload of type other than DONE/ERROR to `each`,
    /// until DONE or an ERROR message (an error code of 0 is an ACK: done).
    fn receive(&self, op: &'static str, mut each: impl FnMut(&[u8])) -> Result<()> {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`.
            let n = unsafe {
                libc::recv(
                    self.0.as_raw_fd(),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                    0,
                )
            };
            if n < 0 {
                let source = io::Error::last_os_error();
                if source.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(Error::Diag { op, source });
            }
            let mut msgs = &buf[..n as usize];
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

    /// Every IPv4 UDP socket of this network namespace.
    fn dump_udp4(&self) -> Result<Vec<SockId>> {
        self.send(
            SOCK_DIAG_BY_FAMILY,
            NLM_F_REQUEST | NLM_F_DUMP,
            SockId::default(),
            "dumping UDP sockets",
        )?;
        let mut out = Vec::new();
        self.receive("dumping UDP sockets", |payload| {
            // struct inet_diag_msg: family, state, timer, retrans, then the socket id.
            if payload.len() >= 4 + size_of::<SockId>() {
                // SAFETY: the bytes after the first four are a `struct inet_diag_sockid`, a
                // plain-integer struct for which any bit pattern is valid; read unaligned.
                let id = unsafe { (payload.as_ptr().add(4) as *const SockId).read_unaligned() };
                out.push(id);
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
