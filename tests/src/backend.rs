//! Echo backends that say who they are and whom they saw, and the clients that query them.
//!
//! Sockets keep the network namespace they were created in, so everything here creates its
//! sockets inside [`Netns::run`] and may then use them from ordinary threads.

use std::io::{self, BufRead, BufReader, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};

use crate::Netns;

/// How often server threads look at their stop flag; bounds how long drop takes.
const POLL: Duration = Duration::from_millis(50);

/// What a backend answered: its name and the client address it saw, which tells a test
/// which backend a load balancer picked and whether the client's source address survived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The name given to [`EchoServer::start`].
    pub backend: String,
    /// The source address of the request as the backend saw it.
    pub peer: SocketAddrV4,
}

impl Reply {
    /// Parses `"<name> <ip>:<port>"` (trailing newline allowed).
    pub fn parse(line: &str) -> Result<Reply> {
        let (backend, peer) = line
            .trim_end()
            .split_once(' ')
            .ok_or_else(|| anyhow!("malformed reply {line:?}"))?;
        let peer = peer
            .parse()
            .map_err(|_| anyhow!("malformed peer address in reply {line:?}"))?;
        Ok(Reply {
            backend: backend.to_string(),
            peer,
        })
    }
}

/// A backend in a namespace, listening on 0.0.0.0 on one TCP and one UDP port.
///
/// TCP: each connection gets `"<name> <peer_ip>:<peer_port>\n"` at once, then every line
/// it sends is echoed until it closes, so tests can hold a connection open. UDP: each
/// datagram is answered to its sender with the same line. Stops (threads joined) on drop.
#[derive(Debug)]
pub struct EchoServer {
    name: String,
    tcp_port: u16,
    udp_port: u16,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl EchoServer {
    /// Binds both sockets inside `ns` (port 0 picks a free one; see [`EchoServer::tcp_port`])
    /// and serves them; it accepts connections as soon as this returns.
    pub fn start(ns: &Netns, name: &str, tcp_port: u16, udp_port: u16) -> Result<EchoServer> {
        let (listener, udp) = ns.run(|| -> Result<_> {
            let tcp = TcpListener::bind((Ipv4Addr::UNSPECIFIED, tcp_port))
                .with_context(|| format!("bind TCP 0.0.0.0:{tcp_port} in {}", ns.name()))?;
            let udp = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, udp_port))
                .with_context(|| format!("bind UDP 0.0.0.0:{udp_port} in {}", ns.name()))?;
            Ok((tcp, udp))
        })?;
        let tcp_port = listener.local_addr()?.port();
        let udp_port = udp.local_addr()?.port();
        udp.set_read_timeout(Some(POLL))?;

        let stop = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(Mutex::new(Vec::new()));
        let mut server = EchoServer {
            name: name.to_string(),
            tcp_port,
            udp_port,
            stop: stop.clone(),
            threads: Vec::new(),
            connections: connections.clone(),
        };
        let (tcp_name, tcp_stop) = (name.to_string(), stop.clone());
        server.threads.push(
            std::thread::Builder::new()
                .name(format!("echo-tcp {name}"))
                .spawn(move || accept_loop(listener, &tcp_name, &tcp_stop, &connections))?,
        );
        let udp_name = name.to_string();
        server.threads.push(
            std::thread::Builder::new()
                .name(format!("echo-udp {name}"))
                .spawn(move || udp_loop(udp, &udp_name, &stop))?,
        );
        Ok(server)
    }

    /// The name this backend puts in its replies.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The TCP port actually bound.
    pub fn tcp_port(&self) -> u16 {
        self.tcp_port
    }

    /// The UDP port actually bound.
    pub fn udp_port(&self) -> u16 {
        self.udp_port
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
        // The accept thread is gone, so nobody adds connections any more.
        let connections = std::mem::take(&mut *lock(&self.connections));
        for thread in connections {
            let _ = thread.join();
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

fn accept_loop(
    listener: TcpListener,
    name: &str,
    stop: &Arc<AtomicBool>,
    connections: &Mutex<Vec<JoinHandle<()>>>,
) {
    while !stop.load(Ordering::Relaxed) {
        match readable(&listener, POLL) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => {
                eprintln!("lb-tests: echo server {name}: poll: {e}");
                return;
            }
        }
        let Ok((stream, peer)) = listener.accept() else {
            // E.g. EMFILE: the listener stays readable, so don't spin.
            std::thread::sleep(POLL);
            continue;
        };
        let (name, stop) = (name.to_string(), stop.clone());
        let spawned = std::thread::Builder::new()
            .name("echo-conn".into())
            .spawn(move || serve_connection(stream, peer, &name, &stop));
        let mut threads = lock(connections);
        threads.retain(|t| !t.is_finished());
        match spawned {
            Ok(thread) => threads.push(thread),
            Err(e) => eprintln!("lb-tests: echo server: cannot spawn a thread: {e}"),
        }
    }
}

/// Greets, then echoes until the client closes or the server stops. Waiting for the
/// client's FIN (instead of closing first) also avoids answering late data with a RST.
fn serve_connection(stream: TcpStream, peer: SocketAddr, name: &str, stop: &AtomicBool) {
    let mut writer = &stream;
    if writer
        .write_all(format!("{name} {peer}\n").as_bytes())
        .is_err()
        || stream.set_read_timeout(Some(POLL)).is_err()
    {
        return;
    }
    let mut reader = BufReader::new(&stream);
    let mut line = String::new();
    while !stop.load(Ordering::Relaxed) {
        match reader.read_line(&mut line) {
            Ok(0) => break,
            Ok(_) if line.ends_with('\n') => {
                if writer.write_all(line.as_bytes()).is_err() {
                    break;
                }
                line.clear();
            }
            // A partial line: keep it and wait for the rest.
            Ok(_) => {}
            Err(e) if is_timeout(&e) => {}
            Err(_) => break,
        }
    }
    let _ = stream.shutdown(Shutdown::Both);
}

fn udp_loop(socket: UdpSocket, name: &str, stop: &AtomicBool) {
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        match socket.recv_from(&mut buf) {
            Ok((_, peer)) => {
                let _ = socket.send_to(format!("{name} {peer}\n").as_bytes(), peer);
            }
            Err(e) if is_timeout(&e) => {}
            // E.g. ECONNREFUSED left by an ICMP error for an earlier reply: keep serving.
            Err(_) => {}
        }
    }
}

