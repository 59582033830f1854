//! A small fuzz driver for plain `cargo test` (stable Rust, no cargo-fuzz): each target is a
//! closure that builds structured input from an [`arbitrary::Unstructured`] over bytes drawn from
//! a seeded PRNG, and must never panic.
//!
//! * Short mode (default, CI): `short` inputs per target, or [`SHORT_BUDGET`] of wall time,
//!   whichever comes first.
//! * Long mode: `PRFAAS_FUZZ_ITERS=1000000` runs exactly that many inputs per target, with no
//!   time limit. `PRFAAS_FUZZ_SEED` changes the base seed (default fixed, so runs repeat).
//! * Replay: a panicking input prints its seed and index; `PRFAAS_FUZZ_SEED=S PRFAAS_FUZZ_ONLY=I`
//!   reruns only that input.
//!
//! Shared by `mesh/tests/fuzz.rs`, `node/tests/fuzz.rs` and the KV receiver's unit fuzz test
//! through `#[path]`, so every target reports and replays the same way.

#![allow(dead_code)]

use std::time::{Duration, Instant};

use arbitrary::Unstructured;

/// Wall-time cap per target in short mode.
pub const SHORT_BUDGET: Duration = Duration::from_secs(3);

/// SplitMix64: a tiny, well-mixed PRNG; input `i` of a target is a pure function of (seed, i).
#[derive(Debug, Clone)]
pub struct SplitMix(pub u64);

impl SplitMix {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn fill(&mut self, out: &mut [u8]) {
        for chunk in out.chunks_mut(8) {
            let x = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&x[..chunk.len()]);
        }
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

/// What one target's run did.
#[derive(Debug, Clone, Copy)]
pub struct Report {
    pub inputs: u64,
    pub elapsed: Duration,
}

/// Runs `target` over seeded inputs of up to `max_len` bytes (short mode: `short` inputs or
/// [`SHORT_BUDGET`]; long mode: `PRFAAS_FUZZ_ITERS`). An `Err` from `arbitrary` (input ran out)
/// just ends that input. Prints one line with the count and the time.
pub fn run(
    name: &str,
    short: u64,
    max_len: usize,
    mut target: impl FnMut(&mut Unstructured<'_>) -> arbitrary::Result<()>,
) -> Report {
    let seed = env_u64("PRFAAS_FUZZ_SEED").unwrap_or(0x005E_ED0F_F022);
    let long = env_u64("PRFAAS_FUZZ_ITERS");
    let only = env_u64("PRFAAS_FUZZ_ONLY");
    let (iters, budget) = match (only, long) {
        (Some(_), _) => (1, None),
        (None, Some(n)) => (n, None),
        (None, None) => (short, Some(SHORT_BUDGET)),
    };
    let started = Instant::now();
    let mut buf = vec![0u8; max_len];
    let mut done = 0u64;
    for i in 0..iters {
        if budget.is_some_and(|b| started.elapsed() > b) {
            break;
        }
        let index = only.unwrap_or(i);
        let mut rng = SplitMix(seed ^ index.wrapping_mul(0xA24B_AED4_963E_E407));
        // Mostly short inputs (most bugs need few bytes), some up to `max_len`.
        let len = match rng.next_u64() % 4 {
            0 => (rng.next_u64() % 64) as usize,
            1 | 2 => (rng.next_u64() % 512) as usize,
            _ => (rng.next_u64() % (max_len as u64 + 1)) as usize,
        }
        .min(max_len);
        rng.fill(&mut buf[..len]);
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut u = Unstructured::new(&buf[..len]);
            let _ = target(&mut u);
        }));
        if let Err(panic) = outcome {
            eprintln!(
                "fuzz {name}: input {index} panicked; replay with \
                 PRFAAS_FUZZ_SEED={seed} PRFAAS_FUZZ_ONLY={index}"
            );
            std::panic::resume_unwind(panic);
        }
        done += 1;
    }
    let elapsed = started.elapsed();
    eprintln!(
        "fuzz {name}: {done} inputs in {:.2} s ({:.0}/s), seed {seed}",
        elapsed.as_secs_f64(),
        done as f64 / elapsed.as_secs_f64().max(1e-9)
    );
    assert!(done > 0, "fuzz {name}: no input ran");
    Report {
        inputs: done,
        elapsed,
    }
}

/// Applies zero to three byte-level mutations to an encoded message: truncation, a bit flip,
/// inserted or deleted bytes, a duplicated range, or a big-endian length prefix rewritten.
pub fn mutate(u: &mut Unstructured<'_>, bytes: &mut Vec<u8>) -> arbitrary::Result<bool> {
    let rounds = u.int_in_range(0..=3u8)?;
    for _ in 0..rounds {
        let n = bytes.len();
        match u.int_in_range(0..=6u8)? {
            0 => {
                let at = u.int_in_range(0..=n)?;
                bytes.truncate(at);
            }
            1 if n > 0 => {
                let at = u.int_in_range(0..=n - 1)?;
                bytes[at] ^= 1 << u.int_in_range(0..=7u8)?;
            }
            2 => {
                let at = u.int_in_range(0..=n)?;
                let extra: Vec<u8> = (0..u.int_in_range(1..=8u8)?)
                    .map(|_| u.arbitrary())
                    .collect::<arbitrary::Result<_>>()?;
                bytes.splice(at..at, extra);
            }
            3 if n > 0 => {
                let at = u.int_in_range(0..=n - 1)?;
                let len = u.int_in_range(1..=(n - at).min(16))?;
                bytes.drain(at..at + len);
            }
            4 if n > 0 => {
                let at = u.int_in_range(0..=n - 1)?;
                let len = u.int_in_range(1..=(n - at).min(64))?;
                let copy = bytes[at..at + len].to_vec();
                bytes.splice(at..at, copy);
            }
            5 if n >= 4 => {
                let at = u.int_in_range(0..=n - 4)?;
                let v: u32 = match u.int_in_range(0..=3u8)? {
                    0 => 0,
                    1 => u32::MAX,
                    2 => {
                        u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
                            .wrapping_add(u.int_in_range(1..=4u32)?)
                    }
                    _ => u.arbitrary()?,
                };
                bytes[at..at + 4].copy_from_slice(&v.to_be_bytes());
            }
            6 if n > 0 => {
                // CBOR-aware: overwrite one byte with an interesting major type / length marker.
                let at = u.int_in_range(0..=n - 1)?;
                bytes[at] = *u.choose(&[
                    0x00, 0x17, 0x18, 0x1b, 0x1f, 0x5f, 0x7f, 0x9f, 0xbf, 0xff, 0xf9, 0xfb, 0xc0,
                ])?;
            }
            _ => {}
        }
    }
    Ok(rounds > 0)
}

/// A string that is often interesting to parsers: empty, huge-ish, control characters,
/// non-ASCII, or arbitrary UTF-8.
pub fn tricky_string(u: &mut Unstructured<'_>) -> arbitrary::Result<String> {
    Ok(match u.int_in_range(0..=5u8)? {
        0 => String::new(),
        1 => "\u{0}\u{7f}\u{feff}\u{10ffff}é漢".into(),
        2 => "x".repeat(u.int_in_range(0..=300usize)?),
        3 => (*u.choose(&[
            "NaN",
            "-0",
            "1e999",
            "null",
            "<|im_start|>",
            "\\u0000",
            "{",
            "]",
        ])?)
        .into(),
        _ => u.arbitrary::<String>()?,
    })
}
