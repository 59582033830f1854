//! What an operator sees: the mesh-wide dashboard driven in headless Chromium against a live
//! 3-node mesh, the home's `request` span and the winner's `serve_prefill` span sharing the
//! mesh request number, and a departed peer's metric series going away.
//!
//! This binary installs a global JSON log subscriber (captured in memory) for the span test;
//! the other tests only add lines to it.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::*;
use prfaas_node::api::client::{self, ChatParams};
use prfaas_node::config::NodeRole;
use prfaas_node::engine::chat::ChatMessage;
use prfaas_node::service::PrefillRoute;

/// A prompt far above the test configs' offload threshold (48 tokens).
fn long_prompt() -> String {
    format!(
        "Summarise this: {}",
        "the mesh streams KV across the link. ".repeat(6)
    )
}

// ---------------------------------------------------------------------------------------------
// Captured JSON logs.

/// Most bytes of log kept (later lines are dropped): a bound, not a size any test reaches.
const MAX_LOG: usize = 64 << 20;

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut v) = self.0.lock() {
            if v.len() + buf.len() <= MAX_LOG {
                v.extend_from_slice(buf);
            }
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Capture {
    type Writer = Capture;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// The process-wide log capture: JSON lines, one more line per closed span (with its fields).
fn logs() -> &'static Capture {
    static LOGS: OnceLock<Capture> = OnceLock::new();
    LOGS.get_or_init(|| {
        let cap = Capture::default();
        let installed = tracing_subscriber::fmt()
            .json()
            .with_env_filter(tracing_subscriber::EnvFilter::new(
                "warn,prfaas_node=info,prfaas_mesh=info",
            ))
            .with_span_events(tracing_subscriber::fmt::format::FmtSpan::CLOSE)
            .with_current_span(true)
            .with_writer(cap.clone())
            .try_init();
        assert!(
            installed.is_ok(),
            "this test binary captures the logs itself: run it without RUST_LOG"
        );
        cap
    })
}

/// Fields of every closed span named `name` so far.
fn closed_spans(name: &str) -> Vec<serde_json::Value> {
    let bytes = logs().0.lock().map(|v| v.clone()).unwrap_or_default();
    String::from_utf8_lossy(&bytes)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["fields"]["message"] == "close" && v["span"]["name"] == name)
        .map(|v| v["span"].clone())
        .collect()
}

