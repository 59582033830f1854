//! Human table (shaped like the paper's Table 6) and hand-written SVG charts.

use std::fmt::Write as _;
use std::path::Path;

use super::{PolicyKind, Report};

fn fmt_t(t: f64) -> String {
    if !t.is_finite() {
        "—".to_owned()
    } else if t <= 0.0 {
        "0".to_owned()
    } else {
        format!("{:.1}K", t / 1000.0)
    }
}

/// The table as text.
pub fn table(r: &Report) -> String {
    let mut out = String::new();
    let homo = r
        .model
        .iter()
        .find(|(k, _)| *k == PolicyKind::Homogeneous)
        .map_or(f64::NAN, |(_, e)| e.lambda);
    let homo_sim = r
        .capacity
        .iter()
        .find(|m| m.policy == PolicyKind::Homogeneous)
        .map_or(f64::NAN, |m| m.throughput_per_s);
    let _ = writeln!(
        out,
        "scenario: {}  ({} requests/policy, seed {}, mean prompt {:.0} tokens, sim wall {:.1}s)",
        r.scenario, r.requests, r.seed, r.mean_prompt_tokens, r.wall_s
    );
    let _ = writeln!(
        out,
        "{:<30} {:>7} {:>9} {:>24} {:>7} {:>6} {:>7} {:>6} {:>13} {:>7} {:>7} {:>11}",
        "configuration",
        "t",
        "R/P/D",
        "Θprfaas/Θpd-p/Θpd-d",
        "Λ",
        "×homo",
        "simΛ",
        "×homo",
        "TTFT mean/P90",
        "offload",
        "offLen",
        "egress Gbps"
    );
    for (i, (kind, e)) in r.model.iter().enumerate() {
        let m = &r.sim[i];
        let cap = r.capacity.get(i);
        let (t, lam, ratio) = if *kind == PolicyKind::Auction {
            ("auction".to_owned(), "—".to_owned(), "—".to_owned())
        } else {
            (
                fmt_t(e.threshold),
                format!("{:.2}", e.lambda),
                format!("{:.2}×", e.lambda / homo),
            )
        };
        let sim_l = cap.map_or("—".to_owned(), |c| format!("{:.2}", c.throughput_per_s));
        let sim_r = cap.map_or("—".to_owned(), |c| {
            format!("{:.2}×", c.throughput_per_s / homo_sim)
        });
        let egress = if *kind == PolicyKind::Auction {
            format!("{:.1}", m.egress_gbps)
        } else {
            format!(
                "{:.1}@Λ/{:.1}",
                e.egress_bytes_per_s * 8.0 / 1e9,
                m.egress_gbps
            )
        };
        let _ = writeln!(
            out,
            "{:<30} {:>7} {:>9} {:>24} {:>7} {:>6} {:>7} {:>6} {:>13} {:>6.1}% {:>6.1}K {:>11}",
            kind.label(),
            t,
            format!("{}/{}/{}", e.split.prfaas, e.split.prefill, e.split.decode),
            format!(
                "{:.2}/{:.2}/{:.2}",
                e.theta_prfaas, e.theta_pd_p, e.theta_pd_d
            ),
            lam,
            ratio,
            sim_l,
            sim_r,
            format!("{:.2}/{:.2}s", m.ttft_mean_s, m.ttft_p90_s),
            m.offload_fraction * 100.0,
            m.mean_offloaded_tokens / 1000.0,
            egress,
        );
    }
    let _ = writeln!(
        out,
        "Λ, Θ, t, R/P/D: throughput model + grid search. simΛ: sustained completions/s in the overload run. \
         TTFT, offload, offLen, second egress figure: simulated at the scenario's arrival rate; first egress figure: model at Λ."
    );
    let extra: Vec<String> = r
        .sim
        .iter()
        .filter(|m| m.researches > 0 || m.retries > 0)
        .map(|m| {
            format!(
                "{}: {} re-searches (final t {}), {} retries",
                m.policy.label(),
                m.researches,
                fmt_t(m.final_threshold),
                m.retries
            )
        })
        .collect();
    for e in extra {
        let _ = writeln!(out, "{e}");
    }
    out
}

