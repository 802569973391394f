//! Protocol detection on a port that declares none: a peek at the client's
//! first bytes, bounded in time so server-first protocols are not held.
//! It reads nothing off the socket and routes nothing.

#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

use tokio::net::TcpStream;

use crate::mesh::model::Protocol;

/// A port that declares no protocol: HTTP if the client's first bytes are
/// an HTTP request line or the HTTP/2 preface, opaque TCP otherwise (also
/// when the client says nothing for a moment: server-first protocols).
pub(crate) async fn sniff(stream: &TcpStream) -> Protocol {
    let deadline = Instant::now() + Duration::from_millis(100);
    let mut buf = [0u8; 16];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(Ok(n)) = tokio::time::timeout(left, stream.peek(&mut buf)).await else {
            return Protocol::Tcp;
        };
        if n == 0 {
            return Protocol::Tcp;
        }
        let seen = &buf[..n];
        if looks_like_http(seen) {
            return Protocol::Http;
        }
        // Could still become a request line: wait for more bytes.
        let prefix = |p: &[u8]| p.starts_with(seen) || seen.starts_with(p);
        let possible = [
            &b"GET "[..],
            b"POST ",
            b"PUT ",
            b"DELETE ",
            b"HEAD ",
            b"OPTIONS ",
            b"PATCH ",
            b"CONNECT ",
            b"TRACE ",
            b"PRI * HTTP/2.0",
        ]
        .iter()
        .any(|m| prefix(m));
        if !possible || n == buf.len() || Instant::now() >= deadline {
            return Protocol::Tcp;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Whether the first bytes a client sent look like HTTP/1.x or the HTTP/2
/// preface.
pub(crate) fn looks_like_http(first: &[u8]) -> bool {
    const METHODS: [&[u8]; 9] =
        [b"GET ", b"POST ", b"PUT ", b"DELETE ", b"HEAD ", b"OPTIONS ", b"PATCH ", b"CONNECT ", b"TRACE "];
    first.starts_with(b"PRI * HTTP/2.0") || METHODS.iter().any(|m| first.starts_with(m))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_is_recognised_by_its_first_bytes() {
        assert!(looks_like_http(b"GET / HTTP/1.1\r\n"));
        assert!(looks_like_http(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"));
        assert!(!looks_like_http(b"\x16\x03\x01\x02\x00"));
        assert!(!looks_like_http(b"SSH-2.0-OpenSSH"));
    }
}
