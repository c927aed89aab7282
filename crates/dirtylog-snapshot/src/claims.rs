//! Pages claimed by whichever thread comes first. A lazy restore's fault thread and
//! prefetchers ([`lazy`](crate::lazy)) and a background snapshot's fault thread and sweep
//! ([`background`](crate::background)) race for the same pages; each page is handled once, by
//! the thread that set its bit, and the other leaves it alone.

use dirtylog::DirtyBitmap;

/// One bit per page of each region, set by the page's claimer.
pub(crate) struct Claims(Vec<DirtyBitmap>);

/// What [`Claims::claim_runs`] found, in page order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Claimed {
    /// Pages `first..first + n`, claimed now by the caller.
    Run { first: u64, n: u64 },
    /// One page another thread had claimed.
    Taken,
}

impl Claims {
    /// Nothing claimed, in regions of `npages` pages each.
    pub(crate) fn new(npages: impl IntoIterator<Item = u64>) -> Self {
        Claims(npages.into_iter().map(DirtyBitmap::new).collect())
    }

    /// Claim page `p` of region `r`: true if nobody had.
    pub(crate) fn claim(&self, r: usize, p: u64) -> bool {
        let bit = 1u64 << (p % 64);
        self.0[r].set_word_bits((p / 64) as usize, bit) & bit == 0
    }

    /// Walk pages `first..end` of region `r` in order, claiming what nobody has in runs of at
    /// most `max` pages, and hand `f` each run claimed and each page found taken, until the
    /// range ends, `f` fails, or `stop()` says so (checked before each step).
    pub(crate) fn claim_runs<E>(
        &self,
        r: usize,
        (first, end): (u64, u64),
        max: u64,
        stop: impl Fn() -> bool,
        mut f: impl FnMut(Claimed) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut p = first;
        while p < end && !stop() {
            if !self.claim(r, p) {
                f(Claimed::Taken)?;
                p += 1;
                continue;
            }
            let mut n = 1;
            while n < max && p + n < end && self.claim(r, p + n) {
                n += 1;
            }
            f(Claimed::Run { first: p, n })?;
            p += n;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn walk(claims: &Claims, range: (u64, u64), max: u64) -> Vec<Claimed> {
        let mut seen = Vec::new();
        claims
            .claim_runs(
                0,
                range,
                max,
                || false,
                |c| {
                    seen.push(c);
                    Ok::<(), ()>(())
                },
            )
            .unwrap();
        seen
    }

    #[test]
    fn runs_stop_at_pages_already_claimed_and_at_the_limit() {
        let claims = Claims::new([200]);
        assert!(claims.claim(0, 5));
        assert!(!claims.claim(0, 5), "a page is claimed once");
        let seen = walk(&claims, (2, 12), 4);
        use Claimed::{Run, Taken};
        assert_eq!(
            seen,
            [
                Run { first: 2, n: 3 },
                Taken,
                Run { first: 6, n: 4 },
                Run { first: 10, n: 2 }
            ]
        );
        assert_eq!(walk(&claims, (2, 12), 4), [Taken; 10], "all claimed now");
        assert_eq!(walk(&claims, (60, 70), 64), [Run { first: 60, n: 10 }]);
    }

    #[test]
    fn stop_and_errors_end_the_walk() {
        let claims = Claims::new([64]);
        let calls = std::cell::Cell::new(0);
        let r = claims.claim_runs(
            0,
            (0, 64),
            1,
            || calls.get() == 3,
            |_| {
                calls.set(calls.get() + 1);
                Ok::<(), ()>(())
            },
        );
        assert_eq!((r, calls.get()), (Ok(()), 3));
        assert_eq!(
            claims.claim_runs(0, (10, 64), 8, || false, |_| Err("no")),
            Err("no")
        );
        assert!(
            claims.claim(0, 18),
            "nothing past the failed run was claimed"
        );
    }
}
