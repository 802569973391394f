//! Takeover: a second `redirector run` with the same state directory
//! replaces the running agent without refusing a connection. The running
//! agent answers on `<state dir>/takeover.sock` (a unix seqpacket socket,
//! owner only):
//!
//! 1. the new agent connects and asks (`takeover`); each side checks the
//!    other's credentials (same user, a `redirector` process);
//! 2. the running agent sends every socket it listens on (host listeners,
//!    each pod's, the gateway's) with SCM_RIGHTS, by name;
//! 3. the new agent opens the same names from those sockets (the same
//!    kernel sockets: their accept queues go with them), adopts the pinned
//!    capture, serves every pod, and says `serving`;
//! 4. only then does the running agent stop accepting (`draining`) and
//!    drain its open connections until they end or `proxy.drainTimeout`,
//!    and exit. Both accept on the same sockets in between, so no instant
//!    exists at which a connection is refused.
//!
//! A running agent that does not answer in [`ANSWER`] (wedged, stopped)
//! is killed and the new agent starts alone, as after a crash: the pinned
//! capture refuses connections in the gap. A stale socket (no agent
//! behind it) is removed; one answered by another program is not trusted.

#![forbid(unsafe_code)]

use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::sys::handover::{self, Handover, FDS_PER_MESSAGE};

pub(super) const SOCKET: &str = "takeover.sock";
/// How long the running agent has to answer a takeover request.
pub(super) const ANSWER: Duration = Duration::from_secs(5);
/// How long a running agent waits for the new one to serve.
const SERVING: Duration = Duration::from_mins(2);

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
enum Message {
    Takeover { pid: u32, version: String },
    Sockets { names: Vec<String>, more: bool },
    Refused { reason: String },
    Serving,
    Draining,
}

fn send(fd: &OwnedFd, m: &Message, fds: &[std::os::fd::BorrowedFd<'_>]) -> std::io::Result<()> {
    handover::send(fd.as_fd(), &serde_json::to_vec(m).expect("serializable"), fds)
}

/// The next message; `None` when the peer closed.
fn recv(fd: &OwnedFd) -> std::io::Result<Option<(Message, Vec<OwnedFd>)>> {
    let (body, fds) = handover::recv(fd.as_fd())?;
    if body.is_empty() && fds.is_empty() {
        return Ok(None);
    }
    let m = serde_json::from_slice(&body)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("not a takeover message: {e}")))?;
    Ok(Some((m, fds)))
}

/// What a process at the other end is: its pid and name, when it is
/// another agent (the same user, a `redirector` process); else why not.
fn check_peer(fd: &OwnedFd) -> std::result::Result<u32, String> {
    let (pid, uid) = handover::peer(fd.as_fd()).map_err(|e| format!("no peer credentials: {e}"))?;
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    let comm = comm.trim_end();
    let me = nix::unistd::getuid().as_raw();
    if uid != me {
        return Err(format!("pid {pid} ({comm}) runs as uid {uid}, not {me}"));
    }
    if !comm.starts_with("redirector") {
        return Err(format!("pid {pid} ({comm}) is not a redirector agent"));
    }
    Ok(pid)
}

/// A takeover in progress, on the new agent's side.
pub(super) struct Incoming {
    conn: OwnedFd,
    pub(super) from_pid: u32,
}

