//! Elementwise ops defined once, as expressions. An op's [`Expr`] (in its input `x`, for a
//! binary op also `y`, and its scalars) is the single definition that drives the generated
//! WGSL ([`Expr::wgsl`]), the f64 CPU reference ([`Expr::eval`]) and the gradient
//! ([`Expr::grad`], derived symbolically: `dy * d/dx`, simplified). Adding an elementwise op
//! means writing its expression in `elementwise.rs`; the unary, binary and fused kernels, the
//! interpreter in `cpu.rs` and autodiff's `UnaryGrad` all follow from it.
//!
//! The primitives map to WGSL built-ins or to the helpers in `elementwise::HELPERS`
//! (`erf_approx`, `sigmoid`, `tanh_safe`), and to f64 functions here ([`erf`] accurate to about
//! 1e-12), so the CPU side stays an independent, more precise evaluation of each primitive.

use std::fmt::Write;

/// A function of one argument.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prim {
    /// e^u
    Exp,
    /// ln u
    Log,
    /// sqrt u
    Sqrt,
    /// 1 / sqrt u
    Rsqrt,
    /// tanh u (clamped to +-15 on the GPU, where some drivers return NaN beyond)
    Tanh,
    /// the error function
    Erf,
    /// 1 / (1 + e^-u)
    Sigmoid,
    /// |u|
    Abs,
    /// -1, 0 or 1 (0 at 0, as WGSL's `sign` and PyTorch's)
    Sign,
}

/// A comparison that chooses between two branches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cmp {
    /// a > b
    Gt,
    /// a < b
    Lt,
    /// a == b
    Eq,
}

/// An elementwise expression (see the module doc).
#[derive(Clone, Debug, PartialEq)]
pub enum Expr {
    /// The input (a binary op's first operand).
    X,
    /// A binary op's second operand.
    Y,
    /// The upstream gradient, in derived gradients.
    Dy,
    /// The op's k-th scalar parameter (0: alpha, 1: beta).
    Param(u8),
    /// A constant.
    Lit(f64),
    /// f(u).
    Call(Prim, Box<Expr>),
    /// -u
    Neg(Box<Expr>),
    /// a + b
    Add(Box<Expr>, Box<Expr>),
    /// a - b
    Sub(Box<Expr>, Box<Expr>),
    /// a * b
    Mul(Box<Expr>, Box<Expr>),
    /// a / b
    Div(Box<Expr>, Box<Expr>),
    /// max(a, b)
    Max(Box<Expr>, Box<Expr>),
    /// min(a, b)
    Min(Box<Expr>, Box<Expr>),
    /// a^b
    Pow(Box<Expr>, Box<Expr>),
    /// `then` when `a cmp b`, else `other`.
    Select {
        /// left side of the comparison
        a: Box<Expr>,
        /// the comparison
        cmp: Cmp,
        /// right side of the comparison
        b: Box<Expr>,
        /// value when it holds
        then: Box<Expr>,
        /// value otherwise
        other: Box<Expr>,
    },
}

/// Shorthands for writing definitions.
pub mod build {
    use super::{Cmp, Expr, Prim};

