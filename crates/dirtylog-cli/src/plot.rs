//! `--plot FILE.svg`: a picture of one migration, drawn from its [`SendReport`].
//!
//! Three panels, one point per round (the bulk pass is round 0, the final round — sent with
//! the guest paused — the last):
//! 1. dirty pages and pages sent (with contents, and as zero-page markers) per round, on a log
//!    scale;
//! 2. the expected downtime at the start of each round against the downtime limit and the
//!    downtime measured at switchover;
//! 3. the vCPU throttle (auto-converge), percent.
//!
//! Drawn with `plotters`' SVG backend only: text goes into the file as SVG `<text>` elements,
//! laid out with plotters' built-in size estimate, so no font files, fontconfig or freetype
//! are needed to draw or to build.

use std::path::Path;

use dirtylog_migrate::SendReport;
use plotters::prelude::*;

/// One round of the picture.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Round {
    /// The round, from 0 (the bulk pass).
    pub round: u64,
    /// Pages found dirty at the start of the round.
    pub dirty_pages: u64,
    /// Pages sent with their contents.
    pub sent_pages: u64,
    /// Pages sent as zero-page markers.
    pub zero_pages: u64,
    /// Expected downtime when the round started, ms (meaningless for the bulk pass).
    pub expected_downtime_ms: u64,
    /// vCPU throttle during the round, percent.
    pub throttle_percent: u8,
    /// Sent with the guest paused.
    pub is_final: bool,
}

/// What the picture shows: the numbers of one migration.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plot {
    /// The rounds, in order.
    pub rounds: Vec<Round>,
    /// The downtime measured, ms.
    pub downtime_ms: u64,
    /// The last expected downtime before switchover, ms.
    pub expected_downtime_ms: u64,
    /// The downtime limit, ms.
    pub downtime_limit_ms: u64,
    /// The whole migration, ms.
    pub total_time_ms: u64,
    /// Why pre-copy stopped, for the title.
    pub switchover: String,
}

const WIDTH: u32 = 960;
const HEIGHT: u32 = 900;
const DIRTY: RGBColor = RGBColor(0xd6, 0x27, 0x28);
const SENT: RGBColor = RGBColor(0x1f, 0x77, 0xb4);
const ZERO: RGBColor = RGBColor(0x7f, 0x7f, 0x7f);
const EXPECTED: RGBColor = RGBColor(0x2c, 0xa0, 0x2c);
const LIMIT: RGBColor = RGBColor(0x00, 0x00, 0x00);
const MEASURED: RGBColor = RGBColor(0xd6, 0x27, 0x28);
const THROTTLE: RGBColor = RGBColor(0x94, 0x67, 0xbd);

impl Plot {
    /// The numbers of a completed migration.
    pub fn of(r: &SendReport) -> Self {
        Plot {
            rounds: r
                .rounds
                .iter()
                .map(|x| Round {
                    round: x.stats.round,
                    dirty_pages: x.stats.dirty_pages,
                    sent_pages: x.stats.sent_pages,
                    zero_pages: x.stats.zero_pages,
                    expected_downtime_ms: x.expected_downtime,
                    throttle_percent: x.cpu_throttle_percentage,
                    is_final: x.is_final,
                })
                .collect(),
            downtime_ms: r.stats.downtime,
            expected_downtime_ms: r.stats.expected_downtime,
            downtime_limit_ms: r.downtime_limit,
            total_time_ms: r.stats.total_time,
            switchover: format!("{:?}", r.switchover),
        }
    }

    /// The picture, as an SVG document.
    pub fn svg(&self) -> Result<String, String> {
        let mut out = String::new();
        {
            let root = SVGBackend::with_string(&mut out, (WIDTH, HEIGHT)).into_drawing_area();
            self.draw(&root)
                .map_err(|e| format!("drawing the plot: {e}"))?;
            root.present()
                .map_err(|e| format!("drawing the plot: {e}"))?;
        }
        Ok(out)
    }

    fn draw<DB: DrawingBackend>(
        &self,
        root: &DrawingArea<DB, plotters::coord::Shift>,
    ) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
        root.fill(&WHITE)?;
        let exceeded = self.downtime_ms > self.downtime_limit_ms;
        let title = format!(
            "migration: {} rounds in {} ms · downtime {} ms{} limit {} ms (expected {} ms) · \
             switchover: {}",
            self.rounds.len(),
            self.total_time_ms,
            self.downtime_ms,
            if exceeded {
                " EXCEEDED the"
            } else {
                " within the"
            },
            self.downtime_limit_ms,
            self.expected_downtime_ms,
            self.switchover
        );
        let root = root.titled(&title, ("sans-serif", 18))?;
        let panels = root.split_by_breakpoints::<u32, u32, _, _>([], [380, 640]);
        let last = self.rounds.last().map_or(0, |r| r.round).max(1);
        let x_range = -0.3f64..last as f64 + 0.3;
        let x_desc = "round (0 = bulk pass, last = final round, guest paused)";
        let x_label = |x: &f64| {
            if x.fract() == 0.0 && *x >= 0.0 {
                format!("{x:.0}")
            } else {
                String::new()
            }
        };
        let n_x = (last as usize + 1).min(20);

