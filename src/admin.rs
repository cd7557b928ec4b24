//! The admin endpoint of weft's processes, over plain HTTP: `/healthz` (the process
//! answers), `/readyz` (it has what it needs to serve) and `/metrics` (Prometheus text).

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

/// What a process reports on its admin endpoint.
pub trait Report: Clone + Send + Sync + 'static {
    /// `Err` with the reason while the process is not ready to serve.
    fn ready(&self) -> Result<(), String>;
    /// The metrics, in the OpenMetrics text format.
    fn metrics(&self) -> String;
    /// A page of the process's own at `path`, if it has one there.
    fn extra(&self, path: &str) -> Option<Page> {
        let _ = path;
        None
    }
}

/// A page of a process's own on its admin endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    status: StatusCode,
    content_type: &'static str,
    body: String,
}

impl Page {
    /// A plain-text page with `status`.
    pub fn text(status: u16, body: String) -> Self {
        Self {
            status: StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            content_type: TEXT,
            body,
        }
    }

    /// A JSON document.
    pub fn json(body: String) -> Self {
        Self {
            status: StatusCode::OK,
            content_type: "application/json",
            body,
        }
    }
}

const TEXT: &str = "text/plain; charset=utf-8";

fn respond(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = http::HeaderValue::from_str(content_type) {
        response
            .headers_mut()
            .insert(http::header::CONTENT_TYPE, value);
    }
    response
}

/// The answer to one request.
pub fn answer<R: Report, B>(report: &R, request: &Request<B>) -> Response<Full<Bytes>> {
    if request.method() != http::Method::GET {
        return respond(StatusCode::METHOD_NOT_ALLOWED, TEXT, "GET only\n".into());
    }
    if let Some(page) = report.extra(request.uri().path()) {
        return respond(page.status, page.content_type, page.body);
    }
    match request.uri().path() {
        "/healthz" => respond(StatusCode::OK, TEXT, "ok\n".into()),
        // `/ready` as the issue and ztunnel's admin name it, `/readyz` as Kubernetes does.
        "/ready" | "/readyz" => match report.ready() {
            Ok(()) => respond(StatusCode::OK, TEXT, "ready\n".into()),
            Err(why) => respond(StatusCode::SERVICE_UNAVAILABLE, TEXT, format!("{why}\n")),
        },
        "/metrics" => respond(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            report.metrics(),
        ),
        other => respond(
            StatusCode::NOT_FOUND,
            TEXT,
            format!("{other}: not found (try /healthz, /ready, /readyz, /metrics)\n"),
        ),
    }
}

/// Serves the admin endpoint on `listener` until `shutdown` resolves. A connection that
/// fails is logged and dropped; the endpoint keeps serving.
pub async fn serve(
    listener: tokio::net::TcpListener,
    report: impl Report,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors, say: pause rather than spin.
                    tracing::warn!(error = %e, "admin endpoint: accept");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => return,
        };
        let report = report.clone();
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                    let response = answer(&report, &request);
                    async move { Ok::<_, Infallible>(response) }
                });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(%peer, error = %e, "admin endpoint: connection");
            }
        });
    }
}
