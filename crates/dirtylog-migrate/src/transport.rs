//! Connections: the [`Transport`] trait the engines run over (any `Read + Write` stream that
//! can be cloned and shut down; [`TcpStream`] and [`UnixStream`] implement it), migration
//! [`Address`]es (`host:port` or `unix:/path`), connecting and listening on them, shutting all
//! connections down at once to unblock every thread on failure, and a shared rate limiter.

use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::error::MigrateError;

pub mod tls;

/// A connection of a migration: a blocking byte stream in both directions.
///
/// The engines clone each connection (one thread writes it while another reads the replies)
/// and shut connections down to unblock their threads when anything fails, so both are
/// required; timeouts default to none.
pub trait Transport: Read + Write + Send + Sized + 'static {
    /// Another handle to the same connection.
    fn try_clone(&self) -> io::Result<Self>;
    /// Shut down one or both directions: a thread blocked reading or writing returns.
    fn shutdown(&self, how: Shutdown) -> io::Result<()>;
    /// Bound each blocking read (`None`: wait for ever). The default ignores it.
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        let _ = timeout;
        Ok(())
    }
    /// Bound each blocking write (`None`: wait for ever). The default ignores it.
    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        let _ = timeout;
        Ok(())
    }
    /// Make the connection ready for a migration: blocking, and whatever else suits the
    /// transport (TCP: `TCP_NODELAY`, frames are written whole). The default does nothing.
    fn prepare(&self) -> io::Result<()> {
        Ok(())
    }
    /// The socket under the transport, if bytes written to it with `write(2)` reach the peer
    /// exactly as this transport's own writes would (no framing, no encryption, nothing
    /// buffered in between). A source then writes large runs of a running guest's pages
    /// through it straight from guest memory, without copying them first. The default,
    /// `None`, makes the engine copy each page before writing it, as a transport that
    /// encrypts or frames (TLS) must have the bytes anyway.
    fn raw_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }
    /// Wait at most `timeout` for the peer to send something, without consuming it: `false`
    /// if it stays silent (the receiver then drops the connection and accepts another). The
    /// default cannot tell and says `true`. May change the read timeout: set it again after.
    fn wait_readable(&self, timeout: Duration) -> io::Result<bool> {
        let _ = timeout;
        Ok(true)
    }
}

/// Whether a connection to or on `addr` stays on this host: a loopback address (IPv4
/// 127.0.0.0/8, IPv6 `::1`, or IPv4 loopback mapped into IPv6), or a Unix socket.
pub fn is_local(addr: &Address) -> bool {
    match addr {
        Address::Tcp(a) => a.ip().to_canonical().is_loopback(),
        Address::Unix(_) => true,
    }
}

impl Transport for TcpStream {
    fn try_clone(&self) -> io::Result<Self> {
        TcpStream::try_clone(self)
    }
    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        TcpStream::shutdown(self, how)
    }
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        TcpStream::set_read_timeout(self, timeout)
    }
    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        TcpStream::set_write_timeout(self, timeout)
    }
    fn prepare(&self) -> io::Result<()> {
        self.set_nonblocking(false)?;
        self.set_nodelay(true)
    }
    fn raw_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.as_fd())
    }
    fn wait_readable(&self, timeout: Duration) -> io::Result<bool> {
        TcpStream::set_read_timeout(self, Some(timeout.max(Duration::from_millis(1))))?;
        match self.peek(&mut [0u8; 1]) {
            Ok(_) => Ok(true),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }
}

impl Transport for UnixStream {
    fn try_clone(&self) -> io::Result<Self> {
        UnixStream::try_clone(self)
    }
    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        UnixStream::shutdown(self, how)
    }
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        UnixStream::set_read_timeout(self, timeout)
    }
    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        UnixStream::set_write_timeout(self, timeout)
    }
    fn prepare(&self) -> io::Result<()> {
        self.set_nonblocking(false)
    }
    fn raw_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.as_fd())
    }
}

/// Where a migration receiver listens: a TCP socket address or a Unix socket path.
///
/// ```
/// use dirtylog_migrate::Address;
///
/// let tcp: Address = "127.0.0.1:4444".parse().unwrap();
/// assert_eq!(tcp.to_string(), "127.0.0.1:4444");
/// let unix: Address = "unix:/run/vm0.sock".parse().unwrap();
/// assert_eq!(unix, Address::Unix("/run/vm0.sock".into()));
/// assert!("unix:".parse::<Address>().is_err());
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Address {
    /// TCP.
    Tcp(SocketAddr),
    /// A Unix stream socket at this path.
    Unix(PathBuf),
}