    /// The input.
    pub fn x() -> Expr {
        Expr::X
    }
    /// The second operand.
    pub fn y() -> Expr {
        Expr::Y
    }
    /// Scalar parameter k.
    pub fn param(k: u8) -> Expr {
        Expr::Param(k)
    }
    /// A constant.
    pub fn lit(v: f64) -> Expr {
        Expr::Lit(v)
    }
    /// f(u).
    pub fn call(f: Prim, u: Expr) -> Expr {
        Expr::Call(f, Box::new(u))
    }
    /// -u.
    pub fn neg(u: Expr) -> Expr {
        Expr::Neg(Box::new(u))
    }
    /// a + b.
    pub fn add(a: Expr, b: Expr) -> Expr {
        Expr::Add(Box::new(a), Box::new(b))
    }
    /// a - b.
    pub fn sub(a: Expr, b: Expr) -> Expr {
        Expr::Sub(Box::new(a), Box::new(b))
    }
    /// a * b.
    pub fn mul(a: Expr, b: Expr) -> Expr {
        Expr::Mul(Box::new(a), Box::new(b))
    }
    /// a / b.
    pub fn div(a: Expr, b: Expr) -> Expr {
        Expr::Div(Box::new(a), Box::new(b))
    }
    /// max(a, b).
    pub fn max(a: Expr, b: Expr) -> Expr {
        Expr::Max(Box::new(a), Box::new(b))
    }
    /// min(a, b).
    pub fn min(a: Expr, b: Expr) -> Expr {
        Expr::Min(Box::new(a), Box::new(b))
    }
    /// a^b.
    pub fn pow(a: Expr, b: Expr) -> Expr {
        Expr::Pow(Box::new(a), Box::new(b))
    }
    /// `then` when `a cmp b`, else `other`.
    pub fn select(a: Expr, cmp: Cmp, b: Expr, then: Expr, other: Expr) -> Expr {
        Expr::Select {
            a: Box::new(a),
            cmp,
            b: Box::new(b),
            then: Box::new(then),
            other: Box::new(other),
        }
    }
}

use build::*;

/// Values of the variables for [`Expr::eval`].
#[derive(Clone, Copy, Debug, Default)]
pub struct Env {
    /// x
    pub x: f64,
    /// y
    pub y: f64,
    /// dy
    pub dy: f64,
    /// alpha, beta
    pub params: [f64; 2],
}

/// How [`Expr::wgsl`] writes the variables and scalars.
#[derive(Clone, Copy, Debug)]
pub struct Names<'a> {
    /// WGSL name of x.
    pub x: &'a str,
    /// WGSL name of y.
    pub y: &'a str,
    /// WGSL name of dy.
    pub dy: &'a str,
    /// `Some(values)`: scalars as literals; `None`: read from the uniform as `p.alpha`,
    /// `p.beta` (one pipeline for every value).
    pub params: Option<[f32; 2]>,
}

/// The error function in f64 (series below 2.5, Lentz's continued fraction for erfc above;
/// about 1e-12 accurate).
pub fn erf(x: f64) -> f64 {
    if x.is_nan() {
        return x;
    }
    if x.abs() > 6.0 {
        return x.signum();
    }
    let a = x.abs();
    if a < 2.5 {
        let mut sum = a;
        let mut term = a;
        let mut n = 0.0;
        loop {
            n += 1.0;
            term *= -a * a / n;
            let add = term / (2.0 * n + 1.0);
            sum += add;
            if add.abs() < 1e-17 {
                break;
            }
        }
        return x.signum() * sum * 2.0 / std::f64::consts::PI.sqrt();
    }
    let mut f = a;
    let mut c = a;
    let mut d = 0.0;
    for k in 1..200 {
        let an = k as f64 / 2.0;
        d = a + an * d;
        d = 1.0 / d;
        c = a + an / c;
        let delta = c * d;
        f *= delta;
        if (delta - 1.0).abs() < 1e-16 {
            break;
        }
    }
    let erfc = (-a * a).exp() / (f * std::f64::consts::PI.sqrt());
    x.signum() * (1.0 - erfc)
}

impl Prim {
    /// The primitive in f64.
    pub fn eval(self, u: f64) -> f64 {
        match self {
            Prim::Exp => u.exp(),
            Prim::Log => u.ln(),
            Prim::Sqrt => u.sqrt(),
            Prim::Rsqrt => 1.0 / u.sqrt(),
            Prim::Tanh => u.tanh(),
            Prim::Erf => erf(u),
            Prim::Sigmoid => 1.0 / (1.0 + (-u).exp()),
            Prim::Abs => u.abs(),
            Prim::Sign => {
                if u > 0.0 {
                    1.0
                } else if u < 0.0 {
                    -1.0
                } else {
                    u
                }
            }
        }
    }

