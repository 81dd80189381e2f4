//! Internals exposed for fuzz targets (e.g. cargo-fuzz); not a stable API.
//!
//! - The request splitter: [`InputBuffer::new`]`(max)`, [`InputBuffer::push`]`(&[u8])` and
//!   `Iterator::next() -> Option<`[`Input`]`>`.
//! - The whole server without a socket: [`session`] runs one client over an in-memory pipe
//!   (through the public [`QmpServer::serve_connection`], which takes any
//!   `AsyncRead + AsyncWrite` stream) and returns what the server wrote.
//!
//! ```
//! use std::sync::Arc;
//! use colo_blk::qmp::fuzzing::{session, Input, InputBuffer};
//! use colo_blk::qmp::{CommandHandler, EventSender, QmpError, QmpServer, QmpVersion};
//! use serde_json::{Map, Value};
//!
//! let mut buf = InputBuffer::new(1 << 20);
//! buf.push(b"{\"execute\": \"quit\"} [1");
//! assert!(matches!(buf.next(), Some(Input::Request(_))));
//! assert!(buf.next().is_none());
//!
//! struct Nothing;
//! impl CommandHandler for Nothing {
//!     fn commands(&self) -> Vec<&'static str> { vec![] }
//!     fn execute(&self, name: &str, _: &Map<String, Value>) -> Result<Value, QmpError> {
//!         Err(QmpError::CommandNotFound(name.into()))
//!     }
//! }
//! let version = QmpVersion::default();
//! let server = Arc::new(QmpServer::new(Arc::new(Nothing), EventSender::new(), version));
//! let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
//! let out = rt.block_on(session(server, b"{\"execute\": \"qmp_capabilities\"}")).unwrap();
//! assert!(out.ends_with(b"{\"return\":{}}\r\n"));
//! ```

use std::io;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub use super::input::{Input, InputBuffer};
use super::QmpServer;

/// Runs one client session against `server` over an in-memory pipe: writes `input`, closes
/// the client's sending side (EOF) and returns every byte the server wrote (greeting, replies,
/// events) until it closed the connection. Handler commands run on tokio's blocking pool, so
/// this needs a runtime with it (any tokio runtime has one).
pub async fn session(server: Arc<QmpServer>, input: &[u8]) -> io::Result<Vec<u8>> {
    let (client, far) = tokio::io::duplex(64 * 1024);
    let conn = server.serve_connection(far);
    let (mut rd, mut wr) = tokio::io::split(client);
    let send = async {
        // A write error means the server closed first (e.g. an oversized request): fine.
        let _ = wr.write_all(input).await;
        let _ = wr.shutdown().await;
    };
    let mut out = Vec::new();
    let recv = rd.read_to_end(&mut out);
    let (served, (), received) = tokio::join!(conn, send, recv);
    received?;
    served?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qmp::server::MAX_REQUEST_BYTES;
    use crate::qmp::{CommandHandler, EventSender, QmpError, QmpVersion};
    use serde_json::{Map, Value};

    struct Echo;

    impl CommandHandler for Echo {
        fn commands(&self) -> Vec<&'static str> {
            vec!["echo"]
        }

        fn execute(&self, _: &str, a: &Map<String, Value>) -> Result<Value, QmpError> {
            Ok(Value::Object(a.clone()))
        }
    }

    fn server() -> Arc<QmpServer> {
        Arc::new(QmpServer::new(
            Arc::new(Echo),
            EventSender::new(),
            QmpVersion {
                major: 1,
                minor: 2,
                micro: 3,
                package: "p".into(),
            },
        ))
    }

    #[tokio::test]
    async fn session_returns_the_exact_transcript() {
        let out = session(
            server(),
            b"{\"execute\": \"echo\"}\n{\"execute\":\"qmp_capabilities\"}\
              {\"execute\": \"echo\", \"arguments\": {\"b\": 1, \"a\": [true]}, \"id\": 9} }\n\
              {\"execute\": \"query-version\"}",
        )
        .await
        .unwrap();
        let want = concat!(
            "{\"QMP\":{\"capabilities\":[],\"version\":{\"package\":\"p\",",
            "\"qemu\":{\"major\":1,\"micro\":3,\"minor\":2}}}}\r\n",
            "{\"error\":{\"class\":\"CommandNotFound\",",
            "\"desc\":\"Expecting capabilities negotiation with 'qmp_capabilities'\"}}\r\n",
            "{\"return\":{}}\r\n",
            "{\"id\":9,\"return\":{\"a\":[true],\"b\":1}}\r\n",
            "{\"error\":{\"class\":\"GenericError\",",
            "\"desc\":\"JSON parse error, expected value at line 1 column 2\"}}\r\n",
            "{\"return\":{\"package\":\"p\",\"qemu\":{\"major\":1,\"micro\":3,\"minor\":2}}}\r\n",
        );
        assert_eq!(String::from_utf8(out).unwrap(), want);
    }

    #[tokio::test]
    async fn session_survives_an_oversized_request() {
        let mut big = b"{\"execute\": \"qmp_capabilities\"} \"".to_vec();
        big.resize(MAX_REQUEST_BYTES + 1024, b'x');
        let out = String::from_utf8(session(server(), &big).await.unwrap()).unwrap();
        let lines: Vec<&str> = out.split_inclusive("\r\n").collect();
        assert_eq!(lines.len(), 3, "{out}");
        assert_eq!(lines[1], "{\"return\":{}}\r\n");
        assert!(lines[2].contains("exceeds"), "{out}");
    }
}
