//! The per-connection rate limit: a token bucket, and the flood rule.
//!
//! Pure arithmetic on a millisecond clock the caller passes in, so it is
//! tested without waiting. Tokens are counted in thousandths so the refill
//! needs no floating point and loses nothing at low rates.

/// What the bucket says about one command.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Within the rate: handle it.
    Allow,
    /// Over the rate: refuse it with `rate_limited`.
    Refuse,
    /// Refused again and again: the client ignores `rate_limited`; close it
    /// with 1008.
    Flooding,
}

/// A token bucket holding at most `burst` commands, refilled at
/// `per_s` commands per second.
#[derive(Debug, Clone)]
pub struct Bucket {
    milli_tokens: u64,
    last_ms: u64,
    /// Commands refused since the last one allowed.
    refused: u32,
}

/// The limits every bucket shares.
#[derive(Debug, Clone, Copy)]
pub struct Rate {
    pub per_s: u32,
    pub burst: u32,
}

impl Rate {
    /// Refusals in a row after which a client counts as flooding: another
    /// whole burst sent after being told to slow down is no accident.
    fn flood_after(&self) -> u32 {
        self.burst.max(1)
    }
}

impl Bucket {
    /// A full bucket at time `now_ms`.
    pub fn new(rate: Rate, now_ms: u64) -> Self {
        Bucket {
            milli_tokens: u64::from(rate.burst) * 1000,
            last_ms: now_ms,
            refused: 0,
        }
    }

    /// Take one token for a command arriving at `now_ms`.
    pub fn take(&mut self, rate: Rate, now_ms: u64) -> Verdict {
        let elapsed = now_ms.saturating_sub(self.last_ms);
        self.last_ms = now_ms.max(self.last_ms);
        let cap = u64::from(rate.burst) * 1000;
        // per_s tokens per 1000 ms is per_s milli-tokens per ms.
        let refill = elapsed.saturating_mul(u64::from(rate.per_s));
        self.milli_tokens = self.milli_tokens.saturating_add(refill).min(cap);
        if self.milli_tokens >= 1000 {
            self.milli_tokens -= 1000;
            self.refused = 0;
            Verdict::Allow
        } else {
            self.refused += 1;
            if self.refused > rate.flood_after() {
                Verdict::Flooding
            } else {
                Verdict::Refuse
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RATE: Rate = Rate {
        per_s: 20,
        burst: 40,
    };

    #[test]
    fn burst_then_refuse_then_refill() {
        let mut b = Bucket::new(RATE, 0);
        for _ in 0..40 {
            assert_eq!(b.take(RATE, 0), Verdict::Allow);
        }
        assert_eq!(b.take(RATE, 0), Verdict::Refuse);
        // 50 ms at 20/s refills exactly one token.
        assert_eq!(b.take(RATE, 50), Verdict::Allow);
        assert_eq!(b.take(RATE, 50), Verdict::Refuse);
    }

    #[test]
    fn sustained_flood_is_flagged() {
        let mut b = Bucket::new(RATE, 0);
        for _ in 0..40 {
            b.take(RATE, 0);
        }
        let verdicts: Vec<_> = (0..41).map(|_| b.take(RATE, 0)).collect();
        assert!(verdicts[..40].iter().all(|v| *v == Verdict::Refuse));
        assert_eq!(verdicts[40], Verdict::Flooding);
    }

    #[test]
    fn an_allowed_command_forgives() {
        let mut b = Bucket::new(RATE, 0);
        for _ in 0..40 {
            b.take(RATE, 0);
        }
        for _ in 0..30 {
            assert_eq!(b.take(RATE, 0), Verdict::Refuse);
        }
        assert_eq!(b.take(RATE, 1000), Verdict::Allow);
        for _ in 0..19 {
            assert_eq!(b.take(RATE, 1000), Verdict::Allow);
        }
        assert_eq!(b.take(RATE, 1000), Verdict::Refuse);
    }

    #[test]
    fn clock_going_backwards_does_not_refill() {
        let mut b = Bucket::new(RATE, 1000);
        for _ in 0..40 {
            b.take(RATE, 1000);
        }
        assert_eq!(b.take(RATE, 500), Verdict::Refuse);
    }
}