    /// The WGSL function (a built-in or one of `elementwise::HELPERS`).
    pub fn wgsl(self) -> &'static str {
        match self {
            Prim::Exp => "exp",
            Prim::Log => "log",
            Prim::Sqrt => "sqrt",
            Prim::Rsqrt => "inverseSqrt",
            Prim::Tanh => "tanh_safe",
            Prim::Erf => "erf_approx",
            Prim::Sigmoid => "sigmoid",
            Prim::Abs => "abs",
            Prim::Sign => "sign",
        }
    }

    /// f'(u) as an expression in u.
    fn derivative(self, u: &Expr) -> Expr {
        let u = u.clone();
        match self {
            Prim::Exp => call(Prim::Exp, u),
            Prim::Log => div(lit(1.0), u),
            Prim::Sqrt => div(lit(0.5), call(Prim::Sqrt, u)),
            Prim::Rsqrt => div(mul(lit(-0.5), call(Prim::Rsqrt, u.clone())), u),
            Prim::Tanh => {
                let t = call(Prim::Tanh, u);
                sub(lit(1.0), mul(t.clone(), t))
            }
            // 2 / sqrt(pi) e^(-u^2)
            Prim::Erf => mul(
                lit(std::f64::consts::FRAC_2_SQRT_PI),
                call(Prim::Exp, neg(mul(u.clone(), u))),
            ),
            Prim::Sigmoid => {
                let s = call(Prim::Sigmoid, u);
                mul(s.clone(), sub(lit(1.0), s))
            }
            Prim::Abs => call(Prim::Sign, u),
            Prim::Sign => lit(0.0),
        }
    }
}

impl Cmp {
    fn holds(self, a: f64, b: f64) -> bool {
        match self {
            Cmp::Gt => a > b,
            Cmp::Lt => a < b,
            Cmp::Eq => a == b,
        }
    }

    fn wgsl(self) -> &'static str {
        match self {
            Cmp::Gt => ">",
            Cmp::Lt => "<",
            Cmp::Eq => "==",
        }
    }
}

/// A WGSL literal for `v` (finite): shortest round-trip digits, always with a point or an
/// exponent, negatives in parentheses.
fn wgsl_lit(v: f64) -> String {
    let mut s = format!("{v:?}");
    if !s.contains(['.', 'e', 'E']) {
        s += ".0";
    }
    if v.is_sign_negative() {
        format!("({s})")
    } else {
        s
    }
}

impl Expr {
    /// The value in f64.
    pub fn eval(&self, env: &Env) -> f64 {
        let e = |a: &Expr| a.eval(env);
        match self {
            Expr::X => env.x,
            Expr::Y => env.y,
            Expr::Dy => env.dy,
            Expr::Param(k) => env.params[*k as usize],
            Expr::Lit(v) => *v,
            Expr::Call(f, u) => f.eval(e(u)),
            Expr::Neg(u) => -e(u),
            Expr::Add(a, b) => e(a) + e(b),
            Expr::Sub(a, b) => e(a) - e(b),
            Expr::Mul(a, b) => e(a) * e(b),
            Expr::Div(a, b) => e(a) / e(b),
            Expr::Max(a, b) => e(a).max(e(b)),
            Expr::Min(a, b) => e(a).min(e(b)),
            Expr::Pow(a, b) => e(a).powf(e(b)),
            Expr::Select {
                a,
                cmp,
                b,
                then,
                other,
            } => {
                if cmp.holds(e(a), e(b)) {
                    e(then)
                } else {
                    e(other)
                }
            }
        }
    }

    /// The expression as WGSL (f32, fully parenthesized).
    pub fn wgsl(&self, names: &Names) -> String {
        let mut s = String::new();
        self.write_wgsl(names, &mut s);
        s
    }

