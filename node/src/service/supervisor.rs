//! Supervisors: restart crashed children by strategy, within a restart intensity, with
//! exponential backoff; escalate to their own parent when the intensity is exceeded (OTP).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::{sleep_until, Instant};

use super::beacon::NodeKind;
use super::{Context, CrashReason, LifecycleEventKind, Result, Service, ServiceHandle};

/// Which children a supervisor restarts when one crashes (OTP's restart strategies, plus
/// mode's forfeit variants that give up instead).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// Restart only the crashed child.
    OneForOne,
    /// Stop every child, then restart them all in order.
    OneForAll,
    /// Restart the crashed child and every child declared after it.
    RestForOne,
    /// Stop the crashed child and leave it crashed.
    ForfeitOneForOne,
    /// Stop every child and restart none.
    ForfeitOneForAll,
}

impl Strategy {
    fn label(self) -> &'static str {
        match self {
            Strategy::OneForOne => "OneForOneSupervisor",
            Strategy::OneForAll => "OneForAllSupervisor",
            Strategy::RestForOne => "RestForOneSupervisor",
            Strategy::ForfeitOneForOne => "ForfeitOneForOneSupervisor",
            Strategy::ForfeitOneForAll => "ForfeitOneForAllSupervisor",
        }
    }
}

/// At most `max_restarts` restarts within any `within` window (OTP's intensity and period).
/// One more crash than that crashes the supervisor itself, which escalates to its parent.
///
/// Default: 5 restarts within 30 s. Python mode's default (a token bucket refilling 100/s)
/// never escalates a crash loop; OTP's (1 in 5 s) escalates a single flaky restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartIntensity {
    /// Restarts allowed within the window.
    pub max_restarts: u32,
    /// The sliding window.
    pub within: Duration,
}

impl Default for RestartIntensity {
    fn default() -> Self {
        RestartIntensity {
            max_restarts: 5,
            within: Duration::from_secs(30),
        }
    }
}

impl RestartIntensity {
    /// Never escalate (for benchmarks and children that must always come back).
    pub fn unlimited() -> Self {
        RestartIntensity {
            max_restarts: u32::MAX,
            within: Duration::from_secs(1),
        }
    }
}

/// Delay before restarting a child that keeps crashing.
///
/// The first restart after a healthy period is immediate; the n-th consecutive one waits
/// `initial × multiplier^(n-2)`, capped at `max`, ± `jitter` (a fraction). A child that ran for
/// `reset_after` without crashing starts over. Default: 100 ms × 2 up to 10 s, ±20 %, reset
/// after 10 s.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// Delay of the second consecutive restart.
    pub initial: Duration,
    /// Growth factor per further restart.
    pub multiplier: f64,
    /// Upper bound.
    pub max: Duration,
    /// Random spread, 0.0 to 1.0, as a fraction of the delay.
    pub jitter: f64,
    /// Healthy run time after which the streak resets.
    pub reset_after: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(100),
            multiplier: 2.0,
            max: Duration::from_secs(10),
            jitter: 0.2,
            reset_after: Duration::from_secs(10),
        }
    }
}

impl Backoff {
    /// Restart at once, always.
    pub fn none() -> Self {
        Backoff {
            initial: Duration::ZERO,
            multiplier: 1.0,
            max: Duration::ZERO,
            jitter: 0.0,
            reset_after: Duration::ZERO,
        }
    }

    /// The delay before the `streak`-th consecutive restart (1-based), with `unit_random` in
    /// [0, 1) choosing the jitter.
    pub fn delay(&self, streak: u32, unit_random: f64) -> Duration {
        if streak <= 1 || self.initial.is_zero() {
            return Duration::ZERO;
        }
        let exp = self.multiplier.powi((streak - 2).min(64) as i32);
        let base = self.initial.as_secs_f64() * exp;
        let capped = base.min(self.max.as_secs_f64());
        let spread = 1.0 + self.jitter.clamp(0.0, 1.0) * (2.0 * unit_random - 1.0);
        Duration::from_secs_f64((capped * spread).max(0.0))
    }
}

/// A service that starts its children in order and restarts them when they crash.
///
/// ```
/// use std::time::Duration;
/// use mode::service::{Backoff, RestartIntensity, Strategy, Supervisor, ServiceHandle, Service};
///
/// struct Worker;
/// impl Service for Worker {}
///
/// let supervisor: ServiceHandle = Supervisor::new(Strategy::OneForOne)
///     .intensity(RestartIntensity { max_restarts: 3, within: Duration::from_secs(10) })
///     .backoff(Backoff::default())
///     .child(ServiceHandle::new(Worker))
///     .build();
/// ```
pub struct Supervisor {
    config: Arc<Config>,
    children: Vec<ServiceHandle>,
    label: Option<String>,
}

