//! Running an emulator: stdout read line by line (echoed to the terminal and
//! handed to the caller), a hard timeout, and no orphans.
//!
//! The emulator gets its own process group, so a timeout or the caller's
//! decision to stop kills the whole group (SIGKILL). Because its own group
//! does not receive the terminal's Ctrl-C, the runner installs a
//! SIGINT/SIGTERM/SIGHUP handler that kills every registered group before
//! exiting, and each child also asks the kernel to kill it should the runner
//! die (`PR_SET_PDEATHSIG`). Stdin is `/dev/null`: runs never wait for input.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{mpsc, Once};
use std::time::{Duration, Instant};

/// What the caller wants after seeing a line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Control {
    Continue,
    /// Stop the emulator once this much more time has passed (it may exit by
    /// itself first). Earlier requests are not pushed back by later ones.
    StopAfter(Duration),
}

/// How a run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunEnd {
    /// The emulator exited (its exit code; `None` if killed by a signal).
    Exited(Option<i32>),
    /// The timeout expired and the emulator was killed.
    TimedOut(Duration),
    /// The caller asked to stop (see [`Control::StopAfter`]) and it was killed.
    Stopped,
}

impl RunEnd {
    /// Words for "cases that never reported" (see `summary`).
    pub fn describe(&self) -> String {
        match self {
            RunEnd::Exited(_) | RunEnd::Stopped => "node output ended".to_string(),
            RunEnd::TimedOut(t) => format!("timed out after {} s", t.as_secs()),
        }
    }
}

/// Process groups to kill if the runner is interrupted (0 = free slot).
static GROUPS: [AtomicI32; 8] = [const { AtomicI32::new(0) }; 8];
static HANDLERS: Once = Once::new();

extern "C" fn on_signal(signal: libc::c_int) {
    for slot in &GROUPS {
        let pgid = slot.load(Ordering::SeqCst);
        if pgid > 0 {
            // SAFETY: kill(2) is async-signal-safe; pgid is a group we made.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
        }
    }
    // SAFETY: _exit(2) is async-signal-safe and ends the process at once.
    unsafe { libc::_exit(128 + signal) };
}

fn install_handlers() {
    HANDLERS.call_once(|| {
        for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            let handler: extern "C" fn(libc::c_int) = on_signal;
            // SAFETY: the handler only calls async-signal-safe functions and
            // reads atomics.
            unsafe { libc::signal(signal, handler as libc::sighandler_t) };
        }
    });
}

/// A background process group (a cluster node, the link relay) that an
/// interrupt of the runner (Ctrl-C) kills with it while this lives;
/// dropping it leaves the group alone.
pub struct InterruptGuard(Option<usize>);

/// Kill group `pgid` if the runner is interrupted while the guard lives.
pub fn kill_on_interrupt(pgid: u32) -> InterruptGuard {
    install_handlers();
    let pgid = i32::try_from(pgid).unwrap_or(0);
    InterruptGuard((pgid > 0).then_some(()).and_then(|()| {
        GROUPS.iter().position(|s| {
            s.compare_exchange(0, pgid, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
        })
    }))
}

impl Drop for InterruptGuard {
    fn drop(&mut self) {
        if let Some(slot) = self.0 {
            GROUPS[slot].store(0, Ordering::SeqCst);
        }
    }
}

/// Kills the child's process group and reaps it when dropped, so no early
/// return or panic leaves an emulator running.
struct Guard {
    child: Child,
    slot: Option<usize>,
}

impl Guard {
    fn kill(&mut self) {
        let pgid = self.child.id() as i32;
        // SAFETY: signalling the process group this runner created (the
        // child is its leader, process_group(0)); harmless if already gone.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.kill();
        } else {
            // The leader is gone; stragglers in its group are killed too.
            // SAFETY: as in `kill`.
            unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        }
        if let Some(slot) = self.slot {
            GROUPS[slot].store(0, Ordering::SeqCst);
        }
    }
}

