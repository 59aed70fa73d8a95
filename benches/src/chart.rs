//! Grouped bar charts as PNG (plotters' bitmap backend). Text uses a TrueType font loaded at run
//! time (DejaVu Sans from Debian's fonts-dejavu-core, or `BENCH_FONT=path.ttf`); without one
//! the chart is drawn without text and the markdown table carries the labels.

use std::path::Path;

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::FontStyle;

const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];

/// One bar per workload for one target.
pub struct Series {
    pub name: String,
    pub color: (u8, u8, u8),
    /// One value per workload; None = no bar (failed or not measured).
    pub values: Vec<Option<f64>>,
}

/// One chart: a group of bars (one per series) for each workload.
pub struct Panel {
    pub title: String,
    pub series: Vec<Series>,
}

/// Register a sans-serif font with plotters; false if none could be loaded.
fn load_font() -> bool {
    let candidates = std::env::var("BENCH_FONT")
        .ok()
        .into_iter()
        .chain(FONT_PATHS.iter().map(|s| s.to_string()));
    for path in candidates {
        if let Ok(bytes) = std::fs::read(&path) {
            // plotters keeps fonts for the life of the process.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                return true;
            }
        }
    }
    eprintln!(
        "warning: no TrueType font found (install fonts-dejavu-core or set BENCH_FONT): \
         the chart has no text; the markdown table has the labels"
    );
    false
}

fn short(v: f64) -> String {
    if v == 0.0 {
        "0".to_string()
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// Draw `panels` stacked vertically into the PNG at `path`, workloads along the x axis.
pub fn draw(path: &Path, workloads: &[String], panels: &[Panel]) -> Result<(), String> {
    let text = load_font();
    let e = |err: &dyn std::fmt::Display| format!("draw {}: {err}", path.display());
    let n = workloads.len().max(1);
    let legend_h = 36;
    let root =
        BitMapBackend::new(path, (1400, legend_h + 360 * panels.len() as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let (legend, body) = root.split_vertically(legend_h);
    // One legend for all panels, in a strip at the top (the series are the same everywhere).
    if let Some(first) = panels.first() {
        let mut x = 70;
        for s in &first.series {
            let color = RGBColor(s.color.0, s.color.1, s.color.2);
            legend
                .draw(&Rectangle::new([(x, 12), (x + 18, 28)], color.filled()))
                .map_err(|x| e(&x))?;
            if text {
                legend
                    .draw(&Text::new(
                        s.name.clone(),
                        (x + 24, 20),
                        ("sans-serif", 16)
                            .into_font()
                            .color(&BLACK)
                            .pos(Pos::new(HPos::Left, VPos::Center)),
                    ))
                    .map_err(|x| e(&x))?;
            }
            x += 120;
        }
    }
    for (area, panel) in body.split_evenly((panels.len(), 1)).iter().zip(panels) {
        let ymax = panel
            .series
            .iter()
            .flat_map(|s| s.values.iter().flatten())
            .fold(0.0f64, |a, &b| a.max(b));
        let ymax = if ymax > 0.0 { ymax * 1.12 } else { 1.0 };
        let mut builder = ChartBuilder::on(area);
        builder.margin(12);
        if text {
            builder
                .caption(&panel.title, ("sans-serif", 22))
                .x_label_area_size(28)
                .y_label_area_size(60);
        }
        // Group i is centred on x = i.
        let mut chart = builder
            .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), 0f64..ymax)
            .map_err(|x| e(&x))?;
        if text {
            chart
                .configure_mesh()
                .disable_x_mesh()
                .x_labels(0)
                .y_labels(6)
                .y_label_formatter(&|v| short(*v))
                .light_line_style(WHITE)
                .label_style(("sans-serif", 14))
                .draw()
                .map_err(|x| e(&x))?;
        }
        let k = panel.series.len().max(1) as f64;
        let width = 0.8 / k;
        for (j, s) in panel.series.iter().enumerate() {
            let color = RGBColor(s.color.0, s.color.1, s.color.2);
            let bars = s.values.iter().enumerate().filter_map(|(i, v)| {
                let v = (*v)?;
                let x0 = i as f64 - 0.4 + j as f64 * width;
                Some(Rectangle::new(
                    [(x0 + 0.01, 0.0), (x0 + width - 0.01, v)],
                    color.filled(),
                ))
            });
            let drawn = chart.draw_series(bars).map_err(|x| e(&x))?;
            if text {
                drawn.label(s.name.clone()).legend(move |(x, y)| {
                    Rectangle::new([(x, y - 6), (x + 14, y + 6)], color.filled())
                });
                // Values above the bars.
                for (i, v) in s.values.iter().enumerate() {
                    let Some(v) = *v else { continue };
                    let x = i as f64 - 0.4 + (j as f64 + 0.5) * width;
                    let (px, py) = chart.backend_coord(&(x, v));
                    root.draw(&Text::new(
                        short(v),
                        (px, py - 3),
                        ("sans-serif", 11)
                            .into_font()
                            .color(&BLACK)
                            .pos(Pos::new(HPos::Center, VPos::Bottom)),
                    ))
                    .map_err(|x| e(&x))?;
                }
            }
        }
        if text {
            // Workload names under the groups.
            for (i, name) in workloads.iter().enumerate() {
                let (px, py) = chart.backend_coord(&(i as f64, 0.0));
                root.draw(&Text::new(
                    name.clone(),
                    (px, py + 6),
                    ("sans-serif", 14)
                        .into_font()
                        .color(&BLACK)
                        .pos(Pos::new(HPos::Center, VPos::Top)),
                ))
                .map_err(|x| e(&x))?;
            }
        } else {
            // Axes only.
            let (x0, y0) = chart.backend_coord(&(-0.5, 0.0));
            let (x1, y1) = chart.backend_coord(&(n as f64 - 0.5, ymax));
            root.draw(&PathElement::new(vec![(x0, y1), (x0, y0), (x1, y0)], BLACK))
                .map_err(|x| e(&x))?;
        }
    }
    root.present().map_err(|x| e(&x))?;
    Ok(())
}
