//! The enforcer's objects on bpffs: where each is pinned under the pin path
//! (`P/{maps,programs,links,staging}/`), and the few `bpf(2)` commands on pins
//! that aya does not wrap.

use std::io;
use std::path::{Path, PathBuf};

use crate::Error;

/// Where a map is pinned under `pin_path`.
pub fn map_pin(pin_path: &Path, name: &str) -> PathBuf {
    pin_path.join("maps").join(name)
}

/// Where a migrated map waits for the programs that use it to be attached (bpffs
/// refuses dots in names; a rename between its directories is still one step).
pub fn staging_pin(pin_path: &Path, name: &str) -> PathBuf {
    pin_path.join("staging").join(name)
}

/// Where a program is pinned under `pin_path`.
pub fn program_pin(pin_path: &Path, name: &str) -> PathBuf {
    pin_path.join("programs").join(name)
}

/// Where the TCX link of a program is pinned under `pin_path`.
pub fn link_pin(pin_path: &Path, name: &str) -> PathBuf {
    pin_path.join("links").join(name)
}

pub fn create_dir(dir: PathBuf) -> Result<(), Error> {
    std::fs::create_dir_all(&dir).map_err(|source| Error::PinDir { path: dir, source })
}

/// Removes the pin at `pin`; a missing pin is not an error.
pub fn remove_pin(pin: &Path) -> Result<(), Error> {
    match std::fs::remove_file(pin) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(Error::Unpin {
            path: pin.to_path_buf(),
            source: e,
        }),
        _ => Ok(()),
    }
}

/// Detaches the link pinned at `pin` from its hook now (`BPF_LINK_DETACH`,
/// which aya does not wrap), though descriptors and the pin may live on. No
/// pin: nothing to do.
pub fn detach_pinned_link(pin: &Path) -> io::Result<()> {
    use std::os::fd::AsRawFd as _;
    /// `bpf_attr.link_detach` of `linux/bpf.h`.
    #[repr(C)]
    struct LinkDetachAttr {
        link_fd: u32,
    }
    const BPF_LINK_DETACH: libc::c_long = 34;
    let Some(link) = open_pin(pin)? else {
        return Ok(());
    };
    let detach = LinkDetachAttr {
        link_fd: link.as_raw_fd() as u32,
    };
    bpf(
        BPF_LINK_DETACH,
        (&raw const detach).cast(),
        std::mem::size_of::<LinkDetachAttr>(),
    )
    .map(|_| ())
}

/// Fills `info` (`size` bytes of a `bpf_*_info` of `linux/bpf.h`) for the
/// object pinned at `pin`; `None` when nothing is pinned there.
pub fn pinned_info(pin: &Path, info: *mut libc::c_void, size: usize) -> io::Result<Option<()>> {
    use std::os::fd::AsRawFd as _;
    /// `bpf_attr.info` of `linux/bpf.h`.
    #[repr(C)]
    struct InfoAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    let Some(object) = open_pin(pin)? else {
        return Ok(None);
    };
    let attr = InfoAttr {
        bpf_fd: object.as_raw_fd() as u32,
        info_len: size as u32,
        info: info as u64,
    };
    bpf(
        BPF_OBJ_GET_INFO_BY_FD,
        (&raw const attr).cast(),
        std::mem::size_of::<InfoAttr>(),
    )
    .map(|_| Some(()))
}

/// A descriptor of the object pinned at `pin` (`BPF_OBJ_GET`); `None` when
/// nothing is pinned there.
fn open_pin(pin: &Path) -> io::Result<Option<std::os::fd::OwnedFd>> {
    use std::os::fd::{FromRawFd as _, OwnedFd};
    use std::os::unix::ffi::OsStrExt as _;
    /// `bpf_attr.obj_get` of `linux/bpf.h`.
    #[repr(C)]
    struct ObjGetAttr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    const BPF_OBJ_GET: libc::c_long = 7;
    let path = std::ffi::CString::new(pin.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let get = ObjGetAttr {
        pathname: path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    match bpf(
        BPF_OBJ_GET,
        (&raw const get).cast(),
        std::mem::size_of::<ObjGetAttr>(),
    ) {
        // SAFETY: a fresh descriptor the kernel just gave us.
        Ok(fd) => Ok(Some(unsafe { OwnedFd::from_raw_fd(fd as i32) })),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// The `bpf(2)` system call, for what aya does not wrap.
fn bpf(cmd: libc::c_long, attr: *const libc::c_void, size: usize) -> io::Result<libc::c_long> {
    // SAFETY: `attr` points at a valid bpf_attr prefix of `size` bytes.
    let result = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr, size) };
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(result)
    }
}

/// Pins program `name` of `ebpf` (for `bpftool` and tests), over what was pinned before.
pub(super) fn repin_program(
    ebpf: &mut aya::Ebpf,
    pin_path: &Path,
    name: &'static str,
) -> Result<(), Error> {
    let pin = program_pin(pin_path, name);
    remove_pin(&pin)?;
    ebpf.program_mut(name)
        .ok_or(Error::MissingProgram(name))?
        .pin(&pin)
        .map_err(|source| Error::Pin { path: pin, source })
}
