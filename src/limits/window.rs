//! Quota windows follow the calendar: a UTC day, or a calendar month (not "30 days").
//! Days count from the Unix epoch; months count as `year * 12 + month0`, so both are
//! plain integers that order correctly and are cheap to compare on the request path.

use time::{Date, Month};

/// Julian day number of 1970-01-01.
const UNIX_EPOCH_JULIAN: i32 = 2_440_588;
const NANOS_PER_DAY: u64 = 86_400 * 1_000_000_000;

/// A point in time in nanoseconds since the Unix epoch: the one clock the limits read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Now(pub u64);

impl Now {
    pub fn system() -> Now {
        Now(std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64))
    }

    pub fn from_secs(secs: u64) -> Now {
        Now(secs * 1_000_000_000)
    }

    pub fn day(self) -> u32 {
        (self.0 / NANOS_PER_DAY) as u32
    }

    pub fn month(self) -> u32 {
        Calendar::of(self).month
    }

    pub fn secs(self) -> u64 {
        self.0 / 1_000_000_000
    }
}

/// The windows containing one day, with the figures the limit headers need. Working them
/// out takes calendar arithmetic, so each thread keeps the current day's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Calendar {
    pub day: u32,
    pub month: u32,
    /// Unix seconds at which the day ends.
    pub day_end: u64,
    /// Unix seconds at which the month ends.
    pub month_end: u64,
    pub month_secs: u64,
}

impl Calendar {
    fn compute(day: u32) -> Calendar {
        let month = month_of_day(day);
        let next_month = u64::from(month_start(month + 1)) * 86_400;
        Calendar {
            day,
            month,
            day_end: (u64::from(day) + 1) * 86_400,
            month_end: next_month,
            month_secs: next_month - u64::from(month_start(month)) * 86_400,
        }
    }

    pub fn of(now: Now) -> Calendar {
        thread_local! {
            static CURRENT: std::cell::Cell<Option<Calendar>> = const { std::cell::Cell::new(None) };
        }
        let day = now.day();
        CURRENT.with(|current| match current.get() {
            Some(calendar) if calendar.day == day => calendar,
            _ => {
                let calendar = Calendar::compute(day);
                current.set(Some(calendar));
                calendar
            }
        })
    }
}

/// The clock of the limits: wall-clock time that never runs backwards. It advances with
/// the monotonic clock from the wall time read at start; when the system clock steps
/// forward (NTP correcting a slow host) it jumps with it, and when the system clock steps
/// back it does not follow — a GCRA reading a clock that went back would refuse every
/// active caller until it caught up (docs/limits.md). The wall time may be shifted so an
/// end-to-end test can start a gateway just before midnight of Jan 31
/// (`TOLLGATE_CLOCK_START`, docs/operations.md).
#[derive(Debug)]
pub struct Clock {
    offset_ns: i64,
    /// Shifted wall time at `anchor`.
    start_ns: u64,
    anchor: std::time::Instant,
    /// How far the system clock has stepped ahead of the monotonic one since start.
    ahead_ns: std::sync::atomic::AtomicU64,
    /// When (in this clock's time) the system clock is next compared.
    next_wall_check: std::sync::atomic::AtomicU64,
}

impl Clone for Clock {
    fn clone(&self) -> Self {
        Clock {
            offset_ns: self.offset_ns,
            start_ns: self.start_ns,
            anchor: self.anchor,
            ahead_ns: std::sync::atomic::AtomicU64::new(self.ahead_ns.load(std::sync::atomic::Ordering::Relaxed)),
            next_wall_check: std::sync::atomic::AtomicU64::new(0),
        }
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::shifted(0)
    }
}

/// A forward step smaller than this is drift, left to the monotonic clock.
const STEP_NS: u64 = 1_000_000_000;

