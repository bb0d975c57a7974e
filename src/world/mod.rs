//! The built-in mini-world: a procedural "real world" of small scenes, so the whole StableRep
//! pipeline runs with nothing to download. A scene holds one or two objects (a dozen shapes,
//! eight colours, two sizes, solid, striped or dotted fill) on a plain, gradient or checkered
//! background. Each scene has a natural-language caption ("a small red star above a large
//! striped blue ring on a checkered beige background") and labels for evaluation (the main
//! object's shape and colour). Everything is a deterministic function of a seed: the same
//! caption rendered with another seed moves, resizes and re-textures its objects within what
//! the caption says.

pub mod demo;
pub mod experiments;
pub mod export;
pub mod judge;
pub mod render;
pub mod supervised;
pub mod train_sd;

use crate::util::rng::Rng;

/// Shapes, in label order.
pub const SHAPES: [&str; 12] = [
    "circle", "square", "triangle", "star", "ring", "cross", "diamond", "hexagon", "heart",
    "crescent", "arrow", "bar",
];

/// Colour names and their RGB in [0, 1], in label order.
pub const COLOURS: [(&str, [f32; 3]); 8] = [
    ("red", [0.86, 0.12, 0.12]),
    ("green", [0.12, 0.68, 0.22]),
    ("blue", [0.14, 0.30, 0.86]),
    ("yellow", [0.95, 0.85, 0.10]),
    ("purple", [0.55, 0.20, 0.70]),
    ("orange", [0.96, 0.52, 0.08]),
    ("white", [0.96, 0.96, 0.96]),
    ("black", [0.08, 0.08, 0.08]),
];

/// Background colour names and their RGB.
pub const GROUNDS: [(&str, [f32; 3]); 5] = [
    ("gray", [0.55, 0.55, 0.57]),
    ("beige", [0.88, 0.80, 0.64]),
    ("sky blue", [0.55, 0.75, 0.92]),
    ("pink", [0.94, 0.70, 0.76]),
    ("dark", [0.22, 0.24, 0.28]),
];

/// Object sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Size {
    /// Radius about 0.13 of the image.
    Small,
    /// Radius about 0.24 of the image.
    Large,
}

/// How an object is filled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fill {
    /// One colour.
    Solid,
    /// Stripes of the colour and a darker shade.
    Striped,
    /// Dots of a lighter shade on the colour.
    Dotted,
}

/// How the background is painted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ground {
    /// One colour.
    Plain,
    /// A vertical gradient from the colour to a darker shade.
    Gradient,
    /// A checkerboard of the colour and a lighter shade.
    Checkered,
}

/// Where the second object sits relative to the first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Relation {
    /// The first object is above the second.
    Above,
    /// The first object is below the second.
    Below,
    /// The first object is left of the second.
    LeftOf,
    /// The first object is right of the second.
    RightOf,
}

impl Relation {
    const ALL: [Relation; 4] = [
        Relation::Above,
        Relation::Below,
        Relation::LeftOf,
        Relation::RightOf,
    ];

    fn words(self) -> &'static str {
        match self {
            Relation::Above => "above",
            Relation::Below => "below",
            Relation::LeftOf => "to the left of",
            Relation::RightOf => "to the right of",
        }
    }
}

/// What a caption says about one object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Object {
    /// Index into [`SHAPES`].
    pub shape: usize,
    /// Index into [`COLOURS`].
    pub colour: usize,
    /// Size.
    pub size: Size,
    /// Fill.
    pub fill: Fill,
}

/// Which world a description belongs to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum World {
    /// The full world: one or two objects of 12 shapes, 8 colours, 2 sizes and 3 fills on
    /// plain, gradient or checkered grounds, and captions that name all of it.
    #[default]
    Full,
    /// The demo's world: one large solid object of 6 shapes and 6 colours on a plain or
    /// gradient ground, and usually a small distractor. Captions name the large object ("a
    /// red star") and, half of the time, the background colour; everything they leave out
    /// (the distractor, the background when unnamed, the pattern, size, position, rotation)
    /// changes from render to render, as real captions underspecify their photos. That is
    /// where StableRep's positives teach more than crops.
    Simple,
}

