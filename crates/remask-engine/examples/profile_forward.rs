//! Where the time of one forward pass goes, per kernel: wraps the CPU backend
//! in a timing layer. `cargo run --release -p remask-engine --example
//! profile_forward -- MODEL_DIR [SEQ_LEN] [ITERS]`.

use remask_engine::{Backend, CpuBackend, Heads, Llada, Matrix, Packing, Shard};
use remask_model::{Checkpoint, Result, TensorRef};
use std::collections::BTreeMap;
use std::time::Instant;

#[derive(Default)]
struct Timed {
    inner: CpuBackend,
    totals: std::sync::Mutex<BTreeMap<&'static str, f64>>,
}

impl Timed {
    fn t<T>(&self, name: &'static str, f: impl FnOnce() -> T) -> T {
        let start = Instant::now();
        let out = f();
        *self.totals.lock().unwrap().entry(name).or_default() +=
            start.elapsed().as_secs_f64() * 1e3;
        out
    }
}

impl Backend for Timed {
    type Tensor = Matrix;
    type Weight = Matrix;
    fn load_weight(&self, t: TensorRef<'_>) -> Result<Matrix> {
        self.inner.load_weight(t)
    }
    fn upload(&self, v: &[f32], r: usize, c: usize) -> Matrix {
        self.inner.upload(v, r, c)
    }
    fn embed(&self, t: &Matrix, ids: &[u32]) -> Matrix {
        self.t("embed", || self.inner.embed(t, ids))
    }
    fn rms_norm(&self, x: &Matrix, w: &Matrix, eps: f32) -> Matrix {
        self.t("rms_norm", || self.inner.rms_norm(x, w, eps))
    }
    fn linear(&self, x: &Matrix, w: &Matrix) -> Matrix {
        let name = if w.rows > 8 * w.cols {
            "linear (head)"
        } else {
            "linear (layers)"
        };
        self.t(name, || self.inner.linear(x, w))
    }
    fn rope(&self, x: &mut Matrix, hd: usize, p: &[u32], c: &Matrix, s: &Matrix) {
        self.t("rope", || self.inner.rope(x, hd, p, c, s))
    }
    fn attention(
        &self,
        q: &Matrix,
        k: &Matrix,
        v: &Matrix,
        h: Heads,
        p: &Packing,
        keys: &Packing,
    ) -> Matrix {
        self.t("attention", || self.inner.attention(q, k, v, h, p, keys))
    }
    fn silu_mul(&self, g: &Matrix, u: &Matrix) -> Matrix {
        self.t("silu_mul", || self.inner.silu_mul(g, u))
    }
    fn add_assign(&self, x: &mut Matrix, y: &Matrix) {
        self.t("add", || self.inner.add_assign(x, y))
    }
    fn gather_rows(&self, x: &Matrix, rows: &[usize]) -> Matrix {
        self.inner.gather_rows(x, rows)
    }
    fn concat_rows(&self, pieces: &[(&Matrix, std::ops::Range<usize>)]) -> Matrix {
        self.t("concat_rows", || self.inner.concat_rows(pieces))
    }
    fn to_host(&self, x: Matrix) -> Vec<f32> {
        self.t("to_host", || self.inner.to_host(x))
    }
    fn read_host<'a>(&self, x: &'a Matrix) -> std::borrow::Cow<'a, [f32]> {
        self.inner.read_host(x)
    }
    fn load_hidden(&self, v: &[f32], r: usize, c: usize) -> Matrix {
        self.inner.load_hidden(v, r, c)
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dir = args
        .first()
        .expect("usage: profile_forward MODEL_DIR [SEQ_LEN] [ITERS]");
    let seq: usize = args.get(1).map_or(320, |s| s.parse().unwrap());
    let iters: usize = args.get(2).map_or(5, |s| s.parse().unwrap());
    let ckpt = Checkpoint::open(dir).unwrap();
    let be = Timed::default();
    let model = Llada::load(&be, &ckpt, Shard::full(&ckpt.config)).unwrap();
    let ids: Vec<u32> = (0..seq as u32).map(|i| i * 7 % 1000).collect();
    let packing = Packing::new([seq]);
    model.logits(&be, &ids, &packing, None);
    be.totals.lock().unwrap().clear();
    let start = Instant::now();
    for _ in 0..iters {
        std::hint::black_box(model.logits(&be, &ids, &packing, None));
    }
    let total = start.elapsed().as_secs_f64() * 1e3 / iters as f64;
    println!("forward, seq_len {seq}: {total:.2} ms per pass");
    for (name, ms) in be.totals.lock().unwrap().iter() {
        let ms = ms / iters as f64;
        println!("  {name:16} {ms:8.2} ms  {:5.1}%", 100.0 * ms / total);
    }
}
