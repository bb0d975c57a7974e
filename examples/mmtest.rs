use stablerep::gpu::{Gpu, GpuOptions};
use stablerep::kernels::{matmul, View, Dispatch, uniform, Binding};
use stablerep::exec::Prepared;
fn main() {
    env_logger::init();
    let gpu = Gpu::new(&GpuOptions::default()).unwrap();
    let args: Vec<u32> = std::env::args().skip(1).map(|a| a.parse().unwrap()).collect();
    let (m, n, k) = (args[0], args[1], args[2]);
    let t = matmul::SgTile { s: 8, r: args[3], tn: args[4] };
    let s = matmul::MatmulShape { batch: 1, m, n, k, ta: args[5] == 1, tb: args[6] == 1, a_shared: false, b_shared: false };
    let (na, nb, nc) = matmul::sizes(&s);
    let a = gpu.alloc(na * 4, "a").unwrap();
    let b = gpu.alloc(nb * 4, "b").unwrap();
    let c = gpu.alloc(nc * 4, "c").unwrap();
    let av: Vec<f32> = (0..na).map(|i| ((i * 7 % 13) as f32) / 13.0).collect();
    let bv: Vec<f32> = (0..nb).map(|i| ((i * 5 % 11) as f32) / 11.0).collect();
    gpu.write(&a, 0, &av); gpu.write(&b, 0, &bv);
    let _ = View::new(0, 1);
    let d = vec![Dispatch { key: format!("sg{:?}{:?}", t, (s.ta, s.tb)), template: "matmul_sg", subst: matmul::sg_subst(&s, t),
        uniform: uniform(&[m, n, k, 0, 0, 0, 0, 0, 0]),
        bindings: vec![Binding { buf: 0, offset: 0, size: na * 4 }, Binding { buf: 1, offset: 0, size: nb * 4 }, Binding { buf: 2, offset: 0, size: nc * 4 }],
        groups: [n.div_ceil(8 * t.tn), m.div_ceil(t.r), 1] }];
    let p = Prepared::new(&gpu, &d, &[&a, &b, &c]).unwrap();
    let t0 = std::time::Instant::now();
    p.submit(&gpu); gpu.wait().unwrap();
    let first = t0.elapsed().as_secs_f64();
    let reps = 10;
    let t0 = std::time::Instant::now();
    for _ in 0..reps { p.submit(&gpu); }
    gpu.wait().unwrap();
    let dt = t0.elapsed().as_secs_f64() / reps as f64;
    let out: Vec<f32> = gpu.read(&c, 0, nc * 4).unwrap();
    let mut maxerr = 0f64;
    for (i, j) in [(0usize, 0usize), (m as usize / 2, n as usize / 3), (m as usize - 1, n as usize - 1)] {
        let mut r = 0f64;
        for kk in 0..k as usize {
            let ai = if s.ta { kk * m as usize + i } else { i * k as usize + kk };
            let bi = if s.tb { j * k as usize + kk } else { kk * n as usize + j };
            r += av[ai] as f64 * bv[bi] as f64;
        }
        maxerr = maxerr.max((out[i * n as usize + j] as f64 - r).abs());
    }
    println!("{} {:.1} GFLOP/s first {:.2}s maxerr {:.2e}", d[0].key, 2.0 * (m as f64) * (n as f64) * (k as f64) / dt / 1e9, first, maxerr);
}
