//! Small PNG charts drawn on the CPU, with no dependency beyond `image`: grouped bar charts
//! with error bars and line charts with error bars, for the demo and the experiments'
//! reports. Text uses a built-in bitmap font ([`font`]).

pub mod font;

use std::path::Path;

use image::{Rgb, RgbImage};

use crate::error::{Error, Result};

/// Series colours (colour-blind friendly, from Okabe and Ito).
pub const PALETTE: [[u8; 3]; 6] = [
    [0, 114, 178],
    [230, 159, 0],
    [0, 158, 115],
    [204, 121, 167],
    [86, 180, 233],
    [213, 94, 0],
];

const INK: Rgb<u8> = Rgb([30, 30, 30]);
const GRID: Rgb<u8> = Rgb([225, 225, 225]);
const WHITE: Rgb<u8> = Rgb([255, 255, 255]);

/// A value with its spread (e.g. the mean and standard deviation over seeds).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Value {
    /// Mean.
    pub mean: f64,
    /// Half-length of the error bar (0 for none).
    pub spread: f64,
}

/// One named series: a value per category (bar chart) or per x position (line chart).
#[derive(Clone, Debug)]
pub struct Series {
    /// Legend text.
    pub name: String,
    /// Values, in category order; `None` leaves a gap.
    pub values: Vec<Option<Value>>,
}

/// What a chart shows.
#[derive(Clone, Debug)]
pub struct Chart {
    /// Title above the plot.
    pub title: String,
    /// Category labels (bars) or x tick labels (lines), in order.
    pub categories: Vec<String>,
    /// Label under the x axis.
    pub x_label: String,
    /// Label of the y axis (drawn above it).
    pub y_label: String,
    /// The y axis range.
    pub y_range: (f64, f64),
    /// The series.
    pub series: Vec<Series>,
}

/// A drawing surface: an RGB image with clipped primitives.
pub struct Canvas {
    /// The pixels.
    pub image: RgbImage,
}

impl Canvas {
    /// A white canvas.
    pub fn new(width: u32, height: u32) -> Canvas {
        Canvas {
            image: RgbImage::from_pixel(width, height, WHITE),
        }
    }

    fn put(&mut self, x: i64, y: i64, c: Rgb<u8>) {
        if x >= 0 && y >= 0 && (x as u32) < self.image.width() && (y as u32) < self.image.height() {
            self.image.put_pixel(x as u32, y as u32, c);
        }
    }

    /// Fills the rectangle [x0, x1) x [y0, y1).
    pub fn rect(&mut self, x0: i64, y0: i64, x1: i64, y1: i64, c: Rgb<u8>) {
        for y in y0.min(y1)..y0.max(y1) {
            for x in x0.min(x1)..x0.max(x1) {
                self.put(x, y, c);
            }
        }
    }

    /// A line `width` pixels thick from (x0, y0) to (x1, y1).
    pub fn line(&mut self, x0: f64, y0: f64, x1: f64, y1: f64, width: i64, c: Rgb<u8>) {
        let n = (x1 - x0).abs().max((y1 - y0).abs()).ceil().max(1.0) as i64;
        let lo = -(width - 1) / 2;
        for i in 0..=n {
            let t = i as f64 / n as f64;
            let x = (x0 + t * (x1 - x0)).round() as i64;
            let y = (y0 + t * (y1 - y0)).round() as i64;
            for dy in lo..lo + width {
                for dx in lo..lo + width {
                    self.put(x + dx, y + dy, c);
                }
            }
        }
    }

    /// Text with its top-left corner at (x, y); characters outside printable ASCII draw as
    /// '?'. Returns the width drawn.
    pub fn text(&mut self, x: i64, y: i64, s: &str, c: Rgb<u8>) -> i64 {
        let mut cx = x;
        for ch in s.chars() {
            let code = ch as u32;
            let index = if (32..127).contains(&code) {
                code - 32
            } else {
                '?' as u32 - 32
            };
            for (row, bits) in font::GLYPHS[index as usize].iter().enumerate() {
                for col in 0..font::WIDTH {
                    if bits >> col & 1 == 1 {
                        self.put(cx + col as i64, y + row as i64, c);
                    }
                }
            }
            cx += font::WIDTH as i64;
        }
        cx - x
    }