impl Clock {
    fn shifted(offset_ns: i64) -> Clock {
        Clock {
            offset_ns,
            start_ns: Now::system().0.saturating_add_signed(offset_ns),
            anchor: std::time::Instant::now(),
            ahead_ns: std::sync::atomic::AtomicU64::new(0),
            next_wall_check: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// A clock that reads `start` now and runs at the system clock's pace.
    pub fn starting_at(start: Now) -> Clock {
        Clock::shifted(start.0 as i64 - Now::system().0 as i64)
    }

    pub fn now(&self) -> Now {
        self.at(std::time::Instant::now())
    }

    /// The clock's time at `instant`, a monotonic reading the caller already has (the
    /// request's arrival): the request path reads the clock once for several uses.
    pub fn at(&self, instant: std::time::Instant) -> Now {
        use std::sync::atomic::Ordering;
        let monotonic = self.monotonic(instant);
        // The system clock is compared once a second, not on every request.
        if monotonic >= self.next_wall_check.load(Ordering::Relaxed) {
            self.next_wall_check.store(monotonic + STEP_NS, Ordering::Relaxed);
            return self.reading(Now::system().0.saturating_add_signed(self.offset_ns), instant);
        }
        Now(monotonic)
    }

    fn monotonic(&self, instant: std::time::Instant) -> u64 {
        self.start_ns
            + instant.saturating_duration_since(self.anchor).as_nanos() as u64
            + self.ahead_ns.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The clock's time at `instant` given the (shifted) system time `wall`.
    fn reading(&self, wall: u64, instant: std::time::Instant) -> Now {
        let monotonic = self.monotonic(instant);
        if wall > monotonic + STEP_NS {
            self.ahead_ns
                .fetch_add(wall - monotonic, std::sync::atomic::Ordering::Relaxed);
            return Now(wall);
        }
        Now(monotonic)
    }

    /// Reads `TOLLGATE_CLOCK_START` (`YYYY-MM-DDTHH:MM:SSZ`) when set.
    pub fn from_env() -> Result<Clock, String> {
        match std::env::var("TOLLGATE_CLOCK_START") {
            Ok(text) => parse_timestamp(&text)
                .map(Clock::starting_at)
                .ok_or_else(|| format!("TOLLGATE_CLOCK_START: {text:?} is not YYYY-MM-DDTHH:MM:SSZ")),
            Err(_) => Ok(Clock::default()),
        }
    }
}

/// Parses `YYYY-MM-DDTHH:MM:SSZ`.
pub fn parse_timestamp(text: &str) -> Option<Now> {
    let (date, time) = text.strip_suffix('Z')?.split_once('T')?;
    let day = parse_day(date)?;
    let mut parts = time.split(':').map(|p| p.parse::<u64>().ok());
    let (h, m, s) = (parts.next()??, parts.next()??, parts.next()??);
    if parts.next().is_some() || h > 23 || m > 59 || s > 59 {
        return None;
    }
    Some(Now::from_secs(u64::from(day) * 86_400 + h * 3600 + m * 60 + s))
}

fn date(day: u32) -> Date {
    Date::from_julian_day(day as i32 + UNIX_EPOCH_JULIAN).unwrap_or(Date::MIN)
}

fn day_of(date: Date) -> u32 {
    (date.to_julian_day() - UNIX_EPOCH_JULIAN).max(0) as u32
}

pub fn month_of_day(day: u32) -> u32 {
    let d = date(day);
    d.year() as u32 * 12 + (d.month() as u32 - 1)
}

/// The first day of `month`.
pub fn month_start(month: u32) -> u32 {
    let month0 = (month % 12) as u8;
    let date = Month::try_from(month0 + 1)
        .ok()
        .and_then(|m| Date::from_calendar_date((month / 12) as i32, m, 1).ok())
        .unwrap_or(Date::MIN);
    day_of(date)
}

/// `2026-11-23`.
pub fn format_day(day: u32) -> String {
    let d = date(day);
    format!("{:04}-{:02}-{:02}", d.year(), d.month() as u8, d.day())
}

/// `2026-11`.
pub fn format_month(month: u32) -> String {
    format!("{:04}-{:02}", month / 12, month % 12 + 1)
}

/// `2026-11-24T00:00:00Z` for a Unix time in seconds.
pub fn format_timestamp(secs: u64) -> String {
    let rest = secs % 86_400;
    format!(
        "{}T{:02}:{:02}:{:02}Z",
        format_day((secs / 86_400) as u32),
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

/// Parses `YYYY-MM-DD`; rejects dates that do not exist (2026-02-29).
pub fn parse_day(text: &str) -> Option<u32> {
    let mut parts = text.split('-');
    let (y, m, d) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || y.len() != 4 || m.len() != 2 || d.len() != 2 {
        return None;
    }
    let month = Month::try_from(m.parse::<u8>().ok()?).ok()?;
    let date = Date::from_calendar_date(y.parse().ok()?, month, d.parse().ok()?).ok()?;
    (date.year() >= 1970).then(|| day_of(date))
}

/// Parses `YYYY-MM`.
pub fn parse_month(text: &str) -> Option<u32> {
    let (y, m) = text.split_once('-')?;
    if y.len() != 4 || m.len() != 2 {
        return None;
    }
    let year: u32 = y.parse().ok()?;
    let month: u32 = m.parse().ok()?;
    ((1..=12).contains(&month) && year >= 1970).then(|| year * 12 + month - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_follows_forward_steps_and_ignores_backward_ones() {
        let clock = Clock::starting_at(Now::from_secs(1_000_000));
        let start = clock.now().0;
        // The system clock stepped back an hour: time goes on from where it was.
        let back = clock.reading(start - 3_600_000_000_000, std::time::Instant::now());
        assert!(back.0 >= start && back.0 < start + STEP_NS, "{} vs {start}", back.0);
        // Stepped forward an hour: followed, and from then on.
        let ahead = clock.reading(start + 3_600_000_000_000, std::time::Instant::now());
        assert_eq!(ahead.0, start + 3_600_000_000_000);
        assert!(clock.now().0 >= ahead.0);
    }

    #[test]
    fn a_reading_at_an_earlier_instant_is_that_instant_s_time() {
        let arrived = std::time::Instant::now();
        let clock = Clock::starting_at(Now::from_secs(1_000_000));
        std::thread::sleep(std::time::Duration::from_millis(20));
        let later = clock.now().0;
        // Before the clock's anchor: its start, never earlier.
        assert_eq!(clock.at(arrived).0, clock.start_ns);
        let arrived = std::time::Instant::now();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let at_arrival = clock.at(arrived).0;
        let after = clock.now().0;
        assert!(
            at_arrival >= later && at_arrival + 20_000_000 <= after,
            "{later} {at_arrival} {after}"
        );
    }

    fn at(day: &str, secs_into_day: u64) -> Now {
        Now::from_secs(u64::from(parse_day(day).unwrap()) * 86_400 + secs_into_day)
    }

    #[test]
    fn days_and_months_follow_the_calendar() {
        assert_eq!(parse_day("1970-01-01"), Some(0));
        assert_eq!(format_day(parse_day("2026-11-23").unwrap()), "2026-11-23");
        assert_eq!(format_month(at("2026-11-23", 0).month()), "2026-11");
        // Jan 31 → Feb 1 changes both windows.
        let jan31 = at("2026-01-31", 86_399);
        let feb1 = at("2026-02-01", 0);
        assert_eq!(feb1.day(), jan31.day() + 1);
        assert_eq!(feb1.month(), jan31.month() + 1);
        assert_eq!(Calendar::of(jan31).day_end - jan31.secs(), 1);
        assert_eq!(Calendar::of(jan31).month_end - jan31.secs(), 1);
        // Dec → Jan crosses the year.
        let dec31 = at("2026-12-31", 3600);
        assert_eq!(format_month(dec31.month() + 1), "2027-01");
        assert_eq!(month_start(dec31.month() + 1), parse_day("2027-01-01").unwrap());
        // Leap years: February has 29 days in 2028, 28 in 2026 and 2100, 29 in 2000.
        let month_secs = |month: &str| Calendar::compute(month_start(parse_month(month).unwrap())).month_secs;
        assert_eq!(month_secs("2028-02"), 29 * 86_400);
        assert_eq!(month_secs("2026-02"), 28 * 86_400);
        assert_eq!(month_secs("2100-02"), 28 * 86_400);
        assert_eq!(month_secs("2000-02"), 29 * 86_400);
        assert!(parse_day("2028-02-29").is_some());
        assert_eq!(parse_day("2026-02-29"), None);
        assert_eq!(
            at("2028-02-29", 10).month(),
            parse_month("2028-02").unwrap(),
            "Feb 29 belongs to February"
        );
        assert_eq!(at("2028-03-01", 0).month(), parse_month("2028-03").unwrap());
        // (now, another day, seconds to the day's end, to the month's end, month length)
        for (now, other, day_left, month_left, month_len) in [
            (jan31, feb1, 1, 1, 31 * 86_400),
            (feb1, jan31, 86_400, 28 * 86_400, 28 * 86_400),
            (dec31, jan31, 82_800, 82_800, 31 * 86_400),
        ] {
            let calendar = Calendar::of(now);
            assert_eq!(Calendar::of(other), Calendar::compute(other.day()));
            assert_eq!(calendar.month, now.month());
            assert_eq!(calendar.day_end - now.secs(), day_left);
            assert_eq!(calendar.month_end - now.secs(), month_left);
            assert_eq!(calendar.month_secs, month_len);
        }
    }

    #[test]
    fn rejects_malformed_dates() {
        for bad in [
            "2026-13-01",
            "2026-1-01",
            "26-01-01",
            "2026-01-32",
            "yesterday",
            "",
            "2026-01-01-01",
        ] {
            assert_eq!(parse_day(bad), None, "{bad}");
        }
        for bad in ["2026-00", "2026-13", "2026", "2026-1"] {
            assert_eq!(parse_month(bad), None, "{bad}");
        }
        assert_eq!(
            format_timestamp(u64::from(parse_day("2026-03-01").unwrap()) * 86_400),
            "2026-03-01T00:00:00Z"
        );
        let at = parse_timestamp("2026-01-31T23:59:58Z").unwrap();
        assert_eq!(
            (format_day(at.day()), at.secs() % 86_400),
            ("2026-01-31".to_string(), 86_398)
        );
        assert_eq!(parse_timestamp("2026-01-31T24:00:00Z"), None);
        assert_eq!(format_timestamp(at.secs()), "2026-01-31T23:59:58Z");
        let shifted = Clock::starting_at(at).now();
        assert!(shifted >= at && shifted.secs() - at.secs() < 5);
    }
}
