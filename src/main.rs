// The system allocator: mimalloc measured no lower CPU per request here and kept ~1.6×
// the RSS with 10,000 idle keep-alive connections (docs/benchmarks.md).
fn main() -> std::process::ExitCode {
    tollgate::cli::main()
}
