//! Serving the dashboard (`web/dist`) at `/`, with the single-page-app fallback: any path that is
//! not a file (a client-side route such as `/units/u-1`) gets `index.html`.

use std::path::Path;

use axum::Router;
use axum::response::Html;
use tower_http::services::{ServeDir, ServeFile};

/// The dashboard's files, or — when they have not been built — a page that says how.
pub fn router(dir: &Path) -> Router {
    if dir.join("index.html").is_file() {
        let spa = ServeDir::new(dir).fallback(ServeFile::new(dir.join("index.html")));
        Router::new().fallback_service(spa)
    } else {
        tracing::warn!(dir = %dir.display(), "dashboard not built; `make run` builds it");
        Router::new().fallback(|| async {
            Html(
                "<!doctype html><title>sensorwire</title><h1>sensorwire is running</h1>\
                 <p>The dashboard is not built. Run <code>make run</code> (it builds <code>web/</code>), \
                 or <code>cd web &amp;&amp; npm ci &amp;&amp; npm run build</code>.</p>\
                 <p>The API is under <code>/api</code>; Socket.io at <code>/socket.io/</code>.</p>",
            )
        })
    }
}