    fn write_wgsl(&self, n: &Names, s: &mut String) {
        let bin = |s: &mut String, a: &Expr, op: &str, b: &Expr| {
            s.push('(');
            a.write_wgsl(n, s);
            s.push_str(op);
            b.write_wgsl(n, s);
            s.push(')');
        };
        let func = |s: &mut String, f: &str, args: &[&Expr]| {
            s.push_str(f);
            s.push('(');
            for (i, a) in args.iter().enumerate() {
                if i > 0 {
                    s.push_str(", ");
                }
                a.write_wgsl(n, s);
            }
            s.push(')');
        };
        match self {
            Expr::X => s.push_str(n.x),
            Expr::Y => s.push_str(n.y),
            Expr::Dy => s.push_str(n.dy),
            Expr::Param(k) => match n.params {
                Some(v) => s.push_str(&wgsl_lit(v[*k as usize] as f64)),
                None => s.push_str(if *k == 0 { "p.alpha" } else { "p.beta" }),
            },
            Expr::Lit(v) => s.push_str(&wgsl_lit(*v)),
            Expr::Call(f, u) => func(s, f.wgsl(), &[u]),
            Expr::Neg(u) => {
                s.push_str("(-");
                u.write_wgsl(n, s);
                s.push(')');
            }
            Expr::Add(a, b) => bin(s, a, " + ", b),
            Expr::Sub(a, b) => bin(s, a, " - ", b),
            Expr::Mul(a, b) => bin(s, a, " * ", b),
            Expr::Div(a, b) => bin(s, a, " / ", b),
            Expr::Max(a, b) => func(s, "max", &[a, b]),
            Expr::Min(a, b) => func(s, "min", &[a, b]),
            Expr::Pow(a, b) => func(s, "pow", &[a, b]),
            Expr::Select {
                a,
                cmp,
                b,
                then,
                other,
            } => {
                s.push_str("select(");
                other.write_wgsl(n, s);
                s.push_str(", ");
                then.write_wgsl(n, s);
                s.push_str(", ");
                bin(s, a, &format!(" {} ", cmp.wgsl()), b);
                let _ = write!(s, ")");
            }
        }
    }

    /// Whether the expression reads x.
    pub fn reads_x(&self) -> bool {
        match self {
            Expr::X => true,
            Expr::Y | Expr::Dy | Expr::Param(_) | Expr::Lit(_) => false,
            Expr::Call(_, u) | Expr::Neg(u) => u.reads_x(),
            Expr::Add(a, b)
            | Expr::Sub(a, b)
            | Expr::Mul(a, b)
            | Expr::Div(a, b)
            | Expr::Max(a, b)
            | Expr::Min(a, b)
            | Expr::Pow(a, b) => a.reads_x() || b.reads_x(),
            Expr::Select {
                a, b, then, other, ..
            } => a.reads_x() || b.reads_x() || then.reads_x() || other.reads_x(),
        }
    }