        // 1. Pages per round, log scale (a round with none has no point: the line breaks); a
        // decade of headroom above the data for the legend.
        let max_pages = self
            .rounds
            .iter()
            .map(|r| r.dirty_pages.max(r.sent_pages).max(r.zero_pages))
            .max()
            .unwrap_or(1)
            .max(10);
        let mut pages = ChartBuilder::on(&panels[0])
            .caption("pages per round (log scale)", ("sans-serif", 15))
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(x_range.clone(), (1f64..max_pages as f64 * 20.0).log_scale())?;
        pages
            .configure_mesh()
            .max_light_lines(0)
            .x_labels(n_x)
            .x_label_formatter(&x_label)
            .x_desc(x_desc)
            .y_desc("pages")
            .y_label_formatter(&|y| format!("{y:.0}"))
            .draw()?;
        let series = [
            (
                "dirty pages",
                DIRTY,
                (|r: &Round| r.dirty_pages) as fn(&Round) -> u64,
            ),
            ("sent with contents", SENT, |r: &Round| r.sent_pages),
            ("sent as zero-page markers", ZERO, |r: &Round| r.zero_pages),
        ];
        for (name, color, get) in series {
            let pts: Vec<Option<(f64, f64)>> = self
                .rounds
                .iter()
                .map(|r| (get(r) > 0).then(|| (r.round as f64, get(r) as f64)))
                .collect();
            for run in pts.split(Option::is_none).filter(|r| r.len() > 1) {
                pages.draw_series(LineSeries::new(
                    run.iter().flatten().copied(),
                    color.stroke_width(2),
                ))?;
            }
            pages
                .draw_series(
                    pts.iter()
                        .flatten()
                        .map(|&p| Circle::new(p, 3, color.filled())),
                )?
                .label(name)
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2))
                });
        }
        pages
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperRight)
            .draw()?;

        // 2. Expected downtime per round (not for the bulk pass) against the limit and the
        // measured downtime; the top third is left for the legend.
        let expected: Vec<(f64, f64)> = self
            .rounds
            .iter()
            .filter(|r| r.round > 0)
            .map(|r| (r.round as f64, r.expected_downtime_ms as f64))
            .collect();
        let max_ms = expected
            .iter()
            .map(|p| p.1)
            .fold(0.0, f64::max)
            .max(self.downtime_ms as f64)
            .max(self.downtime_limit_ms as f64)
            .max(1.0);
        let mut down = ChartBuilder::on(&panels[1])
            .caption(
                "downtime: expected per round, limit, measured",
                ("sans-serif", 15),
            )
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(x_range.clone(), 0f64..max_ms * 1.6)?;
        down.configure_mesh()
            .max_light_lines(0)
            .x_labels(n_x)
            .x_label_formatter(&x_label)
            .y_desc("ms")
            .y_label_formatter(&|y| format!("{y:.0}"))
            .draw()?;
        let ends = [x_range.start, x_range.end];
        let limit = self.downtime_limit_ms as f64;
        down.draw_series(DashedLineSeries::new(
            ends.map(|x| (x, limit)),
            8,
            5,
            LIMIT.stroke_width(2),
        ))?
        .label(format!("limit {} ms", self.downtime_limit_ms))
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], LIMIT.stroke_width(2)));
        down.draw_series(LineSeries::new(
            expected.iter().copied(),
            EXPECTED.stroke_width(2),
        ))?
        .label("expected downtime at the round's start")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], EXPECTED.stroke_width(2)));
        down.draw_series(
            expected
                .iter()
                .map(|&p| Circle::new(p, 3, EXPECTED.filled())),
        )?;
        let measured = self.downtime_ms as f64;
        down.draw_series(LineSeries::new(
            ends.map(|x| (x, measured)),
            MEASURED.stroke_width(1),
        ))?
        .label(format!(
            "downtime measured {} ms{}",
            self.downtime_ms,
            if exceeded { " (over the limit)" } else { "" }
        ))
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], MEASURED.stroke_width(2)));
        if let Some(f) = self.rounds.iter().find(|r| r.is_final) {
            down.draw_series(std::iter::once(Cross::new(
                (f.round as f64, measured),
                6,
                MEASURED.stroke_width(3),
            )))?;
        }
        // Upper left: the bulk pass has no estimate, so that corner is free.
        down.configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperLeft)
            .draw()?;

        // 3. Throttle.
        let mut thr = ChartBuilder::on(&panels[2])
            .caption("vCPU throttle (auto-converge)", ("sans-serif", 15))
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(x_range, 0f64..100f64)?;
        thr.configure_mesh()
            .max_light_lines(0)
            .x_labels(n_x)
            .x_label_formatter(&x_label)
            .x_desc(x_desc)
            .y_desc("%")
            .y_label_formatter(&|y| format!("{y:.0}"))
            .draw()?;
        let pts: Vec<(f64, f64)> = self
            .rounds
            .iter()
            .map(|r| (r.round as f64, f64::from(r.throttle_percent)))
            .collect();
        thr.draw_series(LineSeries::new(
            pts.iter().copied(),
            THROTTLE.stroke_width(2),
        ))?;
        thr.draw_series(pts.iter().map(|&p| Circle::new(p, 3, THROTTLE.filled())))?;
        Ok(())
    }
}

