//! Noticing that the state directory changed: inotify on the directory, debounced, so
//! that one edit or one ConfigMap update (a rename of its `..data` symlink) is one reload.
//! The directory's own entry in its parent is watched too: a state directory that is a
//! symlink re-pointed to another directory (inotify watches the target, which does not
//! change) or a directory renamed over it is a change, and the watch follows it.

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::time::Instant;

/// Quiet time after the last change before a reload.
pub const DEBOUNCE: Duration = Duration::from_millis(200);
/// The longest a reload waits after the first change: a directory that never
/// stays quiet for [`DEBOUNCE`] is still reloaded.
pub const MAX_DELAY: Duration = Duration::from_secs(2);

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
/// Events on the parent's entries: the directory's name now names something else.
const REPLACED_EVENTS: u32 =
    libc::IN_CREATE | libc::IN_DELETE | libc::IN_MOVED_FROM | libc::IN_MOVED_TO;

/// An inotify watch on a state directory.
pub struct StateWatch {
    dir: PathBuf,
    /// The directory's parent and its name there, if it has a name.
    entry: Option<(PathBuf, OsString)>,
    /// The inotify instance. Its watches are in place from [`StateWatch::new`] on:
    /// what changes before the first wait queues in the kernel and is seen by it.
    inotify: OwnedFd,
    /// A duplicate of `inotify` registered with the runtime, from the first wait on.
    readable: Option<AsyncFd<OwnedFd>>,
    /// The watch descriptor of the directory (of its target, if it is a symlink),
    /// while it is in place (it is renewed when the directory reappears or is replaced).
    dir_watch: Option<i32>,
    /// The watch descriptor of the parent, while it is in place.
    parent_watch: Option<i32>,
}

impl StateWatch {
    /// Watches `dir` (it need not exist yet) from now on. Needs no runtime, so
    /// the watch can be placed before the state's first read; waiting for a
    /// change ([`StateWatch::changed`]) needs a Tokio runtime.
    pub fn new(dir: &Path) -> io::Result<Self> {
        // SAFETY: plain syscall; the descriptor is owned below.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor nobody else owns.
        let inotify = unsafe { OwnedFd::from_raw_fd(fd) };
        let entry = dir.file_name().map(|name| {
            let parent = match dir.parent() {
                Some(parent) if !parent.as_os_str().is_empty() => parent,
                _ => Path::new("."),
            };
            (parent.to_path_buf(), name.to_os_string())
        });
        let mut watch = Self {
            dir: dir.to_path_buf(),
            entry,
            inotify,
            readable: None,
            dir_watch: None,
            parent_watch: None,
        };
        watch.renew();
        Ok(watch)
    }

    /// A watch on `path` for `events`, or `None` if it cannot be placed (yet).
    fn add_watch(&self, path: &Path, events: u32) -> Option<i32> {
        let path = CString::new(path.as_os_str().as_bytes()).ok()?;
        // SAFETY: valid descriptor and NUL-terminated path.
        let wd =
            unsafe { libc::inotify_add_watch(self.inotify.as_raw_fd(), path.as_ptr(), events) };
        (wd >= 0).then_some(wd)
    }

    /// Watches what the directory's path names now, dropping the watch on what it
    /// named before; watches the parent if it is not yet.
    fn renew(&mut self) {
        let renewed = self.add_watch(&self.dir, ENTRY_EVENTS | SELF_EVENTS);
        if let Some(old) = self.dir_watch.filter(|&old| Some(old) != renewed) {
            // SAFETY: valid descriptor; a watch the kernel already dropped is EINVAL, harmless.
            unsafe { libc::inotify_rm_watch(self.inotify.as_raw_fd(), old) };
        }
        self.dir_watch = renewed;
        if self.parent_watch.is_none() {
            self.parent_watch = self
                .entry
                .as_ref()
                .and_then(|(parent, _)| self.add_watch(parent, REPLACED_EVENTS | SELF_EVENTS));
        }
    }

    /// Waits for a change, then for [`DEBOUNCE`] without any further one, or
    /// [`MAX_DELAY`] after the change, whichever comes first.
    pub async fn changed(&mut self) -> io::Result<()> {
        loop {
            if self.dir_watch.is_none() {
                // The directory is gone: look for it again now and then.
                tokio::time::sleep(DEBOUNCE).await;
                self.renew();
                if self.dir_watch.is_some() {
                    break;
                }
                continue;
            }
            if self.drain().await? {
                break;
            }
        }
        let deadline = Instant::now() + MAX_DELAY;
        loop {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            match tokio::time::timeout_at((now + DEBOUNCE).min(deadline), self.drain()).await {
                Ok(result) => {
                    result?;
                }
                Err(_quiet) => break,
            }
        }
        Ok(())
    }

