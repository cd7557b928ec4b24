//! The connections a node carries, each with what it was allowed as, so that when the view
//! changes those no longer allowed are closed at once (a tightened policy or label, a pod
//! gone); loosening never touches an open connection.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::watch;

use crate::proxy::Inbound;

/// What a connection was allowed as: judged again on each change of the view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recheck {
    /// From local pod `source` to `target` (a Service already resolved to its endpoint).
    Outbound {
        /// The local pod's address.
        source: IpAddr,
        /// The destination dialled.
        target: SocketAddr,
    },
    /// A tunnel admitted by this node's HBONE server.
    Inbound(Inbound),
    /// A plaintext connection to a local pod.
    Plaintext {
        /// The unmeshed source.
        source: SocketAddr,
        /// The local pod's address and port.
        destination: SocketAddr,
    },
}

#[derive(Debug, Default)]
struct Open {
    next: AtomicU64,
    connections: Mutex<HashMap<u64, (Recheck, watch::Sender<bool>)>>,
}

/// The open connections of a node; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Connections(Arc<Open>);

/// One tracked connection: it leaves the registry when dropped.
#[derive(Debug)]
pub struct Tracked {
    id: u64,
    open: Arc<Open>,
    closed: watch::Receiver<bool>,
}

impl Connections {
    /// Tracks a connection allowed as `recheck`.
    pub fn track(&self, recheck: Recheck) -> Tracked {
        let id = self.0.next.fetch_add(1, Ordering::Relaxed);
        let (close, closed) = watch::channel(false);
        self.lock().insert(id, (recheck, close));
        Tracked {
            id,
            open: self.0.clone(),
            closed,
        }
    }

    /// Closes every connection `allowed` no longer allows; returns those closed.
    pub fn recheck(&self, allowed: impl Fn(&Recheck) -> bool) -> Vec<Recheck> {
        let connections = self.lock();
        let mut closed = Vec::new();
        for (recheck, close) in connections.values() {
            if !*close.borrow() && !allowed(recheck) {
                close.send_replace(true);
                closed.push(recheck.clone());
            }
        }
        closed
    }

    /// How many connections are open.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether none is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, (Recheck, watch::Sender<bool>)>> {
        // Every update leaves the map whole, so a poisoned lock still holds a good one.
        self.0
            .connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl Tracked {
    /// Resolves once the connection must close.
    pub async fn closed(&mut self) {
        // An Err means the registry is gone; nothing can close this connection any more.
        if self.closed.wait_for(|closed| *closed).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.open
            .connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outbound(target: &str) -> Recheck {
        Recheck::Outbound {
            source: "10.0.0.1".parse().expect("ip"),
            target: target.parse().expect("addr"),
        }
    }

    #[tokio::test]
    async fn only_connections_no_longer_allowed_close() {
        let connections = Connections::default();
        let mut web = connections.track(outbound("10.0.0.2:80"));
        let db = connections.track(outbound("10.0.0.3:5432"));
        assert_eq!(connections.len(), 2);
        let closed = connections
            .recheck(|r| !matches!(r, Recheck::Outbound { target, .. } if target.port() == 80));
        assert_eq!(closed, vec![outbound("10.0.0.2:80")]);
        tokio::time::timeout(std::time::Duration::from_secs(1), web.closed())
            .await
            .expect("closed at once");
        // Already closing: not reported twice.
        assert!(
            connections.recheck(|_| false).len() == 1,
            "only db is left to close"
        );
        drop((web, db));
        assert!(connections.is_empty());
    }
}
