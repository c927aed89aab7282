//! TCP plumbing: connecting and accepting the N connections of a migration, shutting them all
//! down at once to unblock every thread on failure, and a shared rate limiter.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::error::MigrateError;

/// Open `n` connections to `addr`, each with `TCP_NODELAY` (frames are written whole, and the
/// control frames should not wait) and the given write timeout.
pub fn connect(
    addr: SocketAddr,
    n: usize,
    timeout: Duration,
    io_timeout: Duration,
) -> Result<Vec<TcpStream>, MigrateError> {
    (0..n)
        .map(|i| {
            let what = || format!("connecting connection {i} to {addr}");
            let stream = TcpStream::connect_timeout(&addr, timeout).map_err(|source| {
                MigrateError::Connect {
                    what: what(),
                    source,
                }
            })?;
            configure(&stream, io_timeout).map_err(|source| MigrateError::Connect {
                what: what(),
                source,
            })?;
            Ok(stream)
        })
        .collect()
}

/// Blocking mode, `TCP_NODELAY`, and read and write timeouts.
pub(crate) fn configure(stream: &TcpStream, io_timeout: Duration) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(io_timeout))?;
    stream.set_write_timeout(Some(io_timeout))
}

/// Accept one connection before `deadline`.
pub(crate) fn accept(listener: &TcpListener, deadline: Instant) -> io::Result<TcpStream> {
    listener.set_nonblocking(true)?;
    let result = loop {
        match listener.accept() {
            Ok((stream, _)) => break Ok(stream),
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
    listener.set_nonblocking(false)?;
    result
}

/// Clones of every connection, to shut them all down from any thread: a thread blocked in a
/// read or a write then returns at once with an error.
#[derive(Debug, Default)]
pub(crate) struct Killer {
    streams: Mutex<Vec<TcpStream>>,
}

impl Killer {
    pub(crate) fn add(&self, stream: &TcpStream) -> io::Result<()> {
        let clone = stream.try_clone()?;
        self.lock().push(clone);
        Ok(())
    }

    /// Shut down the sending direction only: blocked writers fail at once, and the peer's
    /// last words can still be read.
    pub(crate) fn shutdown_writes(&self) {
        for s in self.lock().iter() {
            let _ = s.shutdown(Shutdown::Write);
        }
    }

    /// Shut down the receiving direction only: blocked readers return at once, and a last
    /// reply can still be written.
    pub(crate) fn shutdown_reads(&self) {
        for s in self.lock().iter() {
            let _ = s.shutdown(Shutdown::Read);
        }
    }

    pub(crate) fn kill(&self) {
        for s in self.lock().iter() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<TcpStream>> {
        self.streams.lock().unwrap_or_else(|e| e.into_inner())
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
        let Some(rate) = self.bytes_per_s else {
            return;
        };
        let cost = Duration::from_secs_f64(bytes as f64 / rate.max(1) as f64);
        let start = {
            let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            let start = next.map_or(now, |n| n.max(now));
            *next = Some(start + cost);
            start
        };
        let now = Instant::now();
        if start > now {
            std::thread::sleep(start - now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limiter_paces_frames() {
        let limiter = RateLimiter::new(Some(10_000_000));
        let t = Instant::now();
        for _ in 0..6 {
            limiter.acquire(500_000); // 50 ms each; the first starts at once
        }
        let e = t.elapsed();
        assert!(e >= Duration::from_millis(240), "{e:?}");
        assert!(e < Duration::from_millis(1000), "{e:?}");
        let unlimited = RateLimiter::new(None);
        let t = Instant::now();
        unlimited.acquire(usize::MAX);
        assert!(t.elapsed() < Duration::from_millis(50));
    }

    #[test]
    fn sessions_differ() {
        assert_ne!(session_id(), session_id());
    }

    #[test]
    fn accept_times_out() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let e = accept(&l, Instant::now() + Duration::from_millis(20)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
    }
}