#[derive(Debug)]
struct Config {
    strategy: Strategy,
    intensity: RestartIntensity,
    backoff: Backoff,
}

impl Supervisor {
    /// A supervisor with the default intensity and backoff.
    pub fn new(strategy: Strategy) -> Self {
        Supervisor {
            config: Arc::new(Config {
                strategy,
                intensity: RestartIntensity::default(),
                backoff: Backoff::default(),
            }),
            children: Vec::new(),
            label: None,
        }
    }

    fn config_mut(&mut self) -> &mut Config {
        Arc::get_mut(&mut self.config).expect("config is shared only once started")
    }

    /// Set the restart intensity.
    pub fn intensity(mut self, intensity: RestartIntensity) -> Self {
        self.config_mut().intensity = intensity;
        self
    }

    /// Set the backoff.
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.config_mut().backoff = backoff;
        self
    }

    /// Add a child; children start in the order they are added.
    pub fn child(mut self, child: ServiceHandle) -> Self {
        self.children.push(child);
        self
    }

    /// Add several children.
    pub fn children(mut self, children: impl IntoIterator<Item = ServiceHandle>) -> Self {
        self.children.extend(children);
        self
    }

    /// Name the supervisor (default: the strategy's name, e.g. `OneForOneSupervisor`).
    pub fn label(mut self, label: impl Into<String>) -> Self {
        self.label = Some(label.into());
        self
    }

    /// The handle that runs it.
    pub fn build(self) -> ServiceHandle {
        let label = self
            .label
            .clone()
            .unwrap_or_else(|| self.config.strategy.label().to_string());
        ServiceHandle::builder(self)
            .label(label)
            .kind(NodeKind::Supervisor)
            .build()
    }
}

impl Service for Supervisor {
    fn label(&self) -> String {
        self.config.strategy.label().to_string()
    }

    fn dependencies(&mut self) -> Vec<ServiceHandle> {
        std::mem::take(&mut self.children)
    }

    async fn on_start(&mut self, ctx: &Context) -> Result<()> {
        let (tx, rx) = mpsc::unbounded_channel();
        ctx.handle().set_inbox(Some(tx));
        let run = Supervision::new(self.config.clone(), ctx.clone());
        ctx.spawn("supervise", run.run(rx));
        Ok(())
    }

    async fn on_stop(&mut self, ctx: &Context) -> Result<()> {
        // Children stopped from here on are stopping, not crashing.
        ctx.handle().set_inbox(None);
        Ok(())
    }
}

struct Streak {
    count: u32,
    last_restart: Instant,
}

struct Supervision {
    config: Arc<Config>,
    ctx: Context,
    restarts: VecDeque<Instant>,
    streaks: HashMap<u64, Streak>,
    /// Restarts waiting out their backoff, by due time.
    pending: Vec<(Instant, ServiceHandle)>,
    rng: u64,
}

impl Supervision {
    fn new(config: Arc<Config>, ctx: Context) -> Self {
        let seed = ctx.handle().id().wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
        Supervision {
            config,
            ctx,
            restarts: VecDeque::new(),
            streaks: HashMap::new(),
            pending: Vec::new(),
            rng: seed | 1,
        }
    }

