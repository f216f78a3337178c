//! The latency distribution as a percentile curve, written as plain SVG (no plotting crate).
//!
//! The x axis is the percentile on the usual "number of nines" scale, `-log10(1 − q)`, so the
//! median, p90, p99 and p99.9 are evenly spaced and the tail — where latency problems live — gets
//! as much room as the body. The y axis is linear milliseconds.

use std::fmt::Write as _;

use super::report::Curve;

const WIDTH: f64 = 760.0;
const HEIGHT: f64 = 440.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 60.0;
const COLORS: [&str; 3] = ["#1f77b4", "#d62728", "#2ca02c"];
/// The right end of the x axis: p99.99.
const MAX_NINES: f64 = 4.0;

fn nines(q: f64) -> f64 {
    let tail = (1.0 - q).max(10f64.powf(-MAX_NINES));
    (-tail.log10()).clamp(0.0, MAX_NINES)
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A "nice" axis maximum at or above `v` (1, 2 or 5 × 10ⁿ).
fn nice_ceiling(v: f64) -> f64 {
    if v <= 0.0 {
        return 1.0;
    }
    let magnitude = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 5.0, 10.0] {
        if m * magnitude >= v {
            return m * magnitude;
        }
    }
    10.0 * magnitude
}

/// The SVG document for `curves` (name, `(q, latency)` points ascending in `q`).
pub fn svg(curves: &[(String, Curve)], title: &str) -> String {
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let max_ms = curves
        .iter()
        .flat_map(|(_, pts)| pts.iter())
        .filter(|(q, _)| nines(*q) <= MAX_NINES)
        .map(|(_, d)| d.as_secs_f64() * 1e3)
        .fold(0.0, f64::max);
    let y_max = nice_ceiling(max_ms);
    let x = |q: f64| LEFT + nines(q) / MAX_NINES * plot_w;
    let y = |ms: f64| TOP + plot_h - (ms / y_max).min(1.0) * plot_h;

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        s,
        r#"<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/><text x="{}" y="24" text-anchor="middle" font-size="14">{}</text>"#,
        WIDTH / 2.0,
        escape(title)
    );
    // Grid and axis labels.
    for (q, label) in [
        (0.0, "p0"),
        (0.9, "p90"),
        (0.99, "p99"),
        (0.999, "p99.9"),
        (0.9999, "p99.99"),
    ] {
        let px = x(q);
        let _ = writeln!(
            s,
            r##"<line x1="{px:.1}" y1="{TOP}" x2="{px:.1}" y2="{:.1}" stroke="#ddd"/><text x="{px:.1}" y="{:.1}" text-anchor="middle">{label}</text>"##,
            TOP + plot_h,
            TOP + plot_h + 18.0
        );
    }
    let px50 = x(0.5);
    let _ = writeln!(
        s,
        r##"<line x1="{px50:.1}" y1="{TOP}" x2="{px50:.1}" y2="{:.1}" stroke="#eee"/><text x="{px50:.1}" y="{:.1}" text-anchor="middle" fill="#888">p50</text>"##,
        TOP + plot_h,
        TOP + plot_h + 18.0
    );
    for i in 0..=5 {
        let ms = y_max * f64::from(i) / 5.0;
        let py = y(ms);
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" y1="{py:.1}" x2="{:.1}" y2="{py:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{ms}</text>"##,
            LEFT + plot_w,
            LEFT - 6.0,
            py + 4.0
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">percentile</text><text x="16" y="{:.1}" text-anchor="middle" transform="rotate(-90 16 {:.1})">latency (ms)</text>"#,
        LEFT + plot_w / 2.0,
        HEIGHT - 16.0,
        TOP + plot_h / 2.0,
        TOP + plot_h / 2.0
    );
    // Target lines of docs/architecture.md, "Performance targets" (command → read model visible): p50 ≤ 10 ms, p99 ≤ 50 ms.
    for (q, ms) in [(0.5, 10.0), (0.99, 50.0)] {
        if ms <= y_max {
            let _ = writeln!(
                s,
                r##"<circle cx="{:.1}" cy="{:.1}" r="4" fill="none" stroke="#000"/><text x="{:.1}" y="{:.1}" fill="#000">target ≤ {ms} ms</text>"##,
                x(q),
                y(ms),
                x(q) + 6.0,
                y(ms) - 6.0
            );
        }
    }
    let _ = writeln!(
        s,
        r##"<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#444"/>"##
    );
    for (i, (name, points)) in curves.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let path: Vec<String> = points
            .iter()
            .filter(|(q, _)| *q < 1.0)
            .map(|(q, d)| format!("{:.1},{:.1}", x(*q), y(d.as_secs_f64() * 1e3)))
            .collect();
        if !path.is_empty() {
            let _ = writeln!(
                s,
                r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#,
                path.join(" ")
            );
        }
        let ly = TOP + 16.0 + 18.0 * i as f64;
        let _ = writeln!(
            s,
            r#"<line x1="{:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{color}" stroke-width="2"/><text x="{:.1}" y="{:.1}">{}</text>"#,
            LEFT + 12.0,
            LEFT + 36.0,
            LEFT + 42.0,
            ly + 4.0,
            escape(name)
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_svg_is_one_document_with_a_curve_per_series() {
        let pts: Vec<(f64, Duration)> = (0..10)
            .map(|i| (1.0 - 0.5f64.powi(i), Duration::from_millis(2 + i as u64)))
            .collect();
        let doc = svg(&[("a <b>".into(), pts.clone()), ("c".into(), pts)], "t & u");
        assert!(doc.starts_with("<svg") && doc.trim_end().ends_with("</svg>"));
        assert_eq!(doc.matches("<polyline").count(), 2);
        assert!(doc.contains("a &lt;b&gt;") && doc.contains("t &amp; u"));
    }

    #[test]
    fn axes_are_nines_and_nice_round_maxima() {
        assert_eq!(nines(0.0), 0.0);
        assert!((nines(0.99) - 2.0).abs() < 1e-9);
        assert_eq!(nines(1.0), MAX_NINES);
        assert_eq!(nice_ceiling(37.0), 50.0);
        assert_eq!(nice_ceiling(100.0), 100.0);
        assert_eq!(nice_ceiling(0.0), 1.0);
    }
}
