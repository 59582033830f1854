//! Sans-IO offload policy: plain functions over plain structs, no async, no clocks.
//!
//! The same code decides inside a running node (which feeds it measured queues and bandwidths) and
//! inside the discrete-event simulator in [`crate::sim`] (which feeds it virtual ones), so what the
//! simulator proves is what the node does. See DESIGN.md §1 for the formulas.

pub mod auction;
pub mod bids;
pub mod ledger;
pub mod measure;
pub mod offload;
pub mod placement;
pub mod profile;
pub mod role;
pub mod threshold;
pub mod throughput;
pub mod workload;

pub use auction::{settle, Award, Bid, BidderId, BidderLoad, PricingParams, ScoringParams};
pub use bids::{check_bid, BidFault};
pub use ledger::{Account, Ledger};
pub use measure::{
    decode_points_to_profile, points_to_profile, DecodeEstimator, LengthHistogram, MeasuredProfile,
    PrefillEstimator, QuoteRate,
};
pub use offload::{choose_kv_wire, OffloadRule, Placement, RequestShape};
pub use placement::{
    plan, rank_candidates, spread_key, Candidate, LocalReason, PlacementInput, PlacementPlan,
};
pub use profile::{DecodeProfile, PrefillProfile, ProfilePoint};
pub use role::{advise_role, next_role, RoleAdvice, RoleMode, RoleState};
pub use threshold::{ThresholdInputs, ThresholdTracker};
pub use throughput::{
    Bottleneck, Evaluation, Observation, ReSearchTrigger, SearchMode, Split, ThroughputModel,
};
pub use workload::LengthDistribution;

/// Why a policy input was rejected. Inputs come from config files and from measurements that
/// peers gossip, so every constructor validates instead of panicking.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PolicyError {
    /// A profile needs at least two points to interpolate and extrapolate.
    #[error("profile `{0}` needs at least two points")]
    TooFewPoints(&'static str),
    /// Profile points must be finite, positive and strictly increasing in their x value.
    #[error("profile `{what}` point {index} is invalid: {why}")]
    BadPoint {
        /// Which profile.
        what: &'static str,
        /// Index of the offending point.
        index: usize,
        /// Human-readable reason.
        why: &'static str,
    },
    /// A numeric parameter is out of its domain.
    #[error("parameter `{name}` = {value} is out of range ({why})")]
    OutOfRange {
        /// Parameter name.
        name: &'static str,
        /// The value that was given.
        value: f64,
        /// The accepted domain.
        why: &'static str,
    },
    /// No split/threshold gave a positive throughput (e.g. zero instances).
    #[error("no feasible configuration: {0}")]
    Infeasible(&'static str),
}

/// Reject NaN/inf and values outside `[lo, hi]`.
pub(crate) fn check_range(
    name: &'static str,
    value: f64,
    lo: f64,
    hi: f64,
) -> Result<f64, PolicyError> {
    if value.is_finite() && value >= lo && value <= hi {
        Ok(value)
    } else {
        Err(PolicyError::OutOfRange {
            name,
            value,
            why: "must be finite and within its bounds",
        })
    }
}