/// The simple world's shapes (indices into [`SHAPES`]): circle, square, triangle, star,
/// cross, heart.
pub const SIMPLE_SHAPES: [usize; 6] = [0, 1, 2, 3, 5, 8];
/// The simple world's colours (indices into [`COLOURS`]): red, green, blue, yellow, purple,
/// white.
pub const SIMPLE_COLOURS: [usize; 6] = [0, 1, 2, 3, 4, 6];

impl World {
    /// "full" or "simple".
    pub fn name(self) -> &'static str {
        match self {
            World::Full => "full",
            World::Simple => "simple",
        }
    }

    /// Parses [`World::name`].
    pub fn parse(s: &str) -> Option<World> {
        match s {
            "full" => Some(World::Full),
            "simple" => Some(World::Simple),
            _ => None,
        }
    }

    /// The shapes that occur (indices into [`SHAPES`]).
    pub fn shapes(self) -> Vec<usize> {
        match self {
            World::Full => (0..SHAPES.len()).collect(),
            World::Simple => SIMPLE_SHAPES.to_vec(),
        }
    }

    /// The main object's colours that occur (indices into [`COLOURS`]).
    pub fn colours(self) -> Vec<usize> {
        match self {
            World::Full => (0..COLOURS.len()).collect(),
            World::Simple => SIMPLE_COLOURS.to_vec(),
        }
    }

    /// How many distinct captions the world has (the full world: effectively unbounded).
    pub fn distinct_captions(self) -> usize {
        match self {
            World::Full => usize::MAX,
            World::Simple => SIMPLE_SHAPES.len() * SIMPLE_COLOURS.len() * (1 + GROUNDS.len()),
        }
    }

    /// `count` descriptions of this world under `seed`, drawn independently: the full
    /// world's repeat only by chance; the simple world's name a uniform shape and colour and,
    /// with probability 1/2, a uniform background, so the same caption can occur more than
    /// once (as in real caption sets).
    pub fn descriptions(self, count: usize, seed: u64) -> Vec<Description> {
        match self {
            World::Full => descriptions(count, seed),
            World::Simple => {
                let mut rng = Rng(seed ^ 0x51_3B1E);
                let grounds = 1 + GROUNDS.len();
                (0..count)
                    .map(|_| {
                        let object = rng.below(SIMPLE_SHAPES.len() * SIMPLE_COLOURS.len());
                        let g = if rng.unit() < 0.5 {
                            0
                        } else {
                            1 + rng.below(GROUNDS.len())
                        };
                        Description::simple(object * grounds + g)
                    })
                    .collect()
            }
        }
    }
}

/// What a caption says: the content of a scene, without its layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Description {
    /// The main object.
    pub main: Object,
    /// A second object and where the main one is relative to it.
    pub other: Option<(Relation, Object)>,
    /// Background colour (index into [`GROUNDS`]).
    pub ground: usize,
    /// Background pattern.
    pub pattern: Ground,
    /// The world it belongs to (what the caption names and what each render re-draws).
    pub world: World,
    /// Whether the caption names the background (always in the full world). When it does
    /// not, every render draws its own background colour and pattern.
    pub names_ground: bool,
}

/// Labels for evaluation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Labels {
    /// The main object's shape (index into [`SHAPES`]).
    pub shape: usize,
    /// The main object's colour (index into [`COLOURS`]).
    pub colour: usize,
    /// The background colour (index into [`GROUNDS`]).
    pub ground: usize,
}

fn pick<T: Copy>(rng: &mut Rng, items: &[T]) -> T {
    items[rng.below(items.len())]
}

impl Object {
    fn sample(rng: &mut Rng) -> Object {
        Object {
            shape: rng.below(SHAPES.len()),
            colour: rng.below(COLOURS.len()),
            size: pick(rng, &[Size::Small, Size::Large]),
            fill: pick(
                rng,
                &[Fill::Solid, Fill::Solid, Fill::Striped, Fill::Dotted],
            ),
        }
    }

