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
//! it and reads its output as before. The thread blocks every signal, so that the keeper starts
//! with them blocked; the programs it executes start with none blocked.
//!
//! **A keeper per group.** The parent-death signal reaches only the direct child; what a shell
//! forks stays in its group and would be re-parented to init. The keeper is a second child,
//! made on the spawner thread too and put in the group. It waits with every signal blocked;
//! its own parent-death signal wakes it, and once its parent is no longer the node it SIGKILLs
//! the group, itself included. While it lives the group id cannot be reused (a group id is not
//! reused while a member lives), so signalling the group never reaches a stranger, even after
//! the leader is reaped.
//!
//! The keeper is cloned with `CLONE_VM`: it shares the node's memory instead of copying it (a
//! forked copy would keep, page by page, every page the node writes afterwards: a copy of the
//! node's heap per instance). So it runs on a small stack of its own, touches no memory but
//! that stack, and makes only raw system calls: libc's wrappers would write `errno`, which
//! lives in the spawner thread's thread-local storage that the keeper shares. It closes every
//! file descriptor first (it must not keep the node's sockets and files open). It costs a
//! 64 KiB stack and a task; `ps` shows it as `mode-keeper` (comm) with the node's command line
//! and memory (the same memory, not a copy). Keepers exist on Linux x86_64 and aarch64; elsewhere
//! a group's grandchildren survive a killed node until its next start (see `ledger`).

use std::io;
use std::sync::mpsc;
use std::sync::Mutex;

use tokio::process::{Child, Command};

use super::exec::users::Credentials;
use crate::service::lock;

/// A process started by [`spawn`], and its group's keeper (unless that could not be set up).
pub(super) struct Spawned {
    pub(super) child: Child,
    pub(super) keeper: io::Result<Keeper>,
}

/// The keeper of one process group: a child of this process that nothing else reaps. Dropping
/// it SIGKILLs and reaps it.
#[derive(Debug)]
pub(super) struct Keeper {
    pid: libc::pid_t,
    /// Its stack (mmap'ed), unmapped once it is reaped.
    stack: Stack,
    /// What it reads (its arguments, and the lease deadline they point to), freed once it
    /// is reaped.
    args: Option<Box<KeeperArgs>>,
    _lease: Option<Lease>,
}

type Lease = std::sync::Arc<std::sync::atomic::AtomicU64>;

// SAFETY: the pointer is only read (by the keeper) while the Keeper that owns the cell lives.
unsafe impl Send for KeeperArgs {}
// SAFETY: as above; the cell is atomic.
unsafe impl Sync for KeeperArgs {}

/// The keeper's arguments: the only memory of the node it reads, besides the lease cell.
#[derive(Debug)]
#[repr(C)]
struct KeeperArgs {
    node: u32,
    pgid: i32,
    /// The group's singleton lease deadline (monotonic ns), or null for none.
    lease: *const std::sync::atomic::AtomicU64,
}

impl Keeper {
    pub(super) fn pid(&self) -> libc::pid_t {
        self.pid
    }
}

