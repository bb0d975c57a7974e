//! The built-in mini-world: deterministic renders, captions that say what is drawn, relations
//! that hold, shapes that are told apart.

use stablerep::world::render::{contains, render};
use stablerep::world::{
    descriptions, layout_rng, Description, Fill, Relation, Scene, COLOURS, GROUNDS, SHAPES,
};

/// The shape's mask on a 64 x 64 grid over [-1, 1]^2.
fn mask(shape: usize) -> Vec<bool> {
    (0..64 * 64)
        .map(|i| {
            let (u, v) = (
                ((i % 64) as f32 + 0.5) / 32.0 - 1.0,
                ((i / 64) as f32 + 0.5) / 32.0 - 1.0,
            );
            contains(shape, u, v)
        })
        .collect()
}

#[test]
fn shapes_are_distinct_and_sized_alike() {
    let masks: Vec<Vec<bool>> = (0..SHAPES.len()).map(mask).collect();
    for (a, ma) in masks.iter().enumerate() {
        let area = ma.iter().filter(|&&b| b).count() as f64 / ma.len() as f64;
        assert!(
            (0.15..0.8).contains(&area),
            "{} covers {area:.2} of its box",
            SHAPES[a]
        );
        for (b, mb) in masks.iter().enumerate().skip(a + 1) {
            let inter = ma.iter().zip(mb).filter(|(x, y)| **x && **y).count() as f64;
            let union = ma.iter().zip(mb).filter(|(x, y)| **x || **y).count() as f64;
            assert!(
                inter / union < 0.85,
                "{} and {} overlap {:.2}",
                SHAPES[a],
                SHAPES[b],
                inter / union
            );
        }
    }
}

#[test]
fn captions_say_what_is_drawn_and_renders_are_deterministic() {
    let ds = descriptions(300, 1);
    assert_eq!(
        ds,
        descriptions(300, 1),
        "descriptions depend on the seed only"
    );
    let captions: std::collections::HashSet<String> = ds.iter().map(|d| d.caption()).collect();
    assert!(
        captions.len() > 280,
        "{} distinct captions of 300",
        captions.len()
    );
    let two = ds.iter().filter(|d| d.other.is_some()).count();
    assert!(
        (60..180).contains(&two),
        "{two} of 300 captions have two objects"
    );
    for (c, d) in ds.iter().enumerate() {
        let cap = d.caption();
        let main = SHAPES[d.main.shape];
        let colour = COLOURS[d.main.colour].0;
        assert!(
            cap.starts_with("a small ") || cap.starts_with("a large "),
            "{cap}"
        );
        assert!(cap.contains(&format!("{colour} {main}")), "{cap}");
        assert!(
            cap.ends_with(&format!("{} background", GROUNDS[d.ground].0)),
            "{cap}"
        );
        assert_eq!(d.labels().shape, d.main.shape);
        if d.main.fill == Fill::Striped {
            assert!(cap.contains("striped"), "{cap}");
        }
        let s = Scene::layout(d, &mut layout_rng(7, c as u64, 0));
        assert_eq!(s, Scene::layout(d, &mut layout_rng(7, c as u64, 0)));
        let m = s.main();
        assert_eq!(m.object, d.main);
        if let Some((rel, o)) = &d.other {
            let words = match rel {
                Relation::Above => "above",
                Relation::Below => "below",
                Relation::LeftOf => "to the left of",
                Relation::RightOf => "to the right of",
            };
            assert!(
                cap.contains(&format!(
                    "{words} a {}",
                    ["small", "large"][o.size as usize]
                )),
                "{cap}"
            );
            let other = &s.objects[0];
            let holds = match rel {
                Relation::Above => m.y + 0.1 < other.y,
                Relation::Below => m.y > other.y + 0.1,
                Relation::LeftOf => m.x + 0.1 < other.x,
                Relation::RightOf => m.x > other.x + 0.1,
            };
            assert!(
                holds,
                "{cap}: main at ({}, {}), other at ({}, {})",
                m.x, m.y, other.x, other.y
            );
        }
        for p in &s.objects {
            assert!(
                p.x - p.r > -0.05 && p.x + p.r < 1.05,
                "{cap}: off the image"
            );
            assert!(
                p.y - p.r > -0.05 && p.y + p.r < 1.05,
                "{cap}: off the image"
            );
        }
    }
}