    /// "a small striped red star".
    fn phrase(&self) -> String {
        let size = match self.size {
            Size::Small => "small",
            Size::Large => "large",
        };
        let fill = match self.fill {
            Fill::Solid => "",
            Fill::Striped => "striped ",
            Fill::Dotted => "dotted ",
        };
        format!(
            "a {size} {fill}{} {}",
            COLOURS[self.colour].0, SHAPES[self.shape]
        )
    }
}

impl Description {
    /// A random description: one object (60 %) or two, the second of another shape or colour.
    pub fn sample(rng: &mut Rng) -> Description {
        let main = Object::sample(rng);
        let other = if rng.unit() < 0.4 {
            let mut o = Object::sample(rng);
            while o.shape == main.shape && o.colour == main.colour {
                o = Object::sample(rng);
            }
            Some((pick(rng, &Relation::ALL), o))
        } else {
            None
        };
        // A black main object is never put on the dark background (it would vanish).
        let mut ground = rng.below(GROUNDS.len());
        while main.colour == 7 && GROUNDS[ground].0 == "dark" {
            ground = rng.below(GROUNDS.len());
        }
        let pattern = pick(
            rng,
            &[
                Ground::Plain,
                Ground::Plain,
                Ground::Gradient,
                Ground::Checkered,
            ],
        );
        Description {
            main,
            other,
            ground,
            pattern,
            world: World::Full,
            names_ground: true,
        }
    }

    /// Simple-world caption number `k` (of [`World::distinct_captions`]): shape, colour, then
    /// no background or one of the backgrounds. The ground and size stored here are the
    /// first render's defaults; [`Scene::layout`] draws what the caption leaves out.
    pub fn simple(k: usize) -> Description {
        let grounds = 1 + GROUNDS.len();
        let g = k % grounds;
        let colour = SIMPLE_COLOURS[(k / grounds) % SIMPLE_COLOURS.len()];
        let shape = SIMPLE_SHAPES[(k / grounds / SIMPLE_COLOURS.len()) % SIMPLE_SHAPES.len()];
        Description {
            main: Object {
                shape,
                colour,
                size: Size::Large,
                fill: Fill::Solid,
            },
            other: None,
            ground: g.saturating_sub(1),
            pattern: Ground::Plain,
            world: World::Simple,
            names_ground: g > 0,
        }
    }

    /// The caption.
    pub fn caption(&self) -> String {
        if self.world == World::Simple {
            let mut s = format!(
                "a {} {}",
                COLOURS[self.main.colour].0, SHAPES[self.main.shape]
            );
            if self.names_ground {
                s += &format!(" on a {} background", GROUNDS[self.ground].0);
            }
            return s;
        }
        let mut s = self.main.phrase();
        if let Some((rel, o)) = &self.other {
            s += &format!(" {} {}", rel.words(), o.phrase());
        }
        let pattern = match self.pattern {
            Ground::Plain => "",
            Ground::Gradient => "gradient ",
            Ground::Checkered => "checkered ",
        };
        s + &format!(" on a {pattern}{} background", GROUNDS[self.ground].0)
    }

    /// Evaluation labels (the background is the description's; a render's own is
    /// [`Scene::labels`]).
    pub fn labels(&self) -> Labels {
        Labels {
            shape: self.main.shape,
            colour: self.main.colour,
            ground: self.ground,
        }
    }
}

/// One object placed in the image: centre and radius in [0, 1] image units, rotation,
/// texture phase.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Placed {
    /// What it is.
    pub object: Object,
    /// Centre x (0 = left).
    pub x: f32,
    /// Centre y (0 = top).
    pub y: f32,
    /// Radius.
    pub r: f32,
    /// Rotation in radians (small, so "arrow" and "bar" keep their reading).
    pub angle: f32,
    /// Stripe / dot phase in [0, 1).
    pub phase: f32,
}

