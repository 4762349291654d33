//! Timers are fixed-rate and do not accumulate lag; cron expressions and jobs.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::OnStart;
use crate::service::{Context, CronSchedule, ServiceHandle, TimerSpec};

async fn fire_times(spec: TimerSpec, body_time: Duration, run_for: Duration) -> Vec<u128> {
    let fires = Arc::new(Mutex::new(Vec::new()));
    let f = fires.clone();
    let t0 = Instant::now();
    let s = ServiceHandle::new(OnStart("Timed", move |ctx: &Context| {
        let f = f.clone();
        ctx.timer_with("tick", spec, move || {
            let f = f.clone();
            async move {
                f.lock().unwrap().push(t0.elapsed().as_millis());
                tokio::time::sleep(body_time).await;
                Ok(())
            }
        });
        Ok(())
    }));
    s.start().await.unwrap();
    tokio::time::sleep(run_for).await;
    s.stop().await;
    let v = fires.lock().unwrap().clone();
    v
}

#[tokio::test(start_paused = true)]
async fn timers_fire_at_a_fixed_rate_not_interval_plus_runtime() {
    // mode: 0.2 s timer with a 0.1 s body fired at 0.2, 0.5, 0.8 (fixed delay).
    let fires = fire_times(
        TimerSpec::every(Duration::from_millis(200)),
        Duration::from_millis(100),
        Duration::from_millis(1050),
    )
    .await;
    assert_eq!(fires, [200, 400, 600, 800, 1000]);
}

#[tokio::test(start_paused = true)]
async fn exec_first_fires_once_more_at_start_and_the_first_tick_waits_one_interval() {
    let fires = fire_times(
        TimerSpec::every(Duration::from_millis(100)).exec_first(),
        Duration::ZERO,
        Duration::from_millis(350),
    )
    .await;
    assert_eq!(fires, [0, 100, 200, 300]);
    let fires = fire_times(
        TimerSpec::every(Duration::from_millis(100)),
        Duration::ZERO,
        Duration::from_millis(450),
    )
    .await;
    assert_eq!(
        fires,
        [100, 200, 300, 400],
        "4 ticks, 4 calls, no double sleep first"
    );
}

#[tokio::test(start_paused = true)]
async fn an_overrunning_body_skips_missed_ticks_instead_of_bunching_them() {
    let fires = fire_times(
        TimerSpec::every(Duration::from_millis(100)),
        Duration::from_millis(250),
        Duration::from_millis(1050),
    )
    .await;
    // Fires at 100 (ends 350), skips 200 and 300, fires at 400 (ends 650), 700.
    assert_eq!(fires, [100, 400, 700, 1000]);
}

#[tokio::test(start_paused = true)]
async fn a_failing_timer_body_crashes_its_service() {
    let s = ServiceHandle::new(OnStart("Cleaner", |ctx: &Context| {
        ctx.timer("remove_expired", Duration::from_secs(1), || async {
            Err("cache gone".into())
        });
        Ok(())
    }));
    s.start().await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        s.crash_reason().unwrap().as_str(),
        "timer 'remove_expired' failed: cache gone"
    );
}

#[tokio::test(start_paused = true)]
async fn the_beacon_shows_timer_fires_and_drift() {
    let s = ServiceHandle::new(OnStart("Timed", |ctx: &Context| {
        ctx.timer("tick", Duration::from_millis(100), || async { Ok(()) });
        Ok(())
    }));
    s.start().await.unwrap();
    tokio::time::sleep(Duration::from_millis(550)).await;
    let b = s.beacon();
    let timer = b.find("tick").unwrap();
    let detail = timer.detail.as_deref().unwrap();
    assert!(detail.contains("fires=5"), "{detail}");
    assert!(detail.contains("skipped=0"), "{detail}");
}

const Y2000: i64 = 946_684_800; // 2000-01-01 00:00 UTC

#[test]
fn cron_next_fire_matches_modes_examples() {
    let every_minute = CronSchedule::parse("*/1 * * * *").unwrap();
    assert_eq!(every_minute.next_after(Y2000).unwrap() - Y2000, 60);
    let eight_pm = CronSchedule::parse("0 20 * * *").unwrap();
    assert_eq!(eight_pm.next_after(Y2000).unwrap() - Y2000, 20 * 3600);
    // 2000 is a leap year: 4 July is 185 days after 1 January (mode's test counted from a
    // local-time base and got 186).
    let july_4th = CronSchedule::parse("0 13 4 7 *").unwrap();
    assert_eq!(
        july_4th.next_after(Y2000).unwrap() - Y2000,
        185 * 86400 + 13 * 3600
    );
}

#[test]
fn cron_supports_names_lists_ranges_steps_and_macros() {
    // 2000-01-01 was a Saturday.
    let weekdays_9am = CronSchedule::parse("0 9 * * mon-fri").unwrap();
    assert_eq!(
        weekdays_9am.next_after(Y2000).unwrap() - Y2000,
        2 * 86400 + 9 * 3600
    );
    let sunday_is_7 = CronSchedule::parse("0 0 * * 7").unwrap();
    assert_eq!(sunday_is_7.next_after(Y2000).unwrap() - Y2000, 86400);
    let list = CronSchedule::parse("15,45 * * * *").unwrap();
    assert_eq!(list.next_after(Y2000).unwrap() - Y2000, 15 * 60);
    let daily = CronSchedule::parse("@daily").unwrap();
    assert_eq!(daily.next_after(Y2000).unwrap() - Y2000, 86400);
    let feb_30 = CronSchedule::parse("0 0 30 2 *").unwrap();
    assert_eq!(feb_30.next_after(Y2000), None);
}

#[test]
fn cron_parse_errors_name_the_field() {
    let e = CronSchedule::parse("61 * * * *").unwrap_err().to_string();
    assert!(e.contains("minute field: 61 is out of range 0-59"), "{e}");
    let e = CronSchedule::parse("* * * *").unwrap_err().to_string();
    assert!(e.contains("expected 5 fields"), "{e}");
    let e = CronSchedule::parse("* * * foo *").unwrap_err().to_string();
    assert!(
        e.contains("month field: 'foo' is not a number or a name like 'jan'"),
        "{e}"
    );
    let e = CronSchedule::parse("*/0 * * * *").unwrap_err().to_string();
    assert!(e.contains("step '0' must be a positive number"), "{e}");
}

#[tokio::test(start_paused = true)]
async fn a_cron_job_fires_at_each_scheduled_minute_and_stops_with_its_service() {
    let fires = Arc::new(Mutex::new(0u32));
    let f = fires.clone();
    let s = ServiceHandle::new(OnStart("Reports", move |ctx: &Context| {
        let f = f.clone();
        ctx.cron("minutely", "* * * * *", move || {
            let f = f.clone();
            async move {
                *f.lock().unwrap() += 1;
                Ok(())
            }
        })?;
        Ok(())
    }));
    s.start().await.unwrap();
    tokio::time::sleep(Duration::from_secs(3 * 60 + 1)).await;
    let n = *fires.lock().unwrap();
    assert!((3..=4).contains(&n), "fired {n} times in 3 minutes");
    s.stop().await;
    tokio::time::sleep(Duration::from_secs(5 * 60)).await;
    assert_eq!(*fires.lock().unwrap(), n, "no fires after stop");
}
