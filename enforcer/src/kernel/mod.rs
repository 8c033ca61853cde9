//! The kernel side as userspace drives it: the embedded programs and their links
//! (`ebpf`), loading over pinned maps (`pins`), and the only writer of the maps (`maps`).

pub mod ebpf;
pub mod maps;
pub mod pins;
