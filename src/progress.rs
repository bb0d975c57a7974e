//! Progress display for long jobs: on a terminal, one bar redrawn in place (at most ten times a
//! second); in logs and pipes, a plain line every few seconds and at the end. The ETA counts
//! only work done in this run (units skipped by `--resume` do not inflate the rate).

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// Where a bar draws.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// A progress bar over `total` units of work.
pub struct Bar {
    total: u64,
    start: Instant,
    skipped: u64,
    last: Option<Instant>,
    tty: bool,
    stream: Stream,
    every: Duration,
}

/// `secs` as `42s`, `3m07s` or `1h02m03s`.
pub fn clock(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    match (s / 3600, s / 60 % 60, s % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, s) => format!("{m}m{s:02}s"),
        (h, m, s) => format!("{h}h{m:02}m{s:02}s"),
    }
}

impl Bar {
    /// A bar on `stream`; off a terminal it prints a line at most every `every`.
    pub fn new(total: u64, stream: Stream, every: Duration) -> Bar {
        let tty = match stream {
            Stream::Stdout => std::io::stdout().is_terminal(),
            Stream::Stderr => std::io::stderr().is_terminal(),
        };
        Bar {
            total: total.max(1),
            start: Instant::now(),
            skipped: 0,
            last: None,
            tty,
            stream,
            every,
        }
    }

    /// Changes the amount of work (when it is known only once the job has started).
    pub fn set_total(&mut self, total: u64) {
        self.total = total.max(1);
    }

    /// Marks `units` as done without work (resumed), so they do not count toward the rate.
    pub fn skip(&mut self, units: u64) {
        self.skipped += units;
    }

    /// Seconds left at the rate of this run so far (`None` before any real work).
    pub fn eta(&self, done: u64) -> Option<f64> {
        let worked = done.checked_sub(self.skipped).filter(|&w| w > 0)?;
        let secs = self.start.elapsed().as_secs_f64();
        Some(secs / worked as f64 * self.total.saturating_sub(done) as f64)
    }

    /// Shows `done` of the total with a detail text (throttled; always drawn at the end).
    pub fn update(&mut self, done: u64, detail: &str) {
        let now = Instant::now();
        let finished = done >= self.total;
        let gap = if self.tty {
            Duration::from_millis(100)
        } else {
            self.every
        };
        if !finished && self.last.is_some_and(|t| now - t < gap) {
            return;
        }
        self.last = Some(now);
        let eta = self.eta(done).map_or_else(|| "?".to_string(), clock);
        let line = format!(
            "{detail}  {} elapsed, ETA {eta}",
            clock(self.start.elapsed().as_secs_f64())
        );
        let text = if self.tty {
            let filled = (30 * done.min(self.total) / self.total) as usize;
            format!(
                "\r[{}{}] {line}  {}",
                "#".repeat(filled),
                "-".repeat(30 - filled),
                if finished { "\n" } else { "" }
            )
        } else {
            format!("{line}\n")
        };
        let _ = match self.stream {
            Stream::Stdout => {
                let mut o = std::io::stdout();
                o.write_all(text.as_bytes()).and_then(|_| o.flush())
            }
            Stream::Stderr => {
                let mut o = std::io::stderr();
                o.write_all(text.as_bytes()).and_then(|_| o.flush())
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_formats() {
        assert_eq!(clock(5.2), "5s");
        assert_eq!(clock(187.0), "3m07s");
        assert_eq!(clock(3723.0), "1h02m03s");
    }

    #[test]
    fn eta_ignores_skipped_units() {
        let mut b = Bar::new(10, Stream::Stderr, Duration::from_secs(5));
        b.skip(4);
        assert_eq!(b.eta(4), None);
        std::thread::sleep(Duration::from_millis(20));
        let e = b.eta(6).unwrap();
        // Two units took >= 20 ms, four remain: >= 40 ms.
        assert!(e >= 0.04, "{e}");
    }
}