impl From<SocketAddr> for Address {
    fn from(addr: SocketAddr) -> Self {
        Address::Tcp(addr)
    }
}

impl From<&Path> for Address {
    fn from(path: &Path) -> Self {
        Address::Unix(path.to_path_buf())
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Tcp(a) => write!(f, "{a}"),
            Address::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// Why an address did not parse.
#[derive(Debug, thiserror::Error)]
#[error("bad migration address {addr:?}: {why} (use HOST:PORT or unix:/PATH)")]
pub struct AddressError {
    addr: String,
    why: String,
}

impl FromStr for Address {
    type Err = AddressError;

    /// `unix:PATH`, or `HOST:PORT` (resolved; the first address wins).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: String| AddressError {
            addr: s.to_string(),
            why,
        };
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(bad("no socket path".into()));
            }
            return Ok(Address::Unix(PathBuf::from(path)));
        }
        s.to_socket_addrs()
            .map_err(|e| bad(e.to_string()))?
            .next()
            .map(Address::Tcp)
            .ok_or_else(|| bad("resolves to no address".into()))
    }
}

/// A connection to an [`Address`]: TCP or Unix.
#[derive(Debug)]
pub enum Stream {
    /// TCP.
    Tcp(TcpStream),
    /// Unix.
    Unix(UnixStream),
}

macro_rules! both {
    ($self:ident, $s:ident => $e:expr) => {
        match $self {
            Stream::Tcp($s) => $e,
            Stream::Unix($s) => $e,
        }
    };
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        both!(self, s => s.read(buf))
    }
    fn read_vectored(&mut self, bufs: &mut [io::IoSliceMut<'_>]) -> io::Result<usize> {
        both!(self, s => s.read_vectored(bufs))
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        both!(self, s => s.write(buf))
    }
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        both!(self, s => s.write_vectored(bufs))
    }
    fn flush(&mut self) -> io::Result<()> {
        both!(self, s => s.flush())
    }
}

impl Transport for Stream {
    fn try_clone(&self) -> io::Result<Self> {
        match self {
            Stream::Tcp(s) => Transport::try_clone(s).map(Stream::Tcp),
            Stream::Unix(s) => Transport::try_clone(s).map(Stream::Unix),
        }
    }
    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        both!(self, s => Transport::shutdown(s, how))
    }
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        both!(self, s => Transport::set_read_timeout(s, timeout))
    }
    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        both!(self, s => Transport::set_write_timeout(s, timeout))
    }
    fn prepare(&self) -> io::Result<()> {
        both!(self, s => Transport::prepare(s))
    }
    fn raw_fd(&self) -> Option<BorrowedFd<'_>> {
        both!(self, s => Transport::raw_fd(s))
    }
    /// TCP peeks; a Unix socket cannot tell (the standard library has no `peek` for it) and
    /// says `true`: only a local process can reach it.
    fn wait_readable(&self, timeout: Duration) -> io::Result<bool> {
        both!(self, s => Transport::wait_readable(s, timeout))
    }
}

/// Where connections come from on the receiving side: [`TcpListener`], [`UnixListener`] or
/// [`Listener`]'s enum of both, [`AnyListener`].
pub trait Listener {
    /// The connections it accepts.
    type Stream: Transport;
    /// Accept one connection before `deadline`, or fail with `TimedOut`.
    fn accept_before(&self, deadline: Instant) -> io::Result<Self::Stream>;
}

/// Poll `accept` in non-blocking mode until a connection comes or `deadline` passes.
fn accept_polling<S>(
    set_nonblocking: impl Fn(bool) -> io::Result<()>,
    accept: impl Fn() -> io::Result<S>,
    deadline: Instant,
) -> io::Result<S> {
    set_nonblocking(true)?;
    let result = loop {
        match accept() {
            Ok(stream) => break Ok(stream),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    break Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no connection arrived in time",
                    ));
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => break Err(e),
        }
    };
    set_nonblocking(false)?;
    result
}

impl Listener for TcpListener {
    type Stream = TcpStream;
    fn accept_before(&self, deadline: Instant) -> io::Result<TcpStream> {
        accept_polling(
            |b| self.set_nonblocking(b),
            || self.accept().map(|(s, _)| s),
            deadline,
        )
    }
}

impl Listener for UnixListener {
    type Stream = UnixStream;
    fn accept_before(&self, deadline: Instant) -> io::Result<UnixStream> {
        accept_polling(
            |b| self.set_nonblocking(b),
            || self.accept().map(|(s, _)| s),
            deadline,
        )
    }
}