    fn unit_random(&mut self) -> f64 {
        // xorshift64*: jitter needs spread, not cryptographic quality.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        (self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }

    async fn run(mut self, mut inbox: mpsc::UnboundedReceiver<ServiceHandle>) -> Result<()> {
        let ctx = self.ctx.clone();
        let stop = ctx.stopped();
        tokio::pin!(stop);
        loop {
            let due = self.pending.iter().map(|(t, _)| *t).min();
            let child = tokio::select! {
                biased;
                _ = &mut stop => return Ok(()),
                msg = inbox.recv() => match msg {
                    Some(child) => match self.on_crash(child) {
                        Decision::GiveUp => return Ok(()),
                        Decision::Wait => continue,
                        // Not through the timer: tokio rounds deadlines up to the next
                        // millisecond, which would make every restart take ~1 ms.
                        Decision::RestartNow(child) => child,
                    },
                    None => return Ok(()),
                },
                _ = sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => {
                    let now = Instant::now();
                    let i = self.pending.iter().position(|(t, _)| *t <= now);
                    match i {
                        Some(i) => self.pending.swap_remove(i).1,
                        None => continue,
                    }
                }
            };
            self.restart(child).await;
        }
    }

    /// Decide what to do about a crashed child.
    fn on_crash(&mut self, child: ServiceHandle) -> Decision {
        if self.ctx.should_stop() || !self.is_our_child(&child) {
            return Decision::Wait;
        }
        let me = self.ctx.handle().log_prefix();
        let reason = child
            .crash_reason()
            .map(|r| r.to_string())
            .unwrap_or_else(|| "unknown".to_string());
        match self.config.strategy {
            Strategy::ForfeitOneForOne | Strategy::ForfeitOneForAll => {
                tracing::error!(
                    "[{me}]: giving up on crashed child '{}' ({reason}): {:?} does not restart",
                    child.label(),
                    self.config.strategy
                );
                let victims = if self.config.strategy == Strategy::ForfeitOneForAll {
                    self.ctx.handle().dependencies()
                } else {
                    vec![child]
                };
                tokio::spawn(async move {
                    for c in victims.iter().rev() {
                        c.stop().await;
                    }
                });
                return Decision::Wait;
            }
            Strategy::OneForOne | Strategy::OneForAll | Strategy::RestForOne => {}
        }
        let now = Instant::now();
        let RestartIntensity {
            max_restarts,
            within,
        } = self.config.intensity;
        while self
            .restarts
            .front()
            .is_some_and(|t| now.duration_since(*t) >= within)
        {
            self.restarts.pop_front();
        }
        if self.restarts.len() as u64 >= max_restarts as u64 {
            let reason = format!(
                "restart intensity exceeded: child '{}' crashed again after {} restarts within {:?} (limit {max_restarts}); last reason: {reason}",
                child.label(),
                self.restarts.len(),
                within,
            );
            let reason = CrashReason::new(reason);
            self.ctx.handle().emit(|| LifecycleEventKind::Escalated {
                reason: reason.clone(),
            });
            self.ctx.crash(reason);
            return Decision::GiveUp;
        }
        self.restarts.push_back(now);
        let backoff = self.config.backoff;
        let streak = self.streaks.entry(child.id()).or_insert(Streak {
            count: 0,
            last_restart: now,
        });
        if streak.count > 0 && now.duration_since(streak.last_restart) >= backoff.reset_after {
            streak.count = 0;
        }
        streak.count += 1;
        streak.last_restart = now;
        let count = streak.count;
        let r = self.unit_random();
        let delay = backoff.delay(count, r);
        tracing::warn!(
            "[{me}]: child '{}' crashed ({reason}); restart {} of {max_restarts} within {within:?}, {}",
            child.label(),
            self.restarts.len(),
            if delay.is_zero() { "now".to_string() } else { format!("in {delay:?}") }
        );
        if self.pending.iter().any(|(_, c)| c.same(&child)) {
            return Decision::Wait;
        }
        child.emit(|| LifecycleEventKind::Restarting {
            attempt: count,
            backoff: delay,
        });
        if delay.is_zero() {
            return Decision::RestartNow(child);
        }
        let wall_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        child.set_next_restart_ms(wall_ms + delay.as_millis() as u64);
        self.pending.push((now + delay, child));
        Decision::Wait
    }

    fn is_our_child(&self, child: &ServiceHandle) -> bool {
        child.parent().is_some_and(|p| p.same(self.ctx.handle()))
    }

    async fn restart(&mut self, child: ServiceHandle) {
        let mut next = Some(child);
        while let Some(child) = next.take() {
            if self.ctx.should_stop() {
                return;
            }
            // A failed restart is one more crash of that child.
            let Err(failed) = self.restart_once(&child).await else {
                return;
            };
            next = match self.on_crash(failed) {
                Decision::RestartNow(c) => Some(c),
                Decision::Wait | Decision::GiveUp => None,
            };
        }
    }

    /// Restart what the strategy says; on failure, the child that failed to start.
    async fn restart_once(
        &mut self,
        child: &ServiceHandle,
    ) -> std::result::Result<(), ServiceHandle> {
        let group = match self.config.strategy {
            Strategy::OneForAll => self.ctx.handle().dependencies(),
            Strategy::RestForOne => {
                let children = self.ctx.handle().dependencies();
                let idx = child.index_in_parent().min(children.len());
                children[idx..].to_vec()
            }
            // One-for-one touches only the crashed child, whatever the number of siblings.
            _ => {
                return match child.restart().await {
                    Ok(()) => Ok(()),
                    Err(e) => {
                        tracing::warn!("[{}]: restart failed: {e}", self.ctx.handle().log_prefix());
                        Err(child.clone())
                    }
                };
            }
        };
        for c in group.iter().rev() {
            if !c.same(child) {
                c.stop().await;
            }
        }
        for c in group {
            if self.ctx.should_stop() {
                return Ok(());
            }
            if let Err(e) = c.restart().await {
                tracing::warn!("[{}]: restart failed: {e}", self.ctx.handle().log_prefix());
                return Err(c);
            }
        }
        Ok(())
    }
}

enum Decision {
    /// Restart this child now.
    RestartNow(ServiceHandle),
    /// Nothing to do now (ignored, forfeited, or scheduled after a backoff).
    Wait,
    /// The intensity was exceeded and the supervisor crashed itself.
    GiveUp,
}
