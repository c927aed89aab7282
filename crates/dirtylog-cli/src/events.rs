//! The JSON lines of `migrate send --json` and `demo --json` (docs/JSON.md): live `progress`
//! events while the migration runs, then one `completed` or `failed` event with the result.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use dirtylog_migrate::{Phase, Progress};
use serde::Serialize;

use crate::json;

/// The least time between two progress events, unless the phase changes.
pub const PROGRESS_EVERY: Duration = Duration::from_millis(100);

#[derive(Serialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
enum Live<'a> {
    Progress(&'a Progress),
}

/// Prints the engine's progress as `{"event":"progress",...}` lines: at most one per
/// [`PROGRESS_EVERY`], and one at every change of phase (the engine reports the end of every
/// round; short rounds would otherwise flood the output).
pub struct ProgressEvents {
    enabled: bool,
    last: Option<(Instant, Phase)>,
}

impl ProgressEvents {
    /// Print nothing unless `enabled`.
    pub fn new(enabled: bool) -> Self {
        ProgressEvents {
            enabled,
            last: None,
        }
    }

    /// The engine's progress callback.
    pub fn update(&mut self, p: &Progress) {
        if !self.enabled || !self.due(Instant::now(), p.phase) {
            return;
        }
        // A progress line that cannot be written is not worth failing the migration.
        let _ = json::print_line(&Live::Progress(p));
    }

    /// Whether a progress event at `now` in `phase` is to be printed; if so, remember it.
    fn due(&mut self, now: Instant, phase: Phase) -> bool {
        let due = match self.last {
            None => true,
            Some((t, ph)) => ph != phase || now.duration_since(t) >= PROGRESS_EVERY,
        };
        if due {
            self.last = Some((now, phase));
        }
        due
    }
}

/// The last line: `completed` or `failed`, the command's result, and the plot.
#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Outcome<'a, T: Serialize> {
    /// `completed` or `failed`.
    pub event: &'static str,
    /// The command's result, its fields beside `event`.
    #[serde(flatten)]
    pub result: &'a T,
    /// The plot written (`--plot`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plot: Option<String>,
    /// Why the plot could not be written (the migration's result stands).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plot_error: Option<String>,
}

/// What became of `--plot`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PlotResult {
    /// Written there.
    pub written: Option<PathBuf>,
    /// Not written, because of this.
    pub error: Option<String>,
}

impl PlotResult {
    /// Draw `report` into `path`, if both are given.
    pub fn write(path: Option<&Path>, report: Option<&dirtylog_migrate::SendReport>) -> Self {
        match (path, report) {
            (Some(path), Some(report)) => match crate::plot::write(path, report) {
                Ok(()) => PlotResult {
                    written: Some(path.to_path_buf()),
                    error: None,
                },
                Err(e) => PlotResult {
                    written: None,
                    error: Some(e),
                },
            },
            _ => PlotResult::default(),
        }
    }

    /// The exit status when the plot was asked for and not written (the migration's result
    /// is printed all the same).
    pub const FAILED_STATUS: u8 = 3;

    /// Tell what became of the plot: where it is on stdout (text output only: the JSON
    /// outcome has it), why it is not on stderr (always).
    pub fn say(&self, json: bool) {
        if let (Some(p), false) = (&self.written, json) {
            println!("plot: {}", p.display());
        }
        if let Some(e) = &self.error {
            eprintln!("dirtylog: {e}");
        }
    }

    /// The last line of `--json` output for `result`.
    pub fn outcome<'a, T: Serialize>(&self, ok: bool, result: &'a T) -> Outcome<'a, T> {
        Outcome {
            event: if ok { "completed" } else { "failed" },
            result,
            plot: self.written.as_ref().map(|p| p.display().to_string()),
            plot_error: self.error.clone(),
        }
    }
}

/// Refuse a `--plot FILE` whose directory does not exist, before anything starts.
pub fn check_plot_path(path: &Path) -> Result<(), String> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if path.file_name().is_none() {
        return Err(format!("--plot {}: not a file name", path.display()));
    }
    if !dir.is_dir() {
        return Err(format!(
            "--plot {}: the directory {} does not exist",
            path.display(),
            dir.display()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_is_rate_limited_but_phase_changes_pass() {
        let mut e = ProgressEvents::new(true);
        let t = Instant::now();
        assert!(e.due(t, Phase::Bulk));
        assert!(!e.due(t + Duration::from_millis(50), Phase::Bulk));
        assert!(e.due(t + Duration::from_millis(60), Phase::Iterating));
        assert!(!e.due(t + Duration::from_millis(150), Phase::Iterating));
        assert!(e.due(t + Duration::from_millis(160), Phase::Iterating));
    }

    #[test]
    fn progress_and_outcome_lines() {
        let p = Progress {
            phase: Phase::Iterating,
            round: 2,
            round_pages: 10,
            round_done_pages: 5,
            transferred: 4096,
            expected_downtime_ms: 7,
            dirty_pages_rate: 100,
            mbps: 1.5,
            throttle: 0,
            elapsed_ms: 250,
        };
        let l = json::line(&Live::Progress(&p)).unwrap();
        assert!(
            l.starts_with(
                r#"{"schema-version":1,"event":"progress","phase":"iterating","round":2,"#
            ),
            "{l}"
        );
        let r = PlotResult {
            written: None,
            error: Some("cannot write the plot to /x: denied".into()),
        };
        let l = json::line(&r.outcome(true, &serde_json::json!({"status": "completed"}))).unwrap();
        assert_eq!(
            l,
            r#"{"schema-version":1,"event":"completed","status":"completed","plot-error":"cannot write the plot to /x: denied"}"#
        );
    }

    #[test]
    fn plot_paths_are_checked_up_front() {
        assert!(check_plot_path(Path::new("m.svg")).is_ok());
        assert!(check_plot_path(&std::env::temp_dir().join("m.svg")).is_ok());
        let e = check_plot_path(Path::new("/nonexistent-dir/m.svg")).unwrap_err();
        assert!(e.contains("/nonexistent-dir does not exist"), "{e}");
    }
}