/// Draw `report` into `path` (written whole or not at all: a temporary file beside it,
/// renamed over it). The error says which file and why.
pub fn write(path: &Path, report: &SendReport) -> Result<(), String> {
    write_plot(path, &Plot::of(report))
}

/// [`write()`] for numbers already taken out of a report.
pub fn write_plot(path: &Path, plot: &Plot) -> Result<(), String> {
    let svg = plot.svg()?;
    let name = path.file_name().ok_or_else(|| {
        format!(
            "cannot write the plot to {}: not a file name",
            path.display()
        )
    })?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    std::fs::write(&tmp, svg.as_bytes())
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            format!("cannot write the plot to {}: {e}", path.display())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Plot {
        let round = |round, dirty, sent, exp, thr, fin| Round {
            round,
            dirty_pages: dirty,
            sent_pages: sent,
            zero_pages: if round == 0 { 200_000 } else { 0 },
            expected_downtime_ms: exp,
            throttle_percent: thr,
            is_final: fin,
        };
        Plot {
            rounds: vec![
                round(0, 262_144, 62_144, 0, 0, false),
                round(1, 16_000, 16_000, 900, 0, false),
                round(2, 9_000, 9_000, 450, 20, false),
                round(3, 3_000, 3_000, 120, 30, false),
                round(4, 900, 900, 40, 30, true),
            ],
            downtime_ms: 61,
            expected_downtime_ms: 40,
            downtime_limit_ms: 300,
            total_time_ms: 2_345,
            switchover: "Converged".into(),
        }
    }

    #[test]
    fn draws_every_panel_with_text_and_no_fonts() {
        let svg = sample().svg().unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..80.min(svg.len())]);
        assert!(svg.trim_end().ends_with("</svg>"));
        for text in [
            "pages per round (log scale)",
            "downtime: expected per round, limit, measured",
            "vCPU throttle (auto-converge)",
            "limit 300 ms",
            "downtime measured 61 ms",
            "dirty pages",
            "within the limit 300 ms",
        ] {
            assert!(svg.contains(text), "no {text:?} in the SVG");
        }
        assert!(svg.contains("<text"), "text is written as SVG <text>");
        // The lines: one polyline per series at least.
        assert!(svg.matches("<polyline").count() >= 5, "{svg}");
    }

    #[test]
    fn an_exceeded_limit_is_said() {
        let mut p = sample();
        p.downtime_ms = 420;
        let svg = p.svg().unwrap();
        assert!(svg.contains("EXCEEDED the limit 300 ms"));
        assert!(svg.contains("downtime measured 420 ms (over the limit)"));
    }

    #[test]
    fn an_empty_migration_still_draws() {
        let svg = Plot::default().svg().unwrap();
        assert!(svg.contains("</svg>"));
    }

    #[test]
    fn write_errors_name_the_file() {
        let e = write_plot(Path::new("/nonexistent-dir/x/m.svg"), &sample()).unwrap_err();
        assert!(
            e.starts_with("cannot write the plot to /nonexistent-dir/x/m.svg: "),
            "{e}"
        );
        let dir = std::env::temp_dir().join(format!("dirtylog-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("m.svg");
        write_plot(&f, &sample()).unwrap();
        let svg = std::fs::read_to_string(&f).unwrap();
        assert!(svg.contains("</svg>"));
        // Nothing left beside it.
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
