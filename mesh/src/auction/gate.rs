//! Bidder-side capacity: how many won awards this node serves at once. Checked when bidding
//! *and again when an award arrives* (bids are answered concurrently, so several homes can
//! award bids made while there was room); an award beyond capacity is refused with
//! [`AwardRefusal::Overloaded`](super::AwardRefusal::Overloaded), so the home re-auctions or
//! prefills locally at once instead of queueing behind work the bidder cannot do.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

#[derive(Debug)]
struct Inner {
    in_use: AtomicUsize,
    max: AtomicUsize,
}

/// Shared counter of awards being served, bounded by a maximum the application sets.
#[derive(Debug, Clone)]
pub struct ServeGate {
    inner: Arc<Inner>,
}

/// One award being served; dropping it frees the place.
#[derive(Debug)]
pub struct ServeSlot {
    inner: Arc<Inner>,
}

impl Default for ServeGate {
    /// Unbounded until [`ServeGate::set_max`] is called.
    fn default() -> Self {
        Self {
            inner: Arc::new(Inner {
                in_use: AtomicUsize::new(0),
                max: AtomicUsize::new(usize::MAX),
            }),
        }
    }
}

impl ServeGate {
    /// Sets the most awards served at once.
    pub fn set_max(&self, max: usize) {
        self.inner.max.store(max, Ordering::Release);
    }

    /// Awards being served now.
    pub fn in_use(&self) -> usize {
        self.inner.in_use.load(Ordering::Acquire)
    }

    /// Whether another award would fit now (for bidding; the award itself takes a slot).
    pub fn has_room(&self) -> bool {
        self.in_use() < self.inner.max.load(Ordering::Acquire)
    }

    /// Takes a place, or `None` at capacity.
    pub fn try_acquire(&self) -> Option<ServeSlot> {
        let max = self.inner.max.load(Ordering::Acquire);
        self.inner
            .in_use
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| ServeSlot {
                inner: self.inner.clone(),
            })
    }
}

impl Drop for ServeSlot {
    fn drop(&mut self) {
        self.inner.in_use.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_bounded_and_freed_on_drop() {
        let g = ServeGate::default();
        g.set_max(2);
        let a = g.try_acquire().expect("first");
        let b = g.try_acquire().expect("second");
        assert!(!g.has_room());
        assert!(g.try_acquire().is_none(), "third is over capacity");
        drop(a);
        assert_eq!(g.in_use(), 1);
        let c = g.clone().try_acquire().expect("freed place");
        drop((b, c));
        assert_eq!(g.in_use(), 0);
        g.set_max(0);
        assert!(
            g.try_acquire().is_none(),
            "a node serving nothing refuses every award"
        );
    }
}
