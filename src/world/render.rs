//! Rendering of mini-world scenes: every pixel is the average of 3 x 3 samples (anti-aliased
//! edges); shapes are exact inside tests in the object's rotated, scaled frame.

use super::{Fill, Ground, Placed, Scene, COLOURS, GROUNDS};

/// True when the polygon `v` (any winding) contains `(x, y)` (even-odd rule).
fn in_polygon(x: f32, y: f32, v: &[(f32, f32)]) -> bool {
    let mut inside = false;
    let mut j = v.len() - 1;
    for i in 0..v.len() {
        let (xi, yi) = v[i];
        let (xj, yj) = v[j];
        if (yi > y) != (yj > y) && x < (xj - xi) * (y - yi) / (yj - yi) + xi {
            inside = !inside;
        }
        j = i;
    }
    inside
}

/// The vertices of a regular polygon (`n` corners, first at the top) of radius `r`, or a star
/// alternating between `r` and `inner`.
fn regular(n: usize, r: f32, inner: Option<f32>) -> Vec<(f32, f32)> {
    let m = if inner.is_some() { 2 * n } else { n };
    (0..m)
        .map(|i| {
            let a = -std::f32::consts::FRAC_PI_2 + i as f32 * std::f32::consts::TAU / m as f32;
            let rr = match inner {
                Some(ir) if i % 2 == 1 => ir,
                _ => r,
            };
            (rr * a.cos(), rr * a.sin())
        })
        .collect()
}

/// Whether shape `shape` (index into `SHAPES`) of radius 1 contains `(u, v)` (v points down).
pub fn contains(shape: usize, u: f32, v: f32) -> bool {
    let rho2 = u * u + v * v;
    match shape {
        0 => rho2 <= 1.0,
        1 => u.abs().max(v.abs()) <= 0.62,
        2 => in_polygon(u, v, &[(0.0, -1.0), (-0.9, 0.6), (0.9, 0.6)]),
        3 => in_polygon(u, v, &regular(5, 1.0, Some(0.42))),
        4 => (0.36..=1.0).contains(&rho2),
        5 => (u.abs() <= 0.3 && v.abs() <= 0.9) || (v.abs() <= 0.3 && u.abs() <= 0.9),
        6 => u.abs() / 0.7 + v.abs() <= 1.0,
        7 => in_polygon(u, v, &regular(6, 0.95, None)),
        8 => {
            // The classic implicit heart, y up, scaled to the unit disc.
            let (x, y) = (u * 1.35, -v * 1.35 + 0.28);
            let a = x * x + y * y - 1.0;
            a * a * a - x * x * y * y * y <= 0.0
        }
        9 => rho2 <= 1.0 && (u - 0.45) * (u - 0.45) + (v + 0.1) * (v + 0.1) > 0.62,
        10 => {
            (v.abs() <= 0.22 && (-0.95..=0.2).contains(&u))
                || in_polygon(u, v, &[(0.2, -0.65), (0.95, 0.0), (0.2, 0.65)])
        }
        _ => u.abs() <= 0.95 && v.abs() <= 0.28,
    }
}

fn mix(a: [f32; 3], b: [f32; 3], t: f32) -> [f32; 3] {
    [
        a[0] + (b[0] - a[0]) * t,
        a[1] + (b[1] - a[1]) * t,
        a[2] + (b[2] - a[2]) * t,
    ]
}

fn scale(a: [f32; 3], s: f32) -> [f32; 3] {
    [a[0] * s, a[1] * s, a[2] * s]
}

/// The object's colour at `(x, y)` if it covers that point.
fn object_colour(o: &Placed, x: f32, y: f32) -> Option<[f32; 3]> {
    let (dx, dy) = ((x - o.x) / o.r, (y - o.y) / o.r);
    let (s, c) = o.angle.sin_cos();
    let (u, v) = (c * dx + s * dy, -s * dx + c * dy);
    if !contains(o.object.shape, u, v) {
        return None;
    }
    let base = COLOURS[o.object.colour].1;
    Some(match o.object.fill {
        Fill::Solid => base,
        Fill::Striped => {
            if ((u + v) * 2.2 + o.phase).rem_euclid(1.0) < 0.5 {
                base
            } else if o.object.colour == 7 {
                mix(base, [1.0; 3], 0.45)
            } else {
                scale(base, 0.55)
            }
        }
        Fill::Dotted => {
            let (fu, fv) = (
                (u * 2.6 + o.phase).rem_euclid(1.0) - 0.5,
                (v * 2.6 + o.phase).rem_euclid(1.0) - 0.5,
            );
            if fu * fu + fv * fv < 0.06 {
                if o.object.colour == 6 {
                    scale(base, 0.5)
                } else {
                    mix(base, [1.0; 3], 0.6)
                }
            } else {
                base
            }
        }
    })
}

fn ground_colour(s: &Scene, x: f32, y: f32) -> [f32; 3] {
    let d = &s.description;
    let base = GROUNDS[d.ground].1;
    match d.pattern {
        Ground::Plain => base,
        Ground::Gradient => mix(base, scale(base, 0.55), (y + 0.3 * s.ground_phase).min(1.0)),
        Ground::Checkered => {
            let (i, j) = (
                ((x + s.ground_phase / 8.0) * 8.0).floor() as i64,
                ((y + s.ground_phase / 8.0) * 8.0).floor() as i64,
            );
            if (i + j).rem_euclid(2) == 0 {
                base
            } else {
                mix(base, [1.0; 3], 0.35)
            }
        }
    }
}

/// The scene as RGB in [0, 1], channel-major `[3, size, size]`.
pub fn render(s: &Scene, size: usize) -> Vec<f32> {
    const SUB: usize = 3;
    let plane = size * size;
    let mut out = vec![0.0f32; 3 * plane];
    for py in 0..size {
        for px in 0..size {
            let mut acc = [0.0f32; 3];
            for sy in 0..SUB {
                for sx in 0..SUB {
                    let x = (px as f32 + (sx as f32 + 0.5) / SUB as f32) / size as f32;
                    let y = (py as f32 + (sy as f32 + 0.5) / SUB as f32) / size as f32;
                    let mut c = ground_colour(s, x, y);
                    for o in &s.objects {
                        if let Some(oc) = object_colour(o, x, y) {
                            c = oc;
                        }
                    }
                    for k in 0..3 {
                        acc[k] += c[k];
                    }
                }
            }
            for (k, a) in acc.iter().enumerate() {
                out[k * plane + py * size + px] = a / (SUB * SUB) as f32;
            }
        }
    }
    out
}
