//! The control socket: a Unix stream socket (mode 0600) speaking line-delimited JSON, one
//! request object per line, one answer object per line (see [`crate::control::Request`]).
//!
//! The server runs one thread to accept and one thread per connection (the clients are
//! operators and the health-check sidecar: a handful). What a client can make it hold is
//! bounded:
//! - at most [`MAX_CONNECTIONS`] connections at once; one more is answered with an error line
//!   and closed (counted in `lb_control_connections_refused_total`);
//! - a connection with no request for [`IDLE_TIMEOUT`] is closed;
//! - a line longer than [`MAX_LINE`] bytes is answered with an error and the connection closed.
//!
//! Every line gets exactly one answer line, a blank or malformed one an error, so a client
//! never waits for an answer that does not come.
//!
//! **Invariant.** Nothing here touches the hot path: requests go to a [`ControlHandler`] (the
//! mux's [`crate::control::ControlPlane`], the agent), which publishes snapshots or reads
//! counters.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// What answers a control socket's requests.
pub trait ControlHandler: Send + Sync + 'static {
    /// Answers one request line with a JSON object that has `"ok"`.
    fn handle_line(&self, line: &str) -> Value;
    /// Whether the process is stopping (the server stops accepting then).
    fn stopping(&self) -> bool;
}

/// The longest request line accepted.
pub const MAX_LINE: usize = 64 * 1024;
/// The most connections served at once.
pub const MAX_CONNECTIONS: usize = 32;
/// A connection without a request for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
const TICK: Duration = Duration::from_millis(100);

/// Counts a live connection; the count goes down when it is dropped.
struct ConnectionSlot(Arc<AtomicUsize>);

impl ConnectionSlot {
    /// Takes a slot if fewer than [`MAX_CONNECTIONS`] are taken.
    fn take(count: &Arc<AtomicUsize>) -> Option<Self> {
        count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_CONNECTIONS).then_some(n + 1)
            })
            .ok()
            .map(|_| Self(Arc::clone(count)))
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A listening control socket; removes its file when dropped.
#[derive(Debug)]
pub struct ControlSocket {
    path: PathBuf,
    thread: Option<JoinHandle<()>>,
}

impl ControlSocket {
    /// Binds `path` (mode 0600; its directory is created with mode 0700 if missing) and serves
    /// `plane` until it is stopping. Refuses a path where a live server answers, or that is not
    /// a socket; replaces a stale socket.
    pub fn serve(plane: Arc<dyn ControlHandler>, path: &Path) -> io::Result<Self> {
        let context = |what: &str, e: io::Error| {
            io::Error::new(
                e.kind(),
                format!("control socket {}: {what}: {e}", path.display()),
            )
        };
        if let Some(dir) = path.parent()
            && !dir.as_os_str().is_empty()
            && !dir.exists()
        {
            std::fs::create_dir_all(dir).map_err(|e| context("creating its directory", e))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| context("chmod 0700 of its directory", e))?;
        }
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            if !meta.file_type().is_socket() {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!(
                        "control socket {}: the path exists and is not a socket; refusing to replace it",
                        path.display()
                    ),
                ));
            }
            if UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!(
                        "control socket {}: another process is serving it",
                        path.display()
                    ),
                ));
            }
            std::fs::remove_file(path).map_err(|e| context("removing the stale socket", e))?;
        }
        let listener = UnixListener::bind(path).map_err(|e| context("bind", e))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| context("chmod 0600", e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| context("set_nonblocking", e))?;
        let thread = thread::Builder::new()
            .name("lb-control".into())
            .spawn(move || accept_loop(&plane, &listener))?;
        Ok(Self {
            path: path.to_owned(),
            thread: Some(thread),
        })
    }

    /// The socket's path.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            // The accept loop ends by itself once shutdown is set; do not wait for it otherwise.
            if t.is_finished() {
                let _ = t.join();
            }
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn accept_loop(plane: &Arc<dyn ControlHandler>, listener: &UnixListener) {
    let live = Arc::new(AtomicUsize::new(0));
    while !plane.stopping() {
        match listener.accept() {
            Ok((stream, _)) => {
                let Some(slot) = ConnectionSlot::take(&live) else {
                    metrics::counter!("lb_control_connections_refused_total").increment(1);
                    tracing::warn!(
                        limit = MAX_CONNECTIONS,
                        "control connection refused: too many open"
                    );
                    refuse(stream);
                    continue;
                };
                let plane = Arc::clone(plane);
                let spawned =
                    thread::Builder::new()
                        .name("lb-control-conn".into())
                        .spawn(move || {
                            let _slot = slot;
                            if let Err(e) = serve_connection(plane.as_ref(), stream) {
                                tracing::debug!(error = %e, "control connection ended");
                            }
                        });
                if let Err(e) = spawned {
                    tracing::warn!(error = %e, "cannot start a control connection thread");
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => thread::sleep(TICK),
            Err(e) => {
                tracing::warn!(error = %e, "control socket accept failed");
                thread::sleep(TICK);
            }
        }
    }
}

/// Answers a connection over the limit with one error line, without waiting for it.
fn refuse(mut stream: UnixStream) {
    let _ = stream.set_nonblocking(true);
    let answer = json!({"ok": false, "error": format!("too many control connections (at most {MAX_CONNECTIONS}); try again")});
    let _ = writeln!(stream, "{answer}");
}

fn serve_connection(plane: &dyn ControlHandler, stream: UnixStream) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(TICK))?;
    stream.set_write_timeout(Some(IDLE_TIMEOUT))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    let mut last_request = Instant::now();
    loop {
        if plane.stopping() {
            return Ok(());
        }
        if last_request.elapsed() >= IDLE_TIMEOUT {
            // Closed without a word: a line nobody asked for would be read as the answer to
            // the client's next request.
            tracing::debug!("closing an idle control connection");
            return Ok(());
        }
        let limit = (MAX_LINE + 1 - line.len()) as u64;
        match (&mut reader).take(limit).read_until(b'\n', &mut line) {
            Ok(0) => return Ok(()),
            Ok(_) if line.last() != Some(&b'\n') => {
                if line.len() > MAX_LINE {
                    let answer = json!({"ok": false, "error": format!("request line longer than {MAX_LINE} bytes")});
                    writeln!(writer, "{answer}")?;
                    return Ok(());
                }
                // End of input without a newline: answer what there is.
                if !line.is_empty() {
                    answer_line(plane, &line, &mut writer)?;
                }
                return Ok(());
            }
            Ok(_) => {
                answer_line(plane, &line, &mut writer)?;
                line.clear();
                last_request = Instant::now();
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e),
        }
    }
}