struct Chart {
    w: f64,
    h: f64,
    x0: f64,
    x1: f64,
    y0: f64,
    y1: f64,
    log_x: bool,
    body: String,
}

const COLORS: [&str; 4] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"];

impl Chart {
    /// A 720×420 chart with linear axes from the origin to (`x1`, `y1`).
    fn linear(x1: f64, y1: f64) -> Self {
        Self {
            w: 720.0,
            h: 420.0,
            x0: 0.0,
            x1,
            y0: 0.0,
            y1,
            log_x: false,
            body: String::new(),
        }
    }
    fn px(&self, x: f64) -> f64 {
        let f = if self.log_x {
            (x.ln() - self.x0.ln()) / (self.x1.ln() - self.x0.ln())
        } else {
            (x - self.x0) / (self.x1 - self.x0)
        };
        60.0 + f.clamp(0.0, 1.0) * (self.w - 80.0)
    }
    fn py(&self, y: f64) -> f64 {
        let f = (y - self.y0) / (self.y1 - self.y0);
        self.h - 40.0 - f.clamp(0.0, 1.0) * (self.h - 70.0)
    }
    fn line(&mut self, pts: &[(f64, f64)], color: &str, dash: bool) {
        let d: Vec<String> = pts
            .iter()
            .filter(|p| p.0.is_finite() && p.1.is_finite())
            .map(|&(x, y)| format!("{:.1},{:.1}", self.px(x), self.py(y)))
            .collect();
        let dash = if dash {
            " stroke-dasharray=\"5,3\""
        } else {
            ""
        };
        let _ = writeln!(
            self.body,
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"1.8\"{dash} points=\"{}\"/>",
            d.join(" ")
        );
    }
    fn text(&mut self, x: f64, y: f64, s: &str, color: &str) {
        let _ = writeln!(
            self.body,
            "<text x=\"{x:.1}\" y=\"{y:.1}\" font-size=\"12\" fill=\"{color}\">{s}</text>"
        );
    }
    fn finish(
        mut self,
        title: &str,
        xlabel: &str,
        ylabel: &str,
        xticks: &[(f64, String)],
        yticks: &[f64],
    ) -> String {
        let (w, h) = (self.w, self.h);
        let mut axes = String::new();
        let _ = writeln!(
            axes,
            "<rect x=\"0\" y=\"0\" width=\"{w}\" height=\"{h}\" fill=\"white\"/>"
        );
        let _ = writeln!(
            axes,
            "<text x=\"{:.0}\" y=\"18\" font-size=\"14\" text-anchor=\"middle\">{title}</text>",
            w / 2.0
        );
        let (bx, by) = (self.px(self.x0), self.py(self.y0));
        let _ = writeln!(
            axes,
            "<line x1=\"{bx:.1}\" y1=\"{by:.1}\" x2=\"{:.1}\" y2=\"{by:.1}\" stroke=\"black\"/>",
            self.px(self.x1)
        );
        let _ = writeln!(
            axes,
            "<line x1=\"{bx:.1}\" y1=\"{by:.1}\" x2=\"{bx:.1}\" y2=\"{:.1}\" stroke=\"black\"/>",
            self.py(self.y1)
        );
        for (x, l) in xticks {
            let px = self.px(*x);
            let _ = writeln!(
                axes,
                "<line x1=\"{px:.1}\" y1=\"{by:.1}\" x2=\"{px:.1}\" y2=\"{:.1}\" stroke=\"#ddd\"/>",
                self.py(self.y1)
            );
            let _ = writeln!(axes, "<text x=\"{px:.1}\" y=\"{:.1}\" font-size=\"11\" text-anchor=\"middle\">{l}</text>", by + 15.0);
        }
        for &y in yticks {
            let py = self.py(y);
            let _ = writeln!(
                axes,
                "<line x1=\"{bx:.1}\" y1=\"{py:.1}\" x2=\"{:.1}\" y2=\"{py:.1}\" stroke=\"#ddd\"/>",
                self.px(self.x1)
            );
            let _ = writeln!(
                axes,
                "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\" text-anchor=\"end\">{y:.2}</text>",
                bx - 4.0,
                py + 4.0
            );
        }
        let _ = writeln!(
            axes,
            "<text x=\"{:.0}\" y=\"{:.0}\" font-size=\"12\" text-anchor=\"middle\">{xlabel}</text>",
            w / 2.0,
            h - 8.0
        );
        let _ = writeln!(axes, "<text x=\"14\" y=\"{:.0}\" font-size=\"12\" transform=\"rotate(-90 14 {:.0})\" text-anchor=\"middle\">{ylabel}</text>", h / 2.0, h / 2.0);
        self.body.insert_str(0, &axes);
        format!("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\">\n{}</svg>\n", self.body)
    }
}

