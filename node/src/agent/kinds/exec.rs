//! The `exec` kind: a supervised OS process whose output goes to the log and to the node's
//! [`OutputLog`] (what `modectl logs` reads), stopped with SIGTERM and then SIGKILL after the
//! instance's grace period.
//!
//! The process runs in its own process group and every signal goes to the whole group, so
//! what it forks (a shell's children) stops with it. The signals are sent by the task that
//! owns the [`Child`], and only until that task has reaped it: a reaped pid may already belong
//! to another process.
//!
//! The group never outlives its node: the process is forked with a parent-death signal and the
//! group has a keeper that kills it when the node dies (see [`super::spawner`]), and the group
//! is in the node's [`ProcessLedger`] until it is reaped, so that a node restarted after
//! `kill -9` kills whatever escaped both. Each run gets a fresh `MODE_RUN_ID` in its
//! environment, which what it starts inherits: that is how the restarted node recognises a
//! re-parented grandchild as its own.
//!
//! **What a process gets.** Not the node's environment: a workload must not read the node's
//! secrets (cloud credentials, tokens) from it. Its environment is a minimal base (`PATH` =
//! [`program::BASE_PATH`], `HOME` = the home directory `/etc/passwd` gives the user it runs as,
//! else `/`), then its config's `env` (which may replace both), then what the node tells each
//! run: `MODE_SERVICE`, `MODE_SLOT`, `MODE_NODE_ID`, `MODE_FENCING_TOKEN` and `MODE_RUN_ID`
//! (these win over `env`). `LANG`, `TZ` and the rest are not set: programs use the C locale
//! and `/etc/localtime` unless `env` says otherwise. A command given by name is looked up in
//! that `PATH`. With `user` (and `group`) it runs as that account, which only a node running
//! as root can do (see [`users`]); with `--exec-allow` on the node, only the programs the
//! node allows run (see [`program`]).

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::time::Instant;

use super::ledger::{self, GroupRecord, ProcessId, ProcessLedger};
use super::spawner::{self, Keeper};
use super::{parse_config, InstanceSpec, Kind};
use crate::agent::output::{InstanceOutput, OutputLog, Pipe};
use crate::model::secret::Secret;
use crate::service::{lock, Context, Result, Service, ServiceHandle};

pub(crate) mod program;
pub(super) mod users;

use program::AllowList;
use users::{Account, Credentials};

/// Added to the instance's grace period for the framework's own, so that the framework never
/// aborts the process task before it has sent SIGKILL and reaped the process.
const FRAMEWORK_MARGIN: Duration = Duration::from_secs(2);

/// How long output is still read after the process exited (a child it left behind may hold
/// the pipes open).
const DRAIN: Duration = Duration::from_secs(1);

/// Longer lines are logged in pieces of this size.
const MAX_LINE: usize = 16 * 1024;

/// How much of the last stderr line goes into a crash reason.
const REASON_LINE: usize = 200;

/// The `exec` kind (see the module docs), recording its process groups in `ledger`.
pub(crate) struct ExecKind {
    pub(crate) ledger: ProcessLedger,
    pub(crate) policy: ExecPolicy,
    /// Where each run's output is kept.
    pub(crate) output: OutputLog,
}

/// What this node lets `exec` processes run (its `--exec-allow`), shared by the registry that
/// sets it at the node's start and the kind that reads it at each start of a process.
#[derive(Debug, Clone, Default)]
pub(crate) struct ExecPolicy(Arc<Mutex<Option<Arc<AllowList>>>>);

impl ExecPolicy {
    /// Only programs `allow` permits may run from now on.
    pub(crate) fn restrict(&self, allow: AllowList) {
        *lock(&self.0) = Some(Arc::new(allow));
    }

    fn allow_list(&self) -> Option<Arc<AllowList>> {
        lock(&self.0).clone()
    }