fn answer_line(plane: &dyn ControlHandler, line: &[u8], writer: &mut UnixStream) -> io::Result<()> {
    let text = String::from_utf8_lossy(line);
    let text = text.trim();
    let answer = if text.is_empty() {
        json!({"ok": false, "error": "empty request: send one JSON object per line, such as {\"command\":\"status\"}"})
    } else {
        plane.handle_line(text)
    };
    writeln!(writer, "{answer}")?;
    writer.flush()
}

/// Reads a request to a process that answers only `status` (the agent, the sidecar): Ok for
/// exactly `{"command":"status"}`, otherwise the error answer, naming `who` and what was wrong
/// (not JSON, not an object, another command, a field `status` does not have).
pub fn status_request(line: &str, who: &str) -> Result<(), Value> {
    let fail = |error: String| json!({"ok": false, "error": error});
    let value: Value = serde_json::from_str(line).map_err(|e| fail(format!("bad request: {e}")))?;
    let Some(object) = value.as_object() else {
        return Err(fail(
            "bad request: a request is a JSON object, such as {\"command\":\"status\"}".into(),
        ));
    };
    if value["command"] != "status" {
        return Err(fail(format!(
            "unknown command {}; the {who} answers \"status\"",
            value["command"]
        )));
    }
    let unknown: Vec<&str> = object
        .keys()
        .map(String::as_str)
        .filter(|k| *k != "command")
        .collect();
    if unknown.is_empty() {
        Ok(())
    } else {
        Err(fail(format!(
            "bad request: unknown field(s) {} for command \"status\"",
            unknown.join(", ")
        )))
    }
}

/// A connection to a control socket that stays open for many requests (the health-check
/// sidecar's link to a mux: when it breaks, the mux restarted or went away).
#[derive(Debug)]
pub struct ControlClient {
    path: PathBuf,
    writer: UnixStream,
    reader: BufReader<UnixStream>,
}

impl ControlClient {
    /// Connects to the control socket at `path`; each answer must come within `timeout`.
    pub fn connect(path: &Path, timeout: Duration) -> io::Result<Self> {
        let stream = UnixStream::connect(path).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "cannot connect to the control socket {}: {e} (is the node running? see --socket)",
                    path.display()
                ),
            )
        })?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        Ok(Self {
            path: path.to_owned(),
            writer: stream.try_clone()?,
            reader: BufReader::new(stream),
        })
    }

    /// Sends one request and reads its answer. After an error the connection is unusable.
    pub fn ask(&mut self, request: &Value) -> io::Result<Value> {
        self.ask_line(&request.to_string())
    }

    /// [`ControlClient::ask`] with the request already serialized: one JSON object, no newline.
    pub fn ask_line(&mut self, request: &str) -> io::Result<Value> {
        writeln!(self.writer, "{request}")?;
        self.writer.flush()?;
        let mut answer = String::new();
        if self.reader.read_line(&mut answer)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{} closed the connection", self.path.display()),
            ));
        }
        serde_json::from_str(&answer).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad answer from {}: {e}: {answer:?}", self.path.display()),
            )
        })
    }
}

/// Sends one request to the control socket at `path` and returns the answer.
pub fn request(path: &Path, request: &Value) -> io::Result<Value> {
    ControlClient::connect(path, Duration::from_secs(10))?.ask(request)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_only_process_refuses_other_commands_fields_and_non_objects() {
        assert_eq!(status_request(r#"{"command":"status"}"#, "agent"), Ok(()));
        for (line, says) in [
            (
                r#"{"command":"status","verbose":1}"#,
                "unknown field(s) verbose",
            ),
            (r#"{"command":"reload"}"#, "the agent answers \"status\""),
            (r#"["status"]"#, "JSON object"),
            ("status", "bad request"),
        ] {
            let answer = status_request(line, "agent").unwrap_err();
            assert_eq!(answer["ok"], false);
            assert!(
                answer["error"].as_str().unwrap().contains(says),
                "{line}: {answer}"
            );
        }
    }
}
