// mimalloc: fewer cycles per allocation than glibc's malloc on the request path, and less
// fragmentation with many long-lived connections (see docs/benchmarks.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    tollgate::cli::main()
}
