//! The bench's output: figures, the table, the JSON document, and the progress line on stderr.

use serde::Serialize;
use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

use super::stats;

/// What a figure is held to.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Target {
    /// `value / limit ≥ x`.
    RatioAtLeast(f64),
    /// `value / limit ≤ x`.
    RatioAtMost(f64),
    /// `value ≥ x` (in the figure's unit).
    AtLeast(f64),
    /// `value ≤ x` (in the figure's unit).
    AtMost(f64),
    /// Shown for context; no target.
    None,
}

/// One row of the report.
#[derive(Clone, Debug, Serialize)]
pub struct Figure {
    pub name: String,
    /// `null` when the figure could not be measured (see `note`).
    pub value: Option<f64>,
    pub unit: String,
    pub limit: Option<f64>,
    pub ratio: Option<f64>,
    pub target: String,
    /// `null` for figures without a target and for figures not measured.
    pub met: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl Figure {
    pub fn new(
        name: impl Into<String>,
        value: f64,
        unit: &str,
        limit: Option<f64>,
        target: Target,
    ) -> Self {
        let ratio = limit.and_then(|l| stats::ratio(value, l));
        let met = match target {
            Target::RatioAtLeast(x) => ratio.map(|r| r >= x),
            Target::RatioAtMost(x) => ratio.map(|r| r <= x),
            Target::AtLeast(x) => Some(value >= x),
            Target::AtMost(x) => Some(value <= x),
            Target::None => None,
        };
        Figure {
            name: name.into(),
            value: Some(value),
            unit: unit.to_string(),
            limit,
            ratio,
            target: target_text(target, unit),
            met,
            note: None,
        }
    }

    /// A figure that could not be measured, with the reason.
    pub fn missing(name: impl Into<String>, unit: &str, target: Target, why: String) -> Self {
        Figure {
            name: name.into(),
            value: None,
            unit: unit.to_string(),
            limit: None,
            ratio: None,
            target: target_text(target, unit),
            met: None,
            note: Some(why),
        }
    }

    pub fn with_note(mut self, note: impl Into<String>) -> Self {
        let note = note.into();
        self.note = Some(match self.note.take() {
            Some(old) => format!("{old}; {note}"),
            None => note,
        });
        self
    }
}

fn target_text(target: Target, unit: &str) -> String {
    match target {
        Target::RatioAtLeast(x) => format!("ratio >= {x}"),
        Target::RatioAtMost(x) => format!("ratio <= {x}"),
        Target::AtLeast(x) => format!(">= {} {unit}", number(x)),
        Target::AtMost(x) => format!("<= {} {unit}", number(x)),
        Target::None => "-".to_string(),
    }
}

/// Compact numbers: integers for big values, a few significant digits for small ones.
fn number(x: f64) -> String {
    let a = x.abs();
    if a >= 100.0 {
        format!("{x:.0}")
    } else if a >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

/// A percentile curve: `(q, latency)` points ascending in `q`.
pub type Curve = Vec<(f64, Duration)>;
/// Named curves, one line each in the plot.
pub type Curves = Vec<(String, Curve)>;

/// Everything a run produced.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub figures: Vec<Figure>,
    /// Percentile curves of the open-loop scenarios for `--plot`: file stem, title, curves.
    pub plots: Vec<(&'static str, String, Curves)>,
    /// Cores, memory, server versions.
    pub machine: String,
}

impl Report {
    pub fn json(&self) -> anyhow::Result<String> {
        #[derive(Serialize)]
        struct Doc<'a> {
            figures: &'a [Figure],
            machine: &'a str,
        }
        Ok(serde_json::to_string_pretty(&Doc {
            figures: &self.figures,
            machine: &self.machine,
        })?)
    }

    /// `figure | value | limit | ratio | target | met`, then the notes.
    pub fn table(&self) -> String {
        let header = ["figure", "value", "limit", "ratio", "target", "met"];
        let rows: Vec<[String; 6]> = self
            .figures
            .iter()
            .map(|f| {
                [
                    f.name.clone(),
                    match f.value {
                        Some(v) => format!("{} {}", number(v), f.unit),
                        None => "n/a".to_string(),
                    },
                    f.limit
                        .map(|l| format!("{} {}", number(l), f.unit))
                        .unwrap_or_else(|| "-".into()),
                    f.ratio
                        .map(|r| format!("{r:.2}"))
                        .unwrap_or_else(|| "-".into()),
                    f.target.clone(),
                    match f.met {
                        Some(true) => "yes".into(),
                        Some(false) => "NO".into(),
                        None => "-".into(),
                    },
                ]
            })
            .collect();
        let mut widths = header.map(str::len);
        for row in &rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let line = |cells: &[String; 6]| {
            let mut s = String::from("|");
            for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
                // Numbers right-aligned, words left-aligned.
                if (1..=3).contains(&i) {
                    s.push_str(&format!(" {cell:>w$} |"));
                } else {
                    s.push_str(&format!(" {cell:<w$} |"));
                }
            }
            s.push('\n');
            s
        };
        let mut out = line(&header.map(String::from));
        out.push('|');
        for (i, w) in widths.iter().enumerate() {
            let dashes = "-".repeat(*w);
            if (1..=3).contains(&i) {
                out.push_str(&format!("-{dashes}:|"));
            } else {
                out.push_str(&format!("-{dashes}-|"));
            }
        }
        out.push('\n');
        for row in &rows {
            out.push_str(&line(row));
        }
        let notes: Vec<_> = self
            .figures
            .iter()
            .filter_map(|f| f.note.as_ref().map(|n| format!("- {}: {n}", f.name)))
            .collect();
        if !notes.is_empty() {
            out.push_str("\nnotes:\n");
            for n in notes {
                out.push_str(&n);
                out.push('\n');
            }
        }
        out
    }
}