/// The home logs a request in a `request` span and the winner serves it in a `serve_prefill`
/// span: both carry the same `mesh_request`, the home's names the winner and the winner's names
/// the home, so one request can be followed across nodes.
#[actix_rt::test]
async fn request_and_serve_spans_share_the_mesh_request() {
    logs();
    let (p, home) = prefill_and_home("tiny-hybrid").await;

    let req = prfaas_node::service::GenerateRequest {
        request_id: Some("span-test-7".into()),
        prompt: prfaas_node::service::PromptInput::Text(long_prompt()),
        max_tokens: Some(4),
        sampling: prfaas_node::engine::SamplingParams::greedy(4),
        stop: vec![],
        stream: false,
    };
    let out = collect(home.submit(req).await.expect("admitted")).await;
    assert!(
        out.is_remote(),
        "the long prompt was offloaded: {:?}",
        out.route
    );

    // Spans close when the request's last owner lets go: poll (bounded) for both.
    let t0 = Instant::now();
    let (home_span, serve_span) = loop {
        let h = closed_spans("request")
            .into_iter()
            .find(|s| s["request_id"] == "span-test-7");
        let served = h.as_ref().and_then(|h| {
            closed_spans("serve_prefill")
                .into_iter()
                .find(|s| s["mesh_request"] == h["mesh_request"])
        });
        if let (Some(h), Some(s)) = (h, served) {
            break (h, s);
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "no closed request/serve_prefill span pair for span-test-7 after 20 s; request spans: {:?}",
            closed_spans("request")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(home_span["mesh_request"].is_u64(), "{home_span}");
    assert_eq!(home_span["route"], "remote", "{home_span}");
    assert_eq!(home_span["peer"], p.peer_id().to_string(), "{home_span}");
    assert_eq!(
        serve_span["home"],
        home.peer_id().to_string(),
        "{serve_span}"
    );
    for n in [home, p] {
        n.shutdown().await;
    }
}

/// A peer's `prfaas_peer_bandwidth_bytes_per_second` series goes away when it leaves the peer
/// table (no per-peer series accumulates for peers long gone).
#[actix_rt::test]
async fn departed_peer_bandwidth_series_is_removed() {
    logs();
    let (p, home) = prefill_and_home("tiny-hybrid").await;
    let peer = p.peer_id().to_string();
    // A measured transfer (as a KV stream or probe would record it): 8 MB in one second.
    home.core
        .mesh
        .record_bandwidth(p.peer_id(), 8_000_000, Duration::from_secs(1));
    // Every series also carries `model_name`: look for the peer's label on the gauge's lines.
    let label = format!("peer=\"{peer}\"");
    let has_series =
        || {
            home.core.metrics.render().lines().any(|l| {
                l.starts_with("prfaas_peer_bandwidth_bytes_per_second{") && l.contains(&label)
            })
        };
    let t0 = Instant::now();
    while !has_series() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no bandwidth series for the peer after 10 s:\n{}",
            home.core.metrics.render()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    p.shutdown().await;
    // advert_expiry is 1.5 s in test configs.
    let t0 = Instant::now();
    while has_series() {
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "the departed peer's series is still exported 15 s after it left:\n{}",
            home.core.metrics.render()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mesh = client::get_json(&format!("{}/mesh", base(&home)))
        .await
        .expect("/mesh");
    assert_eq!(
        mesh["nodes"].as_array().map(Vec::len),
        Some(1),
        "only the home itself is left: {mesh}"
    );
    home.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// The dashboard in a real browser.

/// A headless Chromium, or `None` (after saying why) when none is installed and
/// `PRFAAS_REQUIRE_BROWSER` is not `1`. `PRFAAS_CHROMIUM` names a binary explicitly.
fn browser(test: &str) -> Option<PathBuf> {
    let named = std::env::var_os("PRFAAS_CHROMIUM").map(PathBuf::from);
    let found = named.into_iter().chain(
        [
            "chromium-headless-shell",
            "chromium",
            "chromium-browser",
            "google-chrome",
        ]
        .iter()
        .flat_map(|b| {
            std::env::var_os("PATH")
                .map(|p| {
                    std::env::split_paths(&p)
                        .map(|d| d.join(b))
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default()
        }),
    );
    if let Some(b) = found.into_iter().find(|p| p.is_file()) {
        return Some(b);
    }
    assert!(
        std::env::var("PRFAAS_REQUIRE_BROWSER").as_deref() != Ok("1"),
        "{test}: no headless Chromium found and PRFAAS_REQUIRE_BROWSER=1 \
         (apt-get install chromium-headless-shell, or set PRFAAS_CHROMIUM)"
    );
    eprintln!(
        "SKIP {test}: no headless Chromium (apt-get install chromium-headless-shell, or set PRFAAS_CHROMIUM)"
    );
    None
}

/// Runs the browser with `args` + `url` (bounded to 90 s) and returns its stdout.
async fn run_browser(bin: &Path, args: Vec<String>, url: String) -> String {
    let bin = bin.to_path_buf();
    let profile = std::env::temp_dir().join(format!(
        "prfaas-chromium-{}-{}",
        std::process::id(),
        client_nonce()
    ));
    let out = tokio::task::spawn_blocking(move || {
        let mut child = std::process::Command::new(&bin)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--hide-scrollbars",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .args(&args)
            .arg(&url)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{} does not start: {e}", bin.display()));
        let t0 = Instant::now();
        loop {
            if child.try_wait().expect("wait for the browser").is_some() {
                break;
            }
            if t0.elapsed() > Duration::from_secs(90) {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the browser did not finish within 90 s ({url})");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = child.wait_with_output().expect("browser output");
        let _ = std::fs::remove_dir_all(&profile);
        out
    })
    .await
    .expect("browser thread");
    assert!(
        out.status.success(),
        "the browser failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn client_nonce() -> u64 {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// The page after its scripts ran (virtual time lets the first refresh finish).
async fn dump_dom(bin: &Path, url: &str) -> String {
    run_browser(
        bin,
        vec!["--dump-dom".into(), "--virtual-time-budget=5000".into()],
        url.to_owned(),
    )
    .await
}

/// Text of the element with `id="<id>"` in a dumped DOM (up to its first closing tag).
fn element_text<'a>(dom: &'a str, id: &str) -> &'a str {
    let Some(at) = dom.find(&format!("id=\"{id}\"")) else {
        return "";
    };
    let rest = &dom[at..];
    let start = rest.find('>').map_or(0, |i| i + 1);
    let end = rest[start..].find('<').map_or(rest.len(), |i| start + i);
    &rest[start..end]
}

/// The dashboard of a decode node that knows no prefill peer: a warning badge (not a green
/// "ok") with the reason, and no raw JSON on the page. Then a 3-node mesh: the home's page
/// lists all three nodes (each linking to its API), and after a long request, the auction
/// with its bids; a screenshot is kept at `target/dashboard.png`.
#[actix_rt::test]
async fn dashboard_in_headless_chromium_shows_the_mesh() {
    let test = "dashboard_in_headless_chromium_shows_the_mesh";
    logs();
    let Some(bin) = browser(test) else {
        return;
    };

    // A lone decode node: nobody can prefill its long prompts.
    let lone = start_http(node_config(
        "lone",
        &[NodeRole::Decode],
        "tiny-hybrid",
        vec![],
    ))
    .await;
    let dom = dump_dom(&bin, &format!("{}/", base(&lone))).await;
    assert!(
        dom.contains("data-rendered=\"1\""),
        "the page's script ran:\n{dom}"
    );
    assert!(
        !dom.contains("class=\"status ok\""),
        "a decode node without prefill peers must not show a green ok:\n{dom}"
    );
    assert_eq!(element_text(&dom, "status"), "degraded", "{dom}");
    assert!(
        dom.contains("no prefill-capable peer"),
        "the warning is shown:\n{dom}"
    );
    assert!(
        !dom.contains("\"peer_id\"") && !dom.contains("{\""),
        "no raw JSON on the page:\n{dom}"
    );
    lone.shutdown().await;

    // A live mesh: one prefill node, a decode home and a pd node.
    let p = start_http(node_config(
        "prefill",
        &[NodeRole::Prefill],
        "tiny-hybrid",
        vec![],
    ))
    .await;
    let boot = addrs_of(&p).await;
    let home = start_http(node_config(
        "home",
        &[NodeRole::Decode],
        "tiny-hybrid",
        boot.clone(),
    ))
    .await;
    let pd = start_http(node_config("pd", &[NodeRole::Pd], "tiny-hybrid", boot)).await;
    wait_for_prefillers(&home, 2).await;
    let nodes = [&p, &home, &pd];
    // Every node's advert, with its API URL, has reached the home.
    let t0 = Instant::now();
    loop {
        let mesh = client::get_json(&format!("{}/mesh", base(&home)))
            .await
            .expect("/mesh");
        let urls: Vec<String> = mesh["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|n| n["api_url"].as_str().map(str::to_owned))
            .collect();
        if nodes.iter().all(|n| urls.contains(&base(n))) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the home's /mesh does not list every node's API after 30 s: {mesh}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let r = client::chat(
        &base(&home),
        &[ChatMessage::new("user", long_prompt())],
        &ChatParams::greedy(8),
        true,
    )
    .await
    .expect("the long request succeeds");
    let route = r.prfaas.map(|e| e.route);
    assert!(
        matches!(route, Some(PrefillRoute::Remote { .. })),
        "the long prompt was offloaded: {route:?}"
    );

    let url = format!("{}/", base(&home));
    let dom = dump_dom(&bin, &url).await;
    assert!(
        dom.contains("data-rendered=\"1\""),
        "the page's script ran:\n{dom}"
    );
    for n in nodes {
        assert!(
            dom.contains(&format!("data-peer=\"{}\"", n.peer_id())),
            "node {} is listed:\n{dom}",
            n.core.cfg.node.name
        );
    }
    assert_eq!(element_text(&dom, "node-count"), "3", "{dom}");
    for n in [&p, &pd] {
        assert!(
            dom.contains(&format!("href=\"{}/\"", base(n))),
            "node {} links to its API:\n{dom}",
            n.core.cfg.node.name
        );
    }
    assert!(dom.contains("class=\"auction\""), "an auction row:\n{dom}");
    assert!(dom.contains("class=\"bids\""), "the auction's bids:\n{dom}");
    assert!(
        dom.contains("<polyline"),
        "the TTFT chart has a line:\n{dom}"
    );
    assert_eq!(
        element_text(&dom, "status"),
        "ok",
        "the home sees prefill peers:\n{dom}"
    );

    let shot = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/dashboard.png");
    let _ = std::fs::remove_file(&shot);
    // `target/` is not there when the build went to another CARGO_TARGET_DIR.
    std::fs::create_dir_all(shot.parent().expect("a parent")).expect("creating target/");
    run_browser(
        &bin,
        vec![
            format!("--screenshot={}", shot.display()),
            "--window-size=1280,1300".into(),
            "--virtual-time-budget=5000".into(),
        ],
        url,
    )
    .await;
    let png = std::fs::read(&shot).unwrap_or_else(|e| panic!("{}: {e}", shot.display()));
    assert!(
        png.len() > 10_000 && png.starts_with(b"\x89PNG"),
        "{} is a real screenshot ({} bytes)",
        shot.display(),
        png.len()
    );
    eprintln!("dashboard screenshot: {}", shot.display());
    for n in [home, pd, p] {
        n.shutdown().await;
    }
}
