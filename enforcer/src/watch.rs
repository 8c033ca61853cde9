//! Noticing that the state directory changed: inotify on the directory, debounced, so
//! that one edit or one ConfigMap update (a rename of its `..data` symlink) is one reload.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// Quiet time after the last change before a reload.
pub const DEBOUNCE: Duration = Duration::from_millis(200);

/// Events on the directory's entries that may change the state.
const ENTRY_EVENTS: u32 = libc::IN_CREATE
    | libc::IN_DELETE
    | libc::IN_MODIFY
    | libc::IN_CLOSE_WRITE
    | libc::IN_MOVED_FROM
    | libc::IN_MOVED_TO
    | libc::IN_ATTRIB;
/// The directory itself went away (deleted or renamed): the watch must be renewed.
const SELF_EVENTS: u32 = libc::IN_DELETE_SELF | libc::IN_MOVE_SELF | libc::IN_IGNORED;

/// An inotify watch on a state directory.
pub struct StateWatch {
    dir: PathBuf,
    inotify: AsyncFd<OwnedFd>,
    /// Whether the directory's watch is in place (it is renewed when the
    /// directory reappears).
    watching: bool,
}

impl StateWatch {
    /// Watches `dir` (it need not exist yet). Needs a Tokio runtime.
    pub fn new(dir: &Path) -> io::Result<Self> {
        // SAFETY: plain syscall; the descriptor is owned below.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: an OwnedFd keeps returning its own open descriptor until dropped with the AsyncFd.
        let inotify = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }?;
        let mut watch = Self {
            dir: dir.to_path_buf(),
            inotify,
            watching: false,
        };
        watch.renew();
        Ok(watch)
    }

    fn renew(&mut self) {
        let Ok(path) = CString::new(self.dir.as_os_str().as_bytes()) else {
            return;
        };
        // SAFETY: valid descriptor and NUL-terminated path.
        let wd = unsafe {
            libc::inotify_add_watch(
                self.inotify.get_ref().as_raw_fd(),
                path.as_ptr(),
                ENTRY_EVENTS | SELF_EVENTS,
            )
        };
        self.watching = wd >= 0;
    }

    /// Waits for a change, then for [`DEBOUNCE`] without any further one.
    pub async fn changed(&mut self) -> io::Result<()> {
        loop {
            if !self.watching {
                // The directory is gone: look for it again now and then.
                tokio::time::sleep(DEBOUNCE).await;
                self.renew();
                if self.watching {
                    break;
                }
                continue;
            }
            if self.drain().await? {
                break;
            }
        }
        while let Ok(result) = tokio::time::timeout(DEBOUNCE, self.drain()).await {
            result?;
        }
        Ok(())
    }

    /// Reads pending events; true if one of them may change the state.
    async fn drain(&mut self) -> io::Result<bool> {
        let mut buffer = [0u8; 4096];
        let mut guard = self.inotify.readable().await?;
        let read = guard.try_io(|fd| {
            // SAFETY: reading into a buffer we own, of its length.
            let n = unsafe {
                libc::read(
                    fd.get_ref().as_raw_fd(),
                    buffer.as_mut_ptr().cast(),
                    buffer.len(),
                )
            };
            if n < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(n as usize)
            }
        });
        let len = match read {
            Ok(result) => result?,
            Err(_would_block) => return Ok(false),
        };
        let mut changed = false;
        let mut offset = 0;
        let header = std::mem::size_of::<libc::inotify_event>();
        while offset + header <= len {
            // SAFETY: the kernel wrote whole events; read_unaligned copes with any alignment.
            let event: libc::inotify_event =
                unsafe { std::ptr::read_unaligned(buffer[offset..].as_ptr().cast()) };
            if event.mask & SELF_EVENTS != 0 {
                self.watching = false;
            }
            changed |= event.mask & (ENTRY_EVENTS | SELF_EVENTS) != 0;
            offset += header + event.len as usize;
        }
        Ok(changed)
    }
}
