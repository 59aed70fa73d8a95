//! Control sockets: one JSON request per line in, one JSON reply per line out. Each daemon
//! defines its requests (a serde enum) and answers them; `vswitch ctl` and `vdisk ctl` are
//! the clients. A reply with an `error` key is a refusal, and the client reports its text.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};
use tracing::warn;

use crate::socket::ClaimedSocket;

/// Answer the control socket's clients one after the other, forever (run it on its own
/// thread). A line that is not a valid `R` gets an error reply naming what was wrong.
pub fn serve<R: DeserializeOwned>(sock: &ClaimedSocket, mut handle: impl FnMut(R) -> Value) {
    loop {
        match sock.listener.accept() {
            Ok(Some(stream)) => {
                if let Err(e) = session(stream, &mut handle) {
                    warn!("control session: {e}");
                }
            }
            Ok(None) => {}
            Err(e) => {
                warn!("control socket: {e}");
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
    }
}

fn session<R: DeserializeOwned>(
    stream: UnixStream,
    handle: &mut impl FnMut(R) -> Value,
) -> std::io::Result<()> {
    let mut out = stream.try_clone()?;
    for line in BufReader::new(stream).lines() {
        let line = line?;
        let reply = match serde_json::from_str::<R>(&line) {
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
    writeln!(w, "{line}").map_err(|e| format!("cannot send to {}: {e}", path.display()))?;
    let mut reply = String::new();
    BufReader::new(stream)
        .read_line(&mut reply)
        .map_err(|e| format!("no reply from {}: {e}", path.display()))?;
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
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ctl.sock");
        let sock = crate::socket::claim(&path).expect("claim");
        std::thread::spawn(move || {
            serve(&sock, |r: Req| match r {
                Req::Echo { text } => json!({ "echo": text }),
                Req::Refuse => json!({ "error": "no" }),
            })
        });
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
}
