//! Real traffic between the virtual node's namespaces: TCP and UDP echo servers, and probes
//! that connect, exchange data both ways and close, or ping; a drop shows as a timeout.

use std::fmt;
use std::io::{BufRead as _, BufReader, ErrorKind, Read as _, Write as _};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};
use socket2::{Domain, Protocol, Socket, Type};

use super::netns::Namespace;

/// How long a probe waits for an answer: a denied flow costs this much.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// How often the servers look whether they should stop.
const SERVER_POLL: Duration = Duration::from_millis(100);

/// What a probe sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Probe {
    /// A TCP connection to this port: handshake, a request and its reply, orderly close.
    Tcp(u16),
    /// A UDP request to this port and its reply.
    Udp(u16),
    /// One ICMP or ICMPv6 echo request and its reply.
    Ping,
}

impl fmt::Display for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp(port) => write!(f, "tcp/{port}"),
            Self::Udp(port) => write!(f, "udp/{port}"),
            Self::Ping => f.write_str("ping"),
        }
    }
}

/// What became of a probe. Security groups drop silently, so a denied probe times out;
/// anything answering negatively (a reset, an ICMP error) is a failure, not a verdict.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The exchange completed; `seen_as` is the client address the server saw (TCP, UDP).
    Completed { seen_as: Option<IpAddr> },
    /// Nothing came back in time: the flow was dropped.
    TimedOut,
    /// The exchange failed some other way.
    Failed(String),
}

impl Outcome {
    fn failed(step: &str, error: impl fmt::Display) -> Self {
        Self::Failed(format!("{step}: {error}"))
    }
}

/// Sends `probe` from `src` to `dst` (same family) inside `ns`.
pub fn probe(ns: &Namespace, src: IpAddr, dst: IpAddr, probe: Probe) -> Result<Outcome> {
    ns.enter(|| match probe {
        Probe::Tcp(port) => tcp_exchange(src, SocketAddr::new(dst, port)),
        Probe::Udp(port) => udp_exchange(src, SocketAddr::new(dst, port)),
        Probe::Ping => ping(src, dst),
    })
}

fn is_timeout(error: &std::io::Error) -> bool {
    matches!(error.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock)
}

fn tcp_exchange(src: IpAddr, dst: SocketAddr) -> Outcome {
    let mut stream = match TcpSession::connect(src, dst) {
        Ok(stream) => stream,
        Err(e) if is_timeout(&e) => return Outcome::TimedOut,
        Err(e) => return Outcome::failed("connect", e),
    };
    let seen_as = match stream.exchange("hello") {
        Ok(seen_as) => seen_as,
        Err(e) => return Outcome::failed("connected, but the exchange broke off", e),
    };
    match stream.close() {
        Ok(()) => Outcome::Completed {
            seen_as: Some(seen_as),
        },
        Err(e) => Outcome::failed("closing", e),
    }
}

fn udp_exchange(src: IpAddr, dst: SocketAddr) -> Outcome {
    let exchange = || -> std::io::Result<IpAddr> {
        let socket = UdpSocket::bind(SocketAddr::new(src, 0))?;
        socket.set_read_timeout(Some(PROBE_TIMEOUT))?;
        socket.send_to(b"hello", dst)?;
        let mut reply = [0u8; 128];
        loop {
            let (len, from) = socket.recv_from(&mut reply)?;
            if from == dst {
                return parse_seen_as(&reply[..len]);
            }
        }
    };
    match exchange() {
        Ok(seen_as) => Outcome::Completed {
            seen_as: Some(seen_as),
        },
        Err(e) if is_timeout(&e) => Outcome::TimedOut,
        Err(e) => Outcome::failed("udp", e),
    }
}

/// One echo request through a ping socket (the kernel picks the identifier, fills the
/// checksum and hands back only this socket's replies).
fn ping(src: IpAddr, dst: IpAddr) -> Outcome {
    let (domain, protocol, request, reply) = match dst {
        IpAddr::V4(_) => (Domain::IPV4, Protocol::ICMPV4, 8, 0),
        IpAddr::V6(_) => (Domain::IPV6, Protocol::ICMPV6, 128, 129),
    };
    let exchange = || -> std::io::Result<bool> {
        let socket = Socket::new(domain, Type::DGRAM, Some(protocol))?;
        socket.bind(&SocketAddr::new(src, 0).into())?;
        socket.set_read_timeout(Some(PROBE_TIMEOUT))?;
        let echo = [request, 0, 0, 0, 0, 0, 0, 1, b's', b'g', b'p'];
        socket.send_to(&echo, &SocketAddr::new(dst, 0).into())?;
        let mut answer = [0u8; 128];
        let len = (&socket).read(&mut answer)?;
        Ok(len >= 8 && answer[0] == reply)
    };
    match exchange() {
        Ok(true) => Outcome::Completed { seen_as: None },
        Ok(false) => Outcome::Failed("the answer to the echo request was not a reply".into()),
        Err(e) if is_timeout(&e) => Outcome::TimedOut,
        Err(e) => Outcome::failed("ping", e),
    }
}

