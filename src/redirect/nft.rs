//! Runs the `nft` program in the current network namespace: JSON batches in, listings out,
//! with nft's own error message kept.
//!
//! The nftables crate's `apply_ruleset*` does not pipe stderr, so its error loses nft's message
//! (nftables-rs#209, open); this wrapper is the one place weft runs `nft`.

use std::io;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nftables::schema::Nftables;
use thiserror::Error;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

/// How long one `nft` run may take before weft gives up on it (a batch takes milliseconds).
const NFT_TIMEOUT: Duration = Duration::from_secs(10);

/// What went wrong running `nft`.
#[derive(Debug, Error)]
pub enum NftError {
    /// The program is not there (nftables not installed, or not on PATH).
    #[error("nft program {program:?} not found: install nftables or put nft on PATH")]
    NotFound { program: PathBuf },
    /// The program could not be started, or its input not written.
    #[error("running {program:?}: {source}")]
    Io { program: PathBuf, source: io::Error },
    /// The program exited with an error; `stderr` is nft's own message.
    #[error("{program:?} {args} failed ({status}): {stderr}")]
    Failed {
        program: PathBuf,
        args: String,
        status: ExitStatus,
        stderr: String,
    },
    /// The program did not finish in time (it is killed).
    #[error("{program:?} {args} did not finish within {NFT_TIMEOUT:?}")]
    TimedOut { program: PathBuf, args: String },
    /// The batch could not be encoded as JSON.
    #[error("encoding an nft batch as JSON: {0}")]
    Encode(#[from] serde_json::Error),
}

/// The `nft` program weft runs: `nft` from PATH unless told otherwise.
#[derive(Debug, Clone)]
pub struct Nft {
    program: PathBuf,
}

impl Default for Nft {
    fn default() -> Self {
        Self::new("nft")
    }
}

impl Nft {
    /// Runs `program` (a bare name is looked up on PATH) as nft.
    pub fn new(program: impl Into<PathBuf>) -> Self {
        Self {
            program: program.into(),
        }
    }

    /// Applies `batch` as one transaction (`nft -j -f -`): all of it or nothing.
    pub async fn apply(&self, batch: &Nftables<'_>) -> Result<(), NftError> {
        let json = serde_json::to_vec(batch)?;
        self.run(&["-j", "-f", "-"], Some(&json)).await.map(drop)
    }

    /// Lists one table as nft's JSON (`nft -j list table FAMILY NAME`); `None` if it does not exist.
    pub async fn list_table(&self, family: &str, name: &str) -> Result<Option<String>, NftError> {
        match self.run(&["-j", "list", "table", family, name], None).await {
            Ok(out) => Ok(Some(out)),
            // nft reports a missing table as ENOENT from the kernel; netavark matches the same text.
            Err(NftError::Failed { stderr, .. })
                if stderr.contains("No such file or directory") =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    async fn run(&self, args: &[&str], stdin: Option<&[u8]>) -> Result<String, NftError> {
        let program = &self.program;
        let io_err = |source| NftError::Io {
            program: program.clone(),
            source,
        };
        let mut child = Command::new(program)
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| match source.kind() {
                io::ErrorKind::NotFound => NftError::NotFound {
                    program: program.clone(),
                },
                _ => io_err(source),
            })?;
        if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
            // nft reads its whole input before writing anything, so writing first cannot deadlock.
            match pipe.write_all(input).await {
                // nft quit early: its exit status and stderr below say why.
                Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {}
                other => other.map_err(io_err)?,
            }
        }
        let joined = || args.join(" ");
        let output = tokio::time::timeout(NFT_TIMEOUT, child.wait_with_output())
            .await
            .map_err(|_| NftError::TimedOut {
                program: program.clone(),
                args: joined(),
            })?
            .map_err(io_err)?;
        if !output.status.success() {
            return Err(NftError::Failed {
                program: program.clone(),
                args: joined(),
                status: output.status,
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            });
        }
        tracing::debug!(program = ?program, args = %joined(), "nft ran");
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }
}