/// A scene: a description laid out by a seed.
#[derive(Clone, Debug, PartialEq)]
pub struct Scene {
    /// What the caption says.
    pub description: Description,
    /// The objects in drawing order (the second object first, so the main one is on top).
    pub objects: Vec<Placed>,
    /// Checker / gradient phase in [0, 1).
    pub ground_phase: f32,
}

fn radius(size: Size, rng: &mut Rng) -> f32 {
    let base = match size {
        Size::Small => 0.13,
        Size::Large => 0.24,
    };
    base * (0.9 + 0.2 * rng.unit() as f32)
}

impl Scene {
    /// Lays `d` out with the randomness of `rng`: positions, exact radii, rotation, textures.
    /// The main object's relation to the other always holds: each takes its half of the image
    /// (with a gap between), so their centres are at least 0.28 apart along that direction.
    pub fn layout(d: &Description, rng: &mut Rng) -> Scene {
        if d.world == World::Simple {
            return Scene::layout_simple(d, rng);
        }
        let place = |object: Object, lo: [f32; 2], hi: [f32; 2], rng: &mut Rng| {
            let r = radius(object.size, rng);
            // The centre keeps 0.85 r from the region's edges (the middle when it cannot).
            let span = |a: f32, b: f32, rng: &mut Rng| {
                let (a, b) = (a + r * 0.85, b - r * 0.85);
                if a >= b {
                    (a + b) / 2.0
                } else {
                    a + (b - a) * rng.unit() as f32
                }
            };
            Placed {
                object,
                x: span(lo[0], hi[0], rng),
                y: span(lo[1], hi[1], rng),
                r,
                angle: (rng.unit() as f32 - 0.5) * 0.5,
                phase: rng.unit() as f32,
            }
        };
        let objects = match &d.other {
            None => vec![place(d.main, [0.15, 0.15], [0.85, 0.85], rng)],
            Some((rel, o)) => {
                // The main object takes one half of the image, the other the opposite half.
                let (main_lo, main_hi, other_lo, other_hi) = match rel {
                    Relation::Above => ([0.0, 0.0], [1.0, 0.46], [0.0, 0.54], [1.0, 1.0]),
                    Relation::Below => ([0.0, 0.54], [1.0, 1.0], [0.0, 0.0], [1.0, 0.46]),
                    Relation::LeftOf => ([0.0, 0.0], [0.46, 1.0], [0.54, 0.0], [1.0, 1.0]),
                    Relation::RightOf => ([0.54, 0.0], [1.0, 1.0], [0.0, 0.0], [0.46, 1.0]),
                };
                let other = place(*o, other_lo, other_hi, rng);
                let main = place(d.main, main_lo, main_hi, rng);
                vec![other, main]
            }
        };
        Scene {
            description: d.clone(),
            objects,
            ground_phase: rng.unit() as f32,
        }
    }

