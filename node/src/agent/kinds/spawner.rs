//! Where the `exec` kind's processes are forked, so that they die with their node even when
//! it is killed with `kill -9`: each process gets a parent-death signal (SIGKILL), and its
//! process group a keeper that SIGKILLs the whole group when the node dies.
//!
//! **One long-lived spawner thread.** Linux sends the parent-death signal when the *thread*
//! that forked the child exits, not the process. Tokio's blocking-pool threads exit after 10 s
//! idle, and a runtime worker that runs `block_in_place` turns into one; a child forked there
//! would be killed long before its node stops. So every fork happens on one plain thread that
//! is never asked to stop and lives as long as the process. It only forks: the child is
//! registered with the caller's runtime (its handle is entered while spawning), which waits for
//! it and reads its output as before.
//!
//! **A keeper per group.** The parent-death signal reaches only the direct child; what a shell
//! forks stays in its group and would be re-parented to init. The keeper is forked from the
//! spawner thread too, joins the group, blocks every signal and waits. Its own parent-death
//! signal wakes it, and once its parent is no longer the node it SIGKILLs the group, itself
//! included. While it lives the group id cannot be reused (a group id is not reused while a
//! member lives), so signalling the group never reaches a stranger, even after the leader is
//! reaped. It is a forked copy of the node that never executes a program, so between fork and
//! exit it calls only async-signal-safe functions and allocates nothing; it closes every file
//! descriptor first (it must not hold the node's sockets or files). `ps -o comm` shows it as
//! `mode-keeper`.

use std::io;
use std::sync::mpsc;
use std::sync::Mutex;

use tokio::process::{Child, Command};

use crate::service::lock;

/// A process started by [`spawn`], and its group's keeper (unless that could not be set up).
pub(super) struct Spawned {
    pub(super) child: Child,
    pub(super) keeper: io::Result<Keeper>,
}

/// The keeper of one process group: a child of this process that nothing else reaps.
#[derive(Debug)]
pub(super) struct Keeper {
    pid: libc::pid_t,
}

impl Keeper {
    pub(super) fn pid(&self) -> libc::pid_t {
        self.pid
    }

