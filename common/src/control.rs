//! Control sockets: one JSON request per line in, one JSON reply per line out. Each daemon
//! defines its requests (a serde enum) and answers them; `vswitch ctl` and `vdisk ctl` are
//! the clients. A reply with an `error` key is a refusal, and the client reports its text.

//!
//! The server answers each client on its own thread, up to [`MAX_CLIENTS`] at once, so a
//! slow client holds up only itself. A request line is at most [`MAX_REQUEST`] bytes and
//! must arrive whole within [`IO_TIMEOUT`] of the previous reply, a session answers at
//! most 1024 requests; only the peers the [`PeerPolicy`] allows are served.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};
use tracing::warn;

use crate::access::{peer_cred, PeerPolicy};
use crate::logging::LogLimit;
use crate::socket::ClaimedSocket;

/// Clients served at once; one more is told the daemon is busy.
pub const MAX_CLIENTS: usize = 16;
/// The longest request line; no request the daemons know comes near it.
pub const MAX_REQUEST: usize = 64 * 1024;
/// How long a client may take to send a request line, or to take a reply.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Answer the control socket's clients forever (run it on its own thread). A line that is
/// not a valid `R` gets an error reply naming what was wrong.
pub fn serve<R, H>(sock: &ClaimedSocket, policy: &PeerPolicy, handle: H)
where
    R: DeserializeOwned,
    H: Fn(R) -> Value + Send + Sync + 'static,
{
    let handle = Arc::new(handle);
    let active = Arc::new(AtomicUsize::new(0));
    let (refused_peer, refused_busy) = (LogLimit::new(), LogLimit::new());
    loop {
        let stream = match sock.listener.accept() {
            Ok(Some(stream)) => stream,
            Ok(None) => continue,
            Err(e) => {
                warn!("control socket: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        // Reads get their timeout from the session's deadline (`Deadline`).
        let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
        match peer_cred(&stream) {
            Ok(peer) if policy.allows(&peer) => {}
            Ok(peer) => {
                if let Some(suppressed) = refused_peer.check() {
                    warn!(
                        pid = peer.pid,
                        uid = peer.uid,
                        gid = peer.gid,
                        suppressed,
                        "control socket: refused a client whose user and groups are not allowed"
                    );
                }
                refuse(
                    stream,
                    &format!("uid {} is not allowed on this control socket", peer.uid),
                );
                continue;
            }
            Err(e) => {
                warn!("control socket: cannot read the client's credentials: {e}");
                continue;
            }
        }
        if active.fetch_add(1, Ordering::AcqRel) >= MAX_CLIENTS {
            active.fetch_sub(1, Ordering::AcqRel);
            if let Some(suppressed) = refused_busy.check() {
                warn!(
                    suppressed,
                    "control socket: {MAX_CLIENTS} clients already; refused one"
                );
            }
            refuse(stream, "busy: too many control clients at once");
            continue;
        }
        let (handle, done) = (handle.clone(), active.clone());
        let spawned = std::thread::Builder::new()
            .name("control-client".into())
            .spawn(move || {
                if let Err(e) = session(stream, &*handle) {
                    tracing::debug!("control session: {e}");
                }
                done.fetch_sub(1, Ordering::AcqRel);
            });
        if let Err(e) = spawned {
            active.fetch_sub(1, Ordering::AcqRel);
            warn!("control socket: cannot start a client thread: {e}");
        }
    }
}

fn refuse(mut stream: UnixStream, why: &str) {
    let _ = writeln!(stream, "{}", json!({ "error": why }));
}

/// Reads that must all be done by a deadline: a socket read timeout alone starts again
/// with every byte, so a client sending one byte at a time could hold its slot forever.
struct Deadline {
    stream: UnixStream,
    by: Instant,
}

impl Read for Deadline {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.by.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the request line took too long",
            ));
        }
        self.stream.set_read_timeout(Some(left))?;
        self.stream.read(buf)
    }
}

/// Requests one session may make: a client holds a slot for a bounded time, however
/// quickly it asks.
const MAX_SESSION_REQUESTS: usize = 1024;

fn session<R: DeserializeOwned>(
    stream: UnixStream,
    handle: &impl Fn(R) -> Value,
) -> std::io::Result<()> {
    let mut out = stream.try_clone()?;
    let mut input = BufReader::new(Deadline {
        stream,
        by: Instant::now() + IO_TIMEOUT,
    });
    let mut line = Vec::new();
    for _ in 0..MAX_SESSION_REQUESTS {
        // Each request line must arrive whole within IO_TIMEOUT of the last reply.
        input.get_mut().by = Instant::now() + IO_TIMEOUT;
        line.clear();
        // One byte past the limit tells an over-long line from one that just fits.
        let n = (&mut input)
            .take(MAX_REQUEST as u64 + 1)
            .read_until(b'\n', &mut line)?;
        if n == 0 {
            return Ok(());
        }
        // Without a newline within the limit the line is too long, unless the client
        // closed mid-line: then what it sent is answered.
        if line.last() != Some(&b'\n') && n > MAX_REQUEST {
            refuse(
                out,
                &format!("bad request: longer than {MAX_REQUEST} bytes"),
            );
            return Ok(());
        }
        let reply = match serde_json::from_slice::<R>(&line) {
            Ok(req) => handle(req),
            Err(e) => json!({ "error": format!("bad request: {e}") }),
        };
        writeln!(out, "{reply}")?;
    }
    Ok(())
}