/// Take over from the agent running with this state directory, if one
/// answers: its sockets land in `into.inherited`. `None`: no agent to take
/// over from (none, a stale socket, a wedged agent now killed); start
/// alone. An error: the running agent refused (it keeps serving).
pub(super) fn request(state_dir: &Path, into: &Handover) -> Result<Option<Incoming>> {
    let path = state_dir.join(SOCKET);
    if !path.exists() {
        return Ok(None);
    }
    let conn = match handover::connect(&path) {
        Ok(c) => c,
        Err(e) if matches!(e.raw_os_error(), Some(libc::ECONNREFUSED | libc::ENOENT)) => {
            warn!(socket = %path.display(), "a stale takeover socket was left (no agent answers on it): removed; starting alone");
            let _ = std::fs::remove_file(&path);
            return Ok(None);
        }
        Err(e) => bail!("cannot reach the running agent at {}: {e}; stop it or remove the socket", path.display()),
    };
    let from_pid = match check_peer(&conn) {
        Ok(pid) => pid,
        Err(why) => {
            warn!(socket = %path.display(), %why, "the takeover socket is not answered by an agent: not taking over; starting alone");
            return Ok(None);
        }
    };
    handover::set_timeout(conn.as_fd(), Some(ANSWER))?;
    let ask = Message::Takeover { pid: std::process::id(), version: env!("CARGO_PKG_VERSION").into() };
    send(&conn, &ask, &[]).context("asking the running agent to hand over")?;
    loop {
        match recv(&conn) {
            Ok(Some((Message::Sockets { names, more }, fds))) => {
                if names.len() != fds.len() {
                    bail!(
                        "the running agent (pid {from_pid}) sent {} sockets for {} names; not taking over",
                        fds.len(),
                        names.len()
                    );
                }
                for (n, fd) in names.into_iter().zip(fds) {
                    into.inherited.insert(n, fd);
                }
                if !more {
                    break;
                }
            }
            Ok(Some((Message::Refused { reason }, _))) => {
                bail!("the running agent (pid {from_pid}) refused the takeover: {reason}; it keeps serving")
            }
            Ok(Some((m, _))) => {
                bail!("the running agent (pid {from_pid}) answered {m:?} to a takeover; not taking over")
            }
            Ok(None) => bail!("the running agent (pid {from_pid}) closed the takeover; it keeps serving"),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                stop_wedged(from_pid);
                into.inherited.forget("");
                return Ok(None);
            }
            Err(e) => bail!("the takeover from pid {from_pid} failed: {e}; it keeps serving"),
        }
    }
    info!(from_pid, sockets = into.inherited.len(), names = ?summary(&into.inherited.names()), "takeover: sockets received from the running agent");
    Ok(Some(Incoming { conn, from_pid }))
}

