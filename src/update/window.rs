//! Update windows: `ARENA_UPDATE_WINDOW="Mon-Fri 02:00-05:00"`, local time. Several windows are
//! separated by `;`; days are a range (`Mon-Fri`), a list (`Sat,Sun`), one day, or `daily`; a
//! time range that ends before it starts crosses midnight and belongs to the day it starts on.

const DAYS: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];

/// One window: on these days (bit 0 = Monday), from `start` to `end` (minutes after midnight).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Span {
    days: u8,
    start: u16,
    end: u16,
}

/// Update windows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Windows(Vec<Span>);

fn day(s: &str) -> Result<u8, String> {
    DAYS.iter()
        .position(|d| d.eq_ignore_ascii_case(s))
        .map(|i| i as u8)
        .ok_or_else(|| format!("{s:?} is not a day (Mon ... Sun)"))
}

fn minutes(s: &str) -> Result<u16, String> {
    let (h, m) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?} is not a time (HH:MM)"))?;
    let (h, m): (u16, u16) = (
        h.parse()
            .map_err(|_| format!("{s:?} is not a time (HH:MM)"))?,
        m.parse()
            .map_err(|_| format!("{s:?} is not a time (HH:MM)"))?,
    );
    if h > 24 || m > 59 || (h == 24 && m != 0) {
        return Err(format!("{s:?} is not a time of day"));
    }
    Ok(h * 60 + m)
}

impl Windows {
    /// Parses `Mon-Fri 02:00-05:00; Sat,Sun 00:00-08:00`.
    pub fn parse(text: &str) -> Result<Windows, String> {
        let mut spans = Vec::new();
        for part in text.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            let (days_text, times) = part
                .split_once(char::is_whitespace)
                .ok_or_else(|| format!("{part:?}: expected DAYS HH:MM-HH:MM"))?;
            let mut days = 0u8;
            if days_text.eq_ignore_ascii_case("daily") || days_text == "*" {
                days = 0x7f;
            } else {
                for item in days_text.split(',') {
                    match item.split_once('-') {
                        Some((a, b)) => {
                            let (a, b) = (day(a)?, day(b)?);
                            let mut d = a;
                            loop {
                                days |= 1 << d;
                                if d == b {
                                    break;
                                }
                                d = (d + 1) % 7;
                            }
                        }
                        None => days |= 1 << day(item)?,
                    }
                }
            }
            let (a, b) = times
                .trim()
                .split_once('-')
                .ok_or_else(|| format!("{part:?}: expected HH:MM-HH:MM"))?;
            let (start, end) = (minutes(a.trim())?, minutes(b.trim())?);
            if start == end {
                return Err(format!("{part:?}: the window is empty"));
            }
            spans.push(Span { days, start, end });
        }
        if spans.is_empty() {
            return Err("no window given".into());
        }
        Ok(Windows(spans))
    }

    /// Whether `weekday` (0 = Monday) at `minute` (after midnight) is inside a window.
    pub fn contains(&self, weekday: u8, minute: u16) -> bool {
        let yesterday = (weekday + 6) % 7;
        self.0.iter().any(|s| {
            if s.start < s.end {
                s.days & (1 << weekday) != 0 && (s.start..s.end).contains(&minute)
            } else {
                (s.days & (1 << weekday) != 0 && minute >= s.start)
                    || (s.days & (1 << yesterday) != 0 && minute < s.end)
            }
        })
    }

    /// Whether now, in local time, is inside a window.
    pub fn open_now(&self) -> bool {
        let (weekday, minute) = local_now();
        self.contains(weekday, minute)
    }
}

/// The local weekday (0 = Monday) and minute of the day.
pub fn local_now() -> (u8, u16) {
    // SAFETY: time(NULL) and localtime_r with a valid out pointer.
    unsafe {
        let t = libc::time(std::ptr::null_mut());
        let mut tm: libc::tm = std::mem::zeroed();
        libc::localtime_r(&t, &mut tm);
        (
            ((tm.tm_wday + 6) % 7) as u8,
            (tm.tm_hour * 60 + tm.tm_min) as u16,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_parse_and_contain() {
        let w = Windows::parse("Mon-Fri 02:00-05:00").unwrap();
        assert!(w.contains(0, 2 * 60));
        assert!(w.contains(4, 4 * 60 + 59));
        assert!(!w.contains(4, 5 * 60));
        assert!(!w.contains(5, 3 * 60), "Saturday");
        // Across midnight, and a week that wraps.
        let w = Windows::parse("Sat,Sun 22:00-04:00; Fri-Mon 12:00-13:00").unwrap();
        assert!(w.contains(5, 23 * 60));
        assert!(w.contains(6, 60), "Sunday 01:00, from Saturday's window");
        assert!(w.contains(0, 60), "Monday 01:00, from Sunday's window");
        assert!(!w.contains(1, 60));
        assert!(w.contains(0, 12 * 60 + 30));
        assert!(!w.contains(2, 12 * 60 + 30));
        assert!(
            Windows::parse("daily 00:00-24:00")
                .unwrap()
                .contains(3, 1439)
        );
        for bad in [
            "",
            "Mon",
            "Xyz 01:00-02:00",
            "Mon 25:00-26:00",
            "Mon 01:00-01:00",
            "Mon 1-2",
        ] {
            assert!(Windows::parse(bad).is_err(), "{bad}");
        }
        let (d, m) = local_now();
        assert!(d < 7 && m < 1440);
    }
}
