//! Waiting for conditions with a deadline, instead of sleeping and hoping.

use std::{
    thread,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};

/// What a poll check returns: `true`/`Some(value)` when done.
pub trait Outcome {
    type Value;
    fn into_value(self) -> Option<Self::Value>;
}

impl Outcome for bool {
    type Value = ();
    fn into_value(self) -> Option<()> {
        self.then_some(())
    }
}

impl<T> Outcome for Option<T> {
    type Value = T;
    fn into_value(self) -> Option<T> {
        self
    }
}

/// Calls `check` every `interval` until it reports done or `timeout` has passed (checking
/// once more at the deadline). An `Err` from `check` aborts at once: use it for conditions
/// that can no longer become true (a process exited), and `false`/`None` for "not yet".
pub fn poll_until<O: Outcome>(
    timeout: Duration,
    interval: Duration,
    what: &str,
    mut check: impl FnMut() -> Result<O>,
) -> Result<O::Value> {
    let start = Instant::now();
    let deadline = start + timeout;
    loop {
        if let Some(value) = check()?.into_value() {
            return Ok(value);
        }
        let now = Instant::now();
        if now >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        thread::sleep(interval.min(deadline - now));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_value_or_times_out() {
        let mut n = 0;
        let v = poll_until(
            Duration::from_secs(1),
            Duration::from_millis(1),
            "n",
            || {
                n += 1;
                Ok((n == 3).then_some(n))
            },
        );
        assert_eq!(v.unwrap(), 3);
        let err = poll_until(
            Duration::from_millis(20),
            Duration::from_millis(5),
            "never",
            || Ok(false),
        );
        assert!(err.unwrap_err().to_string().contains("never"));
    }
}