fn ticks(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    (0..=n)
        .map(|i| lo + (hi - lo) * i as f64 / n as f64)
        .collect()
}

/// `Λ` and the three capacity terms vs `t` (log axis) at PrfaaS-PD's split; the chosen `t` marked.
pub fn lambda_svg(r: &Report) -> String {
    let pts = &r.lambda_vs_t;
    let term = |e: &crate::policy::Evaluation, which: usize| match which {
        0 => e.lambda,
        1 if e.offload_fraction > 0.0 => e.theta_prfaas / e.offload_fraction,
        2 if e.offload_fraction < 1.0 => e.theta_pd_p / (1.0 - e.offload_fraction),
        3 => e.theta_pd_d,
        _ => f64::NAN,
    };
    let ymax = pts.iter().map(|e| e.lambda).fold(0.0, f64::max) * 2.0;
    let (x0, x1) = (
        pts.first().map_or(1.0, |e| e.threshold),
        pts.last().map_or(2.0, |e| e.threshold),
    );
    let mut c = Chart {
        w: 720.0,
        h: 420.0,
        x0,
        x1,
        y0: 0.0,
        y1: ymax.max(1e-9),
        log_x: true,
        body: String::new(),
    };
    let labels = ["Λ", "Θprfaas/p", "Θpd-p/(1−p)", "Θpd-d"];
    for (k, label) in labels.iter().enumerate() {
        let line: Vec<(f64, f64)> = pts
            .iter()
            .map(|e| (e.threshold, term(e, k).min(ymax)))
            .collect();
        c.line(&line, COLORS[k], k > 0);
        c.text(80.0 + 120.0 * k as f64, 40.0, label, COLORS[k]);
    }
    if let Some((_, best)) = r.model.iter().find(|(k, _)| *k == PolicyKind::PrfaasRouter) {
        if best.threshold.is_finite() && best.threshold > 0.0 {
            let (x, y) = (c.px(best.threshold), c.py(best.lambda));
            let _ = writeln!(
                c.body,
                "<circle cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"4\" fill=\"black\"/>"
            );
            c.text(
                x + 6.0,
                y - 6.0,
                &format!("t*={}, Λ={:.2}", fmt_t(best.threshold), best.lambda),
                "black",
            );
        }
    }
    let xt: Vec<(f64, String)> = [128.0, 1024.0, 4096.0, 16384.0, 65536.0, 131072.0]
        .into_iter()
        .filter(|&x| x >= x0 && x <= x1)
        .map(|x| (x, fmt_t(x)))
        .collect();
    c.finish(
        "Λ vs offload threshold t (PrfaaS-PD split)",
        "threshold t (tokens, log)",
        "requests/s",
        &xt,
        &ticks(0.0, ymax, 5),
    )
}

