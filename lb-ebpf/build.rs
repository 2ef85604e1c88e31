//! Rebuild the programs when the linker changes (a new LLVM changes the emitted code).
fn main() {
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
