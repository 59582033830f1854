//! Settlement ledger: what a node paid each peer as a home and earned from each as a winner,
//! with an optional cap on what a home spends per peer per period. Sans-IO: the caller passes
//! the time in seconds from any fixed origin.

use std::collections::BTreeMap;

use serde::Serialize;

/// Peers a ledger keeps at most; past it the peer with the least total traffic is dropped
/// (its history is lost, its cap restarts).
pub const MAX_LEDGER_PEERS: usize = 1024;

/// One peer's account.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Account {
    /// Total paid to this peer (we were the home, it prefilled).
    pub paid: f64,
    /// Total earned from this peer (it was the home, we prefilled).
    pub earned: f64,
    /// Auctions paid / earned.
    pub paid_count: u64,
    /// Auctions earned.
    pub earned_count: u64,
    /// Paid in the current cap period.
    pub period_paid: f64,
    /// Start of the current cap period (caller's seconds).
    pub period_start_s: f64,
}

/// Per-peer accounts, keyed by the caller's peer type.
#[derive(Debug, Clone, Serialize)]
pub struct Ledger<K: Ord> {
    accounts: BTreeMap<K, Account>,
}

impl<K: Ord> Default for Ledger<K> {
    fn default() -> Self {
        Self {
            accounts: BTreeMap::new(),
        }
    }
}

fn valid(amount: f64) -> bool {
    amount.is_finite() && amount >= 0.0
}

impl<K: Ord + Clone> Ledger<K> {
    fn account(&mut self, peer: &K) -> &mut Account {
        if !self.accounts.contains_key(peer) && self.accounts.len() >= MAX_LEDGER_PEERS {
            let smallest = self
                .accounts
                .iter()
                .min_by(|a, b| (a.1.paid + a.1.earned).total_cmp(&(b.1.paid + b.1.earned)))
                .map(|(k, _)| k.clone());
            if let Some(k) = smallest {
                self.accounts.remove(&k);
            }
        }
        self.accounts.entry(peer.clone()).or_default()
    }

    fn roll(acc: &mut Account, now_s: f64, period_s: f64) {
        if now_s - acc.period_start_s >= period_s || now_s < acc.period_start_s {
            acc.period_start_s = now_s;
            acc.period_paid = 0.0;
        }
    }

    /// Records a settled payment to `peer` (negative or non-finite amounts are ignored).
    pub fn record_paid(&mut self, peer: &K, amount: f64, now_s: f64, period_s: f64) {
        if !valid(amount) {
            return;
        }
        let acc = self.account(peer);
        Self::roll(acc, now_s, period_s);
        acc.paid += amount;
        acc.period_paid += amount;
        acc.paid_count += 1;
    }

    /// Records a payment earned from `peer`.
    pub fn record_earned(&mut self, peer: &K, amount: f64) {
        if !valid(amount) {
            return;
        }
        let acc = self.account(peer);
        acc.earned += amount;
        acc.earned_count += 1;
    }

    /// Whether a home may still pay `peer` in this period under `cap` (`None`: no cap).
    pub fn may_pay(&self, peer: &K, cap: Option<f64>, now_s: f64, period_s: f64) -> bool {
        let Some(cap) = cap else { return true };
        match self.accounts.get(peer) {
            None => cap > 0.0,
            Some(a) if now_s - a.period_start_s >= period_s || now_s < a.period_start_s => {
                cap > 0.0
            }
            Some(a) => a.period_paid < cap,
        }
    }

    /// Every account.
    pub fn accounts(&self) -> impl Iterator<Item = (&K, &Account)> {
        self.accounts.iter()
    }

    /// One peer's account.
    pub fn get(&self, peer: &K) -> Option<&Account> {
        self.accounts.get(peer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_per_peer_and_period_and_stays_bounded() {
        let mut l: Ledger<u32> = Ledger::default();
        let (cap, period) = (Some(10.0), 60.0);
        assert!(l.may_pay(&1, cap, 0.0, period));
        assert!(!l.may_pay(&1, Some(0.0), 0.0, period));
        l.record_paid(&1, 6.0, 1.0, period);
        assert!(l.may_pay(&1, cap, 2.0, period));
        l.record_paid(&1, 6.0, 2.0, period);
        assert!(!l.may_pay(&1, cap, 3.0, period), "12 paid ≥ cap 10");
        assert!(
            l.may_pay(&2, cap, 3.0, period),
            "other peers are not capped by 1's spend"
        );
        assert!(l.may_pay(&1, None, 3.0, period));
        // The next period starts afresh; totals remain.
        assert!(l.may_pay(&1, cap, 61.0, period));
        l.record_paid(&1, 1.0, 61.0, period);
        let a = l.get(&1).unwrap();
        assert_eq!((a.paid, a.period_paid, a.paid_count), (13.0, 1.0, 3));
        for bad in [f64::NAN, -1.0, f64::INFINITY] {
            l.record_paid(&1, bad, 62.0, period);
            l.record_earned(&1, bad);
        }
        l.record_earned(&1, 2.5);
        let a = l.get(&1).unwrap();
        assert_eq!((a.paid, a.earned, a.earned_count), (13.0, 2.5, 1));
        for p in 0..(MAX_LEDGER_PEERS as u32 + 50) {
            l.record_earned(&(p + 10), 1.0);
        }
        assert_eq!(l.accounts().count(), MAX_LEDGER_PEERS);
        assert!(l.get(&1).is_some(), "the biggest account is kept");
    }
}
