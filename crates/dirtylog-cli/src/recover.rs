//! When a migration's outcome is unknown: the source had committed (sent `Commit`) and lost
//! the link before hearing that the destination runs the guest. Neither side may guess: the
//! source keeps its copy paused and asks the operator, who looks at the destination and
//! answers through `dirtylog migrate recover --socket PATH resume|stop`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args as ClapArgs, ValueEnum};

/// What to do with the source's paused copy.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// The destination does not run the guest: resume it here.
    Resume,
    /// The destination runs the guest: discard the copy here.
    Stop,
}

impl Decision {
    fn word(self) -> &'static str {
        match self {
            Decision::Resume => "resume",
            Decision::Stop => "stop",
        }
    }
}

/// `dirtylog migrate recover`: answer a sender that waits with an unknown outcome.
#[derive(ClapArgs, Debug)]
pub struct RecoverArgs {
    /// The control socket the sender printed (`--recover-socket` of `migrate send`).
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,
    /// resume: the destination does NOT run the guest, run it at the source again. stop:
    /// the destination runs it, discard the source's copy. Look at the destination first
    /// (its `migrate receive` says whether the guest runs there).
    #[arg(value_enum)]
    pub action: Decision,
}

/// The default control socket of this process.
pub fn default_socket() -> PathBuf {
    std::env::temp_dir().join(format!("dirtylog-recover-{}.sock", std::process::id()))
}

/// Wait at most `timeout` for an operator's decision on `socket`; `None` if none came (or
/// the socket could not be made: then `say` has explained why).
pub fn wait_for_operator(
    socket: &Path,
    timeout: Duration,
    say: &mut dyn FnMut(&str),
) -> Option<Decision> {
    let listener = match UnixListener::bind(socket) {
        Ok(l) => l,
        Err(e) => {
            say(&format!(
                "cannot create the recovery socket {}: {e}",
                socket.display()
            ));
            return None;
        }
    };
    say(&format!(
        "OUTCOME UNKNOWN: the guest may be running at the destination. This side keeps its copy \
         paused for {} s. If the destination does not run the guest: `dirtylog migrate recover \
         --socket {} resume`; if it does: `... stop`.",
        timeout.as_secs(),
        socket.display()
    ));
    let decision = accept_decision(&listener, timeout);
    let _ = std::fs::remove_file(socket);
    decision
}

fn accept_decision(listener: &UnixListener, timeout: Duration) -> Option<Decision> {
    listener.set_nonblocking(true).ok()?;
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            Err(_) => return None,
        };
        if let Some(d) = read_decision(stream) {
            return Some(d);
        }
    }
    None
}

/// One request line, `resume` or `stop`; anything else is refused and the wait goes on.
fn read_decision(stream: UnixStream) -> Option<Decision> {
    stream.set_nonblocking(false).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut line = String::new();
    BufReader::new(&stream).take(64).read_line(&mut line).ok()?;
    let mut stream = stream;
    let decision = match line.trim() {
        "resume" => Decision::Resume,
        "stop" => Decision::Stop,
        other => {
            let _ = writeln!(
                stream,
                "refused {:?}: send resume or stop",
                other.escape_debug().to_string()
            );
            return None;
        }
    };
    let _ = writeln!(stream, "ok: {}", decision.word());
    Some(decision)
}

use std::io::Read as _;

/// `dirtylog migrate recover`.
pub fn run(a: RecoverArgs) -> Result<ExitCode, String> {
    let mut stream = UnixStream::connect(&a.socket).map_err(|e| {
        format!(
            "cannot reach {}: {e} — is a `dirtylog migrate send` waiting with an unknown outcome?",
            a.socket.display()
        )
    })?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    writeln!(stream, "{}", a.action.word()).map_err(|e| format!("sending: {e}"))?;
    let mut answer = String::new();
    BufReader::new(&stream)
        .take(256)
        .read_line(&mut answer)
        .map_err(|e| format!("reading the answer: {e}"))?;
    let answer = answer.trim().escape_debug().to_string();
    println!("{answer}");
    Ok(if answer.starts_with("ok") {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_operator_answer_reaches_the_waiting_side() {
        let dir =
            std::env::temp_dir().join(format!("dirtylog-recover-test-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let socket = dir.join("s.sock");
        let _ = std::fs::remove_file(&socket);
        let path = socket.clone();
        let waiter = std::thread::spawn(move || {
            wait_for_operator(&path, Duration::from_secs(20), &mut |_| {})
        });
        // A wrong word is refused, then the right one is taken.
        let send = |word: &str| loop {
            match UnixStream::connect(&socket) {
                Ok(mut s) => {
                    writeln!(s, "{word}").unwrap();
                    let mut answer = String::new();
                    BufReader::new(&s).read_line(&mut answer).unwrap();
                    return answer;
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        assert!(send("maybe").starts_with("refused"));
        assert!(send("resume").starts_with("ok: resume"));
        assert_eq!(waiter.join().unwrap(), Some(Decision::Resume));
        assert!(!socket.exists(), "the socket is removed");
    }

    #[test]
    fn no_answer_in_time_is_none() {
        let socket =
            std::env::temp_dir().join(format!("dirtylog-recover-none-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&socket);
        assert_eq!(
            wait_for_operator(&socket, Duration::from_millis(200), &mut |_| {}),
            None
        );
    }
}