    /// A simple-world layout: the background (colour, when the caption leaves it out, and
    /// pattern) drawn anew, then the named object (radius 0.22 - 0.32) anywhere it fits,
    /// rotated by up to 0.4 radians either way, and, in 3 of 4 renders, a small unnamed
    /// distractor (radius 0.10 - 0.14, any simple shape and colour) beside it. Captions never
    /// mention the distractor, as real captions leave out what is not the point.
    fn layout_simple(d: &Description, rng: &mut Rng) -> Scene {
        let mut description = d.clone();
        if !d.names_ground {
            description.ground = rng.below(GROUNDS.len());
        }
        description.pattern = pick(rng, &[Ground::Plain, Ground::Gradient]);
        let place = |r: f32, rng: &mut Rng| {
            let lo = r * 0.85;
            let span = 1.0 - 2.0 * lo;
            (lo + span * rng.unit() as f32, lo + span * rng.unit() as f32)
        };
        let r = 0.22 + 0.10 * rng.unit() as f32;
        let (x, y) = place(r, rng);
        let main = Placed {
            object: d.main,
            x,
            y,
            r,
            angle: (rng.unit() as f32 - 0.5) * 0.8,
            phase: 0.0,
        };
        let mut objects = Vec::new();
        if rng.unit() < 0.75 {
            let object = Object {
                shape: SIMPLE_SHAPES[rng.below(SIMPLE_SHAPES.len())],
                colour: SIMPLE_COLOURS[rng.below(SIMPLE_COLOURS.len())],
                size: Size::Small,
                fill: Fill::Solid,
            };
            let rd = 0.10 + 0.04 * rng.unit() as f32;
            // The spot farthest from the named object among a few tries, so the two rarely
            // overlap.
            let mut best = place(rd, rng);
            for _ in 0..7 {
                let p = place(rd, rng);
                let dist = |q: (f32, f32)| (q.0 - x).powi(2) + (q.1 - y).powi(2);
                if dist(p) > dist(best) {
                    best = p;
                }
            }
            objects.push(Placed {
                object,
                x: best.0,
                y: best.1,
                r: rd,
                angle: (rng.unit() as f32 - 0.5) * 0.8,
                phase: 0.0,
            });
        }
        objects.push(main);
        Scene {
            objects,
            description,
            ground_phase: rng.unit() as f32,
        }
    }

    /// The labels of this render (its own background, which an underspecified caption does
    /// not fix).
    pub fn labels(&self) -> Labels {
        self.description.labels()
    }

    /// The main object (drawn last).
    pub fn main(&self) -> &Placed {
        self.objects.last().expect("a scene has an object")
    }
}

/// `count` captions of the world (seeded), each with its description; captions repeat only by
/// chance (the world has about 4 million distinct ones).
pub fn descriptions(count: usize, seed: u64) -> Vec<Description> {
    let mut rng = Rng(seed ^ 0x57_0E1D);
    (0..count).map(|_| Description::sample(&mut rng)).collect()
}

/// The layout randomness of render `k` of caption `c` under `seed`.
pub fn layout_rng(seed: u64, caption: u64, k: u64) -> Rng {
    let mut r = Rng(seed ^ caption.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (k << 40) ^ 0x1A_7017);
    r.next_u64();
    r
}

/// The built-in model's folder name under `assets/`.
pub const BUILTIN_MODEL: &str = "world-sd";

/// Where the built-in text-to-image model is: `$STABLEREP_ASSETS/world-sd` when that is set,
/// else `assets/world-sd` next to the executable or up to three folders above it (a cargo
/// build's `target/release/`), else the source tree's `assets/world-sd`.
pub fn builtin_model() -> crate::error::Result<std::path::PathBuf> {
    builtin_asset(BUILTIN_MODEL, "model_index.json")
}

/// The folder `assets/<name>` that holds `marker`, looked for in `$STABLEREP_ASSETS`, next
/// to the executable and up to three folders above it, then in the source tree.
pub fn builtin_asset(name: &str, marker: &str) -> crate::error::Result<std::path::PathBuf> {
    let mut tried = Vec::new();
    if let Some(dir) = std::env::var_os("STABLEREP_ASSETS") {
        let p = std::path::PathBuf::from(dir).join(name);
        if p.join(marker).is_file() {
            return Ok(p);
        }
        tried.push(p);
    }
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1).take(4) {
            let p = dir.join("assets").join(name);
            if p.join(marker).is_file() {
                return Ok(p);
            }
            tried.push(p);
        }
    }
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("assets")
        .join(name);
    if p.join(marker).is_file() {
        return Ok(p);
    }
    tried.push(p);
    let mut list: Vec<String> = Vec::new();
    for p in tried {
        let p = p.display().to_string();
        if !list.contains(&p) {
            list.push(p);
        }
    }
    Err(crate::error::Error::Config(format!(
        "the built-in assets/{name} ({marker}) was not found; looked in: {}. Set \
         STABLEREP_ASSETS to the folder holding {name}/, or pass the path explicitly",
        list.join(", ")
    )))
}
