//! The other end of the control socket, for `gpulet status` and the local commands.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

/// Why a request got no reply.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot reach the agent at {path}: {error} (is gpulet running? `systemctl status gpulet`; another socket: --socket PATH)"
    )]
    Connect { path: String, error: std::io::Error },
    #[error("the agent at {path} did not answer: {error}")]
    Io { path: String, error: std::io::Error },
    #[error("the agent at {path} answered something that is not a reply: {error}")]
    Reply { path: String, error: String },
}

/// How long to wait for a reply (the agent answers within its own loop timeout).
const TIMEOUT: Duration = Duration::from_secs(10);

/// Send one request, return the reply (`"ok"` says whether it succeeded).
pub fn request(path: &Path, request: &Value) -> Result<Value, ClientError> {
    let shown = path.display().to_string();
    let mut stream = UnixStream::connect(path)
        .map_err(|error| ClientError::Connect { path: shown.clone(), error })?;
    let io = |error| ClientError::Io { path: shown.clone(), error };
    stream.set_read_timeout(Some(TIMEOUT)).map_err(io)?;
    let mut line = serde_json::to_vec(request).expect("JSON serialises");
    line.push(b'\n');
    stream.write_all(&line).map_err(io)?;
    let mut reply = String::new();
    BufReader::new(&stream).read_line(&mut reply).map_err(io)?;
    serde_json::from_str(&reply)
        .map_err(|e| ClientError::Reply { path: shown.clone(), error: e.to_string() })
}