/// The progress line on stderr: rewritten in place on a terminal, one line per phase otherwise
/// (so logs captured from CI stay readable).
pub struct Progress {
    tty: bool,
    started: Instant,
    last_tick: Mutex<Option<Instant>>,
}

impl Progress {
    pub fn new() -> Self {
        Self {
            tty: std::io::stderr().is_terminal(),
            started: Instant::now(),
            last_tick: Mutex::new(None),
        }
    }

    /// A new phase: always shown.
    pub fn status(&self, msg: &str) {
        let t = self.started.elapsed().as_secs_f64();
        let mut err = std::io::stderr();
        if self.tty {
            let _ = write!(err, "\r\x1b[K[{t:5.1}s] {msg}");
        } else {
            let _ = writeln!(err, "[{t:5.1}s] {msg}");
        }
        let _ = err.flush();
    }

    /// A running counter: shown on a terminal at most a few times per second.
    pub fn tick(&self, msg: &str) {
        if !self.tty {
            return;
        }
        let now = Instant::now();
        {
            let Ok(mut last) = self.last_tick.lock() else {
                return;
            };
            if last.is_some_and(|l| now - l < Duration::from_millis(200)) {
                return;
            }
            *last = Some(now);
        }
        self.status(msg);
    }

    pub fn clear(&self) {
        if self.tty {
            let mut err = std::io::stderr();
            let _ = write!(err, "\r\x1b[K");
            let _ = err.flush();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_decide_met_from_the_ratio_or_the_value() {
        let f = Figure::new("c", 400.0, "ops/s", Some(1000.0), Target::RatioAtLeast(0.5));
        assert_eq!(f.ratio, Some(0.4));
        assert_eq!(f.met, Some(false));
        let f = Figure::new("p50", 8.0, "ms", None, Target::AtMost(10.0));
        assert_eq!((f.ratio, f.met), (None, Some(true)));
        let f = Figure::new("scale", 1.1, "ms", Some(1.0), Target::RatioAtMost(1.2));
        assert_eq!(f.met, Some(true));
        let f = Figure::new("p999", 80.0, "ms", None, Target::None);
        assert_eq!(f.met, None);
    }

    #[test]
    fn the_json_document_has_the_documented_fields() {
        let report = Report {
            figures: vec![Figure::new(
                "commands_c1",
                500.0,
                "ops/s",
                Some(1000.0),
                Target::RatioAtLeast(0.5),
            )],
            ..Report::default()
        };
        let doc: serde_json::Value =
            serde_json::from_str(&report.json().expect("json")).expect("parses");
        let f = &doc["figures"][0];
        for key in ["name", "value", "unit", "limit", "ratio", "target", "met"] {
            assert!(f.get(key).is_some(), "missing {key}");
        }
        assert_eq!(f["met"], serde_json::json!(true));
        assert!(report.table().contains("| commands_c1 |"));
    }
}