    /// Text centred on x.
    pub fn text_centred(&mut self, x: i64, y: i64, s: &str, c: Rgb<u8>) {
        self.text(x - text_width(s) / 2, y, s, c);
    }

    /// Writes the canvas as a PNG.
    pub fn save(&self, path: &Path) -> Result<()> {
        self.image
            .save(path)
            .map_err(|e| Error::Config(format!("{}: cannot write PNG: {e}", path.display())))
    }
}

/// The width of `s` in pixels.
pub fn text_width(s: &str) -> i64 {
    (s.chars().count() * font::WIDTH) as i64
}

/// The plot area of a chart on its canvas, and the value-to-row mapping.
struct Frame {
    left: i64,
    right: i64,
    top: i64,
    bottom: i64,
    y_range: (f64, f64),
}

impl Frame {
    fn y(&self, v: f64) -> f64 {
        let (lo, hi) = self.y_range;
        let t = ((v - lo) / (hi - lo)).clamp(0.0, 1.0);
        self.bottom as f64 - t * (self.bottom - self.top) as f64
    }
}

const WIDTH: u32 = 640;
const HEIGHT: u32 = 400;

/// Draws the frame common to both chart kinds: title, y grid with ticks, axes, legend.
fn frame(chart: &Chart) -> Result<(Canvas, Frame)> {
    let (lo, hi) = chart.y_range;
    if hi.partial_cmp(&lo) != Some(std::cmp::Ordering::Greater)
        || !lo.is_finite()
        || !hi.is_finite()
    {
        return Err(Error::Config(format!(
            "plot '{}': the y range {lo}..{hi} is empty",
            chart.title
        )));
    }
    if chart.categories.is_empty() {
        return Err(Error::Config(format!(
            "plot '{}' has no categories",
            chart.title
        )));
    }
    if let Some(s) = chart
        .series
        .iter()
        .find(|s| s.values.len() != chart.categories.len())
    {
        return Err(Error::Config(format!(
            "plot '{}': series '{}' has {} values for {} categories",
            chart.title,
            s.name,
            s.values.len(),
            chart.categories.len()
        )));
    }
    let mut c = Canvas::new(WIDTH, HEIGHT);
    // Legend entries left to right under the title, wrapping to more rows when needed.
    let (left, right) = (64, WIDTH as i64 - 20);
    let mut spots = Vec::new();
    let (mut x, mut row) = (left + 8, 0);
    for s in &chart.series {
        let w = 16 + text_width(&s.name) + 16;
        if x + w > right && x > left + 8 {
            (x, row) = (left + 8, row + 1);
        }
        spots.push((x, 24 + 15 * row));
        x += w;
    }
    let f = Frame {
        left,
        right,
        top: 56 + 15 * row,
        bottom: HEIGHT as i64 - 56,
        y_range: chart.y_range,
    };
    c.text_centred(WIDTH as i64 / 2, 4, &chart.title, INK);
    for (k, (s, &(x, y))) in chart.series.iter().zip(&spots).enumerate() {
        let colour = Rgb(PALETTE[k % PALETTE.len()]);
        c.rect(x, y, x + 12, y + 10, colour);
        c.text(x + 16, y - 1, &s.name, INK);
    }
    c.text(8, f.top - 15, &chart.y_label, INK);
    // Five grid lines with tick labels.
    for i in 0..=5 {
        let v = lo + (hi - lo) * i as f64 / 5.0;
        let y = f.y(v).round() as i64;
        c.rect(f.left, y, f.right, y + 1, GRID);
        let label = tick(v, hi - lo);
        c.text(f.left - 6 - text_width(&label), y - 6, &label, INK);
    }
    c.rect(f.left, f.top, f.left + 1, f.bottom + 1, INK);
    c.rect(f.left, f.bottom, f.right, f.bottom + 1, INK);
    c.text_centred(
        (f.left + f.right) / 2,
        HEIGHT as i64 - 18,
        &chart.x_label,
        INK,
    );
    Ok((c, f))
}