/// Empirical TTFT CDF per policy (x up to the largest P99).
pub fn ttft_svg(r: &Report) -> String {
    let series: Vec<(String, Vec<f64>)> = r
        .sim
        .iter()
        .map(|m| (m.policy.label().to_owned(), m.ttfts.clone()))
        .collect();
    cdf_svg("TTFT CDF per policy", "TTFT (s)", &series)
}

/// Empirical CDF of each `(label, values)` series (x up to the largest P99; at most ~400 points
/// drawn per series).
pub fn cdf_svg(title: &str, xlabel: &str, series: &[(String, Vec<f64>)]) -> String {
    let sorted: Vec<Vec<f64>> = series
        .iter()
        .map(|(_, v)| {
            let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
            v.sort_by(f64::total_cmp);
            v
        })
        .collect();
    let xmax = sorted
        .iter()
        .filter(|v| !v.is_empty())
        .map(|v| v[((v.len() - 1) as f64 * 0.99).round() as usize])
        .fold(0.0, f64::max)
        .max(1e-3);
    let mut c = Chart::linear(xmax, 1.0);
    for (k, ((label, _), v)) in series.iter().zip(&sorted).enumerate() {
        let n = v.len();
        let step = (n / 400).max(1);
        let line: Vec<(f64, f64)> = v
            .iter()
            .enumerate()
            .filter(|(i, _)| i % step == 0 || *i + 1 == n)
            .map(|(i, &t)| (t.min(xmax), (i + 1) as f64 / n as f64))
            .collect();
        c.line(&line, COLORS[k % 4], false);
        c.text(80.0, 60.0 + 16.0 * k as f64, label, COLORS[k % 4]);
    }
    let xt: Vec<(f64, String)> = ticks(0.0, xmax, 6)
        .into_iter()
        .map(|x| (x, format!("{x:.1}")))
        .collect();
    c.finish(
        title,
        xlabel,
        "fraction of requests",
        &xt,
        &ticks(0.0, 1.0, 5),
    )
}

/// One line per `(label, points)` series on linear axes from 0 (e.g. throughput vs offered
/// load).
pub fn lines_svg(
    title: &str,
    xlabel: &str,
    ylabel: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> String {
    let finite = |f: fn(&(f64, f64)) -> f64| {
        series
            .iter()
            .flat_map(|(_, p)| p.iter().map(f))
            .filter(|x| x.is_finite())
            .fold(0.0, f64::max)
            .max(1e-9)
    };
    let (xmax, ymax) = (finite(|p| p.0) * 1.05, finite(|p| p.1) * 1.15);
    let mut c = Chart::linear(xmax, ymax);
    for (k, (label, pts)) in series.iter().enumerate() {
        c.line(pts, COLORS[k % 4], false);
        for &(x, y) in pts.iter().filter(|p| p.0.is_finite() && p.1.is_finite()) {
            let (px, py) = (c.px(x), c.py(y));
            let _ = writeln!(
                c.body,
                "<circle cx=\"{px:.1}\" cy=\"{py:.1}\" r=\"3\" fill=\"{}\"/>",
                COLORS[k % 4]
            );
        }
        c.text(80.0, 40.0 + 16.0 * k as f64, label, COLORS[k % 4]);
    }
    let xt: Vec<(f64, String)> = ticks(0.0, xmax, 6)
        .into_iter()
        .map(|x| (x, format!("{x:.2}")))
        .collect();
    c.finish(title, xlabel, ylabel, &xt, &ticks(0.0, ymax, 5))
}

/// Write `table.txt`, `lambda_vs_t.svg` and `ttft_cdf.svg` into `dir`.
pub fn write_all(r: &Report, dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("table.txt"), table(r))?;
    std::fs::write(dir.join("lambda_vs_t.svg"), lambda_svg(r))?;
    std::fs::write(dir.join("ttft_cdf.svg"), ttft_svg(r))?;
    Ok(())
}
