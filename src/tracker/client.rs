//! Subscribing to a tracker and keeping a replica of its view.

use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

use super::replica::{Replica, ReplicaError};
use super::server::SNAPSHOT_PART_BYTES;
use super::tls::TlsFiles;
use super::wire::pb;
use crate::model::ClusterId;

/// Why a subscription failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The URL is not one a channel can be made from.
    #[error("tracker {url}: {error}")]
    Url {
        /// The URL.
        url: String,
        /// Why.
        error: String,
    },
    /// The tracker cannot be reached.
    #[error("tracker {url}: cannot connect: {error}")]
    Connect {
        /// The URL.
        url: String,
        /// Why.
        error: tonic::transport::Error,
    },
    /// The tracker refused the subscription or ended the stream with an error.
    #[error("tracker {url}: {status}")]
    Status {
        /// The URL.
        url: String,
        /// What it said.
        status: tonic::Status,
    },
    /// The tracker sent an update that cannot be applied.
    #[error("tracker {url}: {error}")]
    Update {
        /// The URL.
        url: String,
        /// Why.
        error: ReplicaError,
    },
    /// The stream ended before the view was complete.
    #[error("tracker {url}: the stream ended before every cluster was synced")]
    Ended {
        /// The URL.
        url: String,
    },
    /// Not every cluster was synced in time.
    #[error("tracker {url}: not synced after {timeout:?}: {}", describe(.unsynced))]
    Timeout {
        /// The URL.
        url: String,
        /// How long was waited.
        timeout: Duration,
        /// The clusters still unsynced (empty when not even a snapshot arrived).
        unsynced: Vec<ClusterId>,
    },
}

fn describe(unsynced: &[ClusterId]) -> String {
    if unsynced.is_empty() {
        "no complete snapshot arrived".to_owned()
    } else {
        let names: Vec<&str> = unsynced.iter().map(ClusterId::as_str).collect();
        format!("clusters {} are not synced", names.join(", "))
    }
}

/// A tracker to subscribe to: `https://HOST:PORT` with mutual TLS, or `http://HOST:PORT`
/// in plaintext.
#[derive(Debug, Clone)]
pub struct Target {
    url: String,
    tls: Option<TlsFiles>,
    keepalive: Duration,
    /// The name the tracker's certificate must carry, when not the URL's host.
    server_name: Option<String>,
}

impl Target {
    /// The tracker at `url`: `https://` takes TLS files, `http://` none.
    pub fn new(url: &str, tls: Option<TlsFiles>) -> Result<Self, ClientError> {
        let bad = |error: &str| ClientError::Url {
            url: url.to_owned(),
            error: error.to_owned(),
        };
        // At start, not at each reconnection.
        if let Some(error) = crate::endpoint::unreachable_host(url) {
            return Err(bad(&error));
        }
        match (url.split_once("://").map(|(scheme, _)| scheme), &tls) {
            (Some("https"), Some(_)) | (Some("http"), None) => Ok(Self {
                url: url.to_owned(),
                tls,
                keepalive: Duration::from_secs(30),
                server_name: None,
            }),
            (Some("https"), None) => Err(bad(
                "https needs --tls-cert, --tls-key and --tls-ca (mutual TLS)",
            )),
            (Some("http"), Some(_)) => Err(bad(
                "TLS files were given for a plaintext URL: use https://",
            )),
            _ => Err(bad("the URL must start with https:// or http://")),
        }
    }

    /// The tracker at `url` in plaintext (tests and demos on one machine).
    pub fn plaintext(url: &str) -> Result<Self, ClientError> {
        Self::new(url, None)
    }

    /// The same tracker, pinged every `interval` (30 s unless set): one that does not answer
    /// within a third of it is taken as gone, even if its connection was never closed.
    pub fn with_keepalive(mut self, interval: Duration) -> Self {
        self.keepalive = interval;
        self
    }

    /// The same tracker, whose certificate must carry `name` instead of the URL's host: an
    /// address reached without DNS (a Service's, from the kubelet's environment), the
    /// certificate for the Service's name.
    pub fn with_server_name(mut self, name: &str) -> Result<Self, ClientError> {
        if self.tls.is_none() {
            return Err(ClientError::Url {
                url: self.url,
                error: "a server name was given for a plaintext URL".to_owned(),
            });
        }
        rustls_pki_types::ServerName::try_from(name).map_err(|_| ClientError::Url {
            url: self.url.clone(),
            error: format!("server name {name:?}: not a DNS name or an IP address"),
        })?;
        self.server_name = Some(name.to_owned());
        Ok(self)
    }

    /// The URL.
    pub fn url(&self) -> &str {
        &self.url
    }
}

/// A client of the tracker at `target`.
pub async fn connect(
    target: &Target,
) -> Result<pb::tracker_client::TrackerClient<Channel>, ClientError> {
    let url = target.url();
    let mut endpoint = Endpoint::from_shared(url.to_owned()).map_err(|e| ClientError::Url {
        url: url.to_owned(),
        error: e.to_string(),
    })?;
    if let Some(tls) = &target.tls {
        let config = match &target.server_name {
            Some(name) => tls.client().domain_name(name),
            None => tls.client(),
        };
        endpoint = endpoint
            .tls_config(config)
            .map_err(|error| ClientError::Connect {
                url: url.to_owned(),
                error,
            })?;
    }
    let channel = endpoint
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(target.keepalive)
        .keep_alive_timeout(target.keepalive / 3)
        .keep_alive_while_idle(true)
        .connect()
        .await
        .map_err(|error| ClientError::Connect {
            url: url.to_owned(),
            error,
        })?;
    Ok(pb::tracker_client::TrackerClient::new(channel)
        .max_decoding_message_size(4 * SNAPSHOT_PART_BYTES))
}