fn tick(v: f64, span: f64) -> String {
    if span >= 5.0 {
        format!("{v:.0}")
    } else if span >= 0.5 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn error_bar(c: &mut Canvas, f: &Frame, x: f64, v: Value, half: f64) {
    if v.spread > 0.0 {
        let (a, b) = (f.y(v.mean - v.spread), f.y(v.mean + v.spread));
        c.line(x, a, x, b, 1, INK);
        c.line(x - half, a, x + half, a, 1, INK);
        c.line(x - half, b, x + half, b, 1, INK);
    }
}

/// A grouped bar chart: one group per category, one bar per series, with error bars.
pub fn bar_chart(chart: &Chart) -> Result<Canvas> {
    let (mut c, f) = frame(chart)?;
    let groups = chart.categories.len() as f64;
    let slot = (f.right - f.left) as f64 / groups;
    let bars = chart.series.len().max(1) as f64;
    let bar = (slot * 0.8 / bars).floor().max(1.0);
    for (g, label) in chart.categories.iter().enumerate() {
        let x0 = f.left as f64 + slot * g as f64 + (slot - bar * bars) / 2.0;
        for (k, s) in chart.series.iter().enumerate() {
            let Some(v) = s.values[g] else { continue };
            let colour = Rgb(PALETTE[k % PALETTE.len()]);
            let bx = x0 + bar * k as f64;
            let top = f.y(v.mean).round() as i64;
            c.rect(bx as i64 + 1, top, (bx + bar) as i64 - 1, f.bottom, colour);
            error_bar(&mut c, &f, bx + bar / 2.0, v, (bar / 4.0).min(6.0));
            let text = format!("{:.1}", v.mean);
            // Values are printed over the bars only when every value fits.
            if bar >= text_width("100.0") as f64 {
                c.text_centred((bx + bar / 2.0) as i64, top - 14, &text, INK);
            }
        }
        let centre = f.left as f64 + slot * (g as f64 + 0.5);
        c.text_centred(centre as i64, f.bottom + 6, label, INK);
    }
    Ok(c)
}

/// A line chart: the categories are evenly spaced x positions; each series is a polyline
/// with error bars (gaps break the line).
pub fn line_chart(chart: &Chart) -> Result<Canvas> {
    let (mut c, f) = frame(chart)?;
    let n = chart.categories.len();
    let slot = (f.right - f.left) as f64 / n as f64;
    let x_of = |i: usize| f.left as f64 + slot * (i as f64 + 0.5);
    for (i, label) in chart.categories.iter().enumerate() {
        c.text_centred(x_of(i) as i64, f.bottom + 6, label, INK);
        c.rect(
            x_of(i) as i64,
            f.bottom,
            x_of(i) as i64 + 1,
            f.bottom + 4,
            INK,
        );
    }
    for (k, s) in chart.series.iter().enumerate() {
        let colour = Rgb(PALETTE[k % PALETTE.len()]);
        let mut last: Option<(f64, f64)> = None;
        for (i, v) in s.values.iter().enumerate() {
            let Some(v) = v else {
                last = None;
                continue;
            };
            let p = (x_of(i), f.y(v.mean));
            if let Some(q) = last {
                c.line(q.0, q.1, p.0, p.1, 2, colour);
            }
            error_bar(&mut c, &f, p.0, *v, 4.0);
            c.rect(
                p.0 as i64 - 3,
                p.1 as i64 - 3,
                p.0 as i64 + 4,
                p.1 as i64 + 4,
                colour,
            );
            last = Some(p);
        }
    }
    Ok(c)
}

/// Mean and sample standard deviation (0 for fewer than two values).
pub fn mean_spread(values: &[f64]) -> Value {
    let n = values.len() as f64;
    if values.is_empty() {
        return Value {
            mean: f64::NAN,
            spread: 0.0,
        };
    }
    let mean = values.iter().sum::<f64>() / n;
    let spread = if values.len() > 1 {
        (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
    } else {
        0.0
    };
    Value { mean, spread }
}
