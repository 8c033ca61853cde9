//! A local IMDSv2 responder: a token from `PUT /latest/api/token` (which must ask for
//! a TTL, and gets it back in the header aws-config checks), then `GET`s with that
//! token. moto's metadata endpoint cannot stand in: it sends no TTL header.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::Result;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, put};

const TOKEN: &str = "test-imds-token";
const TTL: &str = "x-aws-ec2-metadata-token-ttl-seconds";

type Paths = Arc<Mutex<BTreeMap<String, String>>>;

/// The running responder; its thread serves until the test process ends.
pub struct Imds {
    pub addr: SocketAddr,
    paths: Paths,
}

impl Imds {
    /// Serves `meta-data` paths (relative to `/latest/meta-data/`) on `listener`.
    pub fn serve(listener: std::net::TcpListener, paths: BTreeMap<String, String>) -> Result<Self> {
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let paths: Paths = Arc::new(Mutex::new(paths));
        let app = axum::Router::new()
            .route("/latest/api/token", put(token))
            .route("/latest/meta-data/{*path}", get(metadata))
            .with_state(paths.clone());
        std::thread::Builder::new()
            .name("fake-imds".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a runtime for the IMDS responder");
                runtime.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener)
                        .expect("the IMDS responder's listener");
                    axum::serve(listener, app).await.expect("serving IMDS");
                });
            })?;
        Ok(Self { addr, paths })
    }

    /// `AWS_EC2_METADATA_SERVICE_ENDPOINT` for it.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Sets (or replaces) one path's value.
    pub fn set(&self, path: &str, value: &str) {
        self.paths
            .lock()
            .unwrap()
            .insert(path.to_string(), value.to_string());
    }
}

async fn token(headers: HeaderMap) -> impl IntoResponse {
    match headers.get(TTL).and_then(|v| v.to_str().ok()) {
        Some(ttl) if ttl.parse::<u32>().is_ok_and(|t| (1..=21600).contains(&t)) => {
            (StatusCode::OK, [(TTL, ttl.to_string())], TOKEN).into_response()
        }
        _ => (StatusCode::BAD_REQUEST, "a token needs a TTL").into_response(),
    }
}

async fn metadata(
    State(paths): State<Paths>,
    Path(path): Path<String>,
    headers: HeaderMap,
) -> impl IntoResponse {
    if headers
        .get("x-aws-ec2-metadata-token")
        .and_then(|v| v.to_str().ok())
        != Some(TOKEN)
    {
        return (StatusCode::UNAUTHORIZED, String::new());
    }
    match paths.lock().unwrap().get(&path) {
        Some(value) => (StatusCode::OK, value.clone()),
        None => (StatusCode::NOT_FOUND, String::new()),
    }
}