/// The running agent did not answer: it is wedged (stopped, deadlocked).
/// It is killed, so the ports are ours; the pinned capture refuses
/// connections until this agent serves.
fn stop_wedged(pid: u32) {
    warn!(
        pid,
        timeout_ms = ANSWER.as_millis() as u64,
        "the running agent did not answer the takeover in time: killing it (SIGKILL) and serving alone"
    );
    crate::sys::process::signal(pid, libc::SIGKILL);
    let deadline = std::time::Instant::now() + ANSWER;
    while std::time::Instant::now() < deadline && process_lives(pid) {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether `pid` runs (a zombie has let go of its sockets).
fn process_lives(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X')),
        Err(_) => false,
    }
}

/// Names grouped for a log line: `host` and `gateway` sockets by name,
/// pods' counted.
fn summary(names: &[String]) -> Vec<String> {
    let mut out: Vec<String> = names.iter().filter(|n| !n.starts_with("pod/")).cloned().collect();
    let pods: std::collections::BTreeSet<&str> =
        names.iter().filter_map(|n| n.strip_prefix("pod/")).filter_map(|n| n.split('/').next()).collect();
    if !pods.is_empty() {
        out.push(format!("{} sockets of {} pods", names.len() - out.len(), pods.len()));
    }
    out
}

impl Incoming {
    /// Every socket is being accepted on here: the old agent may stop.
    pub(super) fn serving(self, left_unclaimed: &[String]) {
        if !left_unclaimed.is_empty() {
            warn!(sockets = ?left_unclaimed, "takeover: sockets of pods this agent does not serve were closed");
        }
        let acked = send(&self.conn, &Message::Serving, &[])
            .and_then(|()| recv(&self.conn))
            .is_ok_and(|m| matches!(m, Some((Message::Draining, _))));
        if acked {
            info!(from_pid = self.from_pid, "takeover complete: serving; the previous agent drains and exits");
        } else {
            warn!(from_pid = self.from_pid, "takeover: the previous agent did not confirm it stopped accepting; serving anyway (both accept on the same sockets)");
        }
    }
}

/// Where the running agent stands with takeovers.
enum State {
    Open,
    Busy(u32),
    HandedOver(u32),
}

/// Answer takeover requests on `<state dir>/takeover.sock` for the life of
/// the agent (a thread: the exchange is a few blocking messages). The
/// returned receiver yields the new agent's pid once it serves.
pub(super) fn offer(state_dir: &Path, handover: Arc<Handover>) -> Result<tokio::sync::oneshot::Receiver<u32>> {
    let path = state_dir.join(SOCKET);
    let listener =
        handover::listen(&path).with_context(|| format!("opening the takeover socket {}", path.display()))?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let tx = Arc::new(Mutex::new(Some(tx)));
    let state = Arc::new(Mutex::new(State::Open));
    std::thread::Builder::new().name("takeover".into()).spawn(move || loop {
        let Ok(conn) = handover::accept(listener.as_fd()) else { continue };
        let (handover, state, tx, path) = (Arc::clone(&handover), Arc::clone(&state), Arc::clone(&tx), path.clone());
        let _ = std::thread::Builder::new().name("takeover-peer".into()).spawn(move || {
            answer(&conn, &handover, &state, &tx, &path);
        });
    })?;
    Ok(rx)
}

type Done = Mutex<Option<tokio::sync::oneshot::Sender<u32>>>;

/// One takeover request, from its first message to `serving` (or its end).
fn answer(conn: &OwnedFd, handover: &Handover, state: &Mutex<State>, done: &Done, path: &Path) {
    let refuse = |reason: String| {
        warn!(socket = %path.display(), %reason, "takeover request refused; still serving");
        let _ = send(conn, &Message::Refused { reason }, &[]);
    };
    let pid = match check_peer(conn) {
        Ok(pid) => pid,
        Err(why) => return refuse(why),
    };
    let _ = handover::set_timeout(conn.as_fd(), Some(ANSWER));
    match recv(conn) {
        Ok(Some((Message::Takeover { pid: asked, version }, _))) if asked == pid => {
            info!(pid, version, "takeover asked by a new agent");
        }
        Ok(other) => return refuse(format!("pid {pid} sent {other:?}, not a takeover request")),
        Err(e) => return refuse(format!("pid {pid}: {e}")),
    }
    {
        let mut s = state.lock().expect("takeover state");
        match *s {
            State::Open => *s = State::Busy(pid),
            State::Busy(other) => return refuse(format!("a takeover by pid {other} is in progress")),
            State::HandedOver(other) => return refuse(format!("this agent already handed over to pid {other}")),
        }
    }
    let outcome = hand_sockets(conn, handover, pid);
    let mut s = state.lock().expect("takeover state");
    match outcome {
        Ok(()) => {
            *s = State::HandedOver(pid);
            if let Some(tx) = done.lock().expect("takeover done").take() {
                let _ = tx.send(pid);
            }
            let _ = send(conn, &Message::Draining, &[]);
        }
        Err(e) => {
            *s = State::Open;
            warn!(pid, error = %e, "the new agent gave up the takeover; still serving");
        }
    }
}

/// Send every socket, then wait for the new agent to serve.
fn hand_sockets(conn: &OwnedFd, handover: &Handover, pid: u32) -> Result<()> {
    let sockets = handover.ours.duplicates()?;
    let names: Vec<String> = sockets.iter().map(|(n, _)| n.clone()).collect();
    let chunks: Vec<&[(String, OwnedFd)]> = sockets.chunks(FDS_PER_MESSAGE).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        let names = chunk.iter().map(|(n, _)| n.clone()).collect();
        let fds: Vec<_> = chunk.iter().map(|(_, fd)| fd.as_fd()).collect();
        send(conn, &Message::Sockets { names, more: i + 1 < chunks.len() }, &fds)?;
    }
    if chunks.is_empty() {
        send(conn, &Message::Sockets { names: Vec::new(), more: false }, &[])?;
    }
    info!(pid, sockets = names.len(), names = ?summary(&names), "takeover: sockets handed to the new agent; waiting for it to serve");
    handover::set_timeout(conn.as_fd(), Some(SERVING))?;
    match recv(conn)? {
        Some((Message::Serving, _)) => Ok(()),
        Some((m, _)) => bail!("it sent {m:?}"),
        None => bail!("it closed the takeover before serving"),
    }
}
