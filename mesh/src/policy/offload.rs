//! The offload rule on the *incremental* (uncached) prompt length.

/// Prompt of one request as the home node sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RequestShape {
    /// Total prompt tokens.
    pub total_tokens: f64,
    /// Longest prefix held in the home cluster's own prefix cache.
    pub cached_local_tokens: f64,
    /// Longest prefix held by any remote prefill node (from gossip).
    pub cached_remote_tokens: f64,
}

/// Where to prefill.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// On the home cluster's own prefill instances.
    Local,
    /// On a remote prefill node (PrfaaS).
    Offload,
}

/// `offload iff l > t` with `l` the incremental length. With plenty of bandwidth the incremental
/// length counts the best cache anywhere (a remote hit is as good as a local one: its KV can cross
/// the link). When bandwidth is scarce only the local cache counts — the paper's prefix rule
/// `l_total − l_cached_locally ≤ t ⇒ local` — because a remote hit still has to ship the whole KV.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OffloadRule {
    /// Threshold `t` in tokens, from [`super::ThroughputModel::search`].
    pub threshold_tokens: f64,
}

impl OffloadRule {
    /// The incremental length the rule compares with `t`.
    pub fn incremental_tokens(&self, req: &RequestShape, bandwidth_scarce: bool) -> f64 {
        let cached = if bandwidth_scarce {
            req.cached_local_tokens
        } else {
            req.cached_local_tokens.max(req.cached_remote_tokens)
        };
        (req.total_tokens - cached.clamp(0.0, req.total_tokens.max(0.0))).max(0.0)
    }

    /// Decide. NaN inputs fall back to `Local`, which is always correct, only slower.
    pub fn decide(&self, req: &RequestShape, bandwidth_scarce: bool) -> Placement {
        let l = self.incremental_tokens(req, bandwidth_scarce);
        if l > self.threshold_tokens {
            Placement::Offload
        } else {
            Placement::Local
        }
    }
}

/// How the winner should encode the KV it streams back: `allowed` is the home's setting
/// (`mesh.kv_wire`). Int8 is asked for only when it is allowed and the link bounds time to first
/// token: with layer-wise streaming TTFT ≈ max(prefill, transfer) + one piece, so shrinking the
/// bytes pays only when `kv_bytes / bandwidth` (at the exact encoding) exceeds the winner's
/// prefill. Unknown or nonsense inputs (NaN, zero bandwidth) keep the exact encoding.
pub fn choose_kv_wire(
    allowed: crate::kv::KvWire,
    kv_bytes: f64,
    bandwidth_bytes_per_s: f64,
    prefill_s: f64,
) -> crate::kv::KvWire {
    use crate::kv::KvWire;
    let transfer_s = kv_bytes / bandwidth_bytes_per_s;
    match allowed {
        KvWire::Int8
            if transfer_s.is_finite() && prefill_s.is_finite() && transfer_s > prefill_s =>
        {
            KvWire::Int8
        }
        _ => KvWire::F16,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int8_only_when_allowed_and_the_link_is_the_bound() {
        use crate::kv::KvWire::{Int8, F16};
        // 10 MB at 1 MB/s = 10 s against a 2 s prefill: link-bound.
        assert_eq!(choose_kv_wire(Int8, 10e6, 1e6, 2.0), Int8);
        assert_eq!(choose_kv_wire(F16, 10e6, 1e6, 2.0), F16);
        // 10 MB at 100 MB/s = 0.1 s: prefill-bound, keep it exact.
        assert_eq!(choose_kv_wire(Int8, 10e6, 100e6, 2.0), F16);
        for (bw, p) in [(0.0, 1.0), (f64::NAN, 1.0), (1e6, f64::NAN), (-1.0, 1.0)] {
            assert_eq!(
                choose_kv_wire(Int8, 10e6, bw, p),
                F16,
                "bw {bw} prefill {p}"
            );
        }
    }

    fn req(total: f64, local: f64, remote: f64) -> RequestShape {
        RequestShape {
            total_tokens: total,
            cached_local_tokens: local,
            cached_remote_tokens: remote,
        }
    }

    #[test]
    fn threshold_is_strict_on_incremental_length() {
        let r = OffloadRule {
            threshold_tokens: 1000.0,
        };
        assert_eq!(r.decide(&req(1000.0, 0.0, 0.0), false), Placement::Local);
        assert_eq!(r.decide(&req(1001.0, 0.0, 0.0), false), Placement::Offload);
        // A long prompt whose prefix is cached locally is short in incremental terms.
        assert_eq!(
            r.decide(&req(50_000.0, 49_500.0, 0.0), false),
            Placement::Local
        );
        assert_eq!(r.decide(&req(f64::NAN, 0.0, 0.0), false), Placement::Local);
        assert_eq!(r.decide(&req(500.0, 900.0, 0.0), true), Placement::Local);
    }

    #[test]
    fn prefix_rule_under_scarce_bandwidth() {
        let r = OffloadRule {
            threshold_tokens: 1000.0,
        };
        // Remote cache hit, local miss: abundant bandwidth counts the remote hit …
        let x = req(50_000.0, 0.0, 49_500.0);
        assert_eq!(r.incremental_tokens(&x, false), 500.0);
        // … scarce bandwidth only the local one.
        assert_eq!(r.incremental_tokens(&x, true), 50_000.0);
        assert_eq!(r.decide(&x, true), Placement::Offload);
        // Local hit: local under scarce bandwidth.
        let y = req(50_000.0, 49_200.0, 0.0);
        assert_eq!(r.decide(&y, true), Placement::Local);
        let inf = OffloadRule {
            threshold_tokens: f64::INFINITY,
        };
        assert_eq!(inf.decide(&req(1e9, 0.0, 0.0), false), Placement::Local);
    }
}
