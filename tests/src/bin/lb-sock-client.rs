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
//! udp-sendto A:P     sendto on an unconnected socket, recvfrom -> ok <reply> from=<addr>
//! any failure                                                 -> err <errno> <message>
//! ```
use std::io::{self, BufRead, BufReader, Write};
use std::net::{SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(2);

fn main() {
    let mut connected: Option<UdpSocket> = None;
    let mut unconnected: Option<UdpSocket> = None;
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
