//! [`ConfigWatch`]: notices that a config file has new contents, and offers them only once the
//! file is complete, never a half-written one.
//!
//! A file being rewritten in place (a slow `cat >`, scp, an editor that truncates and writes)
//! passes through every prefix of its new contents, and a prefix is often a valid config: one
//! without the last VIPs or backends. Publishing it would move or drop traffic. So a change is
//! offered only when:
//! - no write is in progress: inotify on the file's directory saw the file closed after its
//!   last write, or a complete file renamed into place (a writer that holds the file open but
//!   has not written for [`WRITER_IDLE`] is taken as done); without inotify, this is skipped;
//! - and the contents stayed the same for [`SETTLE`] ([`SETTLE_WITHOUT_INOTIFY`] without
//!   inotify), read twice that far apart.
//!
//! The file is read with [`lb_core::config::read_config_file`]: only a regular file, opened
//! without blocking, of bounded size, so no path (a FIFO, `/dev/zero`) can wedge or exhaust the
//! process that polls.
//!
//! **Invariant.** [`ConfigWatch::poll`] never blocks, and offers each distinct content at most
//! once in a row: a rewrite with the same contents as the last offered ones is never offered.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use inotify::{EventMask, Inotify, WatchMask};
use lb_core::hash::xxh3;

/// How often the owner should call [`ConfigWatch::poll`].
pub const TICK: Duration = Duration::from_millis(250);
/// How long contents must stay the same before they are offered (with inotify).
pub const SETTLE: Duration = Duration::from_millis(500);
/// The same without inotify, where only the contents tell that a writer is done.
pub const SETTLE_WITHOUT_INOTIFY: Duration = Duration::from_millis(1500);
/// A writer that keeps the file open without writing for this long is taken as done.
pub const WRITER_IDLE: Duration = Duration::from_secs(5);

/// The digest of a config file's contents, as [`ConfigWatch`] compares them.
#[must_use]
pub fn digest(bytes: &[u8]) -> u64 {
    xxh3(bytes, 0)
}

/// What [`ConfigWatch::poll`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Change {
    /// New, complete contents, with their digest.
    Ready(Vec<u8>, u64),
    /// The file cannot be read (missing, not a regular file, too large): the reason, reported
    /// once until it changes.
    Unreadable(String),
}

/// Watches one config file; see the module docs.
#[derive(Debug)]
pub struct ConfigWatch {
    path: PathBuf,
    name: Option<OsString>,
    inotify: Option<Inotify>,
    /// A write was seen, and no close-after-write or rename since; with its last write.
    writing: Option<Instant>,
    /// Contents seen changed, not yet offered: digest and when first seen so.
    candidate: Option<(u64, Instant)>,
    /// The digest last offered (or loaded at start).
    offered: Option<u64>,
    /// The last unreadable reason reported.
    unreadable: Option<String>,
}

