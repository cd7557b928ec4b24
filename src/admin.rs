//! The admin endpoint of weft's processes, over plain HTTP: `/healthz` (the process
//! answers), `/readyz` (it has what it needs to serve) and `/metrics` (Prometheus text).

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Full};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

/// What a process reports on its admin endpoint.
pub trait Report: Clone + Send + Sync + 'static {
    /// `Err` with the reason while the process is not ready to serve.
    fn ready(&self) -> Result<(), String>;
    /// The metrics, in the OpenMetrics text format.
    fn metrics(&self) -> String;
    /// A page of the process's own at `path` (asked with `query`), if it has one there.
    fn extra(&self, path: &str, query: Option<&str>) -> Option<Page> {
        let _ = (path, query);
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

    /// A JSON document with `status`.
    pub fn json(status: u16, body: String) -> Self {
        Self {
            status: StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
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
    if let Some(page) = report.extra(request.uri().path(), request.uri().query()) {
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

/// An answer of an admin endpoint: its status and body.
#[derive(Debug, Clone)]
pub struct HttpAnswer {
    /// The status code.
    pub status: u16,
    /// The body.
    pub body: Bytes,
}

/// Why asking an admin endpoint failed.
#[derive(Debug, thiserror::Error)]
pub enum GetError {
    /// The request could not be built from the path.
    #[error("{0}")]
    Request(#[from] http::Error),
    /// The HTTP exchange failed.
    #[error("{0}")]
    Http(#[from] hyper::Error),
    /// The body could not be read, or is over the limit.
    #[error("the answer's body: {0}")]
    Body(String),
}

/// `GET path` (with its query) of the endpoint `host` over `stream`, reading at most `limit`
/// bytes of the body.
pub async fn get<S>(stream: S, host: &str, path: &str, limit: usize) -> Result<HttpAnswer, GetError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let request = Request::get(path)
        .header(http::header::HOST, host)
        .body(Empty::<Bytes>::new())?;
    let response = sender.send_request(request).await?;
    let status = response.status().as_u16();
    let body = http_body_util::Limited::new(response.into_body(), limit)
        .collect()
        .await
        .map_err(|e| GetError::Body(e.to_string()))?
        .to_bytes();
    Ok(HttpAnswer { status, body })
}
