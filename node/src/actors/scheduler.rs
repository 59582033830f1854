//! The node's side of the shared scheduler (`prfaas_mesh::policy::threshold`): turns what this
//! node measures and what its peers advertise into the threshold search's inputs, runs the
//! search when its trigger fires, and publishes `t` (and the inputs, for `/mesh` and metrics).
//! Owned by the [`super::MeshBridge`], which calls [`ThresholdState::refresh`] every advert
//! interval.

use std::sync::atomic::Ordering;
use std::time::Instant;

use prfaas_mesh::policy::{
    advise_role, next_role, points_to_profile, DecodeEstimator, Observation, PrefillProfile,
    ReSearchTrigger, RoleMode, Split, ThresholdInputs, ThresholdTracker, ThroughputModel,
};
use prfaas_mesh::{KnownAdvert, Role};
use serde_json::json;

use super::core::Core;
use super::planner::advert_profile;
use crate::config::NodeRole;
use crate::metrics::KindLabel;

/// Prompts a home must have seen before its length distribution is trusted.
pub const MIN_HOMED_PROMPTS: u64 = 8;
/// Output tokens per request assumed by the decode term (the node does not know how long its
/// clients' answers will be before they end; the term rarely binds `t`).
const OUTPUT_TOKENS: f64 = 256.0;
/// Most distinct lengths of the peers' merged profile.
const MAX_PROFILE_POINTS: usize = 32;

/// The bridge's threshold state.
#[derive(Debug)]
pub struct ThresholdState {
    tracker: ThresholdTracker,
    last_split: Option<Split>,
    samples_at_search: u64,
    egress_mark: Option<(u64, Instant)>,
}

impl ThresholdState {
    /// Starts at the configured `t`.
    pub fn new(core: &Core) -> Self {
        Self {
            tracker: ThresholdTracker::new(
                core.cfg.policy.offload_threshold_tokens as f64,
                ReSearchTrigger::default(),
            )
            .with_bounds(
                core.cfg.policy.offload_threshold_tokens as f64,
                core.max_context as f64,
            ),
            last_split: None,
            samples_at_search: 0,
            egress_mark: None,
        }
    }

    /// Re-searches `t` if the inputs call for it. `adverts` is the peer table.
    pub fn refresh(&mut self, core: &Core, adverts: &[KnownAdvert]) {
        let why = match self.try_refresh(core, adverts) {
            Ok(()) => return,
            Err(why) => why,
        };
        if let Ok(mut s) = core.threshold_status.lock() {
            *s = json!({
                "threshold_tokens": core.threshold.load(Ordering::Relaxed),
                "searched": self.tracker.researches > 0,
                "waiting_for": why,
                "researches": self.tracker.researches,
            });
        }
    }

