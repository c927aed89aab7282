//! `dirtylog demo`: a live migration of a real KVM guest between two processes on loopback,
//! in one command.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use clap::Args as ClapArgs;
use serde::Serialize;
use serde_json::Value;

use crate::migrate::{self, bytes, GuestArgs, MigrationArgs, SendSummary};

#[derive(ClapArgs, Debug)]
pub struct Args {
    #[command(flatten)]
    guest: GuestArgs,
    #[command(flatten)]
    migration: MigrationArgs,
    /// Milliseconds the destination runs the migrated guest, reporting its progress (at most
    /// a week).
    #[arg(long, default_value_t = 1000, value_parser = crate::limits::millis)]
    run_for_ms: u64,
    /// Print JSON lines instead of text: the source's progress events while migrating, then
    /// one completed or failed event with the source's summary and the destination's events
    /// (docs/JSON.md).
    #[arg(long)]
    json: bool,
    /// Where the demo writes its files (created if missing): migration.svg, the picture of the
    /// migration. Default: dirtylog-demo in the temporary directory ($TMPDIR or /tmp).
    #[arg(long, value_name = "DIR")]
    out_dir: Option<PathBuf>,
    /// Draw the migration into this SVG file instead of OUT_DIR/migration.svg. If it cannot be
    /// written, the statistics are printed all the same, the error goes to stderr and the exit
    /// status is 3.
    #[arg(long, value_name = "FILE.svg", conflicts_with = "no_plot")]
    plot: Option<PathBuf>,
    /// Draw no picture.
    #[arg(long)]
    no_plot: bool,
}

impl Args {
    /// Where to draw the migration, if at all; the default directory is created.
    fn plot_path(&self) -> Result<Option<PathBuf>, String> {
        if self.no_plot {
            return Ok(None);
        }
        let path = match &self.plot {
            Some(p) => p.clone(),
            None => {
                let dir = self
                    .out_dir
                    .clone()
                    .unwrap_or_else(|| std::env::temp_dir().join("dirtylog-demo"));
                std::fs::create_dir_all(&dir).map_err(|e| {
                    format!("cannot create the output directory {}: {e}", dir.display())
                })?;
                dir.join("migration.svg")
            }
        };
        crate::events::check_plot_path(&path)?;
        Ok(Some(path))
    }
}

#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct DemoSummary {
    wall_time_ms: u64,
    receiver_pid: u32,
    receiver_address: String,
    source: SendSummary,
    destination: Vec<Value>,
    guest_ran_on_destination: bool,
    /// Why the demo failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// The receiver process and its stdout, line by line.
struct ReceiverProcess {
    child: Child,
    lines: Receiver<String>,
    /// Lines read ahead (to settle an unknown outcome), to be handed out first.
    pending: std::cell::RefCell<std::collections::VecDeque<String>>,
}

/// However the demo ends (an error returned with `?` included), its receiver does not
/// outlive it.
impl Drop for ReceiverProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl ReceiverProcess {
    fn spawn(run_for_ms: u64, tls: &crate::tls::TlsArgs) -> Result<Self, String> {
        let exe = std::env::current_exe()
            .map_err(|e| format!("cannot find this program to start the receiver: {e}"))?;
        let mut child = Command::new(exe)
            .args(["migrate", "receive", "--listen", "127.0.0.1:0", "--json"])
            .args(["--accept-timeout-s", "60", "--timeout-s", "120"])
            .args(["--run-for-ms", &run_for_ms.to_string()])
            .args(tls.child_args())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot start the receiver process: {e}"))?;
        let stdout = child
            .stdout
            .take()
            .ok_or("the receiver process has no stdout")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Ok(ReceiverProcess {
            child,
            lines,
            pending: Default::default(),
        })
    }