/// Subscribes to the tracker at `target`: the stream of its updates.
pub async fn subscribe(
    target: &Target,
    request: pb::SubscribeRequest,
) -> Result<tonic::Streaming<pb::Update>, ClientError> {
    let url = target.url();
    let mut client = connect(target).await?;
    let response = client
        .subscribe(request)
        .await
        .map_err(|status| ClientError::Status {
            url: url.to_owned(),
            status,
        })?;
    Ok(response.into_inner())
}

/// The next update of a subscription; `Ok(None)` when the tracker ended it.
async fn next(
    url: &str,
    stream: &mut tonic::Streaming<pb::Update>,
) -> Result<Option<pb::Update>, ClientError> {
    stream
        .message()
        .await
        .map_err(|status| ClientError::Status {
            url: url.to_owned(),
            status,
        })
}

/// Subscribes to the tracker at `target` and returns a replica once it is ready (a complete
/// snapshot and every cluster synced): a half-synced view never answers. Fails after
/// `timeout`, naming the clusters not synced.
pub async fn sync(
    target: &Target,
    request: pb::SubscribeRequest,
    timeout: Duration,
) -> Result<Replica, ClientError> {
    let url = target.url();
    let mut replica = Replica::new();
    let work = async {
        let mut stream = subscribe(target, request).await?;
        while let Some(update) = next(url, &mut stream).await? {
            replica.apply(update).map_err(|error| ClientError::Update {
                url: url.to_owned(),
                error,
            })?;
            if replica.ready() {
                return Ok(());
            }
        }
        Err(ClientError::Ended {
            url: url.to_owned(),
        })
    };
    let outcome = tokio::time::timeout(timeout, work).await;
    match outcome {
        Ok(Ok(())) => Ok(replica),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(ClientError::Timeout {
            url: url.to_owned(),
            timeout,
            unsynced: replica.unsynced(),
        }),
    }
}

/// What follows a tracker's stream: a node's replica, or a spoke tracker's copy of its
/// hub's view.
pub trait Follower: Send + Sync {
    /// Where it is in the stream, to resume from.
    fn position(&self) -> Option<pb::Position>;
    /// Applies one update; on error, nothing of it.
    fn apply(&mut self, update: pb::Update) -> Result<(), ReplicaError>;
    /// The tracker accepted the subscription: updates flow again.
    fn connected(&mut self);
    /// The subscription is down.
    fn disconnected(&mut self, error: &ClientError);
}

impl Follower for Replica {
    fn position(&self) -> Option<pb::Position> {
        Replica::position(self).cloned()
    }

    fn apply(&mut self, update: pb::Update) -> Result<(), ReplicaError> {
        Replica::apply(self, update)
    }

    fn connected(&mut self) {
        self.set_connected(true);
    }

    fn disconnected(&mut self, _: &ClientError) {
        self.set_connected(false);
    }
}

/// Keeps `follower` following the tracker at `target` until the task is stopped: on every
/// (re)connection it resumes from the follower's position, and the tracker answers with what
/// was missed or, after a restart or a long absence, a fresh snapshot that replaces the view
/// only once complete. An update that cannot be applied is dropped with the connection, and
/// the next subscription asks for a fresh snapshot. Reconnections back off from `retry` up to
/// 30 s.
pub async fn follow<F: Follower>(
    target: Target,
    request: pb::SubscribeRequest,
    follower: std::sync::Arc<std::sync::RwLock<F>>,
    retry: Duration,
) {
    let lock = || follower.write().unwrap_or_else(|e| e.into_inner());
    let mut delay = retry;
    let mut fresh = false;
    loop {
        let resume = if fresh { None } else { lock().position() };
        fresh = false;
        let outcome: Result<(), ClientError> = async {
            let request = pb::SubscribeRequest {
                resume,
                ..request.clone()
            };
            let mut stream = subscribe(&target, request).await?;
            lock().connected();
            while let Some(update) = next(target.url(), &mut stream).await? {
                delay = retry;
                let applied = lock().apply(update);
                applied.map_err(|error| ClientError::Update {
                    url: target.url().to_owned(),
                    error,
                })?;
            }
            Err(ClientError::Ended {
                url: target.url().to_owned(),
            })
        }
        .await;
        if let Err(e) = outcome {
            // What cannot be applied or decoded is not asked for again: a fresh snapshot is.
            fresh = match &e {
                ClientError::Update { .. } => true,
                ClientError::Status { status, .. } => {
                    matches!(
                        status.code(),
                        tonic::Code::OutOfRange | tonic::Code::Internal
                    )
                }
                _ => false,
            };
            tracing::warn!(error = %e, retry_in = ?delay, "tracker subscription");
            lock().disconnected(&e);
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(30));
    }
}
