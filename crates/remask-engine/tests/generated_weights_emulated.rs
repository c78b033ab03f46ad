//! The CUDA kernel that draws generated weights on the GPU
//! (`init_normal_bf16` in `src/cuda/kernels.cu`), run on the CPU under the
//! emulation of `tests/cuda_emu/emu.h`: it must give exactly the bf16 bits
//! of the host path (`GeneratedTensor::bf16_bytes`, which are the bytes of
//! the files `model init --dtype bf16` writes), for whole tensors and for
//! tensor-parallel blocks. On a GPU, `log` and `cos` in double may differ
//! from the host's libm in the last bit, which changes a bf16 value only in
//! the rarest cases; everything else (hash, index, Box-Muller, rounding) is
//! checked here. Needs g++ (C++17); without one the test says so and passes,
//! unless `REMASK_KERNEL_EMU=required`.

use remask_model::{GeneratedTensor, Init, Preset};
use std::ops::Range;
use std::path::PathBuf;
use std::sync::OnceLock;

type Launch = unsafe extern "C" fn(u32, u32, *mut u16, i32, i32, i64, i64, i64, u64, u64, f32, i32);

fn emu() -> Option<&'static libloading::Library> {
    static EMU: OnceLock<Option<libloading::Library>> = OnceLock::new();
    EMU.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/cuda_emu");
        let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("remask-cuda-emu-init.so");
        let status = std::process::Command::new(std::env::var("CXX").unwrap_or("g++".into()))
            .args([
                "-std=c++17",
                "-O1",
                "-fno-strict-aliasing",
                "-shared",
                "-fPIC",
            ])
            .args(["-Wno-unknown-pragmas", "-o"])
            .arg(&out)
            .arg(dir.join("init_weights.cpp"))
            .status();
        match status {
            Ok(s) if s.success() => {}
            Ok(s) => panic!("the kernels do not compile for the emulation: g++ {s}"),
            Err(e) if std::env::var("REMASK_KERNEL_EMU").as_deref() == Ok("required") => {
                panic!("no C++ compiler ({e}), and REMASK_KERNEL_EMU=required")
            }
            Err(e) => {
                eprintln!("no C++ compiler ({e}): the kernel emulation test is skipped");
                return None;
            }
        }
        // SAFETY: our own library, built just now.
        Some(unsafe { libloading::Library::new(&out) }.expect("load the emulation"))
    })
    .as_ref()
}

/// The block `rows` x `cols` of `t` drawn by the kernel, launched as
/// `CudaBackend::generated_weight` launches it.
fn kernel_block(
    lib: &libloading::Library,
    t: &GeneratedTensor,
    rows: Range<usize>,
    cols: Range<usize>,
) -> Vec<u16> {
    let n = rows.len() * cols.len();
    let mut out = vec![0xffffu16; n];
    let (stddev, one_plus) = match t.init {
        Init::Normal(s) => (s, 0),
        Init::OnePlus(s) => (s, 1),
    };
    let full_cols = t.shape[1] as i64;
    // SAFETY: the signature is the one written in init_weights.cpp; `out`
    // holds the rows x cols elements the kernel writes.
    unsafe {
        let f: libloading::Symbol<Launch> = lib.get(b"launch_init_normal_bf16").unwrap();
        f(
            n.div_ceil(256).max(1) as u32,
            256,
            out.as_mut_ptr(),
            rows.len() as i32,
            cols.len() as i32,
            full_cols,
            rows.start as i64,
            cols.start as i64,
            t.seed,
            t.tensor,
            stddev,
            one_plus,
        );
    }
    out
}

fn host_block(t: &GeneratedTensor, rows: Range<usize>, cols: Range<usize>) -> Vec<u16> {
    t.bf16_bytes(rows, cols)
        .chunks_exact(2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
        .collect()
}

#[test]
fn kernel_draws_the_host_values_bit_for_bit() {
    let Some(lib) = emu() else { return };
    let tiny = Preset::get("tiny").unwrap();
    // The tiny preset's matrices as a checkpoint of seed 5 describes them.
    let dir = tempfile::tempdir().unwrap();
    let opts = remask_model::InitOptions {
        seed: 5,
        generated: true,
        ..Default::default()
    };
    remask_model::init_checkpoint(tiny, &opts, dir.path()).unwrap();
    let ckpt = remask_model::Checkpoint::open(dir.path()).unwrap();
    let (d, e, mlp) = (tiny.d_model, tiny.embedding_size, tiny.mlp_hidden_size);
    let mut checked = 0;
    for (name, shape) in [
        ("model.transformer.wte.weight", [e, d]),
        ("model.transformer.blocks.0.k_proj.weight", [32, d]),
        ("model.transformer.blocks.1.ff_out.weight", [d, mlp]),
        ("model.transformer.ff_out.weight", [e, d]),
    ] {
        let remask_model::WeightSource::Generated(t) = ckpt.weight(name, &shape).unwrap() else {
            panic!("{name} is not generated")
        };
        let (r, c) = (shape[0], shape[1]);
        // The whole tensor, a column-parallel and a row-parallel block, and
        // an odd block that does not fill the last thread block.
        for (rows, cols) in [
            (0..r, 0..c),
            (r / 2..r, 0..c),
            (0..r, c / 2..c),
            (3..r - 5, 7..c - 2),
        ] {
            assert_eq!(
                kernel_block(lib, &t, rows.clone(), cols.clone()),
                host_block(&t, rows.clone(), cols.clone()),
                "{name} rows {rows:?} cols {cols:?}"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 16);
    // OnePlus (the + 1 rounded apart from the product), and element indices
    // past 2^32 (the llada-8b head holds 5.2e8 elements; this is safer).
    for (init, shape, rows) in [
        (Init::OnePlus(0.1), vec![40, 70], 0..40),
        (
            Init::Normal(0.02),
            vec![3_000_000, 4096],
            2_999_000..2_999_003,
        ),
    ] {
        let t = GeneratedTensor {
            seed: 123,
            tensor: 9,
            init,
            shape: shape.clone(),
        };
        let cols = 0..shape[1];
        assert_eq!(
            kernel_block(lib, &t, rows.clone(), cols.clone()),
            host_block(&t, rows, cols),
            "{init:?} {shape:?}"
        );
    }
}