    /// d/dx, unsimplified. Max and min pass the gradient to the strictly larger (smaller)
    /// side, the right one on ties; comparisons are constant.
    fn d(&self) -> Expr {
        match self {
            Expr::X => lit(1.0),
            Expr::Y | Expr::Dy | Expr::Param(_) | Expr::Lit(_) => lit(0.0),
            Expr::Call(f, u) => mul(f.derivative(u), u.d()),
            Expr::Neg(u) => neg(u.d()),
            Expr::Add(a, b) => add(a.d(), b.d()),
            Expr::Sub(a, b) => sub(a.d(), b.d()),
            Expr::Mul(a, b) => add(mul(a.d(), (**b).clone()), mul((**a).clone(), b.d())),
            Expr::Div(a, b) => {
                if b.reads_x() {
                    div(
                        sub(mul(a.d(), (**b).clone()), mul((**a).clone(), b.d())),
                        mul((**b).clone(), (**b).clone()),
                    )
                } else {
                    div(a.d(), (**b).clone())
                }
            }
            Expr::Max(a, b) => select((**a).clone(), Cmp::Gt, (**b).clone(), a.d(), b.d()),
            Expr::Min(a, b) => select((**a).clone(), Cmp::Lt, (**b).clone(), a.d(), b.d()),
            Expr::Pow(a, b) => {
                // b a^(b - 1) a' (+ a^b ln(a) b' when the exponent reads x)
                let base = mul(
                    mul(
                        (**b).clone(),
                        pow((**a).clone(), sub((**b).clone(), lit(1.0))),
                    ),
                    a.d(),
                );
                if b.reads_x() {
                    add(
                        base,
                        mul(mul(self.clone(), call(Prim::Log, (**a).clone())), b.d()),
                    )
                } else {
                    base
                }
            }
            Expr::Select {
                a,
                cmp,
                b,
                then,
                other,
            } => select((**a).clone(), *cmp, (**b).clone(), then.d(), other.d()),
        }
    }

    /// The gradient `dy * d/dx` of this expression, simplified.
    pub fn grad(&self) -> Expr {
        mul(Expr::Dy, self.d()).simplify()
    }

    fn lit_value(&self) -> Option<f64> {
        match self {
            Expr::Lit(v) => Some(*v),
            _ => None,
        }
    }