    fn try_refresh(&mut self, core: &Core, adverts: &[KnownAdvert]) -> Result<(), String> {
        let me = core.mesh.local_peer_id();
        let kv = |l: f64| core.layout.transfer_bytes(l.max(0.0) as usize) as f64;
        let prefillers: Vec<&KnownAdvert> = adverts
            .iter()
            .filter(|a| a.peer != me && a.advert.can_prefill(&core.model_ref))
            .collect();
        // Other homes share those prefill peers with us.
        let homes = 1 + adverts
            .iter()
            .filter(|a| a.peer != me && a.advert.body.roles.contains(&Role::Decode))
            .count();
        let profiles: Vec<PrefillProfile> = prefillers
            .iter()
            .filter_map(|a| advert_profile(&a.advert, kv))
            .collect();
        if profiles.is_empty() {
            return Err("no prefill peer with a profile".into());
        }
        let view = core.compute.view();
        let local = view
            .prefill_profile
            .profile(kv, view.prefill_tokens_per_s())
            .map_err(|e| format!("own prefill profile: {e}"))?;
        let remote = merged_profile(&profiles, homes as f64, kv)
            .map_err(|e| format!("peers' prefill profile: {e}"))?;
        let decode = view
            .decode_profile
            .profile(core.cfg.engine.max_batch)
            .or_else(|| {
                // Nothing decoded yet: a decode side that never binds.
                let mut d = DecodeEstimator::default();
                d.observe(1, 1e-9);
                d.profile(core.cfg.engine.max_batch)
            })
            .ok_or("decode profile")?;
        let bandwidth = prefillers
            .iter()
            .map(|a| core.bandwidth_to(&a.peer).0 / core.mesh.reputation_penalty(&a.peer))
            .sum::<f64>()
            / prefillers.len() as f64;
        let (dist, samples) = {
            let h = core
                .homed_lengths
                .lock()
                .map_err(|_| "length histogram poisoned")?;
            (h.distribution(), h.samples())
        };
        let dist = match dist {
            Some(d) if samples >= MIN_HOMED_PROMPTS => d,
            _ => return Err(format!("{samples} of {MIN_HOMED_PROMPTS} homed prompts")),
        };
        let received = core
            .metrics
            .kv_bytes
            .get_or_create(&KindLabel {
                kind: "received".into(),
            })
            .get();
        let now = Instant::now();
        let egress_utilisation = match self.egress_mark.replace((received, now)) {
            Some((b0, t0)) if bandwidth > 0.0 => {
                let dt = now.duration_since(t0).as_secs_f64().max(1e-3);
                received.saturating_sub(b0) as f64 / dt / bandwidth
            }
            _ => 0.0,
        };
        let split = Split {
            prfaas: profiles.len() as u32,
            prefill: 1,
            decode: 1,
        };
        let inputs = ThresholdInputs {
            local_prefill: &local,
            remote_prefill: &remote,
            decode: &decode,
            output_tokens: OUTPUT_TOKENS,
            split,
            dist: &dist,
            observation: Observation {
                egress_utilisation,
                queue_delay_s: core.compute.queue_delay_s(),
                bandwidth_bytes_per_s: bandwidth,
            },
        };
        let changed = self.last_split != Some(split)
            || samples >= 2 * self.samples_at_search.max(MIN_HOMED_PROMPTS);
        let searched = self
            .tracker
            .update(&inputs, changed)
            .map_err(|e| format!("search: {e}"))?;
        if searched {
            self.last_split = Some(split);
            self.samples_at_search = samples;
            core.metrics.threshold_searches.inc();
        }
        let floor = core.cfg.policy.offload_threshold_tokens;
        // Within [floor, context] by the tracker's bounds.
        let t = self.tracker.threshold.max(0.0).ceil() as usize;
        let old = core.threshold.swap(t, Ordering::Relaxed);
        core.bandwidth_scarce
            .store(self.tracker.egress_bound, Ordering::Relaxed);
        core.metrics.offload_threshold.set(t as i64);
        if searched && old != t {
            tracing::info!(
                old,
                new = t,
                bandwidth_mb_s = bandwidth / 1e6,
                egress_bound = self.tracker.egress_bound,
                "offload threshold re-searched"
            );
        }
        let rate = |p: &PrefillProfile| 1024.0 / p.prefill_time(1024.0);
        let kv_per_token = kv(1025.0) - kv(1024.0);
        let model_p = self.tracker.last.map_or(f64::NAN, |e| e.offload_fraction);
        for (kind, v) in [
            ("bandwidth_bytes_per_s", bandwidth),
            ("egress_utilisation", egress_utilisation),
            ("queue_delay_s", inputs.observation.queue_delay_s),
            ("local_prefill_tokens_per_s", rate(&local)),
            ("remote_prefill_tokens_per_s", rate(&remote)),
            ("decode_step_s", decode.step_time(decode.max_batch())),
            ("kv_bytes_per_token", kv_per_token),
            ("prefill_peers", profiles.len() as f64),
            ("homes", homes as f64),
            ("homed_prompts", samples as f64),
            ("model_offload_fraction", model_p),
        ] {
            core.metrics
                .threshold_inputs
                .get_or_create(&KindLabel { kind: kind.into() })
                .set(v);
        }
        if let Ok(mut s) = core.threshold_status.lock() {
            *s = json!({
                "threshold_tokens": t,
                "searched_threshold_tokens": finite_or_null(self.tracker.threshold),
                "floor_tokens": floor,
                "searched": self.tracker.researches > 0,
                "researches": self.tracker.researches,
                "bandwidth_scarce": self.tracker.egress_bound,
                "last_search": self.tracker.last,
                "inputs": {
                    "bandwidth_bytes_per_s": bandwidth,
                    "searched_bandwidth_bytes_per_s": self.tracker.searched_bandwidth,
                    "egress_utilisation": egress_utilisation,
                    "queue_delay_s": inputs.observation.queue_delay_s,
                    "local_prefill": local.points(),
                    "remote_prefill_shared": remote.points(),
                    "decode_step_s": decode.step_time(decode.max_batch()),
                    "decode_max_batch": decode.max_batch(),
                    "kv_bytes_per_token": kv_per_token,
                    "split": split,
                    "homes": homes,
                    "homed_prompts": samples,
                    "homed_mean_tokens": dist.mean(),
                },
            });
        }
        Ok(())
    }
}