    /// Reads pending events; true if one of them may change the state.
    async fn drain(&mut self) -> io::Result<bool> {
        let mut buffer = [0u8; 4096];
        if self.readable.is_none() {
            let duplicate = self.inotify.try_clone()?;
            // SAFETY: an OwnedFd keeps returning its own open descriptor until dropped with the AsyncFd.
            let registered =
                unsafe { AsyncFd::register_with_interest(duplicate, Interest::READABLE) }?;
            self.readable = Some(registered);
        }
        let readable = self.readable.as_ref().expect("registered above");
        let mut guard = readable.readable().await?;
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
        let mut replaced = false;
        let mut offset = 0;
        let header = std::mem::size_of::<libc::inotify_event>();
        while offset + header <= len {
            // SAFETY: the kernel wrote whole events; read_unaligned copes with any alignment.
            let event: libc::inotify_event =
                unsafe { std::ptr::read_unaligned(buffer[offset..].as_ptr().cast()) };
            let name_bytes = &buffer[offset + header..offset + header + event.len as usize];
            // The name is NUL-padded.
            let name = OsStr::from_bytes(name_bytes.split(|&b| b == 0).next().unwrap_or_default());
            offset += header + event.len as usize;
            if Some(event.wd) == self.dir_watch {
                if event.mask & SELF_EVENTS != 0 {
                    self.dir_watch = None;
                }
                changed |= event.mask & (ENTRY_EVENTS | SELF_EVENTS) != 0;
            } else if Some(event.wd) == self.parent_watch {
                if event.mask & SELF_EVENTS != 0 {
                    self.parent_watch = None;
                    replaced = true;
                }
                let ours = self.entry.as_ref().is_some_and(|(_, n)| n == name);
                replaced |= ours && event.mask & REPLACED_EVENTS != 0;
            }
            // Anything else is from a watch dropped by `renew`.
        }
        if replaced {
            self.renew();
        }
        Ok(changed || replaced)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    /// Waits for `watch` to report a change, failing the test after `limit`.
    async fn change_within(watch: &mut StateWatch, limit: Duration, what: &str) {
        tokio::time::timeout(limit, watch.changed())
            .await
            .unwrap_or_else(|_| panic!("no reload within {limit:?} after {what}"))
            .expect("the watch works");
    }

    #[test]
    fn a_change_made_before_the_first_wait_is_seen_by_it() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        // Placed outside any runtime, as the agent places it before its first read.
        let mut watch = StateWatch::new(dir.path()).expect("watch");
        std::fs::write(dir.path().join("pods.yaml"), "x").expect("write");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        runtime.block_on(change_within(
            &mut watch,
            Duration::from_secs(2),
            "a write before the first wait",
        ));
    }

    #[tokio::test]
    async fn a_directory_written_continuously_still_reloads_within_two_seconds() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let mut watch = StateWatch::new(dir.path()).expect("watch");
        let file = dir.path().join("pods.yaml");
        let writer = tokio::spawn(async move {
            for i in 0u64.. {
                std::fs::write(&file, i.to_string()).expect("write");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        let started = Instant::now();
        change_within(&mut watch, Duration::from_secs(4), "a change every 100 ms").await;
        writer.abort();
        let waited = started.elapsed();
        assert!(
            waited <= Duration::from_millis(2500),
            "reloaded after {waited:?}"
        );
    }

    #[tokio::test]
    async fn a_re_pointed_state_directory_symlink_is_a_change_and_is_followed() {
        let root = tempfile::tempdir().expect("a temporary directory");
        for version in ["v1", "v2"] {
            std::fs::create_dir(root.path().join(version)).expect("a version directory");
        }
        let state = root.path().join("state");
        std::os::unix::fs::symlink("v1", &state).expect("symlink");
        let mut watch = StateWatch::new(&state).expect("watch");

        // Re-pointed atomically, as deployment tools do: a new link renamed over.
        std::os::unix::fs::symlink("v2", root.path().join("state.new")).expect("symlink");
        std::fs::rename(root.path().join("state.new"), &state).expect("rename");
        change_within(&mut watch, Duration::from_secs(2), "the symlink swap").await;

        std::fs::write(root.path().join("v2/pods.yaml"), "x").expect("write");
        change_within(
            &mut watch,
            Duration::from_secs(2),
            "a write in the new target",
        )
        .await;
    }
}
