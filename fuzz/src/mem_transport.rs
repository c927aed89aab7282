//! An in-memory [`Transport`]: the whole incoming stream is known up front, replies go to a
//! shared buffer. Reads never block (the end of the input is end of stream), so a receiver
//! fed from it can fail or finish but never hang.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::sync::{Arc, Mutex, MutexGuard};

use dirtylog_migrate::Transport;

#[derive(Debug, Default)]
struct State {
    input: Vec<u8>,
    at: usize,
    read_shut: bool,
    write_shut: bool,
    output: Vec<u8>,
}

/// One end of an in-memory connection; clones share it.
#[derive(Debug, Clone)]
pub struct MemConn {
    state: Arc<Mutex<State>>,
    /// Most bytes one `read` returns (at least 1) at the start of the stream: exercises
    /// short reads. See [`MemConn::new`].
    chunk: usize,
}

/// Short reads grow to 1/`SHORT_READ_GROWTH` of the bytes read so far.
const SHORT_READ_GROWTH: usize = 64;

impl MemConn {
    /// A connection whose peer has sent `input`; a read returns at most `chunk` bytes, or
    /// 1/64 of the bytes read before it if that is more. Reads stay short (they end at
    /// varied offsets inside frames all along the stream), but a stream of n bytes takes
    /// about 64 ln(n / 64) reads, not n: 1-byte reads of a few hundred KiB of pages cost
    /// 50–100 ms a run under the fuzzer's instrumentation, and were most of its time.
    pub fn new(input: Vec<u8>, chunk: usize) -> Self {
        MemConn {
            state: Arc::new(Mutex::new(State {
                input,
                ..State::default()
            })),
            chunk: chunk.max(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What was written to the connection (the receiver's replies).
    pub fn output(&self) -> Vec<u8> {
        self.lock().output.clone()
    }

    /// Bytes of the input consumed so far.
    pub fn consumed(&self) -> usize {
        self.lock().at
    }
}

impl Read for MemConn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut s = self.lock();
        if s.read_shut {
            return Ok(0);
        }
        let most = self.chunk.max(s.at / SHORT_READ_GROWTH);
        let n = buf.len().min(most).min(s.input.len() - s.at);
        let at = s.at;
        buf[..n].copy_from_slice(&s.input[at..at + n]);
        s.at += n;
        Ok(n)
    }
}

impl Write for MemConn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut s = self.lock();
        if s.write_shut {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        s.output.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Transport for MemConn {
    fn try_clone(&self) -> io::Result<Self> {
        Ok(self.clone())
    }

    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        let mut s = self.lock();
        if matches!(how, Shutdown::Read | Shutdown::Both) {
            s.read_shut = true;
        }
        if matches!(how, Shutdown::Write | Shutdown::Both) {
            s.write_shut = true;
        }
        Ok(())
    }
}
