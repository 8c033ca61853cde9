//! The agent's HTTP endpoint (axum over hyper): `/metrics`, `/healthz`, `/readyz`.
//! Bounded, because any local user can connect: at most [`MAX_CONNECTIONS`] at
//! once, each with [`HEADER_TIMEOUT`] to ask and [`CONNECTION_LIFETIME`] in all;
//! and scrapes, which walk the maps, run on one thread of their own at the lowest
//! CPU priority, one read serving every request that waited for it, so that a
//! client scraping in a loop never takes CPU from the agent's reloads.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::observe::metrics::Source;

/// Connections served at once; more wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 16;
/// How long a client may take to send its request headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a connection may stay open, requests and keep-alive included.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The niceness of the scrape thread: the lowest priority there is.
const SCRAPE_NICENESS: libc::c_int = 19;

/// A scrape's answer: the metrics text, or why the maps could not be read.
type Scraped = Result<String, String>;

/// What the handlers hold: the agent's view and the scrape thread's queue.
#[derive(Clone)]
struct Endpoint {
    source: Source,
    scrapes: mpsc::Sender<oneshot::Sender<Scraped>>,
}

/// Starts the scrape thread: it waits for a request, takes every other one that
/// waits too, reads the maps once and answers them all.
fn scrape_thread(source: Source) -> std::io::Result<mpsc::Sender<oneshot::Sender<Scraped>>> {
    let (sender, mut requests) = mpsc::channel::<oneshot::Sender<Scraped>>(MAX_CONNECTIONS);
    std::thread::Builder::new()
        .name("scrape".into())
        .spawn(move || {
            // SAFETY: plain arguments; on Linux the niceness is the calling thread's.
            let tid = unsafe { libc::gettid() } as libc::id_t;
            // SAFETY: as above.
            if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, SCRAPE_NICENESS) } != 0 {
                log::warn!(
                    "metrics endpoint: scrapes keep the agent's priority: {}",
                    std::io::Error::last_os_error()
                );
            }
            while let Some(first) = requests.blocking_recv() {
                let mut waiting = vec![first];
                while let Ok(next) = requests.try_recv() {
                    waiting.push(next);
                }
                let scraped = source.scrape().map_err(|e| crate::error_chain(&e));
                for reply in waiting {
                    let _ = reply.send(scraped.clone());
                }
            }
        })?;
    Ok(sender)
}

/// Starts the scrape thread, then answers on `listener` until the runtime stops.
pub fn start(listener: TcpListener, source: Source) -> std::io::Result<()> {
    let endpoint = Endpoint {
        scrapes: scrape_thread(source.clone())?,
        source,
    };
    tokio::spawn(serve(listener, endpoint));
    Ok(())
}

async fn serve(listener: TcpListener, endpoint: Endpoint) {
    let router = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(endpoint);
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = permits
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors, most likely: let some close.
                log::warn!("metrics endpoint: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let service = TowerToHyperService::new(router.clone());
        tokio::spawn(async move {
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            // Past its lifetime the connection is dropped, which closes it.
            if let Ok(Err(e)) = tokio::time::timeout(CONNECTION_LIFETIME, connection).await {
                log::debug!("metrics endpoint: {e}");
            }
            drop(permit);
        });
    }
}

async fn metrics(State(endpoint): State<Endpoint>) -> Response {
    let (reply, answer) = oneshot::channel();
    let scraped = match endpoint.scrapes.send(reply).await {
        Ok(()) => answer
            .await
            .unwrap_or_else(|_| Err("the scrape thread ended".into())),
        Err(_) => Err("the scrape thread ended".into()),
    };
    match scraped {
        Ok(text) => ([(header::CONTENT_TYPE, OPENMETRICS)], text).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}

async fn readyz(State(endpoint): State<Endpoint>) -> (StatusCode, String) {
    match endpoint.source.view().not_ready_reason() {
        None => (StatusCode::OK, "ready\n".to_string()),
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}\n"),
        ),
    }
}