    /// The next JSON event, waiting until `deadline`.
    fn event(&self, deadline: Instant) -> Result<Value, String> {
        let left = deadline.saturating_duration_since(Instant::now());
        let next = match self.pending.borrow_mut().pop_front() {
            Some(line) => Ok(line),
            None => self.lines.recv_timeout(left),
        };
        match next {
            Ok(line) => serde_json::from_str(&line)
                .map_err(|e| format!("the receiver printed {line:?}, not a JSON event: {e}")),
            Err(RecvTimeoutError::Timeout) => Err("the receiver did not answer in time".into()),
            Err(RecvTimeoutError::Disconnected) => {
                Err("the receiver exited without finishing".into())
            }
        }
    }

    /// Settle an unknown outcome as an operator would, from the receiver's own word: if it
    /// reports the guest running, the source's copy goes; otherwise (it failed, or says
    /// nothing in 30 s and is ended) the source's copy runs on.
    fn settle(&mut self) -> crate::recover::Decision {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(line) = self.lines.recv_timeout(left) else {
                let _ = self.child.kill();
                return crate::recover::Decision::Resume;
            };
            let event = serde_json::from_str::<Value>(&line)
                .ok()
                .and_then(|v| v["event"].as_str().map(str::to_string));
            self.pending.borrow_mut().push_back(line);
            match event.as_deref() {
                Some("completed") => return crate::recover::Decision::Stop,
                Some("failed") => return crate::recover::Decision::Resume,
                _ => {}
            }
        }
    }

    /// Wait for the process to exit, up to `timeout`; kill it (our own child) after that.
    fn finish(mut self, timeout: Duration) -> Result<std::process::ExitStatus, String> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return Ok(status),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Ok(None) => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return Err("the receiver did not exit in time; killed it".into());
                }
                Err(e) => return Err(format!("waiting for the receiver: {e}")),
            }
        }
    }
}

