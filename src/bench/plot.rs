//! The SVG `warmpool bench --plot` writes: latency CDFs per target (warm vs cold) for the
//! three figures side by side, on a log time axis, with the machine's floor (loopback HTTP for
//! leases, a bare spawn for first byte and exit) as a vertical line. Drawn with plotters.

use std::path::Path;

use plotters::prelude::*;

use super::{LoadReport, Sample};

const COLORS: [RGBColor; 4] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
];

/// Writes the plot of a report to `path` (SVG).
pub fn write_svg(r: &LoadReport, path: &Path) -> Result<(), String> {
    draw(r, path).map_err(|e| format!("cannot draw {}: {e}", path.display()))
}

type Pick = fn(&Sample) -> Option<f64>;

fn draw(r: &LoadReport, path: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(path, (1500, 460)).into_drawing_area();
    root.fill(&WHITE)?;
    let (title_area, body) = root.split_vertically(40);
    title_area.titled(
        &format!(
            "warmpool bench: `{}`, concurrency {}, {} jobs",
            r.command,
            r.concurrency,
            r.samples.len()
        ),
        ("sans-serif", 20),
    )?;
    let figures: [(&str, Pick, f64, &str); 3] = [
        (
            "time to lease (request to 201)",
            |s| s.lease_ms,
            r.baseline.http.p50,
            "loopback HTTP p50",
        ),
        (
            "time to first byte",
            |s| s.ttfb_ms,
            r.baseline.spawn.p50,
            "bare spawn p50",
        ),
        (
            "time to exit",
            |s| s.exit_ms,
            r.baseline.spawn.p50,
            "bare spawn p50",
        ),
    ];
    for (area, (title, pick, floor, floor_name)) in body.split_evenly((1, 3)).iter().zip(figures) {
        let ok = || r.samples.iter().filter(|s| s.error.is_none());
        let all: Vec<f64> = ok().filter_map(pick).filter(|v| *v > 0.0).collect();
        let lo = all
            .iter()
            .copied()
            .fold(floor.max(1e-3), f64::min)
            .max(1e-3)
            * 0.8;
        let hi = all
            .iter()
            .copied()
            .fold(floor * 1.25, f64::max)
            .max(lo * 10.0)
            * 1.25;
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d((lo..hi).log_scale(), 0f64..1f64)?;
        chart
            .configure_mesh()
            .x_desc("milliseconds (log scale)")
            .y_desc("fraction of jobs")
            .draw()?;
        for (i, t) in r.targets.iter().enumerate() {
            let mut v: Vec<f64> = ok()
                .filter(|s| s.target == t.name)
                .filter_map(pick)
                .collect();
            if v.is_empty() {
                continue;
            }
            v.sort_by(f64::total_cmp);
            let n = v.len() as f64;
            let color = COLORS[i % COLORS.len()];
            let pts = v
                .iter()
                .enumerate()
                .map(|(k, x)| (x.max(lo), (k + 1) as f64 / n));
            chart
                .draw_series(LineSeries::new(pts, color.stroke_width(2)))?
                .label(format!(
                    "{} (p50 {:.2} ms)",
                    t.name,
                    super::stats::percentile(&v, 50.0)
                ))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        }
        if floor > 0.0 {
            chart
                .draw_series(LineSeries::new(
                    [(floor, 0.0), (floor, 1.0)],
                    BLACK.mix(0.6).stroke_width(1),
                ))?
                .label(format!("{floor_name} {floor:.2} ms"))
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.mix(0.6)));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .border_style(BLACK)
            .background_style(WHITE.mix(0.85))
            .draw()?;
    }
    root.present()?;
    Ok(())
}
