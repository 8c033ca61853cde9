//! The kernel side as userspace drives it: the embedded programs and their TC links
//! (`ebpf`) and XDP link (`xdp`), their pins (`bpffs`), loading over pinned maps (`pins`), and the only writer of the maps (`maps`).

pub mod bpffs;
pub mod ebpf;
pub mod maps;
pub mod pins;
pub mod xdp;