/// Waits up to `timeout` for `socket` to become readable.
fn readable(socket: &impl AsRawFd, timeout: Duration) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd: socket.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let millis = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
    // SAFETY: pfd is a valid pollfd for the duration of the call and the count is 1.
    let rc = unsafe { libc::poll(&mut pfd, 1, millis) };
    match rc {
        -1 if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted => Ok(false),
        -1 => Err(io::Error::last_os_error()),
        0 => Ok(false),
        _ => Ok(true),
    }
}

/// A TCP connection to an [`EchoServer`], kept open: for tests about established flows.
#[derive(Debug)]
pub struct TcpConn {
    /// The greeting the backend sent when the connection was accepted.
    pub reply: Reply,
    to: SocketAddrV4,
    reader: BufReader<TcpStream>,
}

impl TcpConn {
    /// Sends `text` (one line, without newline) and returns the echoed line (without
    /// newline), failing after `timeout`.
    pub fn roundtrip(&mut self, text: &str, timeout: Duration) -> Result<String> {
        let to = self.to;
        let deadline = Instant::now() + timeout;
        self.reader
            .get_mut()
            .write_all(format!("{text}\n").as_bytes())
            .map_err(|e| anyhow!("TCP {to}: send: {}", explain(&e, timeout)))?;
        let line = read_line(&mut self.reader, deadline)
            .map_err(|e| anyhow!("TCP {to}: waiting for the echo: {}", explain(&e, timeout)))?;
        Ok(line.trim_end_matches('\n').to_string())
    }

    /// The underlying socket, e.g. to read its local address or close it abruptly.
    pub fn stream(&self) -> &TcpStream {
        self.reader.get_ref()
    }
}

/// Connects from `ns` to `to` and reads the greeting, keeping the connection open.
pub fn tcp_connect(ns: &Netns, to: SocketAddrV4, timeout: Duration) -> Result<TcpConn> {
    ns.run(|| connect_here(to, timeout))
}

/// One TCP request from `ns`: connect, read the greeting line, close.
pub fn tcp_request(ns: &Netns, to: SocketAddrV4, timeout: Duration) -> Result<Reply> {
    ns.run(|| connect_here(to, timeout).map(|conn| conn.reply))
}

/// `n` TCP requests one after the other (each a new connection, so a new source port) from a
/// single thread in `ns`; each has its own timeout.
pub fn tcp_requests(
    ns: &Netns,
    to: SocketAddrV4,
    n: usize,
    timeout: Duration,
) -> Vec<Result<Reply>> {
    ns.run(|| {
        (0..n)
            .map(|_| connect_here(to, timeout).map(|conn| conn.reply))
            .collect()
    })
}

/// One UDP request from `ns` on a new socket (a new source port, so a new flow): send
/// "hi", wait for the reply. The socket is connected, so as for real clients a reply from
/// another address than `to` is ignored (and times out) and ICMP unreachable is "refused".
pub fn udp_request(ns: &Netns, to: SocketAddrV4, timeout: Duration) -> Result<Reply> {
    ns.run(|| udp_here(to, timeout))
}

/// `n` [`udp_request`]s one after the other from a single thread in `ns`.
pub fn udp_requests(
    ns: &Netns,
    to: SocketAddrV4,
    n: usize,
    timeout: Duration,
) -> Vec<Result<Reply>> {
    ns.run(|| (0..n).map(|_| udp_here(to, timeout)).collect())
}