pub fn run(a: Args) -> Result<ExitCode, String> {
    let t0 = Instant::now();
    let json = a.json;
    let mut out = std::io::stdout().lock();
    let mut say = |m: &str| {
        if !json {
            let _ = writeln!(out, "{m}");
            let _ = out.flush();
        }
    };
    say("== dirtylog demo: live migration of a KVM guest between two processes on loopback");
    // Refuse bad options before starting the receiver.
    a.guest.config(&a.migration)?;
    a.guest.kernel.load()?;
    let plot_path = a.plot_path()?;
    // TLS files that do not load are refused before the receiver starts.
    a.migration.tls.common.config()?;
    let mut receiver = ReceiverProcess::spawn(a.run_for_ms, &a.migration.tls.common)?;
    let pid = receiver.child.id();
    let first = receiver.event(Instant::now() + Duration::from_secs(20))?;
    let address = match (first["event"].as_str(), first["address"].as_str()) {
        (Some("listening"), Some(addr)) => addr.to_string(),
        _ => {
            let _ = receiver.finish(Duration::from_secs(1));
            return Err(format!("the receiver said {first}, not where it listens"));
        }
    };
    say(&format!(
        "destination: `dirtylog migrate receive` (pid {pid}) listening on {address}"
    ));
    let to = migrate::resolve(&address)?;
    let mut settle = |_: &dirtylog_migrate::MigrateError| receiver.settle();
    let source = migrate::migrate_guest(
        &a.guest,
        &a.migration,
        to,
        !json,
        json,
        &mut say,
        &mut settle,
    )?;
    let plot = crate::events::PlotResult::write(plot_path.as_deref(), source.migration.as_ref());
    match (&source.migration, &source.error) {
        (Some(report), _) => {
            say("source: migration completed; the source guest is stopped for good");
            if !json {
                let mut buf = Vec::new();
                migrate::print_report(report, &mut buf).map_err(|e| e.to_string())?;
                say(String::from_utf8_lossy(&buf).trim_end());
            }
        }
        (None, Some(e)) => {
            say(&format!("source: migration failed: {e}"));
            if let Some(after) = source.source_writes_after {
                say(&format!(
                    "source: the guest was resumed and runs on: writes {} → {} 200 ms later",
                    source.source_writes, after
                ));
            }
        }
        (None, None) => {}
    }

    // What the destination saw: until its last event, or the process ends.
    let deadline = Instant::now() + Duration::from_millis(a.run_for_ms) + Duration::from_secs(30);
    let mut events = vec![first];
    let mut ran = false;
    let mut failed = None;
    let mut first_writes = None;
    let kernel = a.guest.kernel.kernel.is_some();
    // The guest's progress: the dirtier's writes, or the bytes a kernel wrote to its serial port.
    let progress = if kernel { "serial bytes" } else { "writes" };
    while let Ok(e) = receiver.event(deadline) {
        match e["event"].as_str() {
            Some("completed") => {
                first_writes = e["guest-writes"].as_u64();
                let r = &e["report"];
                let verify = r["verify"]
                    .as_str()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(dirtylog_migrate::Verify::Strict);
                let check = migrate::check_phrase(
                    verify,
                    r["hash-check-time"].as_u64().unwrap_or(0),
                    r["verify-after-resume-time"].as_u64().unwrap_or(0),
                );
                say(&format!(
                    "destination: received {} in {} rounds over {} connection(s); {check}; \
                     guest resumed with {} {progress} done",
                    bytes(r["transferred"].as_u64().unwrap_or(0)),
                    r["rounds"],
                    r["connections"],
                    e["guest-writes"]
                ));
            }
            Some("sample") if kernel => say(&format!(
                "destination: +{:>5} ms  guest serial bytes {}",
                e["ms"], e["guest-writes"]
            )),
            Some("sample") => say(&format!(
                "destination: +{:>5} ms  guest writes {}  mailbox requests served there {}",
                e["ms"], e["guest-writes"], e["mailbox-served"]
            )),
            Some("done") => {
                ran = e["advanced"].as_bool().unwrap_or(false);
                say(&format!(
                    "destination: guest {progress} {} → {}: {}",
                    first_writes.map_or("?".to_string(), |w| w.to_string()),
                    e["guest-writes"],
                    if ran {
                        "the guest keeps running on the destination"
                    } else {
                        "the guest made no progress there"
                    }
                ));
            }
            Some("serial") => say(&format!(
                "  destination guest| {}",
                e["line"].as_str().unwrap_or("")
            )),
            Some("guest-exit") => say(&format!(
                "destination: {} (exit status {})",
                e["how"].as_str().unwrap_or("?"),
                e["status"]
            )),
            Some("failed") => {
                failed = e["error"].as_str().map(str::to_string);
                say(&format!(
                    "destination: failed (the guest never ran there): {}",
                    failed.as_deref().unwrap_or("?")
                ));
            }
            _ => {}
        }
        let end = matches!(e["event"].as_str(), Some("done" | "failed"));
        events.push(e);
        if end {
            break;
        }
    }
    let status = receiver.finish(Duration::from_secs(15));
    let wall = t0.elapsed();
    let completed = source.migration.is_some();
    let idle = a.guest.dirty_rate.0 == Some(0);
    let ok = completed && failed.is_none() && (ran || idle) && status.is_ok();
    if json {
        let error = if ok {
            None
        } else if let Some(e) = &source.error {
            Some(format!("the migration failed: {e}"))
        } else if let Some(e) = &failed {
            Some(format!("the destination failed: {e}"))
        } else if let Err(e) = &status {
            Some(format!("the destination: {e}"))
        } else {
            Some("the guest made no progress on the destination".to_string())
        };
        let summary = DemoSummary {
            wall_time_ms: wall.as_millis() as u64,
            receiver_pid: pid,
            receiver_address: address,
            source,
            destination: events,
            guest_ran_on_destination: ran,
            error,
        };
        crate::json::print_line(&plot.outcome(ok, &summary))?;
        plot.say(json);
    } else {
        plot.say(json);
        let mut out = std::io::stdout().lock();
        if let Err(e) = &status {
            let _ = writeln!(out, "destination: {e}");
        }
        let _ = writeln!(
            out,
            "demo {} in {:.1} s",
            if ok { "succeeded" } else { "FAILED" },
            wall.as_secs_f64()
        );
    }
    Ok(if !ok {
        ExitCode::from(1)
    } else if plot.error.is_some() {
        ExitCode::from(crate::events::PlotResult::FAILED_STATUS)
    } else {
        ExitCode::SUCCESS
    })
}
