//! Just enough rtnetlink (NETLINK_ROUTE, link messages only) for attaching to pod interfaces:
//! looking up one interface's peer (`IFLA_LINK` of a veth), and following interfaces as they
//! appear and vanish (`RTM_NEWLINK` / `RTM_DELLINK` on the `RTMGRP_LINK` group).
//!
//! A netlink socket talks to the network namespace of the thread that created it, which is how
//! `lb-cni` looks inside a pod: it creates the socket on a thread that joined the pod namespace.
//! (`/sys/class/net` would not do: it shows the namespace sysfs was mounted in.)
//!
//! Wire format: each message is a 16-byte `nlmsghdr {len u32, type u16, flags u16, seq u32,
//! pid u32}`, for link messages followed by a 16-byte `ifinfomsg {family u8, pad u8, type u16,
//! index i32, flags u32, change u32}` and `rtattr {len u16, type u16}` attributes, every part
//! aligned to 4 bytes; native byte order.
use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

const NLMSG_HDR_LEN: usize = 16;
const IFINFOMSG_LEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const RTM_GETLINK: u16 = 18;
const RTMGRP_LINK: u32 = 1;
const IFLA_IFNAME: u16 = 3;
const IFLA_LINK: u16 = 5;
/// Attribute type bits that are flags, not part of the type.
const NLA_TYPE_MASK: u16 = 0x3fff;

/// Whether an interface appeared (or changed) or vanished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkChange {
    /// `RTM_NEWLINK`: created, moved into this namespace, or any state change.
    New,
    /// `RTM_DELLINK`: deleted or moved out of this namespace.
    Deleted,
}

/// One link message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkMessage {
    /// New or deleted.
    pub change: LinkChange,
    /// The interface's index in this namespace.
    pub ifindex: u32,
    /// `IFLA_IFNAME`.
    pub name: Option<String>,
    /// `IFLA_LINK`: for a veth, the peer's ifindex (in the peer's namespace).
    pub link: Option<u32>,
}

/// A NETLINK_ROUTE socket in the calling thread's network namespace.
pub struct RouteSocket(OwnedFd);