impl ConfigWatch {
    /// Watches `path`, whose contents with digest `loaded` are in force. inotify is optional: if
    /// it cannot be set up, the watch relies on the contents settling for longer.
    #[must_use]
    pub fn new(path: &Path, loaded: Option<u64>) -> Self {
        let name = path.file_name().map(ToOwned::to_owned);
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
            _ => PathBuf::from("."),
        };
        let inotify = Inotify::init().ok().and_then(|i| {
            i.watches()
                .add(
                    &dir,
                    WatchMask::MODIFY
                        | WatchMask::CLOSE_WRITE
                        | WatchMask::MOVED_TO
                        | WatchMask::DELETE
                        | WatchMask::MOVED_FROM,
                )
                .ok()
                .map(|_| i)
        });
        if inotify.is_none() {
            tracing::warn!(
                dir = %dir.display(),
                "inotify is not available for the config's directory: a changed file is applied once its contents stay the same for {SETTLE_WITHOUT_INOTIFY:?}"
            );
        }
        Self {
            path: path.to_owned(),
            name,
            inotify,
            writing: None,
            candidate: None,
            offered: loaded,
            unreadable: None,
        }
    }

    /// Records that contents with `digest` are in force (read by an explicit reload), so the
    /// watch does not offer them again.
    pub fn loaded(&mut self, digest: u64) {
        self.offered = Some(digest);
        self.candidate = None;
    }

    /// Reads inotify's events: a write marks a writer active until the file is closed after
    /// writing, or replaced, deleted or renamed away.
    fn drain_events(&mut self, now: Instant) {
        let Some(inotify) = self.inotify.as_mut() else {
            return;
        };
        let mut buffer = [0u8; 4096];
        loop {
            // An error is WouldBlock: nothing more now.
            let Ok(events) = inotify.read_events(&mut buffer) else {
                return;
            };
            let mut any = false;
            for event in events {
                any = true;
                if event.mask.contains(EventMask::Q_OVERFLOW) {
                    // Events were lost: whether a writer is active is unknown; the contents
                    // must settle all the same.
                    self.writing = None;
                    continue;
                }
                if event.name != self.name.as_deref() {
                    continue;
                }
                if event.mask.contains(EventMask::MODIFY) {
                    self.writing = Some(now);
                } else if event.mask.intersects(
                    EventMask::CLOSE_WRITE
                        | EventMask::MOVED_TO
                        | EventMask::DELETE
                        | EventMask::MOVED_FROM,
                ) {
                    self.writing = None;
                }
            }
            if !any {
                return;
            }
        }
    }

    /// Looks at the file once; never blocks. See the module docs for when contents are offered.
    pub fn poll(&mut self) -> Option<Change> {
        let now = Instant::now();
        self.drain_events(now);
        if let Some(last_write) = self.writing {
            if now.duration_since(last_write) < WRITER_IDLE {
                self.candidate = None;
                return None;
            }
            self.writing = None;
        }
        let bytes = match lb_core::config::read_config_file(&self.path) {
            Ok(bytes) => bytes,
            Err(reason) => {
                self.candidate = None;
                if self.unreadable.as_ref() == Some(&reason) {
                    return None;
                }
                self.unreadable = Some(reason.clone());
                return Some(Change::Unreadable(reason));
            }
        };
        self.unreadable = None;
        let digest = digest(&bytes);
        if Some(digest) == self.offered {
            self.candidate = None;
            return None;
        }
        let settle = if self.inotify.is_some() {
            SETTLE
        } else {
            SETTLE_WITHOUT_INOTIFY
        };
        match self.candidate {
            Some((d, since)) if d == digest => {
                if now.duration_since(since) < settle {
                    return None;
                }
            }
            _ => {
                self.candidate = Some((digest, now));
                return None;
            }
        }
        self.candidate = None;
        self.offered = Some(digest);
        Some(Change::Ready(bytes, digest))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    /// Polls every [`TICK`] for `time`, collecting what is offered.
    fn poll_for(watch: &mut ConfigWatch, time: Duration) -> Vec<Change> {
        let end = Instant::now() + time;
        let mut seen = Vec::new();
        while Instant::now() < end {
            if let Some(c) = watch.poll() {
                seen.push(c);
            }
            std::thread::sleep(TICK / 5);
        }
        seen
    }

    #[test]
    fn a_slowly_written_file_is_offered_once_complete_and_never_a_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lb.toml");
        std::fs::write(&path, "a = 1\n").unwrap();
        let mut watch = ConfigWatch::new(&path, Some(digest(b"a = 1\n")));
        assert_eq!(poll_for(&mut watch, Duration::from_millis(300)), vec![]);
        // A slow writer: one line every 120 ms, the file open throughout.
        let lines: Vec<String> = (0..12).map(|i| format!("line{i} = {i}\n")).collect();
        let writer = {
            let path = path.clone();
            let lines = lines.clone();
            std::thread::spawn(move || {
                let mut f = std::fs::File::create(&path).unwrap();
                for l in lines {
                    f.write_all(l.as_bytes()).unwrap();
                    f.flush().unwrap();
                    std::thread::sleep(Duration::from_millis(120));
                }
            })
        };
        let seen = poll_for(&mut watch, Duration::from_secs(4));
        writer.join().unwrap();
        let full = lines.concat().into_bytes();
        assert_eq!(seen, vec![Change::Ready(full.clone(), digest(&full))]);
    }

    #[test]
    fn appends_closing_after_each_line_are_offered_only_when_they_stop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lb.toml");
        std::fs::write(&path, "").unwrap();
        let mut watch = ConfigWatch::new(&path, Some(digest(b"")));
        let writer = {
            let path = path.clone();
            std::thread::spawn(move || {
                for i in 0..10 {
                    let mut f = std::fs::OpenOptions::new()
                        .append(true)
                        .open(&path)
                        .unwrap();
                    writeln!(f, "line{i} = {i}").unwrap();
                    drop(f);
                    std::thread::sleep(Duration::from_millis(120));
                }
            })
        };
        let seen = poll_for(&mut watch, Duration::from_secs(4));
        writer.join().unwrap();
        let full = std::fs::read(&path).unwrap();
        assert_eq!(seen, vec![Change::Ready(full.clone(), digest(&full))]);
    }

    #[test]
    fn the_same_contents_rewritten_are_not_offered() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lb.toml");
        let text = "x = 1\ny = 2\n";
        std::fs::write(&path, text).unwrap();
        let mut watch = ConfigWatch::new(&path, Some(digest(text.as_bytes())));
        let mut f = std::fs::File::create(&path).unwrap();
        for line in text.split_inclusive('\n') {
            f.write_all(line.as_bytes()).unwrap();
            std::thread::sleep(Duration::from_millis(150));
            assert_eq!(watch.poll(), None);
        }
        drop(f);
        assert_eq!(poll_for(&mut watch, Duration::from_millis(1200)), vec![]);
    }

    #[test]
    fn a_rename_into_place_is_offered_and_a_fifo_is_reported_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lb.toml");
        std::fs::write(&path, "old = 1\n").unwrap();
        let mut watch = ConfigWatch::new(&path, Some(digest(b"old = 1\n")));
        let staged = dir.path().join(".lb.toml.new");
        std::fs::write(&staged, "new = 2\n").unwrap();
        std::fs::rename(&staged, &path).unwrap();
        let seen = poll_for(&mut watch, Duration::from_millis(1200));
        assert_eq!(
            seen,
            vec![Change::Ready(b"new = 2\n".to_vec(), digest(b"new = 2\n"))]
        );

        std::fs::remove_file(&path).unwrap();
        let status = std::process::Command::new("mkfifo")
            .arg(&path)
            .status()
            .unwrap();
        assert!(status.success());
        let started = Instant::now();
        let seen = poll_for(&mut watch, Duration::from_millis(600));
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "a FIFO blocked the watch"
        );
        assert_eq!(seen.len(), 1, "{seen:?}");
        let Change::Unreadable(reason) = &seen[0] else {
            panic!("{seen:?}")
        };
        assert!(reason.contains("FIFO"), "{reason}");
    }
}
