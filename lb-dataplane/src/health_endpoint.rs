//! A node's health over HTTP, for the health-check sidecars of the muxes (which run on other
//! hosts and cannot reach the node's Unix control socket): `GET /healthz` answers `200 healthy`
//! while the node's own health function says so and `503 unhealthy` otherwise; any other path
//! is `404`.
//!
//! Invariant: the answer is computed per request from the node's live state (never cached), and
//! the server stops answering once the node is stopping, so a sidecar sees a dying node fail
//! at once. One thread; no request can block the packet path.

use std::io;
use std::net::SocketAddr;
use std::thread::{self, JoinHandle};
use std::time::Duration;

/// The path that answers.
pub const HEALTH_PATH: &str = "/healthz";

/// How often the server looks at `stopping` while idle.
const POLL: Duration = Duration::from_millis(100);

/// Serves [`HEALTH_PATH`] on `address` from a thread until `stopping()` is true.
pub fn serve(
    address: SocketAddr,
    healthy: impl Fn() -> bool + Send + 'static,
    stopping: impl Fn() -> bool + Send + 'static,
) -> io::Result<JoinHandle<()>> {
    let server = tiny_http::Server::http(address)
        .map_err(|e| io::Error::other(format!("health endpoint {address}: {e}")))?;
    tracing::info!(%address, path = HEALTH_PATH, "health endpoint");
    thread::Builder::new()
        .name("lb-health".into())
        .spawn(move || {
            while !stopping() {
                let request = match server.recv_timeout(POLL) {
                    Ok(Some(request)) => request,
                    Ok(None) => continue,
                    Err(e) => {
                        tracing::warn!(error = %e, "health endpoint");
                        thread::sleep(POLL);
                        continue;
                    }
                };
                let (status, body) = if request.url() != HEALTH_PATH {
                    (404, "not found\n")
                } else if healthy() && !stopping() {
                    (200, "healthy\n")
                } else {
                    (503, "unhealthy\n")
                };
                let response = tiny_http::Response::from_string(body).with_status_code(status);
                if let Err(e) = request.respond(response) {
                    tracing::debug!(error = %e, "health endpoint: reply not sent");
                }
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    fn get(address: SocketAddr, path: &str) -> String {
        let mut stream = TcpStream::connect(address).unwrap();
        write!(stream, "GET {path} HTTP/1.0\r\n\r\n").unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        answer.lines().next().unwrap_or_default().to_owned()
    }

    #[test]
    fn answers_from_live_state_and_stops() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        drop(listener);
        let healthy = Arc::new(AtomicBool::new(true));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (h, s) = (Arc::clone(&healthy), Arc::clone(&stop));
            serve(
                address,
                move || h.load(Ordering::Relaxed),
                move || s.load(Ordering::Relaxed),
            )
            .unwrap()
        };
        assert!(get(address, HEALTH_PATH).contains(" 200 "));
        assert!(get(address, "/other").contains(" 404 "));
        healthy.store(false, Ordering::Relaxed);
        assert!(get(address, HEALTH_PATH).contains(" 503 "));
        stop.store(true, Ordering::Relaxed);
        thread.join().unwrap();
        // tiny_http's acceptor thread closes the listener shortly after the server is dropped.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while TcpStream::connect(address).is_ok() {
            assert!(
                std::time::Instant::now() < deadline,
                "the endpoint still answers after stop"
            );
            thread::sleep(Duration::from_millis(20));
        }
    }
}
