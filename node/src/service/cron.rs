//! Cron expressions (five fields, UTC): parsing and computing the next fire time.

use std::fmt;

/// A parse error, naming the field and what it accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid cron expression '{expression}': {problem}")]
pub struct CronError {
    expression: String,
    problem: String,
}

/// A parsed cron expression: `minute hour day-of-month month day-of-week`, or one of
/// `@hourly`, `@daily`, `@midnight`, `@weekly`, `@monthly`, `@yearly`, `@annually`.
///
/// Fields accept `*`, numbers, ranges `a-b`, steps `*/n` and `a-b/n`, and lists `a,b,c`;
/// months and weekdays also accept names (`jan`, `mon`). Sunday is 0 or 7. As in Vixie cron,
/// when both day fields are restricted a day matches if either matches. Times are UTC.
///
/// ```
/// use mode::service::CronSchedule;
/// let every_5_min = CronSchedule::parse("*/5 * * * *").unwrap();
/// assert_eq!(every_5_min.next_after(0), Some(300));
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct CronSchedule {
    source: String,
    minutes: u64,
    hours: u64,
    days: u64,
    months: u64,
    weekdays: u64,
    days_restricted: bool,
    weekdays_restricted: bool,
}

struct Field {
    name: &'static str,
    min: u32,
    max: u32,
    names: &'static [&'static str],
}

const MINUTE: Field = Field {
    name: "minute",
    min: 0,
    max: 59,
    names: &[],
};
const HOUR: Field = Field {
    name: "hour",
    min: 0,
    max: 23,
    names: &[],
};
const DAY: Field = Field {
    name: "day of month",
    min: 1,
    max: 31,
    names: &[],
};
const MONTH: Field = Field {
    name: "month",
    min: 1,
    max: 12,
    names: &[
        "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
    ],
};
const WEEKDAY: Field = Field {
    name: "day of week",
    min: 0,
    max: 7,
    names: &["sun", "mon", "tue", "wed", "thu", "fri", "sat"],
};

impl Field {
    fn value(&self, text: &str) -> Result<u32, String> {
        let lower = text.to_ascii_lowercase();
        if let Some(i) = self.names.iter().position(|n| *n == lower) {
            return Ok(i as u32 + if self.min == 1 { 1 } else { 0 });
        }
        let v: u32 = text.parse().map_err(|_| {
            format!(
                "{} field: '{text}' is not a number{}",
                self.name,
                self.hint()
            )
        })?;
        if v < self.min || v > self.max {
            return Err(format!(
                "{} field: {v} is out of range {}-{}",
                self.name, self.min, self.max
            ));
        }
        Ok(v)
    }

    fn hint(&self) -> String {
        if self.names.is_empty() {
            String::new()
        } else {
            format!(" or a name like '{}'", self.names[0])
        }
    }

    /// Bit set of allowed values, and whether the field was restricted (not `*`).
    fn parse(&self, text: &str) -> Result<(u64, bool), String> {
        let mut bits = 0u64;
        for part in text.split(',') {
            let (range, step) = match part.split_once('/') {
                Some((r, s)) => {
                    let step: u32 = s.parse().ok().filter(|s| *s > 0).ok_or_else(|| {
                        format!("{} field: step '{s}' must be a positive number", self.name)
                    })?;
                    (r, step)
                }
                None => (part, 1),
            };
            let (lo, hi) = if range == "*" {
                (self.min, self.max)
            } else if let Some((a, b)) = range.split_once('-') {
                let (a, b) = (self.value(a)?, self.value(b)?);
                if a > b {
                    return Err(format!("{} field: range {a}-{b} is backwards", self.name));
                }
                (a, b)
            } else {
                let v = self.value(range)?;
                // `5/15` means "from 5 to the end, every 15", as in Vixie cron.
                (v, if step > 1 { self.max } else { v })
            };
            let mut v = lo;
            while v <= hi {
                bits |= 1 << v;
                v += step;
            }
        }
        Ok((bits, text != "*"))
    }
}

impl CronSchedule {
    /// Parse an expression; the error names the field at fault and what it accepts.
    pub fn parse(expression: &str) -> Result<CronSchedule, CronError> {
        let err = |problem: String| CronError {
            expression: expression.to_string(),
            problem,
        };
        let expanded = match expression.trim() {
            "@hourly" => "0 * * * *",
            "@daily" | "@midnight" => "0 0 * * *",
            "@weekly" => "0 0 * * 0",
            "@monthly" => "0 0 1 * *",
            "@yearly" | "@annually" => "0 0 1 1 *",
            other => other,
        };
        let fields: Vec<&str> = expanded.split_whitespace().collect();
        if fields.len() != 5 {
            return Err(err(format!(
                "expected 5 fields (minute hour day-of-month month day-of-week), found {}",
                fields.len()
            )));
        }
        let (minutes, _) = MINUTE.parse(fields[0]).map_err(err)?;
        let (hours, _) = HOUR.parse(fields[1]).map_err(err)?;
        let (days, days_restricted) = DAY.parse(fields[2]).map_err(err)?;
        let (months, _) = MONTH.parse(fields[3]).map_err(err)?;
        let (mut weekdays, weekdays_restricted) = WEEKDAY.parse(fields[4]).map_err(err)?;
        if weekdays & (1 << 7) != 0 {
            weekdays |= 1; // 7 is Sunday too
        }
        Ok(CronSchedule {
            source: expression.to_string(),
            minutes,
            hours,
            days,
            months,
            weekdays,
            days_restricted,
            weekdays_restricted,
        })
    }

    fn day_matches(&self, year: i64, month: u32, day: u32) -> bool {
        if self.months & (1 << month) == 0 {
            return false;
        }
        let weekday = ((days_from_civil(year, month, day) + 4).rem_euclid(7)) as u32;
        let dom = self.days & (1 << day) != 0;
        let dow = self.weekdays & (1 << weekday) != 0;
        match (self.days_restricted, self.weekdays_restricted) {
            (true, true) => dom || dow,
            (true, false) => dom,
            (false, true) => dow,
            (false, false) => true,
        }
    }

    /// The first fire time strictly after `unix_secs` (seconds since the epoch, UTC), or
    /// `None` if the expression never fires (e.g. `0 0 30 2 *`) within the next 8 years.
    pub fn next_after(&self, unix_secs: i64) -> Option<i64> {
        let start_minute = unix_secs.div_euclid(60) + 1;
        let first_day = start_minute.div_euclid(1440);
        for day in first_day..first_day + 366 * 8 {
            let (y, m, d) = civil_from_days(day);
            if !self.day_matches(y, m, d) {
                continue;
            }
            let from = if day == first_day {
                start_minute.rem_euclid(1440)
            } else {
                0
            };
            for minute_of_day in from..1440 {
                let (h, mi) = ((minute_of_day / 60) as u32, (minute_of_day % 60) as u32);
                if self.hours & (1 << h) != 0 && self.minutes & (1 << mi) != 0 {
                    return Some((day * 1440 + minute_of_day) * 60);
                }
            }
        }
        None
    }
}

impl fmt::Display for CronSchedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

impl fmt::Debug for CronSchedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CronSchedule({:?})", self.source)
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
pub(crate) fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m as i64 + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

/// The date of a day number since 1970-01-01.
pub(crate) fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    (y, m, d)
}

/// `2026-11-25 08:14:20.123` (UTC) from milliseconds since the epoch.
pub fn format_utc_ms(ms: u64) -> String {
    let secs = (ms / 1000) as i64;
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let rem = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.{:03}",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60,
        ms % 1000
    )
}
