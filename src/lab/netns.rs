//! One network namespace the lab made: configured with `ip`, entered by a thread with `setns`
//! (sockets opened there stay in the namespace), deleted when dropped.

use std::fs::File;
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::sched::{CloneFlags, setns};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use super::LabError;

/// A network namespace made by the lab, deleted (with every interface and route in it) when
/// dropped.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Makes the namespace `name` (`ip netns add`), with its loopback up.
    pub fn create(name: &str) -> Result<Self, LabError> {
        run_ip(&["netns", "add", name], None)?;
        let netns = Self {
            name: name.to_owned(),
        };
        netns.ip(&["link", "set", "lo", "up"])?;
        Ok(netns)
    }

    /// The namespace's name, as `ip netns` knows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n NAME args…`.
    pub fn ip(&self, args: &[&str]) -> Result<(), LabError> {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        run_ip(&all, None)
    }

    /// Runs `commands` (each an `ip` command line without `ip`) in one `ip -batch` process,
    /// stopping at the first that fails.
    pub fn ip_batch(&self, commands: &[String]) -> Result<(), LabError> {
        if commands.is_empty() {
            return Ok(());
        }
        let script = commands.join("\n") + "\n";
        run_ip(&["-n", &self.name, "-batch", "-"], Some(&script))
    }

    /// Sets sysctls of the namespace: `("net/ipv4/ip_forward", "1")` writes
    /// `/proc/sys/net/ipv4/ip_forward` as seen from inside it.
    pub fn sysctl(&self, settings: &[(String, &str)]) -> Result<(), LabError> {
        self.run(|| {
            for (key, value) in settings {
                // /proc/sys/net is resolved against the opening thread's namespace.
                let path = format!("/proc/sys/{key}");
                std::fs::write(&path, value).map_err(|e| LabError::Command {
                    command: format!("sysctl {key}={value} in {}", self.name),
                    error: e.to_string(),
                })?;
            }
            Ok(())
        })?
    }

    /// Runs `f` on a thread that has entered the namespace, and returns what it returns.
    /// Sockets `f` opens stay in the namespace; processes it starts run there.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, LabError> {
        let path = format!("/run/netns/{}", self.name);
        let enter = |error: String| LabError::Enter {
            netns: self.name.clone(),
            error,
        };
        let ns = File::open(&path).map_err(|e| enter(format!("{path}: {e}")))?;
        std::thread::scope(|scope| {
            let thread = scope.spawn(move || {
                // setns moves only this thread, which ends with the scope: nothing else runs
                // in the namespace by accident.
                setns(&ns, CloneFlags::CLONE_NEWNET).map_err(|e| enter(e.to_string()))?;
                Ok(f())
            });
            thread
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Runs `future` to completion inside the namespace, on a current-thread runtime of its
    /// own (for work that must open sockets as it goes, such as a server accepting there).
    pub fn block_on<F: Future + Send>(&self, future: F) -> Result<F::Output, LabError>
    where
        F::Output: Send,
    {
        self.run(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map(|runtime| runtime.block_on(future))
                .map_err(|e| LabError::Enter {
                    netns: self.name.clone(),
                    error: format!("a runtime: {e}"),
                })
        })?
    }

    /// A TCP listener on `addr` inside the namespace, served from the calling runtime (call
    /// it inside one).
    pub fn listen(&self, addr: SocketAddr) -> Result<TcpListener, LabError> {
        let socket = |error: std::io::Error| LabError::Socket {
            netns: self.name.clone(),
            addr,
            error,
        };
        let listener = self.run(|| {
            let listener = std::net::TcpListener::bind(addr)?;
            listener.set_nonblocking(true)?;
            Ok(listener)
        })?;
        TcpListener::from_std(listener.map_err(socket)?).map_err(socket)
    }

    /// A TCP connection from inside the namespace to `to`, from address `from` when given
    /// (an address of this namespace), within `timeout`.
    pub async fn connect(
        &self,
        from: Option<IpAddr>,
        to: SocketAddr,
        timeout: Duration,
    ) -> Result<TcpStream, LabError> {
        let socket = |error: std::io::Error| LabError::Socket {
            netns: self.name.clone(),
            addr: to,
            error,
        };
        let made = self.run(|| {
            let socket = if to.is_ipv4() {
                TcpSocket::new_v4()
            } else {
                TcpSocket::new_v6()
            }?;
            if let Some(from) = from {
                socket.bind(SocketAddr::new(from, 0))?;
            }
            Ok(socket)
        })?;
        let connecting = made.map_err(socket)?.connect(to);
        match tokio::time::timeout(timeout, connecting).await {
            Ok(connected) => connected.map_err(socket),
            Err(_) => Err(socket(std::io::ErrorKind::TimedOut.into())),
        }
    }

    /// The processes running in the namespace (`ip netns pids`).
    pub fn pids(&self) -> Vec<u32> {
        pids(&self.name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace also removes its veth ends, routes and nftables tables.
        if let Err(e) = run_ip(&["netns", "del", &self.name], None) {
            tracing::warn!(netns = %self.name, error = %e, "could not delete a network namespace");
        }
    }
}

/// The processes running in namespace `name`.
pub(super) fn pids(name: &str) -> Vec<u32> {
    Command::new("ip")
        .args(["netns", "pids", name])
        .output()
        .map(|out| {
            String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .filter_map(|pid| pid.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Runs `ip args…` with `stdin` as its input, failing with ip's own message.
pub(super) fn run_ip(args: &[&str], stdin: Option<&str>) -> Result<(), LabError> {
    let command = || format!("ip {}", args.join(" "));
    let failed = |error: String| LabError::Command {
        command: command(),
        error,
    };
    let mut child = Command::new("ip")
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| failed(e.to_string()))?;
    if let (Some(text), Some(mut input)) = (stdin, child.stdin.take()) {
        // A write error means ip quit early; its exit status and stderr say why.
        let _ = input.write_all(text.as_bytes());
    }
    let out = child
        .wait_with_output()
        .map_err(|e| failed(e.to_string()))?;
    if out.status.success() {
        return Ok(());
    }
    let mut error = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    // `ip -batch` names the failing line as `-:N`: show that command.
    if let Some(text) = stdin
        && let Some(line) = error
            .rsplit_once("-:")
            .and_then(|(_, n)| n.trim().parse::<usize>().ok())
            .and_then(|n| text.lines().nth(n.saturating_sub(1)))
    {
        error = format!("{error} (at `{line}`)");
    }
    if error.is_empty() {
        error = out.status.to_string();
    }
    Err(failed(error))
}
