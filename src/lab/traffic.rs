//! Traffic in the lab: a line responder that names who answered, the probe that dials it from
//! a namespace and says how the exchange ended, and a small HTTP GET for admin endpoints that
//! listen inside a namespace.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{TcpListener, TcpStream};

use super::{LabError, Netns};

/// The most a responder reads from one connection: it is a probe target, not a sink.
const RESPONDER_READ_LIMIT: u64 = 64 * 1024;
/// The longest answer a probe reads.
const ANSWER_LIMIT: u64 = 4 * 1024;
/// The largest HTTP body read from an admin endpoint.
const HTTP_BODY_LIMIT: usize = 4 * 1024 * 1024;

/// What a responder appends to each line it echoes, before its own name.
const ANSWERED_BY: &str = " answered by ";

/// Answers every line received on `listener` with the line, " answered by " and `who`, until
/// the peer closes; runs until the task is aborted.
pub async fn respond(listener: TcpListener, who: String) {
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            // Accept errors (no file descriptors left, an aborted handshake) are transient.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let who = who.clone();
        tokio::spawn(async move {
            if let Err(e) = answer_lines(stream, &who).await {
                tracing::debug!(%peer, %who, error = %e, "responder connection ended");
            }
        });
    }
}

async fn answer_lines(stream: TcpStream, who: &str) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read.take(RESPONDER_READ_LIMIT)).lines();
    while let Some(line) = lines.next_line().await? {
        write
            .write_all(format!("{line}{ANSWERED_BY}{who}\n").as_bytes())
            .await?;
    }
    Ok(())
}

/// How a probe's exchange ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExchangeOutcome {
    /// The line came back, answered by the named responder.
    Answered {
        /// Who answered.
        by: String,
    },
    /// The connection was refused (RST to the SYN).
    Refused,
    /// The connection was reset after it was established.
    Reset,
    /// The connection was closed without an answer.
    Closed,
    /// Nothing happened within the timeout, at the named step (`connect`, `answer`).
    TimedOut {
        /// The step that timed out.
        during: &'static str,
    },
    /// An answer came that is not the responder's to our line.
    Garbled {
        /// What came.
        answer: String,
    },
    /// Any other failure.
    Failed {
        /// Why.
        error: String,
    },
}

impl ExchangeOutcome {
    /// Whether the exchange completed: the connection was let through.
    pub fn allowed(&self) -> bool {
        matches!(self, ExchangeOutcome::Answered { .. })
    }
}

impl std::fmt::Display for ExchangeOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExchangeOutcome::Answered { by } => write!(f, "answered by {by}"),
            ExchangeOutcome::Refused => f.write_str("connection refused"),
            ExchangeOutcome::Reset => f.write_str("connection reset"),
            ExchangeOutcome::Closed => f.write_str("closed without an answer"),
            ExchangeOutcome::TimedOut { during } => write!(f, "timed out ({during})"),
            ExchangeOutcome::Garbled { answer } => write!(f, "unexpected answer {answer:?}"),
            ExchangeOutcome::Failed { error } => f.write_str(error),
        }
    }
}

/// A probe's exchange: from where, and how it ended.
#[derive(Debug, Clone)]
pub struct Exchange {
    /// The local address of the connection, once it was made.
    pub local: Option<SocketAddr>,
    /// How it ended.
    pub outcome: ExchangeOutcome,
}

/// Dials `to` from inside `netns` (from address `from` when given), sends `line` and waits
/// for a responder's answer to it; each step has `timeout`.
pub async fn exchange(
    netns: &Netns,
    from: Option<IpAddr>,
    to: SocketAddr,
    line: &str,
    timeout: Duration,
) -> Exchange {
    let stream = match netns.connect(from, to, timeout).await {
        Ok(stream) => stream,
        Err(LabError::Socket { error, .. }) => {
            return Exchange {
                local: None,
                outcome: io_outcome(&error, "connect"),
            };
        }
        Err(e) => {
            return Exchange {
                local: None,
                outcome: ExchangeOutcome::Failed {
                    error: e.to_string(),
                },
            };
        }
    };
    let local = stream.local_addr().ok();
    let outcome = match tokio::time::timeout(timeout, send_and_read(stream, line)).await {
        Err(_) => ExchangeOutcome::TimedOut { during: "answer" },
        Ok(Err(e)) => io_outcome(&e, "answer"),
        Ok(Ok(answer)) if answer.is_empty() => ExchangeOutcome::Closed,
        Ok(Ok(answer)) => match answer
            .strip_prefix(line)
            .and_then(|rest| rest.strip_prefix(ANSWERED_BY))
        {
            Some(by) => ExchangeOutcome::Answered { by: by.to_owned() },
            None => ExchangeOutcome::Garbled { answer },
        },
    };
    Exchange { local, outcome }
}

async fn send_and_read(mut stream: TcpStream, line: &str) -> std::io::Result<String> {
    stream.write_all(format!("{line}\n").as_bytes()).await?;
    let mut answer = String::new();
    BufReader::new((&mut stream).take(ANSWER_LIMIT))
        .read_line(&mut answer)
        .await?;
    Ok(answer.trim_end_matches('\n').to_owned())
}

fn io_outcome(error: &std::io::Error, during: &'static str) -> ExchangeOutcome {
    use std::io::ErrorKind;
    match error.kind() {
        ErrorKind::ConnectionRefused => ExchangeOutcome::Refused,
        ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe => {
            ExchangeOutcome::Reset
        }
        ErrorKind::UnexpectedEof => ExchangeOutcome::Closed,
        ErrorKind::TimedOut => ExchangeOutcome::TimedOut { during },
        _ => ExchangeOutcome::Failed {
            error: error.to_string(),
        },
    }
}

pub use crate::admin::HttpAnswer;

/// `GET http://ADDR/PATH` from inside `netns` (where an admin endpoint on 127.0.0.1 is the
/// namespace's own), within `timeout` in all.
pub async fn http_get(
    netns: &Netns,
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> Result<HttpAnswer, LabError> {
    let failed = |error: String| LabError::Http {
        url: format!("http://{addr}{path} in {}", netns.name()),
        error,
    };
    let get = async {
        let stream = netns.connect(None, addr, timeout).await?;
        crate::admin::get(stream, &addr.to_string(), path, HTTP_BODY_LIMIT)
            .await
            .map_err(|e| failed(e.to_string()))
    };
    tokio::time::timeout(timeout, get)
        .await
        .unwrap_or_else(|_| Err(failed(format!("no answer within {timeout:?}"))))
}