#[test]
fn renders_show_the_main_object_in_its_colour() {
    let size = 64;
    let mut checked = 0;
    for (c, d) in descriptions(200, 3).iter().enumerate() {
        let s = Scene::layout(d, &mut layout_rng(0, c as u64, 0));
        let img = render(&s, size);
        assert_eq!(img.len(), 3 * size * size);
        assert!(img.iter().all(|v| (0.0..=1.0).contains(v)));
        assert_eq!(img, render(&s, size), "rendering is deterministic");
        let other = render(&Scene::layout(d, &mut layout_rng(0, c as u64, 1)), size);
        assert_ne!(img, other, "another seed lays the caption out differently");
        // A solid main object whose centre is inside its shape shows its colour there.
        let m = s.main();
        let centre_inside = !matches!(SHAPES[m.object.shape], "ring" | "crescent");
        if m.object.fill == Fill::Solid && centre_inside {
            let (px, py) = ((m.x * size as f32) as usize, (m.y * size as f32) as usize);
            let want = COLOURS[m.object.colour].1;
            for k in 0..3 {
                let got = img[k * size * size + py * size + px];
                assert!(
                    (got - want[k]).abs() < 1e-5,
                    "{}: channel {k} {got} vs {}",
                    d.caption(),
                    want[k]
                );
            }
            checked += 1;
        }
    }
    assert!(checked > 50, "only {checked} scenes checked");
}

#[test]
fn same_seed_same_world_other_seed_other_world() {
    let a: Vec<Description> = descriptions(20, 5);
    let b: Vec<Description> = descriptions(20, 6);
    assert_ne!(a, b);
}

#[test]
fn simple_world_captions_name_the_object_and_leave_the_rest_to_chance() {
    use stablerep::world::export::scene_of;
    use stablerep::world::{World, SIMPLE_COLOURS, SIMPLE_SHAPES};
    let w = World::Simple;
    assert_eq!(w.distinct_captions(), 6 * 6 * 6);
    let ds = w.descriptions(400, 4);
    let captions: std::collections::HashSet<String> = ds.iter().map(|d| d.caption()).collect();
    assert!(
        captions.len() > 150 && captions.len() <= 216,
        "{} distinct",
        captions.len()
    );
    assert_eq!(
        ds,
        w.descriptions(400, 4),
        "descriptions depend on the seed only"
    );
    assert_ne!(ds, w.descriptions(400, 5));
    // Half of the captions name the background.
    let named = ds.iter().filter(|d| d.names_ground).count();
    assert!(
        (160..240).contains(&named),
        "{named} of 400 name the background"
    );
    let mut unnamed_grounds = std::collections::HashSet::new();
    for (c, d) in ds.iter().enumerate() {
        let cap = d.caption();
        assert!(SIMPLE_SHAPES.contains(&d.main.shape) && SIMPLE_COLOURS.contains(&d.main.colour));
        assert!(cap.starts_with(&format!(
            "a {} {}",
            COLOURS[d.main.colour].0, SHAPES[d.main.shape]
        )));
        assert_eq!(cap.contains("background"), d.names_ground, "{cap}");
        assert!(d.other.is_none());
        for k in 0..6 {
            let s = scene_of(d, c, k, 9);
            let l = s.labels();
            assert_eq!((l.shape, l.colour), (d.main.shape, d.main.colour));
            if d.names_ground {
                assert_eq!(l.ground, d.ground, "{cap}: a named background is kept");
            } else {
                unnamed_grounds.insert((c, l.ground));
            }
            let o = s.main();
            assert!(o.r >= 0.22 && o.r <= 0.32, "large objects: r = {}", o.r);
            for extra in &s.objects[..s.objects.len() - 1] {
                assert!(extra.r < 0.15, "a distractor is small");
            }
            assert!(o.x - 0.85 * o.r >= -1e-6 && o.x + 0.85 * o.r <= 1.0 + 1e-6);
            // The object's colour shows at its centre.
            let img = render(&s, 32);
            let (px, py) = ((o.x * 32.0) as usize, (o.y * 32.0) as usize);
            let want = COLOURS[d.main.colour].1;
            for ch in 0..3 {
                let v = img[ch * 1024 + py.min(31) * 32 + px.min(31)];
                assert!((v - want[ch]).abs() < 0.08, "{cap}: centre {ch} = {v}");
            }
        }
    }
    // An unnamed background changes from render to render: many (caption, ground) pairs.
    let unnamed = ds.iter().filter(|d| !d.names_ground).count();
    assert!(
        unnamed_grounds.len() > unnamed * 3,
        "{} (caption, ground) pairs over {unnamed} captions",
        unnamed_grounds.len()
    );
    assert!(GROUNDS.len() == 5);
}