/// An open TCP connection to an echo server: each exchange is one line and its echo.
pub struct TcpSession {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl TcpSession {
    /// Connects from `src` (its port chosen by the kernel) to `dst`, in the calling
    /// thread's namespace.
    pub fn connect(src: IpAddr, dst: SocketAddr) -> std::io::Result<Self> {
        let socket = Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP))?;
        socket.bind(&SocketAddr::new(src, 0).into())?;
        socket.connect_timeout(&dst.into(), PROBE_TIMEOUT)?;
        let stream: TcpStream = socket.into();
        stream.set_read_timeout(Some(PROBE_TIMEOUT))?;
        stream.set_write_timeout(Some(PROBE_TIMEOUT))?;
        let reader = BufReader::new(stream.try_clone()?);
        Ok(Self { stream, reader })
    }

    /// Sends a line and reads its echo; returns the address the server saw.
    pub fn exchange(&mut self, text: &str) -> std::io::Result<IpAddr> {
        writeln!(self.stream, "{text}")?;
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(ErrorKind::UnexpectedEof.into());
        }
        let (echo, seen_as) = line
            .trim_end()
            .split_once(" from ")
            .ok_or_else(|| std::io::Error::other(format!("unexpected reply {line:?}")))?;
        if echo != text {
            return Err(std::io::Error::other(format!("echo {echo:?} of {text:?}")));
        }
        seen_as
            .parse()
            .map_err(|_| std::io::Error::other(format!("unexpected reply {line:?}")))
    }

    /// Closes our side, then waits for the server to close its own.
    pub fn close(mut self) -> std::io::Result<()> {
        self.stream.shutdown(Shutdown::Write)?;
        let mut rest = Vec::new();
        self.reader.read_to_end(&mut rest)?;
        if rest.is_empty() {
            Ok(())
        } else {
            Err(std::io::Error::other("data after our close"))
        }
    }
}

fn parse_seen_as(reply: &[u8]) -> std::io::Result<IpAddr> {
    std::str::from_utf8(reply)
        .ok()
        .and_then(|r| r.trim_end().strip_prefix("hello from "))
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("unexpected reply {reply:?}")))
}

/// An echo server on one address and port of a namespace, until dropped.
pub struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Serves TCP (`Probe::Tcp`) or UDP (`Probe::Udp`) on `addr` in `ns`: each line or
    /// datagram comes back followed by ` from <client address>`.
    pub fn start(ns: &Namespace, addr: SocketAddr, probe: Probe) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = match probe {
            Probe::Tcp(_) => {
                let listener = ns
                    .enter(|| TcpListener::bind(addr))?
                    .with_context(|| format!("listening on tcp {addr} in {}", ns.name()))?;
                // Accepting with a timeout, so that the loop sees the stop flag.
                Socket::from(listener.try_clone()?).set_read_timeout(Some(SERVER_POLL))?;
                std::thread::spawn(move || serve_tcp(&listener, &flag))
            }
            Probe::Udp(_) => {
                let socket = ns
                    .enter(|| UdpSocket::bind(addr))?
                    .with_context(|| format!("listening on udp {addr} in {}", ns.name()))?;
                socket.set_read_timeout(Some(SERVER_POLL))?;
                std::thread::spawn(move || serve_udp(&socket, &flag))
            }
            Probe::Ping => anyhow::bail!("the kernel answers pings: no server needed"),
        };
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve_tcp(listener: &TcpListener, stop: &Arc<AtomicBool>) {
    let mut connections = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, peer)) => {
                let stop = Arc::clone(stop);
                connections.push(std::thread::spawn(move || {
                    echo_lines(stream, peer.ip(), &stop);
                }));
            }
            Err(e) if is_timeout(&e) => {}
            Err(_) => break,
        }
    }
    for connection in connections {
        let _ = connection.join();
    }
}

fn echo_lines(stream: TcpStream, peer: IpAddr, stop: &AtomicBool) {
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    if stream.set_read_timeout(Some(SERVER_POLL)).is_err() {
        return;
    }
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    while !stop.load(Ordering::Relaxed) {
        match reader.read_line(&mut line) {
            // The client closed its side: close ours.
            Ok(0) => break,
            Ok(_) if line.ends_with('\n') => {
                if writeln!(writer, "{} from {peer}", line.trim_end()).is_err() {
                    break;
                }
                line.clear();
            }
            Ok(_) => {}
            Err(e) if is_timeout(&e) => {}
            Err(_) => break,
        }
    }
}

fn serve_udp(socket: &UdpSocket, stop: &AtomicBool) {
    let mut request = [0u8; 512];
    while !stop.load(Ordering::Relaxed) {
        match socket.recv_from(&mut request) {
            Ok((len, peer)) => {
                let text = String::from_utf8_lossy(&request[..len]);
                let _ = socket.send_to(format!("{text} from {}", peer.ip()).as_bytes(), peer);
            }
            Err(e) if is_timeout(&e) => {}
            Err(_) => break,
        }
    }
}
