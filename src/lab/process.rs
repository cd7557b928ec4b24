//! Processes the lab starts inside its namespaces (`ip netns exec`), with what they write kept
//! as lines that callers read, search and wait on.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt as _, AsyncRead, BufReader};
use tokio::sync::Notify;

/// Lines kept per process: older ones are dropped, so a long benchmark's logs stay bounded.
const KEPT_LINES: usize = 100_000;

/// What a process wrote on stdout and stderr, line by line, interleaved as it arrived.
#[derive(Debug, Default)]
pub struct Output {
    lines: Mutex<Lines>,
    grew: Notify,
}

#[derive(Debug, Default)]
struct Lines {
    kept: VecDeque<String>,
    /// How many lines were dropped from the front.
    dropped: usize,
}

impl Output {
    /// How many lines have been written so far: a mark for [`Output::since`].
    pub fn mark(&self) -> usize {
        let lines = self.lock();
        lines.dropped + lines.kept.len()
    }

    /// The lines written since `mark` (those still kept).
    pub fn since(&self, mark: usize) -> Vec<String> {
        let lines = self.lock();
        let skip = mark.saturating_sub(lines.dropped);
        lines.kept.iter().skip(skip).cloned().collect()
    }

    /// The last `n` lines.
    pub fn tail(&self, n: usize) -> Vec<String> {
        let lines = self.lock();
        let skip = lines.kept.len().saturating_sub(n);
        lines.kept.iter().skip(skip).cloned().collect()
    }

    /// Waits up to `timeout` for a line written since `mark` that `matches`; returns it.
    pub async fn wait_for(
        &self,
        mark: usize,
        timeout: Duration,
        matches: impl Fn(&str) -> bool,
    ) -> Option<String> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut seen = mark;
        loop {
            // Registered before looking, so a line pushed in between still wakes us.
            let grew = self.grew.notified();
            let fresh = self.since(seen);
            seen += fresh.len();
            if let Some(line) = fresh.into_iter().find(|l| matches(l)) {
                return Some(line);
            }
            if tokio::time::timeout_at(deadline, grew).await.is_err() {
                return None;
            }
        }
    }

    fn push(&self, line: String) {
        {
            let mut lines = self.lock();
            if lines.kept.len() == KEPT_LINES {
                lines.kept.pop_front();
                lines.dropped += 1;
            }
            lines.kept.push_back(line);
        }
        self.grew.notify_waiters();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Lines> {
        // A panic while holding the lock leaves plain lines behind: still usable.
        self.lines.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A process the lab started. Cheap to clone; the lab keeps the process itself and kills it
/// when dropped.
#[derive(Debug, Clone)]
pub struct Process {
    pub(super) slot: usize,
    name: String,
    pid: Option<u32>,
    output: Arc<Output>,
}

impl Process {
    pub(super) fn new(slot: usize, name: String, pid: Option<u32>, output: Arc<Output>) -> Self {
        Self {
            slot,
            name,
            pid,
            output,
        }
    }

    /// The name it was started under.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its process id, while it was known.
    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// What it wrote.
    pub fn output(&self) -> &Output {
        &self.output
    }
}

/// Copies `stream` into `output`, line by line, until it ends.
pub(super) fn collect(stream: impl AsyncRead + Unpin + Send + 'static, output: Arc<Output>) {
    tokio::spawn(async move {
        let mut lines = BufReader::new(stream).lines();
        // A stream error ends the copy like end of file does: the process is gone or broken.
        while let Ok(Some(line)) = lines.next_line().await {
            output.push(line);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lines_are_kept_marked_and_awaited() {
        let output = Arc::new(Output::default());
        output.push("one".into());
        let mark = output.mark();
        assert_eq!(mark, 1);
        let waiting = {
            let output = output.clone();
            tokio::spawn(async move {
                output
                    .wait_for(mark, Duration::from_secs(5), |l| l.starts_with("th"))
                    .await
            })
        };
        output.push("two".into());
        output.push("three".into());
        assert_eq!(waiting.await.expect("joined").as_deref(), Some("three"));
        assert_eq!(output.since(mark), ["two", "three"]);
        assert_eq!(output.tail(1), ["three"]);
        assert_eq!(
            output
                .wait_for(output.mark(), Duration::from_millis(20), |_| true)
                .await,
            None
        );
    }
}
