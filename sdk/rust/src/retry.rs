//! The retry policy: which failures to retry, how often, and how long to
//! wait between attempts.
//!
//! The delay computation is a pure function of the attempt number and a
//! jitter draw, so it is tested without clocks.

use std::future::Future;
use std::time::Duration;

use rand::Rng;

use crate::Error;

/// Exponential backoff with "equal jitter": attempt `n` (0-based) waits a
/// random duration in `[cap/2, cap]`, where `cap = min(initial * 2^n, max)`.
/// Half the delay is guaranteed, so retries from many clients spread out
/// without any retry being immediate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first attempt; 0 disables retrying.
    pub retries_max: u32,
    /// The cap of the first backoff.
    pub backoff_initial: Duration,
    /// The largest cap of any backoff.
    pub backoff_max: Duration,
}

impl RetryPolicy {
    /// The delay before retry number `attempt` (0-based), given a jitter draw
    /// `jitter_unit` in `[0, 1]`.
    pub fn delay(&self, attempt: u32, jitter_unit: f64) -> Duration {
        assert!(
            (0.0..=1.0).contains(&jitter_unit),
            "jitter_unit {jitter_unit} is outside [0, 1]"
        );
        // Saturate rather than overflow: 2^attempt grows past any cap quickly.
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        let cap = self
            .backoff_initial
            .saturating_mul(factor)
            .min(self.backoff_max);
        let half = cap / 2;
        let delay = half + half.mul_f64(jitter_unit);
        debug_assert!(delay <= cap.max(self.backoff_max));
        delay
    }

    /// Runs `attempt` until it succeeds, fails with an error that is not
    /// [retryable](Error::is_retryable), or `retries_max` retries are spent.
    /// Returns the last error in the latter two cases.
    pub async fn run<T, F, Fut>(&self, mut attempt: F) -> Result<T, Error>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Error>>,
    {
        let mut retries_done = 0u32;
        loop {
            match attempt().await {
                Ok(v) => return Ok(v),
                Err(e) if e.is_retryable() && retries_done < self.retries_max => {
                    let jitter_unit = rand::thread_rng().gen_range(0.0..=1.0);
                    tokio::time::sleep(self.delay(retries_done, jitter_unit)).await;
                    retries_done += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn policy(retries_max: u32) -> RetryPolicy {
        RetryPolicy {
            retries_max,
            backoff_initial: Duration::from_millis(20),
            backoff_max: Duration::from_secs(1),
        }
    }

    #[test]
    fn delay_doubles_then_caps() {
        let p = policy(8);
        let expect_caps_ms = [20, 40, 80, 160, 320, 640, 1000, 1000];
        for (attempt, cap_ms) in expect_caps_ms.iter().enumerate() {
            let cap = Duration::from_millis(*cap_ms);
            assert_eq!(p.delay(attempt as u32, 1.0), cap, "attempt {attempt}");
            assert_eq!(p.delay(attempt as u32, 0.0), cap / 2, "attempt {attempt}");
            let mid = p.delay(attempt as u32, 0.5);
            assert!(mid > cap / 2 && mid < cap, "attempt {attempt}: {mid:?}");
        }
    }

    #[test]
    fn delay_never_overflows() {
        let p = policy(8);
        for attempt in [31, 32, 63, 1000, u32::MAX] {
            assert_eq!(p.delay(attempt, 1.0), p.backoff_max);
        }
    }

    #[test]
    #[should_panic(expected = "outside [0, 1]")]
    fn delay_rejects_bad_jitter() {
        policy(1).delay(0, 1.5);
    }

    fn fast(retries_max: u32) -> RetryPolicy {
        RetryPolicy {
            retries_max,
            backoff_initial: Duration::from_micros(10),
            backoff_max: Duration::from_micros(50),
        }
    }

    /// Runs a fake call that fails with `errors` in order, then succeeds;
    /// returns the outcome and the number of attempts made.
    async fn check(p: RetryPolicy, errors: Vec<Error>) -> (Result<u32, Error>, u32) {
        let attempts = AtomicU32::new(0);
        let result = p
            .run(|| {
                let n = attempts.fetch_add(1, Ordering::SeqCst);
                let outcome = match errors.get(n as usize) {
                    Some(e) => Err(e.clone()),
                    None => Ok(n),
                };
                async move { outcome }
            })
            .await;
        (result, attempts.load(Ordering::SeqCst))
    }

    fn unavailable() -> Error {
        Error::Status {
            code: tonic::Code::Unavailable,
            message: "down".into(),
        }
    }

    #[tokio::test]
    async fn retries_unavailable_and_transport_until_success() {
        let errors = vec![
            unavailable(),
            Error::Transport("reset".into()),
            unavailable(),
        ];
        let (result, attempts) = check(fast(8), errors).await;
        assert_eq!(result, Ok(3));
        assert_eq!(attempts, 4);
    }

    #[tokio::test]
    async fn gives_up_after_retries_max() {
        let (result, attempts) = check(fast(2), vec![unavailable(); 5]).await;
        assert_eq!(result, Err(unavailable()));
        assert_eq!(attempts, 3);
    }

    #[tokio::test]
    async fn zero_retries_means_one_attempt() {
        let (result, attempts) = check(fast(0), vec![unavailable()]).await;
        assert_eq!(result, Err(unavailable()));
        assert_eq!(attempts, 1);
    }

    #[tokio::test]
    async fn does_not_retry_other_errors() {
        for e in [
            Error::Status {
                code: tonic::Code::InvalidArgument,
                message: "bad".into(),
            },
            Error::Status {
                code: tonic::Code::DeadlineExceeded,
                message: "slow".into(),
            },
            Error::InvalidResponse("junk".into()),
        ] {
            let (result, attempts) = check(fast(8), vec![e.clone()]).await;
            assert_eq!(result, Err(e));
            assert_eq!(attempts, 1);
        }
    }
}
