//! Writing output files: packed files get a warning when their arena is large, and an interrupt
//! (Ctrl-C or SIGTERM) during a write removes the temporary file instead of leaving it beside the
//! output.

use std::path::Path;

use anyhow::Result;

use edgefold_compressor::writer::{temporary_path, write_atomic};
use edgefold_runtime::format::Header;
use edgefold_runtime::{Model, OpenOptions};

use crate::kind::PackedKind;

/// Arena size above which `compress` warns, in bytes.
const LARGE_ARENA_BYTES: u64 = 1 << 30;

/// Writes the packed file `bytes` to `path` as [`write_output`] does, after warning when the arena
/// that it plans exceeds [`LARGE_ARENA_BYTES`].
pub fn write_packed(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Ok(header) = Header::parse(bytes) {
        if header.arena_bytes > LARGE_ARENA_BYTES {
            warn_large_arena(path, bytes, header.arena_bytes);
        }
    }
    write_output(path, bytes)
}

/// Warns that the packed file `bytes`, to be written to `path`, plans an arena of `arena_bytes`,
/// naming the subcommands that allocate it and, for its kind, the options that set its size.
fn warn_large_arena(path: &Path, bytes: &[u8], arena_bytes: u64) {
    let options = OpenOptions { verify_weights: false };
    let kind = Model::open_with(bytes, options).map_or(PackedKind::Graph, |m| PackedKind::of(&m));
    let (users, fix) = match kind {
        PackedKind::LanguageModel => (
            "`generate`, `eval --task ppl`",
            "compress again with a smaller --max-seq unless the target has that much memory",
        ),
        PackedKind::Translator => (
            "`translate`, `eval --task bleu`",
            "check that the target has that much memory, because no option of `compress` \
             makes it smaller",
        ),
        PackedKind::Graph | PackedKind::SentenceEncoder => (
            "`run`, `bench`, `embed`, `eval`",
            "compress again with a smaller --max-seq or --max-batch unless the target has that \
             much memory",
        ),
    };
    log::warn!(
        "{} plans an arena of {:.1} MiB, which {users} and the device allocate when they load \
         it; {fix}",
        path.display(),
        arena_bytes as f64 / (1u64 << 20) as f64
    );
}

/// Writes `bytes` to `path` through [`write_atomic`]. On Unix, SIGINT or SIGTERM during the write
/// removes the temporary file and ends the process with status 128 + the signal number.
pub fn write_output(path: &Path, bytes: &[u8]) -> Result<()> {
    #[cfg(unix)]
    let _cleanup = interrupt::RemoveOnInterrupt::register(&temporary_path(path));
    #[cfg(not(unix))]
    let _ = temporary_path;
    write_atomic(path, bytes)?;
    Ok(())
}

#[cfg(unix)]
mod interrupt {
    use std::ffi::{c_char, c_int, CString};
    use std::os::unix::ffi::OsStrExt;
    use std::path::Path;
    use std::ptr::null_mut;
    use std::sync::atomic::{AtomicPtr, Ordering};

    /// The temporary file that the signal handler removes, as a NUL-terminated path, or null.
    static PENDING: AtomicPtr<c_char> = AtomicPtr::new(null_mut());

    const SIGNALS: [c_int; 2] = [libc::SIGINT, libc::SIGTERM];

    extern "C" fn remove_pending_and_exit(signal: c_int) {
        let path = PENDING.load(Ordering::SeqCst);
        if !path.is_null() {
            // SAFETY: a non-null `PENDING` points to a string that `register` leaked, so it stays
            // valid for the rest of the process; `unlink` is async-signal-safe.
            unsafe { libc::unlink(path) };
        }
        // SAFETY: `_exit` is async-signal-safe and runs no destructors or exit handlers.
        unsafe { libc::_exit(128 + signal) };
    }

    /// A registration of a temporary file for removal on SIGINT or SIGTERM, undone on drop.
    pub struct RemoveOnInterrupt {
        previous: [libc::sighandler_t; 2],
    }

    impl RemoveOnInterrupt {
        /// Installs the handler for `path`. A signal that the process ignores stays ignored,
        /// as it does for a command started with `nohup` or in the background of a script.
        pub fn register(path: &Path) -> RemoveOnInterrupt {
            // A path with an interior NUL cannot be created, so there is nothing to remove.
            let pointer = CString::new(path.as_os_str().as_bytes()).map_or(null_mut(), |c| {
                // Leaked on purpose: the handler may still read the string after `drop` clears
                // `PENDING`, so it is never freed. It costs one path per write.
                c.into_raw()
            });
            PENDING.store(pointer, Ordering::SeqCst);
            let handler = remove_pending_and_exit as extern "C" fn(c_int) as libc::sighandler_t;
            let mut previous = [libc::SIG_DFL; 2];
            for (signal, previous) in SIGNALS.into_iter().zip(&mut previous) {
                // SAFETY: the handler only calls the async-signal-safe `unlink` and `_exit`.
                *previous = unsafe { libc::signal(signal, handler) };
                if *previous == libc::SIG_IGN {
                    // SAFETY: restores the ignored disposition that was just replaced.
                    unsafe { libc::signal(signal, libc::SIG_IGN) };
                }
            }
            RemoveOnInterrupt { previous }
        }
    }

    impl Drop for RemoveOnInterrupt {
        fn drop(&mut self) {
            for (signal, previous) in SIGNALS.into_iter().zip(self.previous) {
                // SAFETY: reinstalls the disposition that `register` found.
                unsafe { libc::signal(signal, previous) };
            }
            PENDING.store(null_mut(), Ordering::SeqCst);
        }
    }
}
