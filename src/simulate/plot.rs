//! The SVG `warmpool simulate --plot` writes: per policy, the CDF of lease waits (warm leases at
//! 0 s) and idle agents over the trace's time, side by side. Drawn with plotters.

use std::path::Path;

use plotters::prelude::*;

use super::{Error, Report, Result};

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(140, 86, 75),
];

/// Writes the plot of a report to `path`.
pub fn write_svg(r: &Report, path: &Path) -> Result<()> {
    draw(r, path).map_err(|e| Error::Plot {
        path: path.display().to_string(),
        message: e.to_string(),
    })
}

fn draw(r: &Report, path: &Path) -> std::result::Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(path, (1400, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let (title, body) = root.split_vertically(40);
    title.titled(
        &format!(
            "warmpool simulate: {} ({} leases), provisioning {:.1}s..{:.1}s",
            r.setup.trace,
            r.setup.trace_leases,
            r.setup.provision_seconds.0,
            r.setup.provision_seconds.1
        ),
        ("sans-serif", 20),
    )?;
    let areas = body.split_evenly((1, 2));
    // Wait CDF.
    let max_wait = r
        .policies
        .iter()
        .map(|p| p.wait_seconds.max)
        .fold(1.0f64, f64::max);
    let mut cdf = ChartBuilder::on(&areas[0])
        .caption("lease wait CDF (warm = 0 s)", ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(48)
        .build_cartesian_2d(0f64..max_wait * 1.05, 0f64..1.0)?;
    cdf.configure_mesh()
        .x_desc("wait (s)")
        .y_desc("fraction of leases")
        .draw()?;
    for (i, p) in r.policies.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let n = p.waits.len().max(1) as f64;
        // At most ~2000 points: every k-th sorted wait, plus the last.
        let k = (p.waits.len() / 2000).max(1);
        let mut pts: Vec<(f64, f64)> = p
            .waits
            .iter()
            .enumerate()
            .filter(|(j, _)| j % k == 0 || *j + 1 == p.waits.len())
            .map(|(j, w)| (*w, (j + 1) as f64 / n))
            .collect();
        if let Some(last) = pts.last().copied() {
            pts.push((max_wait * 1.05, last.1));
        }
        cdf.draw_series(LineSeries::new(pts, color.stroke_width(2)))?
            .label(format!("{} (warm-hit {:.3})", p.name, p.warm_hit_ratio))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
    }
    cdf.configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    // Idle agents over time.
    let hours = r.setup.trace_seconds / 3600.0;
    let max_idle = r
        .policies
        .iter()
        .flat_map(|p| p.timeline.iter().map(|t| t.1))
        .max()
        .unwrap_or(1)
        .max(1);
    let mut idle = ChartBuilder::on(&areas[1])
        .caption("idle agents over time", ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(48)
        .build_cartesian_2d(0f64..hours.max(1e-3), 0f64..f64::from(max_idle) * 1.1)?;
    idle.configure_mesh()
        .x_desc("hours from the trace's start")
        .y_desc("idle agents")
        .draw()?;
    for (i, p) in r.policies.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        idle.draw_series(LineSeries::new(
            p.timeline.iter().map(|t| (t.0, f64::from(t.1))),
            color.stroke_width(1),
        ))?
        .label(format!(
            "{} ({:.1} idle agent-h)",
            p.name, p.idle_agent_hours
        ))
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
    }
    idle.configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