    /// The program `command` runs on this node when looked up in `path` from the node's
    /// working directory, if the node allows it (for what the node runs besides instances:
    /// health check commands).
    pub(crate) fn program(
        &self,
        command: &str,
        path: &str,
    ) -> std::result::Result<PathBuf, String> {
        let cwd = std::env::current_dir()
            .map_err(|e| format!("cannot tell this node's working directory ({e})"))?;
        checked_program(self.allow_list().as_deref(), command, path, &cwd)
    }
}

/// The program `command` names (found in `path`, from `cwd`), checked against the node's
/// allow-list: with one, its real location, which is then what runs.
fn checked_program(
    allow: Option<&AllowList>,
    command: &str,
    path: &str,
    cwd: &std::path::Path,
) -> std::result::Result<PathBuf, String> {
    let located = program::locate(command, path, cwd)?;
    let Some(allow) = allow else {
        return Ok(located);
    };
    let real = program::real_location(&located)
        .map_err(|e| format!("cannot run `{command}` ({}): {e}", located.display()))?;
    if !allow.permits(&real) {
        return Err(format!(
            "`{command}` ({}) is not allowed on this node: its --exec-allow permits only {}; run it on a node that allows it, or ask the node's operator to add it to --exec-allow",
            real.display(),
            allow.describe()
        ));
    }
    Ok(real)
}

/// `{"command": "/bin/sleep", "args": ["1000"], "env": {"K": "V"}, "cwd": "/tmp",
/// "user": "nobody", "group": "nogroup"}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExecConfig {
    /// The program: a path, or a name looked up in the process's `PATH`.
    command: String,
    #[serde(default)]
    args: Vec<String>,
    /// Added to the base environment (see the module docs).
    #[serde(default)]
    env: BTreeMap<String, String>,
    /// Working directory (default: the node's).
    #[serde(default)]
    cwd: Option<PathBuf>,
    /// Run as this user (a name or a uid); only a node running as root can.
    #[serde(default)]
    user: Option<Account>,
    /// With `user`: run with this group (a name or a gid) as the only group, instead of the
    /// user's own groups.
    #[serde(default)]
    group: Option<Account>,
}

impl ExecConfig {
    fn parse(config: &Value) -> std::result::Result<Self, String> {
        let config: ExecConfig = parse_config("exec", config)?;
        if config.command.trim().is_empty() {
            return Err(
                "invalid exec config: field `command` is empty: give a program path or name".into(),
            );
        }
        if config
            .cwd
            .as_ref()
            .is_some_and(|d| d.as_os_str().is_empty())
        {
            return Err(
                "invalid exec config: field `cwd` is empty: give a directory or leave it out"
                    .into(),
            );
        }
        if let Some(key) = config
            .env
            .keys()
            .find(|k| k.is_empty() || k.contains('=') || k.contains('\0'))
        {
            return Err(format!(
                "invalid exec config: field `env`: `{key}` is not a variable name (empty, or contains '=' or NUL)"
            ));
        }
        if config.group.is_some() && config.user.is_none() {
            return Err(
                "invalid exec config: field `group` needs `user`: a group alone would leave the process running as the node's user; give `user` too".into(),
            );
        }
        Ok(config)
    }
}

impl Kind for ExecKind {
    fn validate(&self, config: &Value) -> std::result::Result<(), String> {
        ExecConfig::parse(config).map(|_| ())
    }

    fn create(&self, instance: &InstanceSpec) -> std::result::Result<ServiceHandle, String> {
        let config = ExecConfig::parse(&instance.config)?;
        let label = instance.label();
        let service = Exec {
            label: label.clone(),
            config,
            grace: instance.grace,
            env: vec![
                ("MODE_FENCING_TOKEN", instance.fencing_token.to_string()),
                ("MODE_SERVICE", instance.service.clone()),
                ("MODE_SLOT", instance.slot.to_string()),
                ("MODE_NODE_ID", instance.node.to_string()),
            ],
            secrets: instance.secrets.clone(),
            allow: self.policy.allow_list(),
            kill: instance.kill.clone(),
            lease: instance.lease.clone(),
            ledger: self.ledger.clone(),
            output: Arc::new(self.output.attach(&instance.service, instance.slot)),
        };
        Ok(ServiceHandle::builder(service)
            .label(label)
            .grace_period(instance.grace + FRAMEWORK_MARGIN)
            .build())
    }
}