    /// Removes the zeros, ones and constant arithmetic that differentiation leaves, and moves
    /// a product into a 0 / 1 branch choice (`dy * select(.., 1, 0)` becomes
    /// `select(.., dy, 0)`, which also keeps a non-finite dy out of the dead branch, as
    /// PyTorch's ReLU gradient does).
    pub fn simplify(&self) -> Expr {
        let is = |e: &Expr, v: f64| e.lit_value() == Some(v);
        match self {
            Expr::Call(f, u) => call(*f, u.simplify()),
            Expr::Neg(u) => match u.simplify() {
                Expr::Lit(v) => lit(-v),
                Expr::Neg(w) => *w,
                w => neg(w),
            },
            Expr::Add(a, b) => {
                let (a, b) = (a.simplify(), b.simplify());
                match (a.lit_value(), b.lit_value()) {
                    (Some(p), Some(q)) => lit(p + q),
                    (Some(0.0), _) => b,
                    (_, Some(0.0)) => a,
                    _ => add(a, b),
                }
            }
            Expr::Sub(a, b) => {
                let (a, b) = (a.simplify(), b.simplify());
                match (a.lit_value(), b.lit_value()) {
                    (Some(p), Some(q)) => lit(p - q),
                    (_, Some(0.0)) => a,
                    (Some(0.0), _) => neg(b).simplify(),
                    _ => sub(a, b),
                }
            }
            Expr::Mul(a, b) => {
                let (a, b) = (a.simplify(), b.simplify());
                if is(&a, 0.0) || is(&b, 0.0) {
                    return lit(0.0);
                }
                if let (Some(p), Some(q)) = (a.lit_value(), b.lit_value()) {
                    return lit(p * q);
                }
                if is(&a, 1.0) {
                    return b;
                }
                if is(&b, 1.0) {
                    return a;
                }
                if is(&a, -1.0) {
                    return neg(b).simplify();
                }
                if is(&b, -1.0) {
                    return neg(a).simplify();
                }
                // x * (1 / b) = x / b
                if let Expr::Div(n, d) = &b {
                    if is(n, 1.0) {
                        return div(a, (**d).clone());
                    }
                }
                for (left, s, o) in [(true, &a, &b), (false, &b, &a)] {
                    if let Expr::Select {
                        a: l,
                        cmp,
                        b: r,
                        then,
                        other,
                    } = s
                    {
                        let unit = |e: &Expr| is(e, 0.0) || is(e, 1.0);
                        if unit(then) || unit(other) {
                            let side = |e: &Expr| {
                                if left {
                                    mul(e.clone(), o.clone())
                                } else {
                                    mul(o.clone(), e.clone())
                                }
                            };
                            return select(
                                (**l).clone(),
                                *cmp,
                                (**r).clone(),
                                side(then),
                                side(other),
                            )
                            .simplify();
                        }
                    }
                }
                mul(a, b)
            }
            Expr::Div(a, b) => {
                let (a, b) = (a.simplify(), b.simplify());
                if is(&a, 0.0) {
                    return lit(0.0);
                }
                if is(&b, 1.0) {
                    return a;
                }
                match (a.lit_value(), b.lit_value()) {
                    (Some(p), Some(q)) => lit(p / q),
                    _ => div(a, b),
                }
            }
            Expr::Max(a, b) => max(a.simplify(), b.simplify()),
            Expr::Min(a, b) => min(a.simplify(), b.simplify()),
            Expr::Pow(a, b) => pow(a.simplify(), b.simplify()),
            Expr::Select {
                a,
                cmp,
                b,
                then,
                other,
            } => {
                let (then, other) = (then.simplify(), other.simplify());
                if then == other {
                    return then;
                }
                select(a.simplify(), *cmp, b.simplify(), then, other)
            }
            leaf => leaf.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const N: Names = Names {
        x: "x",
        y: "y",
        dy: "dy",
        params: None,
    };

    #[test]
    fn relu_gradient_becomes_a_branch_choice() {
        let relu = max(x(), lit(0.0));
        assert_eq!(relu.wgsl(&N), "max(x, 0.0)");
        assert_eq!(relu.grad().wgsl(&N), "select(0.0, dy, (x > 0.0))");
    }

    #[test]
    fn literals_and_scalars() {
        let e = add(mul(param(0), x()), param(1));
        assert_eq!(e.wgsl(&N), "((p.alpha * x) + p.beta)");
        let lits = Names {
            params: Some([2.0, -0.1]),
            ..N
        };
        assert_eq!(e.wgsl(&lits), "((2.0 * x) + (-0.10000000149011612))");
        assert_eq!(e.grad().wgsl(&N), "(dy * p.alpha)");
        assert_eq!(wgsl_lit(1e-7), "1e-7");
    }

    #[test]
    fn derived_gradients_match_finite_differences() {
        let sig = |u: Expr| call(Prim::Sigmoid, u);
        let cases = [
            mul(x(), sig(mul(lit(1.702), x()))),
            div(lit(1.0), x()),
            pow(x(), x()),
            call(Prim::Erf, mul(x(), x())),
            min(max(x(), param(0)), param(1)),
            call(Prim::Rsqrt, add(x(), lit(2.0))),
            call(Prim::Tanh, call(Prim::Log, x())),
        ];
        for e in &cases {
            for &x0 in &[0.3, 0.45, 0.8, 1.7] {
                let env = |x| Env {
                    x,
                    dy: 1.0,
                    params: [0.35, 1.2],
                    ..Env::default()
                };
                let h = 1e-6;
                let fd = (e.eval(&env(x0 + h)) - e.eval(&env(x0 - h))) / (2.0 * h);
                let g = e.grad().eval(&Env {
                    dy: 0.75,
                    ..env(x0)
                });
                assert!(
                    (g - 0.75 * fd).abs() <= 1e-7 * (1.0 + fd.abs()),
                    "{e:?} at {x0}: {g} vs {}",
                    0.75 * fd
                );
            }
        }
    }

    #[test]
    fn erf_matches_known_values() {
        // erf(0.5), erf(1), erf(3) to 16 digits (Abramowitz & Stegun, table 7.1).
        for (x, v) in [
            (0.5, 0.5204998778130465),
            (1.0, 0.8427007929497149),
            (3.0, 0.9999779095030014),
        ] {
            assert!((erf(x) - v).abs() < 1e-13 && (erf(-x) + v).abs() < 1e-13);
        }
    }
}
