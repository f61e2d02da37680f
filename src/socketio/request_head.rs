//! Socket.io keeps each connection's request head (`req_parts`: URI, headers) for the life of
//! the connection. hyper parses both without copying: they are slices of the connection's read
//! buffer, which has grown to 16 KiB by the time a request is parsed. Holding a single header
//! value holds the whole buffer — with 10,000 idle sockets that was 16 KiB of a socket's
//! 31 KiB (heaptrack, README "Performance"). Copying the head, about a kilobyte, before
//! socketioxide stores it lets hyper's buffer go when the connection upgrades.

use axum::body::Body;
use axum::extract::OriginalUri;
use axum::http::{HeaderMap, HeaderValue, Request, Uri};

/// Requests under this path reach socketioxide.
const SOCKET_IO_PATH: &str = "/socket.io";

/// `tower::util::MapRequestLayer` function: Socket.io requests get a head of their own.
pub fn detach(mut req: Request<Body>) -> Request<Body> {
    if !req.uri().path().starts_with(SOCKET_IO_PATH) {
        return req;
    }
    let headers = std::mem::take(req.headers_mut());
    *req.headers_mut() = copy_headers(&headers);
    if let Some(uri) = copy_uri(req.uri()) {
        *req.uri_mut() = uri;
    }
    // axum's router keeps the URI as it arrived too (`OriginalUri`, an extension that
    // socketioxide stores with the head).
    if let Some(original) = req.extensions_mut().get_mut::<OriginalUri>()
        && let Some(uri) = copy_uri(&original.0)
    {
        original.0 = uri;
    }
    req
}

/// A URI in an allocation of its own (parsing a `String` does not borrow).
fn copy_uri(uri: &Uri) -> Option<Uri> {
    Uri::try_from(uri.to_string()).ok()
}

/// A deep copy: `HeaderValue::from_bytes` copies the bytes (names are static or copied by
/// hyper already). Every value of a repeated header is kept, in order.
fn copy_headers(headers: &HeaderMap) -> HeaderMap {
    let mut copied = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        // Cannot fail: the bytes come from a valid value.
        if let Ok(mut v) = HeaderValue::from_bytes(value.as_bytes()) {
            v.set_sensitive(value.is_sensitive());
            copied.append(name.clone(), v);
        }
    }
    copied
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_io_heads_are_copied_whole() {
        let req = Request::builder()
            .uri("/socket.io/?EIO=4&transport=websocket&token=abc")
            .header("authorization", "Bearer t")
            .header("x-forwarded-for", "10.0.0.1")
            .header("x-forwarded-for", "10.0.0.2")
            .body(Body::empty())
            .unwrap();
        let before = req.headers()["authorization"].as_bytes().as_ptr();
        let req = detach(req);
        assert_ne!(
            req.headers()["authorization"].as_bytes().as_ptr(),
            before,
            "a copy, not a view of the same bytes"
        );
        assert_eq!(
            req.uri().to_string(),
            "/socket.io/?EIO=4&transport=websocket&token=abc"
        );
        assert_eq!(req.headers()["authorization"], "Bearer t");
        let forwarded: Vec<_> = req.headers().get_all("x-forwarded-for").iter().collect();
        assert_eq!(forwarded, ["10.0.0.1", "10.0.0.2"]);
    }

    #[test]
    fn other_requests_are_untouched() {
        let req = Request::builder()
            .uri("/api/units")
            .header("authorization", "Bearer t")
            .body(Body::empty())
            .unwrap();
        let before = req.headers()["authorization"].as_bytes().as_ptr();
        let req = detach(req);
        assert_eq!(req.headers()["authorization"].as_bytes().as_ptr(), before);
    }
}
