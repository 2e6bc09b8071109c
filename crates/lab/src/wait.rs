//! Polling helper.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};

/// Calls `check` every `poll` until it returns `Ok(true)` (then `Ok(())`), it returns an
/// error (returned as is), or `deadline` passes (an error). `check` runs at least once,
/// and once more at the deadline.
pub fn wait_until<F>(deadline: Instant, poll: Duration, mut check: F) -> Result<()>
where
    F: FnMut() -> Result<bool>,
{
    loop {
        if check()? {
            return Ok(());
        }
        let now = Instant::now();
        if now >= deadline {
            bail!("condition not met before the deadline");
        }
        std::thread::sleep(poll.min(deadline - now));
    }
}

/// [`wait_until`] with a timeout from now.
pub fn wait_for<F>(timeout: Duration, poll: Duration, check: F) -> Result<()>
where
    F: FnMut() -> Result<bool>,
{
    wait_until(Instant::now() + timeout, poll, check)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn succeeds_and_times_out() {
        let mut n = 0;
        wait_for(Duration::from_secs(5), Duration::from_millis(1), || {
            n += 1;
            Ok(n >= 3)
        })
        .expect("reaches 3");
        assert_eq!(n, 3);
        let start = Instant::now();
        let r = wait_for(Duration::from_millis(30), Duration::from_millis(5), || {
            Ok(false)
        });
        assert!(r.is_err());
        assert!(start.elapsed() >= Duration::from_millis(30));
        let r = wait_for(Duration::from_secs(5), Duration::from_millis(1), || {
            anyhow::bail!("boom")
        });
        assert!(
            r.expect_err("error propagates")
                .to_string()
                .contains("boom")
        );
    }
}