impl Drop for Keeper {
    /// Blocks only while a SIGKILLed process dies (the keeper only waits for signals, so that
    /// is immediate).
    fn drop(&mut self) {
        // SAFETY: plain syscalls on our own unreaped child: its pid cannot belong to another
        // process until the waitpid below.
        let reaped = unsafe {
            libc::kill(self.pid, libc::SIGKILL);
            loop {
                if libc::waitpid(self.pid, std::ptr::null_mut(), 0) == self.pid {
                    break true;
                }
                if io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                    break false;
                }
            }
        };
        if reaped {
            self.stack.unmap();
            drop(self.args.take());
        } else {
            // Its arguments must outlive it, too.
            std::mem::forget(self.args.take());
            // Never free a stack a keeper may still run on: leak the 64 KiB instead.
            tracing::warn!(
                "cannot reap the keeper pid {}: {}",
                self.pid,
                io::Error::last_os_error()
            );
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
            block_every_signal();
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

fn block_every_signal() {
    // SAFETY: sigfillset and pthread_sigmask on a local set.
    unsafe {
        let mut every: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut every);
        libc::pthread_sigmask(libc::SIG_BLOCK, &every, std::ptr::null_mut());
    }
}

/// Spawn `command` (which must put the process in a group of its own, `process_group(0)`) from
/// the spawner thread, with a parent-death signal, and give its group a keeper.
/// With `lease`, the keeper also kills the group once that deadline has passed (a singleton
/// whose node holds no lease any more), whatever the node is doing. With `switch`, the process
/// takes those ids before it executes the program (the keeper stays the node's).
pub(super) async fn spawn(
    mut command: Command,
    lease: Option<Lease>,
    switch: Option<Credentials>,
) -> io::Result<Spawned> {
    let node = std::process::id();
    // SAFETY: sigemptyset on a local set.
    let no_signal = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        set
    };
    // SAFETY: the hook runs in the child between fork and exec, and only calls setgroups,
    // setgid, setuid (as std's own `uid`/`gid` do there), sigprocmask, prctl and getppid,
    // and builds an io::Error from an errno, which does not allocate.
    unsafe {
        command.pre_exec(move || {
            // First: a change of ids clears the parent-death signal (commit_creds in the
            // kernel), so it is set after the switch.
            if let Some(switch) = &switch {
                switch.apply()?;
            }
            // The program starts with no signal blocked (the spawner thread blocks them all).
            if libc::sigprocmask(libc::SIG_SETMASK, &no_signal, std::ptr::null_mut()) != 0 {
                return Err(io::Error::last_os_error());
            }
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
                Some(pgid) => start_keeper(pgid, lease),
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

/// The keeper's stack.
#[derive(Debug)]
struct Stack {
    base: *mut libc::c_void,
    size: usize,
}

// SAFETY: the mapping is only ever unmapped, by its one owner.
unsafe impl Send for Stack {}
// SAFETY: as above; nothing reads through the pointer.
unsafe impl Sync for Stack {}

const KEEPER_STACK: usize = 64 * 1024;

impl Stack {
    fn map() -> io::Result<Stack> {
        // SAFETY: a fresh anonymous mapping, owned by the returned value.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                KEEPER_STACK,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Stack {
            base,
            size: KEEPER_STACK,
        })
    }

    fn unmap(&mut self) {
        if !self.base.is_null() {
            // SAFETY: our own mapping, no longer used by anyone.
            unsafe { libc::munmap(self.base, self.size) };
            self.base = std::ptr::null_mut();
        }
    }
}

/// Start the keeper of group `pgid` (see the module docs). Runs on the spawner thread, so that
/// the keeper's parent-death signal, too, fires only when the node dies.
#[cfg(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
))]
fn start_keeper(pgid: libc::pid_t, lease: Option<Lease>) -> io::Result<Keeper> {
    let mut stack = Stack::map()?;
    let args = Box::new(KeeperArgs {
        node: std::process::id(),
        pgid,
        lease: lease
            .as_ref()
            .map_or(std::ptr::null(), std::sync::Arc::as_ptr),
    });
    let arg = &*args as *const KeeperArgs as *mut libc::c_void;
    // SAFETY: the keeper runs `keep` on its own stack and only makes raw system calls (see the
    // module docs); the stack stays mapped until it is reaped (Keeper's drop).
    let pid = unsafe {
        let top = (stack.base as *mut u8).add(stack.size) as *mut libc::c_void;
        libc::clone(keep, top, libc::CLONE_VM | libc::SIGCHLD, arg)
    };
    if pid < 0 {
        let e = io::Error::last_os_error();
        stack.unmap();
        return Err(e);
    }
    let keeper = Keeper {
        pid,
        stack,
        args: Some(args),
        _lease: lease,
    };
    // SAFETY: plain syscall on our own child, which never executes a program.
    if unsafe { libc::setpgid(pid, pgid) } != 0 {
        let e = io::Error::last_os_error();
        drop(keeper);
        return Err(io::Error::new(
            e.kind(),
            format!("cannot put the keeper in process group {pgid}: {e}"),
        ));
    }
    Ok(keeper)
}

#[cfg(not(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
)))]
fn start_keeper(_pgid: libc::pid_t, _lease: Option<Lease>) -> io::Result<Keeper> {
    Err(io::Error::other(
        "process group keepers exist on Linux x86_64 and aarch64 only",
    ))
}