/// The service: each start spawns the process and a task that owns it.
struct Exec {
    label: String,
    config: ExecConfig,
    grace: Duration,
    /// What the process learns of its instance (`MODE_FENCING_TOKEN`, ...).
    env: Vec<(&'static str, String)>,
    /// The spec's secrets, set in the environment beside `config.env` (never logged).
    secrets: BTreeMap<String, Secret>,
    /// The node's `--exec-allow`, if it has one.
    allow: Option<Arc<AllowList>>,
    kill: super::KillSwitch,
    lease: Option<super::LeaseDeadline>,
    ledger: ProcessLedger,
    /// Where its runs' output is kept.
    output: Arc<InstanceOutput>,
}

/// What one run starts: which program, with what environment, as whom.
struct Launch {
    /// Its absolute path (its real location when the node has an allow-list).
    program: PathBuf,
    env: BTreeMap<String, String>,
    switch: Option<Credentials>,
}

impl Exec {
    /// Resolve the program, the environment and the account of run `run_id`, and check them
    /// against what this node allows.
    fn prepare(&self, run_id: &str) -> std::result::Result<Launch, String> {
        let config = &self.config;
        let run_as = users::run_as(config.user.as_ref(), config.group.as_ref())?;
        let node_vars = self
            .env
            .iter()
            .map(|(k, v)| (*k, v.as_str()))
            .chain([(ledger::RUN_ID_VAR, run_id)]);
        let mut env = environment(&config.env, &run_as.home, node_vars);
        // Secrets beside `config.env` (validation keeps their names apart, and off MODE_*).
        env.extend(
            self.secrets
                .iter()
                .map(|(k, v)| (k.clone(), v.expose().to_string())),
        );
        let cwd = match config.cwd.as_deref() {
            Some(dir) if dir.is_absolute() => dir.to_path_buf(),
            dir => std::env::current_dir()
                .map(|here| dir.map_or_else(|| here.clone(), |d| here.join(d)))
                .map_err(|e| {
                    format!(
                        "cannot tell this node's working directory ({e}): give an absolute `cwd`"
                    )
                })?,
        };
        let path = env.get("PATH").map_or(program::BASE_PATH, String::as_str);
        let program = checked_program(self.allow.as_deref(), &config.command, path, &cwd)?;
        Ok(Launch {
            program,
            env,
            switch: run_as.switch,
        })
    }
}

/// A run's whole environment: the base (`PATH`, `HOME`), then the config's `env`, then what
/// the node sets for the run (which wins).
fn environment<'a>(
    config: &BTreeMap<String, String>,
    home: &str,
    node: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> BTreeMap<String, String> {
    let mut env = BTreeMap::from([
        ("PATH".to_string(), program::BASE_PATH.to_string()),
        ("HOME".to_string(), home.to_string()),
    ]);
    env.extend(config.iter().map(|(k, v)| (k.clone(), v.clone())));
    env.extend(
        node.into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    env
}

impl Service for Exec {
    async fn on_start(&mut self, ctx: &Context) -> Result<()> {
        let config = &self.config;
        // A singleton whose node lost its lease is not started again (by its supervisor,
        // say), not even for the moment before it would be killed.
        let lease_over = self
            .lease
            .as_ref()
            .is_some_and(|l| l.get() != 0 && l.get() <= super::monotonic_ns());
        if self.kill.is_fired() || lease_over {
            return Err(format!(
                "not started: this node holds no lease for the singleton `{}`",
                self.label
            )
            .into());
        }
        let run_id = ledger::new_run_id();
        let launch = self.prepare(&run_id)?;
        let mut command = Command::new(&launch.program);
        command
            .arg0(&config.command)
            .args(&config.args)
            .env_clear()
            .envs(&launch.env)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        if let Some(cwd) = &config.cwd {
            command.current_dir(cwd);
        }
        let lease = self.lease.as_ref().map(|l| l.cell());
        let spawned = spawner::spawn(command, lease, launch.switch)
            .await
            .map_err(|e| {
                let place = config
                    .cwd
                    .as_ref()
                    .map(|cwd| format!(" in {}", cwd.display()))
                    .unwrap_or_default();
                let user = config
                    .user
                    .as_ref()
                    .map(|user| format!(" as user `{user}`"))
                    .unwrap_or_default();
                format!("cannot run `{}`{place}{user}: {e}", config.command)
            })?;
        let mut child = spawned.child;
        let keeper = spawned.keeper.map_err(|e| {
            tracing::warn!(
                "[{}] `{}` runs without a keeper for its process group ({e}): what it forks survives a kill -9 of this node until the node's next start",
                self.label, config.command
            )
        });
        let Some(pid) = child.id().and_then(|pid| libc::pid_t::try_from(pid).ok()) else {
            drop(keeper);
            return Err(format!("`{}` started without a usable pid", config.command).into());
        };
        tracing::info!("[{}] started `{}` as pid {pid}", self.label, config.command);
        self.output.begin_run();
        let mut group = ProcessGroup {
            pgid: pid,
            keeper: keeper.ok(),
            recorded: None,
        };
        group.record(&self.label, run_id, &self.ledger);
        let stdout = child.stdout.take().map(OutputLines::new);
        let stderr = child.stderr.take().map(OutputLines::new);
        let process = Process {
            label: self.label.clone(),
            child,
            group,
            grace: self.grace,
            last_stderr: None,
            kill: self.kill.clone(),
            output: self.output.clone(),
        };
        let c = ctx.clone();
        ctx.spawn("process", process.supervise(c, stdout, stderr));
        Ok(())
    }
}

/// One run of the process, owned by the service's `process` task.
struct Process {
    label: String,
    child: Child,
    group: ProcessGroup,
    grace: Duration,
    last_stderr: Option<String>,
    kill: super::KillSwitch,
    output: Arc<InstanceOutput>,
}

impl Process {
    /// Log the output, wait for the exit, and on a stop: SIGTERM, then SIGKILL after the grace
    /// period. An exit the service did not ask for is an error (the service crashes).
    async fn supervise<O, E>(
        mut self,
        ctx: Context,
        mut stdout: Option<OutputLines<O>>,
        mut stderr: Option<OutputLines<E>>,
    ) -> Result<()>
    where
        O: AsyncRead + Unpin,
        E: AsyncRead + Unpin,
    {
        let pid = self.group.pgid;
        let mut kill_at: Option<Instant> = None;
        let mut killed = false;
        let status = loop {
            tokio::select! {
                line = next_line(&mut stdout), if stdout.is_some() => match line {
                    Some(piece) => self.log_stdout(piece),
                    None => stdout = None,
                },
                line = next_line(&mut stderr), if stderr.is_some() => match line {
                    Some(piece) => self.log_stderr(piece),
                    None => stderr = None,
                },
                status = self.child.wait() => break status,
                _ = ctx.stopped(), if kill_at.is_none() => {
                    tracing::info!(
                        "[{}] stopping pid {pid}: SIGTERM, SIGKILL after {:?}",
                        self.label, self.grace
                    );
                    self.group.signal(libc::SIGTERM);
                    kill_at = Some(Instant::now() + self.grace);
                }
                _ = self.kill.fired(), if !killed => {
                    tracing::warn!(
                        "[{}] killing pid {pid} at once (SIGKILL): this node lost its lease on the instance",
                        self.label
                    );
                    self.group.signal(libc::SIGKILL);
                    let _ = self.child.start_kill();
                    killed = true;
                    kill_at.get_or_insert_with(Instant::now);
                }
                _ = sleep_until(kill_at), if kill_at.is_some() && !killed => {
                    tracing::warn!(
                        "[{}] pid {pid} still running {:?} after SIGTERM: sending SIGKILL",
                        self.label, self.grace
                    );
                    self.group.signal(libc::SIGKILL);
                    // Also the pid itself, should it have left the group.
                    let _ = self.child.start_kill();
                    killed = true;
                }
            }
        };
        // The leader is reaped; whatever it left behind in its group goes with it (a group id
        // is not reused while any member lives, so this cannot hit a stranger).
        self.group.kill_rest();
        let drain_until = Instant::now() + DRAIN;
        while stdout.is_some() || stderr.is_some() {
            tokio::select! {
                line = next_line(&mut stdout), if stdout.is_some() => match line {
                    Some(piece) => self.log_stdout(piece),
                    None => stdout = None,
                },
                line = next_line(&mut stderr), if stderr.is_some() => match line {
                    Some(piece) => self.log_stderr(piece),
                    None => stderr = None,
                },
                _ = tokio::time::sleep_until(drain_until) => break,
            }
        }
        let status = status.map_err(|e| format!("cannot wait for pid {pid}: {e}"))?;
        if kill_at.is_some() || ctx.should_stop() {
            tracing::info!("[{}] pid {pid}: {}", self.label, describe(status));
            return Ok(());
        }
        Err(match &self.last_stderr {
            Some(line) => format!("{} (last stderr line: {line})", describe(status)),
            None => describe(status),
        }
        .into())
    }

    fn log_stdout(&self, piece: Piece) {
        tracing::info!("[{}] {}", self.label, piece.text);
        if !piece.continued {
            self.output.push(Pipe::Stdout, &piece.text);
        }
    }

    fn log_stderr(&mut self, piece: Piece) {
        let line = piece.text;
        tracing::warn!("[{}] {line}", self.label);
        // The rest of a line longer than the node's log pieces is cut in the kept output
        // (which keeps less of a line than a piece).
        if !piece.continued {
            self.output.push(Pipe::Stderr, &line);
        }
        if !line.trim().is_empty() {
            self.last_stderr = Some(truncate(&line, REASON_LINE));
        }
    }
}

/// The process group of one run, led by the process itself.
struct ProcessGroup {
    pgid: libc::pid_t,
    /// Keeps the group alive (and its id ours) until the group is killed.
    keeper: Option<Keeper>,
    /// Where the group is recorded until it is gone.
    recorded: Option<(ProcessLedger, GroupRecord)>,
}

impl ProcessGroup {
    /// Send `signal` to every process of the group; false if none was there.
    fn signal(&self, signal: libc::c_int) -> bool {
        // Never 0 or -1: `kill(0)` is our own group, `kill(-1)` every process we may signal.
        if self.pgid <= 1 {
            return false;
        }
        // SAFETY: kill(2) takes plain integers and touches no memory of ours.
        unsafe { libc::kill(-self.pgid, signal) == 0 }
    }
}

impl ProcessGroup {
    /// Put the group in the ledger. Called before anything can reap the leader, so that its
    /// pid (and the keeper's) are still theirs when their start times are read, even if it
    /// exited already (what it started may still run).
    fn record(&mut self, label: &str, run_id: String, ledger: &ProcessLedger) {
        let keeper = self
            .keeper
            .as_ref()
            .and_then(|k| ProcessId::of_unreaped_child(k.pid()));
        let Some(leader) = ProcessId::of_unreaped_child(self.pgid) else {
            tracing::warn!(
                "[{label}] cannot read the start time of pid {} from /proc: its group is not recorded, so a restart after a kill -9 of this node cannot check for its leftovers",
                self.pgid
            );
            return;
        };
        let record = GroupRecord {
            label: label.to_string(),
            pgid: self.pgid,
            leader,
            keeper,
            run_id: Some(run_id),
        };
        ledger.started(&record);
        self.recorded = Some((ledger.clone(), record));
    }

    /// SIGKILL what is left of the group once its leader is reaped (the keeper too), then
    /// forget the group.
    fn kill_rest(&mut self) {
        self.signal(libc::SIGKILL);
        // With the group gone, the keeper is killed (if it was not in the group) and reaped.
        drop(self.keeper.take());
        if let Some((ledger, record)) = self.recorded.take() {
            ledger.reaped(&record);
        }
        self.pgid = 0;
    }
}

impl Drop for ProcessGroup {
    /// The task was aborted (or the runtime is going away) before the group was stopped:
    /// kill it rather than leave it running (the `Child` kills the leader on drop as well).
    fn drop(&mut self) {
        self.kill_rest();
    }
}

/// "process exited with status 3", "process killed by signal 9 (SIGKILL)".
fn describe(status: ExitStatus) -> String {
    if let Some(code) = status.code() {
        return format!("process exited with status {code}");
    }
    match status.signal() {
        Some(signal) => {
            let name = signal_name(signal)
                .map(|n| format!(" ({n})"))
                .unwrap_or_default();
            let core = if status.core_dumped() {
                ", core dumped"
            } else {
                ""
            };
            format!("process killed by signal {signal}{name}{core}")
        }
        None => format!("process ended: {status}"),
    }
}

fn signal_name(signal: i32) -> Option<&'static str> {
    Some(match signal {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGUSR2 => "SIGUSR2",
        _ => return None,
    })
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

async fn next_line<R: AsyncRead + Unpin>(lines: &mut Option<OutputLines<R>>) -> Option<Piece> {
    match lines {
        Some(lines) => lines.next().await,
        None => std::future::pending().await,
    }
}

/// Lines of a pipe, tolerant of invalid UTF-8 and of lines without an end; cancel-safe (a
/// partly read line stays in `pending`), so it can sit in a `select!` loop. A line longer
/// than [`MAX_LINE`] comes in pieces.
struct OutputLines<R> {
    reader: BufReader<R>,
    pending: Vec<u8>,
    /// The last piece ended at [`MAX_LINE`], not at a line break: the next one continues it.
    cut: bool,
}

/// A line, or a piece of a long one.
struct Piece {
    text: String,
    /// It continues the previous piece (the same line).
    continued: bool,
}

impl<R: AsyncRead + Unpin> OutputLines<R> {
    fn new(pipe: R) -> Self {
        OutputLines {
            reader: BufReader::new(pipe),
            pending: Vec::new(),
            cut: false,
        }
    }

    /// The next line, `None` at the end of the output (or on a read error).
    async fn next(&mut self) -> Option<Piece> {
        loop {
            let available = match self.reader.fill_buf().await {
                Ok(bytes) => bytes,
                Err(e) => {
                    tracing::debug!("reading process output failed: {e}");
                    return self.take_rest();
                }
            };
            if available.is_empty() {
                return self.take_rest();
            }
            let room = MAX_LINE.saturating_sub(self.pending.len());
            if let Some(end) = available.iter().take(room).position(|&b| b == b'\n') {
                self.pending.extend_from_slice(&available[..end]);
                self.reader.consume(end + 1);
                return Some(self.take_line(false));
            }
            let n = available.len().min(room);
            self.pending.extend_from_slice(&available[..n]);
            self.reader.consume(n);
            if self.pending.len() >= MAX_LINE {
                return Some(self.take_line(true));
            }
        }
    }

    fn take_rest(&mut self) -> Option<Piece> {
        (!self.pending.is_empty()).then(|| self.take_line(false))
    }

    /// The pending bytes as a piece; `cut`: the line goes on in the next piece.
    fn take_line(&mut self, cut: bool) -> Piece {
        let mut bytes = std::mem::take(&mut self.pending);
        if !cut && bytes.last() == Some(&b'\r') {
            bytes.pop();
        }
        let continued = std::mem::replace(&mut self.cut, cut);
        Piece {
            text: String::from_utf8_lossy(&bytes).into_owned(),
            continued,
        }
    }
}

fn truncate(line: &str, max: usize) -> String {
    match line.char_indices().nth(max) {
        Some((at, _)) => format!("{}...", &line[..at]),
        None => line.to_string(),
    }
}