/// The client side: send `req` to the control socket at `path` and return the reply, or
/// the daemon's refusal as the error.
pub fn request<R: Serialize>(path: &Path, req: &R) -> Result<Value, String> {
    let stream = UnixStream::connect(path).map_err(|e| {
        format!(
            "cannot connect to the control socket {}: {e}",
            path.display()
        )
    })?;
    let mut w = stream.try_clone().map_err(|e| e.to_string())?;
    let line = serde_json::to_string(req).map_err(|e| e.to_string())?;
    // A daemon that refuses the client says why and closes at once, maybe before the
    // request is sent: read its reply before reporting the failed send.
    let sent = writeln!(w, "{line}");
    let mut reply = String::new();
    let read = BufReader::new(stream).read_line(&mut reply);
    match (sent, read) {
        (_, Ok(n)) if n > 0 => {}
        (Err(e), _) => return Err(format!("cannot send to {}: {e}", path.display())),
        (Ok(()), Err(e)) => return Err(format!("no reply from {}: {e}", path.display())),
        (Ok(()), Ok(_)) => return Err(format!("{} closed without a reply", path.display())),
    }
    let v: Value = serde_json::from_str(&reply).map_err(|e| format!("bad reply: {e}"))?;
    if let Some(err) = v.get("error").and_then(Value::as_str) {
        return Err(err.to_string());
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Serialize, serde::Deserialize)]
    #[serde(tag = "cmd", rename_all = "kebab-case")]
    enum Req {
        Echo { text: String },
        Refuse,
    }

    #[test]
    fn request_reply_and_refusals() {
        let (_dir, path) = echo_server();
        let reply = request(
            &path,
            &Req::Echo {
                text: "hi".to_string(),
            },
        )
        .expect("echo");
        assert_eq!(reply["echo"], "hi");
        assert_eq!(request(&path, &Req::Refuse), Err("no".to_string()));
        assert!(request(&path, &json!({ "cmd": "nonsense" }))
            .expect_err("unknown request")
            .contains("bad request"));
    }

    fn echo_server() -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ctl.sock");
        let sock = crate::socket::claim(&path, &Default::default()).expect("claim");
        std::thread::spawn(move || {
            serve(&sock, &PeerPolicy::default(), |r: Req| match r {
                Req::Echo { text } => json!({ "echo": text }),
                Req::Refuse => json!({ "error": "no" }),
            })
        });
        (dir, path)
    }

    #[test]
    fn silent_clients_do_not_hold_up_others() {
        let (_dir, path) = echo_server();
        let silent: Vec<UnixStream> = (0..MAX_CLIENTS - 1)
            .map(|_| UnixStream::connect(&path).expect("connect"))
            .collect();
        let started = std::time::Instant::now();
        let reply = request(&path, &Req::Echo { text: "x".into() }).expect("echo");
        assert_eq!(reply["echo"], "x");
        assert!(
            started.elapsed() < IO_TIMEOUT / 2,
            "{:?}",
            started.elapsed()
        );
        drop(silent);
    }

    #[test]
    fn one_client_too_many_is_told_so() {
        let (_dir, path) = echo_server();
        let _silent: Vec<UnixStream> = (0..MAX_CLIENTS)
            .map(|_| UnixStream::connect(&path).expect("connect"))
            .collect();
        let mut err = String::new();
        // The server counts a client once it has accepted it; let it take all of them.
        for _ in 0..100 {
            match request(&path, &Req::Echo { text: "x".into() }) {
                Err(e) => {
                    err = e;
                    break;
                }
                Ok(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        assert!(err.contains("busy"), "{err}");
    }

    #[test]
    fn an_over_long_request_is_refused() {
        let (_dir, path) = echo_server();
        let mut s = UnixStream::connect(&path).expect("connect");
        let line = vec![b'x'; MAX_REQUEST + 100];
        // The server may close before taking it all.
        let _ = s.write_all(&line);
        let mut reply = String::new();
        BufReader::new(s).read_line(&mut reply).expect("reply");
        assert!(reply.contains("longer than"), "{reply}");
    }

    /// A client trickling a byte every 50 ms never lets a per-read timeout expire; the
    /// deadline ends its line all the same.
    #[test]
    fn a_trickling_client_meets_the_deadline() {
        let (ours, mut theirs) = UnixStream::pair().expect("socketpair");
        std::thread::spawn(move || {
            while theirs.write_all(b"x").is_ok() {
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let started = Instant::now();
        let mut input = BufReader::new(Deadline {
            stream: ours,
            by: Instant::now() + Duration::from_millis(300),
        });
        let mut line = Vec::new();
        let err = input
            .read_until(b'\n', &mut line)
            .expect_err("no newline ever comes");
        assert!(
            matches!(
                err.kind(),
                std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
            ),
            "{err}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
    }
}
