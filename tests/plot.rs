//! The PNG charts: bars and points land where their values say, text draws, bad input errors.

use stablerep::plot::{bar_chart, line_chart, mean_spread, Chart, Series, Value, PALETTE};

fn chart(values: Vec<Option<Value>>) -> Chart {
    Chart {
        title: "Title".into(),
        categories: (0..values.len()).map(|i| format!("c{i}")).collect(),
        x_label: "x".into(),
        y_label: "y".into(),
        y_range: (0.0, 100.0),
        series: vec![Series {
            name: "s".into(),
            values,
        }],
    }
}

/// Rows in column `x` painted in `colour`.
fn rows_of(img: &image::RgbImage, x: u32, colour: [u8; 3]) -> Vec<u32> {
    (0..img.height())
        .filter(|&y| img.get_pixel(x, y).0 == colour)
        .collect()
}

#[test]
fn bar_heights_follow_values() {
    let v = |mean| Some(Value { mean, spread: 0.0 });
    let img = bar_chart(&chart(vec![v(25.0), v(50.0), v(100.0)]))
        .unwrap()
        .image;
    let (w, _) = img.dimensions();
    // The plot spans x 64..620 and y 56..344 (0 at the bottom, 100 at the top); each bar sits
    // in the middle of its third.
    let slot = (w as f64 - 20.0 - 64.0) / 3.0;
    let mut heights = Vec::new();
    for k in 0..3 {
        let x = (64.0 + slot * (k as f64 + 0.5)) as u32;
        let rows = rows_of(&img, x, PALETTE[0]);
        assert!(!rows.is_empty(), "bar {k} not drawn");
        heights.push(rows.len() as f64);
    }
    let full = 344.0 - 56.0;
    for (h, want) in heights.iter().zip([0.25, 0.5, 1.0]) {
        assert!((h / full - want).abs() < 0.02, "height {h} for {want}");
    }
}

#[test]
fn error_bars_and_text_draw_ink() {
    let img = line_chart(&chart(vec![
        Some(Value {
            mean: 40.0,
            spread: 10.0,
        }),
        None,
        Some(Value {
            mean: 60.0,
            spread: 0.0,
        }),
    ]))
    .unwrap()
    .image;
    let ink = |x0: u32, x1: u32, y0: u32, y1: u32| {
        (x0..x1)
            .flat_map(|x| (y0..y1).map(move |y| (x, y)))
            .filter(|&(x, y)| img.get_pixel(x, y).0 == [30, 30, 30])
            .count()
    };
    // The title is centred in the top 20 rows.
    assert!(ink(280, 360, 0, 24) > 10);
    // The first point's error bar spans 30..50: rows 200 to 258, less the 7-row marker.
    let slot = (640.0 - 20.0 - 64.0) / 3.0;
    let x = (64.0 + slot * 0.5) as u32;
    assert!(ink(x - 1, x + 2, 202, 255) >= 40, "error bar missing");
    // A gap: no series colour in the middle slot's column.
    let mid = (64.0 + slot * 1.5) as u32;
    assert!(rows_of(&img, mid, PALETTE[0]).is_empty());
}

#[test]
fn bad_charts_are_refused() {
    let mut c = chart(vec![None, None]);
    c.series[0].values.pop();
    let e = bar_chart(&c).err().unwrap().to_string();
    assert!(e.contains("1 values for 2 categories"), "{e}");
    let mut c = chart(vec![None]);
    c.y_range = (1.0, 1.0);
    assert!(line_chart(&c).err().unwrap().to_string().contains("empty"));
}

#[test]
fn mean_and_sample_spread() {
    let v = mean_spread(&[1.0, 2.0, 3.0]);
    assert!((v.mean - 2.0).abs() < 1e-12 && (v.spread - 1.0).abs() < 1e-12);
    assert_eq!(mean_spread(&[5.0]).spread, 0.0);
}