/// A listener on an [`Address`], from [`listen`].
#[derive(Debug)]
pub enum AnyListener {
    /// TCP.
    Tcp(TcpListener),
    /// Unix, and the socket's path, which is removed when the listener is dropped (so the
    /// next `listen` on the same path works).
    Unix(UnixListener, PathBuf),
}

impl Drop for AnyListener {
    fn drop(&mut self) {
        if let AnyListener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl AnyListener {
    /// The address it listens on (with the port chosen for port 0).
    pub fn local_addr(&self) -> io::Result<Address> {
        match self {
            AnyListener::Tcp(l) => l.local_addr().map(Address::Tcp),
            AnyListener::Unix(l, _) => l
                .local_addr()?
                .as_pathname()
                .map(|p| Address::Unix(p.to_path_buf()))
                .ok_or_else(|| io::Error::other("an unnamed Unix socket")),
        }
    }
}

impl Listener for AnyListener {
    type Stream = Stream;
    fn accept_before(&self, deadline: Instant) -> io::Result<Stream> {
        match self {
            AnyListener::Tcp(l) => l.accept_before(deadline).map(Stream::Tcp),
            AnyListener::Unix(l, _) => l.accept_before(deadline).map(Stream::Unix),
        }
    }
}

/// Listen on `addr`: bind a TCP socket, or create the Unix socket at the path (which must
/// not exist yet; it is removed again when the listener is dropped).
pub fn listen(addr: &Address) -> io::Result<AnyListener> {
    match addr {
        Address::Tcp(a) => TcpListener::bind(a).map(AnyListener::Tcp),
        Address::Unix(p) => UnixListener::bind(p).map(|l| AnyListener::Unix(l, p.clone())),
    }
}

/// Open `n` connections to `addr`, each prepared ([`Transport::prepare`]) and with the given
/// read and write timeout. Unix connections are made at once; `timeout` bounds each TCP
/// connect.
pub fn connect(
    addr: &Address,
    n: usize,
    timeout: Duration,
    io_timeout: Duration,
) -> Result<Vec<Stream>, MigrateError> {
    (0..n)
        .map(|i| {
            let what = || format!("connecting connection {i} to {addr}");
            let stream = match addr {
                Address::Tcp(a) => TcpStream::connect_timeout(a, timeout).map(Stream::Tcp),
                Address::Unix(p) => UnixStream::connect(p).map(Stream::Unix),
            }
            .map_err(|source| MigrateError::Connect {
                what: what(),
                source,
            })?;
            configure(&stream, io_timeout).map_err(|source| MigrateError::Connect {
                what: what(),
                source,
            })?;
            Ok(stream)
        })
        .collect()
}

/// [`Transport::prepare`], and read and write timeouts.
pub(crate) fn configure<T: Transport>(stream: &T, io_timeout: Duration) -> io::Result<()> {
    stream.prepare()?;
    stream.set_read_timeout(Some(io_timeout))?;
    stream.set_write_timeout(Some(io_timeout))
}

/// Shutting down one connection, whatever its type.
trait Shut: Send {
    fn shut(&self, how: Shutdown);
}

impl<T: Transport> Shut for T {
    fn shut(&self, how: Shutdown) {
        let _ = self.shutdown(how);
    }
}

/// Clones of every connection, to shut them all down from any thread: a thread blocked in a
/// read or a write then returns at once with an error.
#[derive(Default)]
pub(crate) struct Killer {
    streams: Mutex<Vec<Box<dyn Shut>>>,
}

impl fmt::Debug for Killer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Killer({} connections)", self.lock().len())
    }
}

impl Killer {
    pub(crate) fn add<T: Transport>(&self, stream: &T) -> io::Result<()> {
        let clone = stream.try_clone()?;
        self.lock().push(Box::new(clone));
        Ok(())
    }

    /// Shut down the sending direction only: blocked writers fail at once, and the peer's
    /// last words can still be read.
    pub(crate) fn shutdown_writes(&self) {
        self.all(Shutdown::Write);
    }

    /// Shut down the receiving direction only: blocked readers return at once, and a last
    /// reply can still be written.
    pub(crate) fn shutdown_reads(&self) {
        self.all(Shutdown::Read);
    }

    pub(crate) fn kill(&self) {
        self.all(Shutdown::Both);
    }

