//! One module per subcommand; each exposes `Args` (clap) and `run`.

pub mod bench_engine;
pub mod bench_kernels;
pub mod bench_mesh;
pub mod generate;
pub mod simulate;