impl RouteSocket {
    fn open(groups: u32) -> io::Result<RouteSocket> {
        // SAFETY: plain socket(2); the result is checked before use.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the descriptor was just returned to us and nothing else owns it.
        let socket = RouteSocket(unsafe { OwnedFd::from_raw_fd(fd) });
        // SAFETY: sockaddr_nl is plain data; all-zero is a valid value.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        addr.nl_groups = groups;
        // SAFETY: `addr` is a valid sockaddr_nl and the length given is its size.
        let rc = unsafe {
            libc::bind(
                socket.0.as_raw_fd(),
                &addr as *const libc::sockaddr_nl as *const libc::sockaddr,
                size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(socket)
    }

    /// Subscribes to link events (`RTMGRP_LINK`).
    pub fn link_events() -> io::Result<RouteSocket> {
        RouteSocket::open(RTMGRP_LINK)
    }

    /// Blocks until messages arrive and returns the link messages among them. `ENOBUFS` means
    /// events were lost (the socket buffer overflowed): the caller should rescan.
    pub fn receive(&self) -> io::Result<Vec<LinkMessage>> {
        let mut buf = vec![0u8; 64 * 1024];
        let n = recv(&self.0, &mut buf)?;
        parse_messages(&buf[..n])
    }

    fn send(&self, message: &[u8]) -> io::Result<()> {
        send(&self.0, message)
    }
}

/// One `recv` on a netlink socket into `buf`, retried when a signal interrupts it; the number of
/// bytes received.
pub(crate) fn recv(socket: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`, which we own.
        let n = unsafe {
            libc::recv(
                socket.as_raw_fd(),
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
                0,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Sends one whole message on a netlink socket (to the kernel, its default destination).
pub(crate) fn send(socket: &OwnedFd, message: &[u8]) -> io::Result<()> {
    // SAFETY: `message` is valid for reads of its length for the duration of the call.
    let n = unsafe {
        libc::send(
            socket.as_raw_fd(),
            message.as_ptr() as *const libc::c_void,
            message.len(),
            0,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Looks up the interface with `ifindex` in the calling thread's network namespace; `None` if
/// there is none.
pub fn link_by_index(ifindex: u32) -> io::Result<Option<LinkMessage>> {
    let socket = RouteSocket::open(0)?;
    let mut request = Vec::with_capacity(NLMSG_HDR_LEN + IFINFOMSG_LEN);
    request.extend_from_slice(&((NLMSG_HDR_LEN + IFINFOMSG_LEN) as u32).to_ne_bytes());
    request.extend_from_slice(&RTM_GETLINK.to_ne_bytes());
    request.extend_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes());
    request.extend_from_slice(&1u32.to_ne_bytes()); // seq
    request.extend_from_slice(&0u32.to_ne_bytes()); // pid: the kernel fills it in
    request.extend_from_slice(&[libc::AF_UNSPEC as u8, 0, 0, 0]);
    request.extend_from_slice(&(ifindex as i32).to_ne_bytes());
    request.extend_from_slice(&[0u8; 8]); // flags, change
    socket.send(&request)?;
    match socket.receive() {
        Ok(mut links) => Ok(links.pop()),
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Parses a buffer of netlink messages; an `NLMSG_ERROR` with a non-zero code becomes that error.
fn parse_messages(buf: &[u8]) -> io::Result<Vec<LinkMessage>> {
    let mut out = Vec::new();
    let mut offset = 0;
    while offset + NLMSG_HDR_LEN <= buf.len() {
        let len = u32_at(buf, offset) as usize;
        let kind = u16_at(buf, offset + 4);
        if len < NLMSG_HDR_LEN || offset + len > buf.len() {
            break;
        }
        let body = &buf[offset + NLMSG_HDR_LEN..offset + len];
        match kind {
            NLMSG_ERROR if body.len() >= 4 => {
                let code = i32::from_ne_bytes(body[..4].try_into().expect("4 bytes"));
                if code != 0 {
                    return Err(io::Error::from_raw_os_error(-code));
                }
            }
            NLMSG_DONE => break,
            RTM_NEWLINK | RTM_DELLINK if body.len() >= IFINFOMSG_LEN => {
                out.push(parse_link(kind, body));
            }
            _ => {}
        }
        offset += align4(len);
    }
    Ok(out)
}

fn parse_link(kind: u16, body: &[u8]) -> LinkMessage {
    let mut message = LinkMessage {
        change: if kind == RTM_DELLINK {
            LinkChange::Deleted
        } else {
            LinkChange::New
        },
        ifindex: u32_at(body, 4),
        name: None,
        link: None,
    };
    let mut offset = IFINFOMSG_LEN;
    while offset + 4 <= body.len() {
        let len = u16_at(body, offset) as usize;
        let attr_type = u16_at(body, offset + 2) & NLA_TYPE_MASK;
        if len < 4 || offset + len > body.len() {
            break;
        }
        let payload = &body[offset + 4..offset + len];
        match attr_type {
            IFLA_IFNAME => {
                let name = payload.split(|b| *b == 0).next().unwrap_or_default();
                message.name = Some(String::from_utf8_lossy(name).into_owned());
            }
            IFLA_LINK if payload.len() >= 4 => message.link = Some(u32_at(payload, 0)),
            _ => {}
        }
        offset += align4(len);
    }
    message
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn u32_at(buf: &[u8], offset: usize) -> u32 {
    u32::from_ne_bytes(buf[offset..offset + 4].try_into().expect("4 bytes"))
}

fn u16_at(buf: &[u8], offset: usize) -> u16 {
    u16::from_ne_bytes(buf[offset..offset + 2].try_into().expect("2 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link_message(kind: u16, index: u32, attrs: &[(u16, &[u8])]) -> Vec<u8> {
        let mut body = vec![0u8; IFINFOMSG_LEN];
        body[4..8].copy_from_slice(&index.to_ne_bytes());
        for (t, payload) in attrs {
            let len = 4 + payload.len();
            body.extend_from_slice(&(len as u16).to_ne_bytes());
            body.extend_from_slice(&t.to_ne_bytes());
            body.extend_from_slice(payload);
            body.resize(align4(body.len()), 0);
        }
        let mut msg = Vec::new();
        msg.extend_from_slice(&((NLMSG_HDR_LEN + body.len()) as u32).to_ne_bytes());
        msg.extend_from_slice(&kind.to_ne_bytes());
        msg.extend_from_slice(&[0u8; 10]);
        msg.extend_from_slice(&body);
        msg
    }

    #[test]
    fn link_messages_yield_index_name_and_peer() {
        let mut buf = link_message(
            RTM_NEWLINK,
            7,
            &[(IFLA_IFNAME, b"veth1\0"), (IFLA_LINK, &3u32.to_ne_bytes())],
        );
        buf.extend(link_message(RTM_DELLINK, 9, &[(IFLA_IFNAME, b"lxc12\0")]));
        let links = parse_messages(&buf).unwrap();
        assert_eq!(
            links,
            vec![
                LinkMessage {
                    change: LinkChange::New,
                    ifindex: 7,
                    name: Some("veth1".into()),
                    link: Some(3)
                },
                LinkMessage {
                    change: LinkChange::Deleted,
                    ifindex: 9,
                    name: Some("lxc12".into()),
                    link: None
                },
            ]
        );
    }

    #[test]
    fn netlink_error_message_becomes_the_errno() {
        let mut msg = Vec::new();
        msg.extend_from_slice(&((NLMSG_HDR_LEN + 4) as u32).to_ne_bytes());
        msg.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        msg.extend_from_slice(&[0u8; 10]);
        msg.extend_from_slice(&(-libc::ENODEV).to_ne_bytes());
        let err = parse_messages(&msg).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENODEV));
    }
}