    /// SIGKILL and reap it. Blocks only while a SIGKILLed process dies (the keeper does
    /// nothing but wait for signals, so that is immediate).
    pub(super) fn kill_and_reap(self) {
        // SAFETY: plain syscalls on our own unreaped child: its pid cannot belong to another
        // process until the waitpid below.
        unsafe {
            libc::kill(self.pid, libc::SIGKILL);
            while libc::waitpid(self.pid, std::ptr::null_mut(), 0) < 0
                && io::Error::last_os_error().raw_os_error() == Some(libc::EINTR)
            {}
        }
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// The spawner thread's queue, started on first use.
static SPAWNER: Mutex<Option<mpsc::Sender<Job>>> = Mutex::new(None);

fn submit(job: Job) -> io::Result<()> {
    let mut spawner = lock(&SPAWNER);
    let job = match spawner.as_ref() {
        Some(tx) => match tx.send(job) {
            Ok(()) => return Ok(()),
            // The thread is gone (it never is: the loop catches panics); start another.
            Err(mpsc::SendError(job)) => job,
        },
        None => job,
    };
    let (tx, rx) = mpsc::channel::<Job>();
    std::thread::Builder::new()
        .name("mode-spawner".into())
        .spawn(move || {
            while let Ok(job) = rx.recv() {
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
            }
        })
        .map_err(|e| io::Error::other(format!("cannot start the process spawner thread: {e}")))?;
    tx.send(job)
        .map_err(|_| io::Error::other("the process spawner thread stopped at once"))?;
    *spawner = Some(tx);
    Ok(())
}

/// Spawn `command` (which must put the process in a group of its own, `process_group(0)`) from
/// the spawner thread, with a parent-death signal, and give its group a keeper.
pub(super) async fn spawn(mut command: Command) -> io::Result<Spawned> {
    let node = std::process::id();
    // SAFETY: the hook runs in the child between fork and exec, and only calls prctl and
    // getppid, which are async-signal-safe, and builds an io::Error from an errno, which does
    // not allocate.
    unsafe {
        command.pre_exec(move || {
            set_parent_death_signal(libc::SIGKILL)?;
            // The node may have died before the signal was set up: then nobody sends it.
            if libc::getppid() as u32 != node {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    let runtime = tokio::runtime::Handle::current();
    let (tx, rx) = tokio::sync::oneshot::channel();
    submit(Box::new(move || {
        // The child's pipes and exit are watched by the caller's runtime.
        let _entered = runtime.enter();
        let spawned = command.spawn().map(|child| {
            let keeper = match child.id().and_then(|p| libc::pid_t::try_from(p).ok()) {
                Some(pgid) => fork_keeper(pgid),
                None => Err(io::Error::other("the process has no pid")),
            };
            Spawned { child, keeper }
        });
        let _ = tx.send(spawned);
    }))?;
    rx.await
        .map_err(|_| io::Error::other("the process spawner thread failed while spawning"))?
}

#[cfg(target_os = "linux")]
fn set_parent_death_signal(signal: libc::c_int) -> io::Result<()> {
    // SAFETY: prctl(PR_SET_PDEATHSIG) takes plain integers.
    match unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, signal as libc::c_ulong) } {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

/// Elsewhere there is no parent-death signal: the process outlives a killed node until the
/// next start reaps it from the ledger.
#[cfg(not(target_os = "linux"))]
fn set_parent_death_signal(_signal: libc::c_int) -> io::Result<()> {
    Ok(())
}

/// Fork the keeper of group `pgid` (see the module docs). Runs on the spawner thread, so that
/// the keeper's parent-death signal, too, fires only when the node dies.
#[cfg(target_os = "linux")]
fn fork_keeper(pgid: libc::pid_t) -> io::Result<Keeper> {
    // Everything the keeper uses is prepared before the fork: after it, it may not allocate.
    // SAFETY: getpid, sigfillset on a local set and fork take no memory of ours but the set.
    let node = unsafe { libc::getpid() };
    let mut every_signal: libc::sigset_t = unsafe { std::mem::zeroed() };
    unsafe { libc::sigfillset(&mut every_signal) };
    // SAFETY: the child runs only `keep`, which calls async-signal-safe functions and exits.
    match unsafe { libc::fork() } {
        -1 => Err(io::Error::last_os_error()),
        0 => unsafe { keep(pgid, node, &every_signal) },
        pid => {
            // Also from here, so that the keeper is in the group when this returns, whichever
            // of the two runs first (the shells' way).
            // SAFETY: plain syscalls on our own child, which never executes a program.
            if unsafe { libc::setpgid(pid, pgid) } != 0 {
                let e = io::Error::last_os_error();
                Keeper { pid }.kill_and_reap();
                return Err(io::Error::new(
                    e.kind(),
                    format!("cannot put the keeper in process group {pgid}: {e}"),
                ));
            }
            Ok(Keeper { pid })
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn fork_keeper(_pgid: libc::pid_t) -> io::Result<Keeper> {
    Err(io::Error::other(
        "process group keepers need Linux (a parent-death signal)",
    ))
}

/// The keeper's whole life, in the forked child.
///
/// # Safety
///
/// Only in a child just forked from the spawner thread; never returns.
#[cfg(target_os = "linux")]
unsafe fn keep(pgid: libc::pid_t, node: libc::pid_t, every_signal: &libc::sigset_t) -> ! {
    // SAFETY (the whole function): async-signal-safe syscalls on plain integers and on the set
    // prepared before the fork; no allocation, no lock, no unwinding.
    unsafe {
        // A group stop (SIGTERM) must not end the keeper before the group is gone: every
        // signal is blocked and merely wakes the wait below. SIGKILL still ends it.
        libc::sigprocmask(libc::SIG_SETMASK, every_signal, std::ptr::null_mut());
        if libc::syscall(libc::SYS_close_range, 0u32, u32::MAX, 0u32) != 0 {
            for fd in 0..1024 {
                libc::close(fd);
            }
        }
        libc::setpgid(0, pgid);
        libc::prctl(libc::PR_SET_NAME, c"mode-keeper".as_ptr() as libc::c_ulong);
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGHUP as libc::c_ulong);
        // Checked after setting the signal: the node may already be gone. Any other signal
        // (a group stop, something in the group signalling its group) leaves it waiting.
        while libc::getppid() == node {
            libc::sigwaitinfo(every_signal, std::ptr::null_mut());
        }
        libc::kill(-pgid, libc::SIGKILL);
        libc::_exit(0)
    }
}