fn finite_or_null(x: f64) -> serde_json::Value {
    if x.is_finite() {
        json!(x)
    } else {
        serde_json::Value::Null
    }
}

/// One remote instance's profile as this home gets to use it: the mean of the peers' profiles,
/// each instance shared among `homes` homes (its times multiplied by `homes`).
fn merged_profile(
    profiles: &[PrefillProfile],
    homes: f64,
    kv: impl Fn(f64) -> f64,
) -> Result<PrefillProfile, prfaas_mesh::policy::PolicyError> {
    let mut xs: Vec<f64> = profiles
        .iter()
        .flat_map(|p| p.points().iter().map(|q| q.tokens))
        .collect();
    xs.sort_by(f64::total_cmp);
    xs.dedup();
    if xs.len() > MAX_PROFILE_POINTS {
        let step = xs.len().div_ceil(MAX_PROFILE_POINTS);
        xs = xs.into_iter().step_by(step).collect();
    }
    let n = profiles.len().max(1) as f64;
    let pts: Vec<(f64, f64)> = xs
        .iter()
        .map(|&x| {
            let mean = profiles.iter().map(|p| p.prefill_time(x)).sum::<f64>() / n;
            (x, mean * homes.max(1.0))
        })
        .collect();
    points_to_profile(&pts, kv)
}

/// Hysteresis of role advice: moving one node must raise the modelled throughput by 5%.
const ROLE_HYSTERESIS: f64 = 0.05;

/// Runtime role conversion (`policy.role_conversion`, `pd` nodes only): asks
/// [`prfaas_mesh::policy::advise_role`] whether the prefill or the decode side of the nodes this
/// node sees (same model, from their adverts; itself included as it serves now) is the
/// bottleneck, and switches what this node serves by [`next_role`]'s rate-limited, one-step rule.
/// Giving a role up stops new work of that role at once (calls are declined, or new requests
/// refused with 503) and drains what is in flight; the advert drops the role when the drain is
/// over ([`prfaas_mesh::policy::RoleState`], polled by the bridge). Returns the new mode when a
/// change began.
pub fn consider_role(core: &Core, adverts: &[KnownAdvert]) -> Option<RoleMode> {
    let pol = &core.cfg.policy;
    if !pol.role_conversion || !core.cfg.node.roles.contains(&NodeRole::Pd) {
        return None;
    }
    // One change at a time: a drain under way finishes first.
    if core.role_state().draining() {
        return None;
    }
    let me = core.mesh.local_peer_id();
    let same: Vec<&KnownAdvert> = adverts
        .iter()
        .filter(|a| a.peer != me && a.advert.body.models.contains(&core.model_ref))
        .collect();
    let count = |role: Role, mine: bool| {
        u32::from(mine)
            + same
                .iter()
                .filter(|a| a.advert.body.roles.contains(&role))
                .count() as u32
    };
    let split = Split {
        prfaas: 0,
        prefill: count(Role::Prefill, core.serves_prefill_now()),
        decode: count(Role::Decode, core.homes_now()),
    };
    let view = core.compute.view();
    let kv = |l: f64| core.layout.transfer_bytes(l.max(0.0) as usize) as f64;
    let prefill = view
        .prefill_profile
        .profile(kv, view.prefill_tokens_per_s())
        .ok()?;
    // Only a measured decode side can be called a bottleneck.
    let decode = view.decode_profile.profile(core.cfg.engine.max_batch)?;
    let dist = {
        let h = core.homed_lengths.lock().ok()?;
        if h.samples() < MIN_HOMED_PROMPTS {
            return None;
        }
        h.distribution()?
    };
    let model = ThroughputModel {
        remote_prefill: prefill.clone(),
        local_prefill: prefill,
        decode,
        output_tokens: OUTPUT_TOKENS,
        egress_bytes_per_s: 0.0,
    };
    // Roles are judged for the mesh as a PD cluster: every prompt prefilled by one node that
    // prefills and decoded by one that homes (t = ∞).
    let advice = advise_role(&model, &dist, split, f64::INFINITY, ROLE_HYSTERESIS);
    let (mode, since) = core.role_mode();
    let now = core.uptime_s();
    let next = next_role(
        mode,
        advice,
        now,
        since,
        pol.role_min_interval.as_secs_f64(),
    )?;
    core.set_role_mode(next);
    core.metrics.role_changes.inc();
    tracing::info!(
        from = ?mode,
        to = ?next,
        ?advice,
        prefill_nodes = split.prefill,
        decode_nodes = split.decode,
        "role converted"
    );
    Some(next)
}