/// The keeper's whole life (see the module docs): only raw system calls, only its own stack.
#[cfg(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
))]
extern "C" fn keep(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the KeeperArgs the node keeps until this keeper is reaped; the lease
    // cell, too (Keeper holds both).
    let (pgid, node, lease) = unsafe {
        let args = &*(arg as *const KeeperArgs);
        (args.pgid as usize, args.node as usize, args.lease.as_ref())
    };
    // How often a lease is looked at.
    const LEASE_CHECK_NS: i64 = 10_000_000;
    let every_signal: u64 = !0;
    let signals = &every_signal as *const u64 as usize;
    let sigset_size = std::mem::size_of::<u64>();
    // SAFETY: raw system calls on integers and on `every_signal` (on this stack).
    unsafe {
        raw::syscall(
            libc::SYS_rt_sigprocmask,
            [libc::SIG_SETMASK as usize, signals, 0, sigset_size],
        );
        if raw::syscall(libc::SYS_close_range, [0, u32::MAX as usize, 0, 0]) != 0 {
            // Before Linux 5.9.
            for fd in 0..65_536 {
                raw::syscall(libc::SYS_close, [fd, 0, 0, 0]);
            }
        }
        raw::syscall(
            libc::SYS_prctl,
            [
                libc::PR_SET_NAME as usize,
                c"mode-keeper".as_ptr() as usize,
                0,
                0,
            ],
        );
        raw::syscall(
            libc::SYS_prctl,
            [libc::PR_SET_PDEATHSIG as usize, libc::SIGHUP as usize, 0, 0],
        );
        // Checked after setting the signal: the node may already be gone. Any other signal
        // (a group stop, something signalling its own group) leaves it waiting.
        while raw::syscall(libc::SYS_getppid, [0; 4]) as usize == node {
            let Some(lease) = lease else {
                raw::syscall(libc::SYS_rt_sigtimedwait, [signals, 0, 0, sigset_size]);
                continue;
            };
            // A singleton's group: also dies once the node's lease has passed, even if the
            // node cannot act (frozen by SIGSTOP, a stalled VM).
            let deadline = lease.load(std::sync::atomic::Ordering::Acquire);
            let mut now = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            raw::syscall(
                libc::SYS_clock_gettime,
                [
                    libc::CLOCK_MONOTONIC as usize,
                    &mut now as *mut libc::timespec as usize,
                    0,
                    0,
                ],
            );
            let now_ns = (now.tv_sec as u64)
                .wrapping_mul(1_000_000_000)
                .wrapping_add(now.tv_nsec as u64);
            if deadline != 0 && now_ns > deadline {
                break;
            }
            let pause = libc::timespec {
                tv_sec: 0,
                tv_nsec: LEASE_CHECK_NS,
            };
            raw::syscall(
                libc::SYS_rt_sigtimedwait,
                [
                    signals,
                    0,
                    &pause as *const libc::timespec as usize,
                    sigset_size,
                ],
            );
        }
        raw::syscall(
            libc::SYS_kill,
            [
                (pgid as libc::pid_t).wrapping_neg() as usize,
                libc::SIGKILL as usize,
                0,
                0,
            ],
        );
        loop {
            raw::syscall(libc::SYS_exit, [0; 4]);
        }
    }
}

/// System calls without libc: no `errno` (see the module docs).
#[cfg(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
))]
mod raw {
    /// The kernel's return value (a negative errno on failure).
    ///
    /// # Safety
    ///
    /// As for the system call `number` with these arguments.
    #[cfg(target_arch = "x86_64")]
    pub(super) unsafe fn syscall(number: libc::c_long, args: [usize; 4]) -> isize {
        let ret: isize;
        // SAFETY: the Linux x86_64 system call convention; rcx and r11 are clobbered.
        unsafe {
            std::arch::asm!(
                "syscall",
                inlateout("rax") number as isize => ret,
                in("rdi") args[0],
                in("rsi") args[1],
                in("rdx") args[2],
                in("r10") args[3],
                lateout("rcx") _,
                lateout("r11") _,
                options(nostack),
            );
        }
        ret
    }

    /// See the x86_64 version.
    ///
    /// # Safety
    ///
    /// As for the system call `number` with these arguments.
    #[cfg(target_arch = "aarch64")]
    pub(super) unsafe fn syscall(number: libc::c_long, args: [usize; 4]) -> isize {
        let ret: isize;
        // SAFETY: the Linux aarch64 system call convention.
        unsafe {
            std::arch::asm!(
                "svc 0",
                in("x8") number,
                inlateout("x0") args[0] as isize => ret,
                in("x1") args[1],
                in("x2") args[2],
                in("x3") args[3],
                options(nostack),
            );
        }
        ret
    }
}
