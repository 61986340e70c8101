//! The dashboard page at `GET /`: one HTML page and its script and style, embedded in the
//! binary. Assets are served under content-hashed names with long-lived cache headers; the page
//! itself is revalidated (`no-cache` with an ETag), so a new binary's assets are picked up at once.

use std::sync::{Arc, LazyLock};

use axum::extract::Path;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::http::{error, AppState};

/// A year: the longest max-age caches honour; a hashed name never changes content.
const ASSET_MAX_AGE_S: u64 = 365 * 24 * 3600;

struct Asset {
    /// Served as `/assets/<hashed_name>`.
    hashed_name: String,
    content_type: &'static str,
    body: &'static str,
}

struct Dashboard {
    assets: Vec<Asset>,
    page: String,
    page_etag: String,
}

/// FNV-1a, 64 bits: stable across builds and platforms, enough to tell contents apart.
fn content_hash(bytes: &[u8]) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in bytes {
        hash ^= *byte as u64;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{hash:016x}")
}

static DASHBOARD: LazyLock<Dashboard> = LazyLock::new(|| {
    let sources: [(&str, &str, &'static str); 2] = [
        (
            "app.js",
            "text/javascript; charset=utf-8",
            include_str!("dashboard/app.js"),
        ),
        (
            "style.css",
            "text/css; charset=utf-8",
            include_str!("dashboard/style.css"),
        ),
    ];
    let mut page = include_str!("dashboard/index.html").to_string();
    let mut assets = Vec::new();
    for (name, content_type, body) in sources {
        let (stem, extension) = name.split_once('.').expect("asset names have an extension");
        let hashed_name = format!("{stem}.{}.{extension}", content_hash(body.as_bytes()));
        page = page.replace(
            &format!("{{{{{name}}}}}"),
            &format!("/assets/{hashed_name}"),
        );
        assets.push(Asset {
            hashed_name,
            content_type,
            body,
        });
    }
    let page_etag = format!("\"{}\"", content_hash(page.as_bytes()));
    Dashboard {
        assets,
        page,
        page_etag,
    }
});

pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/", get(page))
        .route("/assets/{file}", get(asset))
}

async fn page(headers: HeaderMap) -> Response {
    let dashboard = &*DASHBOARD;
    let cache = [
        (header::ETAG, dashboard.page_etag.clone()),
        (header::CACHE_CONTROL, "no-cache".to_string()),
    ];
    let matches = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == dashboard.page_etag));
    if matches {
        return (StatusCode::NOT_MODIFIED, cache).into_response();
    }
    (
        cache,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        dashboard.page.clone(),
    )
        .into_response()
}

async fn asset(Path(file): Path<String>) -> Response {
    match DASHBOARD.assets.iter().find(|a| a.hashed_name == file) {
        Some(asset) => (
            [
                (header::CONTENT_TYPE, asset.content_type.to_string()),
                (
                    header::CACHE_CONTROL,
                    format!("public, max-age={ASSET_MAX_AGE_S}, immutable"),
                ),
            ],
            asset.body,
        )
            .into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            format!("no asset `{file}` (asset names change with every build: reload the page)"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_links_every_asset_by_its_hashed_name() {
        let dashboard = &*DASHBOARD;
        assert!(!dashboard.page.contains("{{"), "a placeholder is left");
        for asset in &dashboard.assets {
            assert!(dashboard
                .page
                .contains(&format!("/assets/{}", asset.hashed_name)));
            assert!(asset
                .hashed_name
                .contains(&content_hash(asset.body.as_bytes())));
        }
        assert_ne!(content_hash(b"a"), content_hash(b"b"));
    }
}
