//! A host process for the socket-hook tests: reads one command per line on stdin and answers one
//! line on stdout, so a test can start it inside a cgroup and a namespace and drive it step by
//! step. Every socket operation has a 2 s timeout, so every command gets an answer.
//!
//! ```text
//! tcp A:P            connect, read the greeting, getpeername   -> ok <greeting> peer=<addr>
//! udp-connect A:P    new UDP socket connected to A:P          -> ok peer=<addr>
//! udp-reconnect A:P  connect the current UDP socket again     -> ok peer=<addr>
//! udp-send           send on the connected socket, recvfrom   -> ok <reply> from=<addr>
//! udp-recv           recvfrom on the connected socket          -> ok <reply> from=<addr>
//! udp-peer           getpeername of the connected socket       -> ok peer=<addr>
//! udp-stash          send the connected socket over a unix socket to itself (SCM_RIGHTS) and
//!                    close it: no process has it open while it waits there -> ok stashed
//! udp-unstash        receive it back as the connected socket   -> ok unstashed
//! udp-sendto A:P     sendto on an unconnected socket, recvfrom -> ok <reply> from=<addr>
//! any failure                                                 -> err <errno> <message>
//! ```
use std::io::{self, BufRead, BufReader, Write};
use std::net::{SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(2);

fn main() {
    let mut connected: Option<UdpSocket> = None;
    let mut unconnected: Option<UdpSocket> = None;
    let mut stash: Option<(UnixDatagram, UnixDatagram)> = None;
    let stdin = io::stdin();
    let mut out = io::stdout();
    for line in stdin.lock().lines() {
        let Ok(line) = line else { break };
        let mut words = line.split_whitespace();
        let cmd = words.next().unwrap_or("");
        let addr = words.next().and_then(|a| a.parse::<SocketAddrV4>().ok());
        let answer = match (cmd, addr) {
            ("tcp", Some(to)) => tcp(to),
            ("udp-connect", Some(to)) => udp_socket().and_then(|s| {
                s.connect(to)?;
                let peer = s.peer_addr()?;
                connected = Some(s);
                Ok(format!("peer={peer}"))
            }),
            ("udp-reconnect", Some(to)) => match &connected {
                Some(s) => s
                    .connect(to)
                    .and_then(|_| s.peer_addr())
                    .map(|p| format!("peer={p}")),
                None => Err(io::Error::other("no connected socket")),
            },
            ("udp-send", None) => match &connected {
                Some(s) => s.send(b"hi\n").and_then(|_| receive(s)),
                None => Err(io::Error::other("no connected socket")),
            },
            ("udp-peer", None) => match &connected {
                Some(s) => s.peer_addr().map(|p| format!("peer={p}")),
                None => Err(io::Error::other("no connected socket")),
            },
            ("udp-stash", None) => match connected.take() {
                Some(s) => UnixDatagram::pair().and_then(|(tx, rx)| {
                    send_fd(&tx, s.into())?;
                    stash = Some((tx, rx));
                    Ok("stashed".to_string())
                }),
                None => Err(io::Error::other("no connected socket")),
            },
            ("udp-unstash", None) => match stash.take() {
                Some((_tx, rx)) => receive_fd(&rx).map(|fd| {
                    connected = Some(UdpSocket::from(fd));
                    "unstashed".to_string()
                }),
                None => Err(io::Error::other("nothing stashed")),
            },
            ("udp-recv", None) => match &connected {
                Some(s) => receive(s),
                None => Err(io::Error::other("no connected socket")),
            },
            ("udp-sendto", Some(to)) => {
                if unconnected.is_none() {
                    unconnected = udp_socket().ok();
                }
                match &unconnected {
                    Some(s) => s.send_to(b"hi\n", to).and_then(|_| receive(s)),
                    None => Err(io::Error::other("cannot create a UDP socket")),
                }
            }
            _ => Err(io::Error::other(format!("bad command {line:?}"))),
        };
        let text = match answer {
            Ok(a) => format!("ok {a}"),
            Err(e) => format!("err {} {e}", e.raw_os_error().unwrap_or(0)),
        };
        if writeln!(out, "{text}").and_then(|_| out.flush()).is_err() {
            break;
        }
    }
}

fn udp_socket() -> io::Result<UdpSocket> {
    let s = UdpSocket::bind("0.0.0.0:0")?;
    s.set_read_timeout(Some(TIMEOUT))?;
    Ok(s)
}

/// One datagram and its source as recvfrom reports it.
fn receive(s: &UdpSocket) -> io::Result<String> {
    let mut buf = [0u8; 512];
    let (n, from) = s.recv_from(&mut buf)?;
    Ok(format!(
        "{} from={from}",
        String::from_utf8_lossy(&buf[..n]).trim_end()
    ))
}

fn tcp(to: SocketAddrV4) -> io::Result<String> {
    let stream = TcpStream::connect_timeout(&SocketAddr::V4(to), TIMEOUT)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    let peer = stream.peer_addr()?;
    let mut greeting = String::new();
    BufReader::new(&stream).read_line(&mut greeting)?;
    Ok(format!("{} peer={peer}", greeting.trim_end()))
}

/// Sends `fd` as SCM_RIGHTS over `tx` and closes it here: until received, only the message holds it.
fn send_fd(tx: &UnixDatagram, fd: OwnedFd) -> io::Result<()> {
    let raw = fd.into_raw_fd();
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr() as *mut libc::c_void,
        iov_len: 1,
    };
    // Room for one cmsghdr carrying one descriptor, aligned as the kernel wants.
    let mut control = [0u64; 4];
    // SAFETY: msghdr is a plain C struct; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
    // SAFETY: CMSG_SPACE only computes a size.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(size_of::<i32>() as u32) } as usize;
    // SAFETY: msg_control points to `control`, large enough for one cmsghdr with an int; the
    // header and its data are written inside it.
    let rc = unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<i32>() as u32) as usize;
        (libc::CMSG_DATA(cmsg) as *mut i32).write_unaligned(raw);
        libc::sendmsg(tx.as_raw_fd(), &msg, 0)
    };
    let result = if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    };
    // SAFETY: `raw` came from into_raw_fd above and is closed once; the message keeps its own
    // reference.
    drop(unsafe { OwnedFd::from_raw_fd(raw) });
    result
}

/// Receives a descriptor sent by [`send_fd`].
fn receive_fd(rx: &UnixDatagram) -> io::Result<OwnedFd> {
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr() as *mut libc::c_void,
        iov_len: 1,
    };
    let mut control = [0u64; 4];
    // SAFETY: msghdr is a plain C struct; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = size_of_val(&control);
    // SAFETY: the kernel writes into `byte` and `control`, both alive for the call.
    if unsafe { libc::recvmsg(rx.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `msg` was filled by recvmsg; CMSG_FIRSTHDR checks msg_controllen.
    let cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    // SAFETY: a non-null cmsg points inside `control`.
    if cmsg.is_null() || unsafe { (*cmsg).cmsg_type } != libc::SCM_RIGHTS {
        return Err(io::Error::other("no descriptor received"));
    }
    // SAFETY: an SCM_RIGHTS message carries an int descriptor, now ours.
    Ok(unsafe { OwnedFd::from_raw_fd((libc::CMSG_DATA(cmsg) as *const i32).read_unaligned()) })
}