    fn all(&self, how: Shutdown) {
        for s in self.lock().iter() {
            s.shut(how);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Box<dyn Shut>>> {
        dirtylog::sync::lock(&self.streams)
    }
}

/// A random 64-bit id for a migration session, from the standard library's per-process random
/// hash keys mixed with the time.
pub(crate) fn session_id() -> u64 {
    let mut h = RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    h.finish()
}

/// A shared limit on bytes per second over all connections: each frame reserves its time slot
/// on a common schedule and sleeps until it starts. Bursts are at most one frame per
/// connection.
#[derive(Debug)]
pub(crate) struct RateLimiter {
    bytes_per_s: Option<u64>,
    next: Mutex<Option<Instant>>,
}

impl RateLimiter {
    pub(crate) fn new(bytes_per_s: Option<u64>) -> Self {
        RateLimiter {
            bytes_per_s,
            next: Mutex::new(None),
        }
    }

    /// Wait until `bytes` more may be sent.
    pub(crate) fn acquire(&self, bytes: usize) {
        if let Some(start) = self.reserve(bytes, Instant::now()) {
            let now = Instant::now();
            if start > now {
                std::thread::sleep(start - now);
            }
        }
    }

    /// Reserve the next slot for `bytes` on the common schedule, as of `now`: when they may
    /// start (`None` when unlimited).
    fn reserve(&self, bytes: usize, now: Instant) -> Option<Instant> {
        let rate = self.bytes_per_s?;
        let cost = Duration::from_secs_f64(bytes as f64 / rate.max(1) as f64);
        let mut next = dirtylog::sync::lock(&self.next);
        let start = next.map_or(now, |n| n.max(now));
        *next = Some(start + cost);
        Some(start)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limiter_paces_frames() {
        let limiter = RateLimiter::new(Some(10_000_000));
        let t0 = Instant::now();
        // 50 ms per frame: each starts where the previous one's time ends, the first at once.
        let starts: Vec<Duration> = (0..6)
            .map(|_| limiter.reserve(500_000, t0).unwrap() - t0)
            .collect();
        let want: Vec<Duration> = (0..6).map(|i| Duration::from_millis(50 * i)).collect();
        assert_eq!(starts, want);
        // A sender that comes back later than its slot starts at once, on a new schedule.
        let later = t0 + Duration::from_secs(10);
        assert_eq!(limiter.reserve(1, later), Some(later));
        // Unlimited never waits: even usize::MAX bytes pass (a sleep would last for ever).
        assert_eq!(RateLimiter::new(None).reserve(usize::MAX, t0), None);
        RateLimiter::new(None).acquire(usize::MAX);
    }

    #[test]
    fn loopback_and_unix_are_local() {
        for (addr, local) in [
            ("127.0.0.1:1", true),
            ("127.8.9.10:1", true),
            ("[::1]:1", true),
            ("[::ffff:127.0.0.1]:1", true),
            ("unix:/tmp/x", true),
            ("10.0.0.1:1", false),
            ("192.168.1.2:1", false),
            ("[2001:db8::1]:1", false),
            ("[::ffff:10.0.0.1]:1", false),
            ("0.0.0.0:1", false),
        ] {
            assert_eq!(is_local(&addr.parse().unwrap()), local, "{addr}");
        }
    }

    #[test]
    fn sessions_differ() {
        assert_ne!(session_id(), session_id());
    }

    #[test]
    fn accept_times_out() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let e = l
            .accept_before(Instant::now() + Duration::from_millis(20))
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
    }

    #[test]
    fn unix_listen_connect_and_address() {
        let dir = std::env::temp_dir().join(format!("dirtylog-transport-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let addr = Address::Unix(dir.join("m.sock"));
        let l = listen(&addr).unwrap();
        assert_eq!(l.local_addr().unwrap(), addr);
        let mut c = connect(&addr, 2, Duration::from_secs(1), Duration::from_secs(5)).unwrap();
        let mut a = l
            .accept_before(Instant::now() + Duration::from_secs(5))
            .unwrap();
        c[0].write_all(b"hi").unwrap();
        let mut buf = [0; 2];
        a.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hi");
        Transport::shutdown(&c[1], Shutdown::Both).unwrap();
        let addr2: Address = format!("unix:{}", dir.join("m.sock").display())
            .parse()
            .unwrap();
        assert_eq!(addr2, addr);
        // Dropping the listener removes its socket, so the same path can be listened on again.
        drop(l);
        assert!(!dir.join("m.sock").exists());
        drop(listen(&addr).unwrap());
        let _ = std::fs::remove_dir_all(&dir);
        assert!("nonsense".parse::<Address>().is_err());
        assert_eq!(
            "127.0.0.1:9".parse::<Address>().unwrap(),
            Address::Tcp("127.0.0.1:9".parse().unwrap())
        );
    }
}