/// Run `cmd`, handing every stdout line (without its line end) to
/// `on_line`, echoing it to our stdout first when `echo` is set. Kills the
/// emulator after `timeout` (if given) or when `on_line` asks to stop.
pub fn run_streaming(
    mut cmd: Command,
    timeout: Option<Duration>,
    echo: bool,
    mut on_line: impl FnMut(&str) -> Control,
) -> io::Result<RunEnd> {
    install_handlers();
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .process_group(0);
    // SAFETY: runs in the child between fork and exec; prctl(2) is
    // async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let pgid = child.id() as i32;
    let slot = GROUPS.iter().position(|s| {
        s.compare_exchange(0, pgid, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    });
    let mut guard = Guard { child, slot };

    let (tx, rx) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let text = String::from_utf8_lossy(&buf);
                    let line = text.trim_end_matches(['\n', '\r']).to_string();
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            }
        }
    });

    let start = Instant::now();
    let deadline = timeout.map(|t| start + t);
    let mut stop_at: Option<Instant> = None;
    let end = loop {
        let now = Instant::now();
        let next = [deadline, stop_at].into_iter().flatten().min();
        let received = match next {
            Some(when) if when <= now => Err(mpsc::RecvTimeoutError::Timeout),
            Some(when) => rx.recv_timeout(when - now),
            None => rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected),
        };
        match received {
            Ok(line) => {
                if echo {
                    let mut out = io::stdout().lock();
                    let _ = writeln!(out, "{line}");
                    let _ = out.flush();
                }
                if let Control::StopAfter(grace) = on_line(&line) {
                    let when = Instant::now() + grace;
                    stop_at = Some(stop_at.map_or(when, |s| s.min(when)));
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                // Output ended: the emulator is exiting. Give it a moment,
                // then take it down regardless.
                let wait_until = Instant::now() + Duration::from_secs(5);
                let end = loop {
                    if let Some(status) = guard.child.try_wait()? {
                        break RunEnd::Exited(status.code());
                    }
                    if Instant::now() >= wait_until {
                        guard.kill();
                        break RunEnd::Stopped;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                };
                break end;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                guard.kill();
                let now = Instant::now();
                if deadline.is_some_and(|d| d <= now) && stop_at.is_none_or(|s| s > now) {
                    break RunEnd::TimedOut(timeout.unwrap_or_default());
                }
                break RunEnd::Stopped;
            }
        }
    };
    drop(guard);
    let _ = reader.join();
    Ok(end)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Command {
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(script);
        cmd
    }

    #[test]
    fn exit_code_and_lines() {
        let mut lines = Vec::new();
        let end = run_streaming(
            sh("printf 'a\\r\\nb\\n'; printf 'no newline'; exit 3"),
            None,
            false,
            |l| {
                lines.push(l.to_string());
                Control::Continue
            },
        )
        .unwrap();
        assert_eq!(end, RunEnd::Exited(Some(3)));
        assert_eq!(lines, ["a", "b", "no newline"]);
    }

    #[test]
    fn timeout_kills_the_whole_group() {
        let t0 = Instant::now();
        let mut lines = Vec::new();
        // A background child in the same group keeps the pipe open: only a
        // group kill ends the run.
        let end = run_streaming(
            sh("sleep 60 & echo started; wait"),
            Some(Duration::from_millis(500)),
            false,
            |l| {
                lines.push(l.to_string());
                Control::Continue
            },
        )
        .unwrap();
        assert_eq!(end, RunEnd::TimedOut(Duration::from_millis(500)));
        assert_eq!(lines, ["started"]);
        assert!(t0.elapsed() < Duration::from_secs(10));
        assert_eq!(end.describe(), "timed out after 0 s");
    }

    #[test]
    fn caller_can_stop_the_run() {
        let t0 = Instant::now();
        let end = run_streaming(
            sh("echo one; echo stop; sleep 60"),
            Some(Duration::from_secs(60)),
            false,
            |l| {
                if l == "stop" {
                    Control::StopAfter(Duration::from_millis(100))
                } else {
                    Control::Continue
                }
            },
        )
        .unwrap();
        assert_eq!(end, RunEnd::Stopped);
        assert!(t0.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn missing_program_is_an_error() {
        let err = run_streaming(Command::new("/nonexistent/emulator"), None, false, |_| {
            Control::Continue
        });
        assert!(err.is_err());
    }
}