fn connect_here(to: SocketAddrV4, timeout: Duration) -> Result<TcpConn> {
    let deadline = Instant::now() + timeout;
    let stream = TcpStream::connect_timeout(&to.into(), timeout)
        .map_err(|e| anyhow!("TCP {to}: connect: {}", explain(&e, timeout)))?;
    let mut reader = BufReader::new(stream);
    let line = read_line(&mut reader, deadline).map_err(|e| {
        anyhow!(
            "TCP {to}: waiting for the greeting: {}",
            explain(&e, timeout)
        )
    })?;
    let reply = Reply::parse(&line).with_context(|| format!("TCP {to}"))?;
    Ok(TcpConn { reply, to, reader })
}

/// One TCP request from a given source address and port (bound before connecting), on the
/// calling thread, which must already be in the client's namespace (inside [`Netns::run`]):
/// for many clients that share a source port.
pub fn tcp_request_from_here(
    from: SocketAddrV4,
    to: SocketAddrV4,
    timeout: Duration,
) -> Result<Reply> {
    use std::os::fd::FromRawFd;
    let deadline = Instant::now() + timeout;
    // SAFETY: plain socket(2); the descriptor is owned by the TcpStream below or closed on error.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(anyhow!("socket: {}", io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a fresh socket nothing else owns.
    let stream = unsafe { TcpStream::from_raw_fd(fd) };
    let sockaddr = |a: SocketAddrV4| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(a.ip().octets()),
        },
        sin_zero: [0; 8],
    };
    let one: libc::c_int = 1;
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: the option values and addresses are valid for the calls and their sizes given.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            &one as *const _ as *const libc::c_void,
            std::mem::size_of_val(&one) as libc::socklen_t,
        ) | libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            &tv as *const _ as *const libc::c_void,
            std::mem::size_of_val(&tv) as libc::socklen_t,
        ) | libc::bind(
            fd,
            &sockaddr(from) as *const _ as *const libc::sockaddr,
            len,
        )
    };
    if rc != 0 {
        return Err(anyhow!("TCP {from}: bind: {}", io::Error::last_os_error()));
    }
    // SAFETY: as above.
    if unsafe { libc::connect(fd, &sockaddr(to) as *const _ as *const libc::sockaddr, len) } != 0 {
        let e = io::Error::last_os_error();
        return Err(anyhow!(
            "TCP {from} -> {to}: connect: {}",
            explain(&e, timeout)
        ));
    }
    let mut reader = BufReader::new(stream);
    let line = read_line(&mut reader, deadline).map_err(|e| {
        anyhow!(
            "TCP {from} -> {to}: waiting for the greeting: {}",
            explain(&e, timeout)
        )
    })?;
    Reply::parse(&line).with_context(|| format!("TCP {from} -> {to}"))
}

/// Reads one full line before `deadline`; EOF before the newline is an error.
fn read_line(reader: &mut BufReader<TcpStream>, deadline: Instant) -> io::Result<String> {
    let mut line = String::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        reader.get_ref().set_read_timeout(Some(left))?;
        match reader.read_line(&mut line) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("connection closed after {:?}", line),
                ))
            }
            Ok(_) if line.ends_with('\n') => return Ok(line),
            Ok(_) => {}
            Err(e) => return Err(e),
        }
    }
}

fn udp_here(to: SocketAddrV4, timeout: Duration) -> Result<Reply> {
    let fail = |what: &str, e: io::Error| anyhow!("UDP {to}: {what}: {}", explain(&e, timeout));
    let socket = bind_fresh_udp().map_err(|e| fail("bind", e))?;
    socket.connect(to).map_err(|e| fail("connect", e))?;
    socket
        .set_read_timeout(Some(timeout))
        .map_err(|e| fail("set timeout", e))?;
    socket.send(b"hi").map_err(|e| fail("send", e))?;
    let mut buf = [0u8; 2048];
    let len = socket
        .recv(&mut buf)
        .map_err(|e| fail("waiting for the reply", e))?;
    let line = String::from_utf8_lossy(&buf[..len]);
    Reply::parse(&line).with_context(|| format!("UDP {to}"))
}

/// Binds a UDP socket to a source port this process has not used recently. Port 0 lets
/// the kernel draw at random, and repeats within a few dozen requests are common; a repeat
/// would be the same flow to a load balancer that remembers flows.
fn bind_fresh_udp() -> io::Result<UdpSocket> {
    // The default ip_local_port_range; the namespace is fresh, so nobody changed it.
    const FIRST: u32 = 32768;
    const COUNT: u32 = 61000 - FIRST;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let mut last_error = None;
    for _ in 0..64 {
        let port = FIRST + NEXT.fetch_add(1, Ordering::Relaxed) % COUNT;
        match UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port as u16)) {
            Ok(socket) => return Ok(socket),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => last_error = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last_error.unwrap_or_else(|| io::ErrorKind::AddrInUse.into()))
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Turns an I/O error into words: read timeouts surface as EAGAIN, whose text misleads.
fn explain(e: &io::Error, timeout: Duration) -> String {
    if is_timeout(e) {
        format!("timed out after {} ms", timeout.as_millis())
    } else {
        e.to_string()
    }
}
