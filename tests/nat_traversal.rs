//! NAT traversal with real node processes in network namespaces: a relay node on a public
//! network, an edge prefill node behind one NAT router and a home decode node behind another
//! (nftables masquerade; the routers drop unsolicited inbound connections, as home routers do).
//! The edge joins through the relay (PSK mesh), its advert reaches the home over the relay, and
//! a long prompt homed behind the second NAT is won by the edge, whose KV streams back:
//!
//! * behind NATs that keep source ports, DCUtR punches a hole and the KV takes the direct
//!   connection (the relayed one is closed);
//! * behind a NAT that randomises ports (no hole can be punched), the KV crosses the relay.
//!
//! Needs root (namespaces), `ip` and `nft`; skips loudly without them, and
//! `PRFAAS_REQUIRE_NETNS=1` (CI) turns the skip into a failure. Namespaces carry this process's
//! id and are removed on drop, also when an assertion fails.

mod netns_nodes;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use netns_nodes::netns::{self, ChildGuard};
use netns_nodes::{api_url, node_config, prfaas_bin, spawn_node};
use prfaas_node::api::client::{self, ChatParams};
use prfaas_node::config::{NodeConfig, NodeRole};
use prfaas_node::service::PrefillRoute;

const PREFIX: &str = "prfaas-nat-";
/// Mesh and API port of every node (each in its own namespace).
const PORT: u16 = 4100;

/// Why this machine cannot run the test, or `None`.
fn unavailable() -> Option<String> {
    if let Some(why) = netns::unavailable() {
        return Some(why);
    }
    let nft = Command::new("nft")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    (!nft).then(|| "`nft` not found (apt-get install nftables)".to_owned())
}

fn run(cmd: &mut Command) {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

fn ip(args: &[&str]) {
    run(Command::new("ip").args(args));
}

fn default_route(ns: &str, via: &str) {
    ip(&["-n", ns, "route", "add", "default", "via", via]);
}

/// Runs `nft -f -` with `rules` in namespace `ns`.
fn nft(ns: &str, rules: &str) {
    use std::io::Write;
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("nft starts");
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(rules.as_bytes())
        .expect("nft rules written");
    let out = child.wait_with_output().expect("nft finishes");
    assert!(
        out.status.success(),
        "nft in {ns}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Namespaces of one run; deleted on drop.
struct NatTopology {
    names: Vec<String>,
    base: String,
}

/// Where each node lives.
#[derive(Clone, Copy)]
enum Site {
    /// The public network.
    Relay,
    /// Behind NAT router 1.
    Edge,
    /// Behind NAT router 2.
    Home,
}

impl NatTopology {
    /// A "public" hub routing between the relay (10.99.0.2) and two NAT routers (wan
    /// 10.99.1.2 / 10.99.2.2), each masquerading a LAN with one host (192.168.1.2 behind
    /// router 1, 192.168.2.2 behind router 2). `random_ports`: router 1 randomises source ports
    /// (a symmetric NAT: no hole can be punched through it).
    fn create(tag: &str, random_ports: bool) -> Self {
        sweep_stale();
        let base = format!("{PREFIX}{}-{tag}", std::process::id());
        let mut t = Self {
            names: Vec::new(),
            base,
        };
        for n in ["hub", "relay", "r1", "r2", "edge", "home"] {
            let ns = t.ns(n);
            ip(&["netns", "add", &ns]);
            t.names.push(ns.clone());
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
        }
        let sysctl = |ns: &str| {
            run(Command::new("ip").args([
                "netns",
                "exec",
                ns,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
            ]))
        };
        sysctl(&t.ns("hub"));
        for (i, n) in ["relay", "r1", "r2"].iter().enumerate() {
            let (hub, ns) = (t.ns("hub"), t.ns(n));
            netns::veth_pair(
                (&hub, &format!("h{i}"), &format!("10.99.{i}.1/24")),
                (&ns, "wan", &format!("10.99.{i}.2/24")),
            )
            .expect("veth to the hub");
            default_route(&ns, &format!("10.99.{i}.1"));
        }
        for (j, (router, host)) in [("r1", "edge"), ("r2", "home")].into_iter().enumerate() {
            let (r, h) = (t.ns(router), t.ns(host));
            let net = j + 1;
            sysctl(&r);
            netns::veth_pair(
                (&r, "lan", &format!("192.168.{net}.1/24")),
                (&h, "up0", &format!("192.168.{net}.2/24")),
            )
            .expect("veth to the LAN");
            default_route(&h, &format!("192.168.{net}.1"));
            let masquerade = if random_ports && router == "r1" {
                "masquerade fully-random"
            } else {
                "masquerade"
            };
            nft(
                &r,
                &format!(
                    r#"table ip nat {{
  chain post {{
    type nat hook postrouting priority srcnat; policy accept;
    oifname "wan" {masquerade}
  }}
}}
table inet filter {{
  chain routed {{
    type filter hook forward priority filter; policy drop;
    ct state established,related accept
    iifname "lan" accept
  }}
  chain local_in {{
    type filter hook input priority filter; policy accept;
    iifname "wan" ct state new drop
  }}
}}
"#
                ),
            );
        }
        t
    }

    fn ns(&self, n: &str) -> String {
        format!("{}-{n}", self.base)
    }

    fn site_ns(&self, s: Site) -> String {
        self.ns(match s {
            Site::Relay => "relay",
            Site::Edge => "edge",
            Site::Home => "home",
        })
    }

    fn addr(s: Site) -> &'static str {
        match s {
            Site::Relay => "10.99.0.2",
            Site::Edge => "192.168.1.2",
            Site::Home => "192.168.2.2",
        }
    }

    /// Moves the calling thread into router 2's namespace: it reaches the home (its LAN) and
    /// the relay (the public side), as a client next to the home would.
    fn enter_home_router(&self) {
        let path = format!("/var/run/netns/{}", self.ns("r2"));
        let f = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        use std::os::fd::AsRawFd;
        // SAFETY: a valid, open namespace file descriptor; setns affects only this thread.
        let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
    }
}

impl Drop for NatTopology {
    fn drop(&mut self) {
        for ns in self.names.iter().rev() {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Removes namespaces left by runs whose process is gone.
fn sweep_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let pid = rest.split('-').next().unwrap_or("");
        if !pid.is_empty() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

fn config(site: Site, psk: &str, relay: &str) -> NodeConfig {
    let ip = NatTopology::addr(site).parse().expect("static");
    let mut c = node_config("node", &[], ip, PORT);
    // A specific address (as `node_config` sets): the listener is registered for port reuse
    // at once, so even the first (bootstrap) dial leaves from the listen port, which is what
    // peers observe behind a port-keeping NAT and what hole punching dials. (On `0.0.0.0` the
    // interfaces are learnt a moment later, and the first dial could leave from a random port.)
    c.mesh.psk = Some(psk.to_owned());
    c.mesh.nat.autonat = true;
    c.mesh.nat.autonat_only_global_ips = false;
    match site {
        Site::Relay => {
            c.node.name = "relay".into();
            c.node.roles = vec![NodeRole::Decode];
            c.mesh.nat.relay_server = true;
        }
        Site::Edge | Site::Home => {
            c.mesh.bootstrap = vec![relay.to_owned()];
            c.mesh.nat.relays = vec![relay.to_owned()];
            if matches!(site, Site::Edge) {
                c.node.name = "edge".into();
                c.node.roles = vec![NodeRole::Prefill];
            } else {
                c.node.name = "home".into();
                c.node.roles = vec![NodeRole::Decode];
                c.policy.offload_threshold_tokens = 16;
            }
        }
    }
    c
}

fn spawn(topo: &NatTopology, site: Site, cfg: &NodeConfig, dir: &Path) -> ChildGuard {
    use std::os::unix::process::CommandExt;
    let mut launcher = Command::new("ip");
    launcher
        .args(["netns", "exec", &topo.site_ns(site)])
        .arg(prfaas_bin())
        .env("RUST_LOG", "info,libp2p_dcutr=debug,libp2p_relay=debug");
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec here.
    unsafe {
        launcher.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    spawn_node(launcher, cfg, dir, &format!("{}.log", cfg.node.name))
}

/// The last lines of every node's log, for failure messages.
fn logs(dir: &Path) -> String {
    let mut out = String::new();
    for n in ["relay", "edge", "home"] {
        let text = std::fs::read_to_string(dir.join(format!("{n}.log"))).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(40)..].join("\n");
        out.push_str(&format!("\n--- {n} (last 40 lines) ---\n{tail}\n"));
    }
    out
}

/// Polls `url` + `/mesh` (bounded) until `ok` holds for it; returns that view.
async fn wait_mesh(
    url: &str,
    what: &str,
    limit: Duration,
    dir: &Path,
    procs: &mut [ChildGuard],
    ok: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let t0 = Instant::now();
    let mut last = serde_json::Value::Null;
    loop {
        if let Ok(v) = client::get_json(&format!("{url}/mesh")).await {
            if ok(&v) {
                return v;
            }
            last = v;
        }
        for p in procs.iter_mut() {
            if let Some(s) = p.exited() {
                panic!("a node exited ({s}) while waiting for {what}:{}", logs(dir));
            }
        }
        assert!(
            t0.elapsed() < limit,
            "{what}: not within {limit:?}; last /mesh of {url}: {last}{}",
            logs(dir)
        );
        actix_rt::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The home's view of `peer` in its `/mesh` peers list.
fn peer_entry<'a>(mesh: &'a serde_json::Value, peer: &str) -> Option<&'a serde_json::Value> {
    mesh["peers"].as_array()?.iter().find(|p| p["peer"] == peer)
}

fn random_psk() -> String {
    use std::io::Read;
    let mut key = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut key))
        .expect("/dev/urandom");
    key.iter().map(|b| format!("{b:02x}")).collect()
}

/// One scenario: returns the route of the long request, the edge's peer id and the home's last
/// `/mesh`, the relay's `/mesh` too.
fn scenario(
    tag: &str,
    random_ports: bool,
) -> (PrefillRoute, String, serde_json::Value, serde_json::Value) {
    let topo = NatTopology::create(tag, random_ports);
    let dir: PathBuf =
        std::env::temp_dir().join(format!("prfaas-nat-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let relay_key = dir.join("relay.key");
    let relay_id = prfaas_node::actors::node::keygen(&relay_key).expect("relay identity");
    let relay_addr = format!(
        "/ip4/{}/tcp/{PORT}/p2p/{relay_id}",
        NatTopology::addr(Site::Relay)
    );
    let psk = random_psk();
    let mut relay_cfg = config(Site::Relay, &psk, &relay_addr);
    relay_cfg.node.identity = Some(relay_key);
    let edge_key = dir.join("edge.key");
    let edge_id = prfaas_node::actors::node::keygen(&edge_key).expect("edge identity");
    let mut edge_cfg = config(Site::Edge, &psk, &relay_addr);
    edge_cfg.node.identity = Some(edge_key);
    let home_cfg = config(Site::Home, &psk, &relay_addr);
    let relay_url = api_url(NatTopology::addr(Site::Relay));
    let home_url = api_url(NatTopology::addr(Site::Home));
    let edge = edge_id.to_string();

    let out = std::thread::scope(|s| {
        s.spawn(|| {
            topo.enter_home_router();
            actix_rt::System::new().block_on(async {
                let mut procs = vec![spawn(&topo, Site::Relay, &relay_cfg, &dir)];
                wait_mesh(
                    &relay_url,
                    "the relay's API",
                    Duration::from_secs(120),
                    &dir,
                    &mut procs,
                    |_| true,
                )
                .await;
                procs.push(spawn(&topo, Site::Edge, &edge_cfg, &dir));
                procs.push(spawn(&topo, Site::Home, &home_cfg, &dir));
                // The edge joined through the relay: its advert reached the home (behind the
                // other NAT) and offers prefill for the home's model.
                wait_mesh(
                    &home_url,
                    "the edge's advert at the home",
                    Duration::from_secs(120),
                    &dir,
                    &mut procs,
                    |m| peer_entry(m, &edge).is_some_and(|p| p["prefills_our_model"] == true),
                )
                .await;
                // The home reaches the edge: directly once a hole is punched, else relayed.
                let want = if random_ports { "relayed" } else { "direct" };
                wait_mesh(
                    &home_url,
                    &format!("a {want} link from the home to the edge"),
                    Duration::from_secs(60),
                    &dir,
                    &mut procs,
                    |m| peer_entry(m, &edge).is_some_and(|p| p["link"] == want),
                )
                .await;
                let params = ChatParams {
                    timeout: Duration::from_secs(120),
                    ..ChatParams::greedy(8)
                };
                let prompt = "Edge nodes behind NAT prefill long prompts for homes behind \
                              other NATs and stream the KV back to them. ";
                let r = client::complete(&home_url, prompt, &params, true)
                    .await
                    .unwrap_or_else(|e| panic!("the long request: {e}{}", logs(&dir)));
                let home_mesh = client::get_json(&format!("{home_url}/mesh"))
                    .await
                    .expect("home /mesh");
                let relay_mesh = client::get_json(&format!("{relay_url}/mesh"))
                    .await
                    .expect("relay /mesh");
                let route = r
                    .prfaas
                    .map(|p| p.route)
                    .unwrap_or_else(|| panic!("no prfaas route{}", logs(&dir)));
                if !matches!(&route, PrefillRoute::Remote { peer, .. } if *peer == edge) {
                    panic!(
                        "the edge did not win and stream the KV: {route:?}{}",
                        logs(&dir)
                    );
                }
                drop(procs);
                (route, edge.clone(), home_mesh, relay_mesh)
            })
        })
        .join()
        .expect("client thread")
    });
    drop(topo);
    let _ = std::fs::remove_dir_all(&dir);
    out
}

fn skip(test: &str) -> bool {
    let Some(why) = unavailable() else {
        return false;
    };
    if std::env::var("PRFAAS_REQUIRE_NETNS").as_deref() == Ok("1") {
        panic!("{test} cannot run ({why}) and PRFAAS_REQUIRE_NETNS=1");
    }
    eprintln!("SKIP {test}: {why} (set PRFAAS_REQUIRE_NETNS=1 to make this a failure)");
    true
}

/// Behind port-keeping NATs: the edge joins through the relay, a hole is punched, the edge
/// wins the home's auction and its KV arrives over the direct connection.
#[test]
fn edge_behind_nat_wins_and_streams_kv_over_a_punched_hole() {
    if skip("edge_behind_nat_wins_and_streams_kv_over_a_punched_hole") {
        return;
    }
    let (route, edge, home, relay) = scenario("punch", false);
    let PrefillRoute::Remote { kv_bytes, .. } = route else {
        unreachable!("scenario checked the route");
    };
    assert!(kv_bytes > 0, "no KV crossed");
    let p = peer_entry(&home, &edge).expect("the home still knows the edge");
    assert_eq!(p["link"], "direct", "{home}");
    assert!(
        relay["nat"]["circuits_relayed"].as_u64().unwrap_or(0) >= 1,
        "the first contact went through the relay: {relay}"
    );
}

/// Behind a port-randomising NAT no hole can be punched: adverts, the auction and the KV
/// stream all cross the relay.
#[test]
fn edge_behind_symmetric_nat_streams_kv_through_the_relay() {
    if skip("edge_behind_symmetric_nat_streams_kv_through_the_relay") {
        return;
    }
    let (route, edge, home, relay) = scenario("relay", true);
    let PrefillRoute::Remote { kv_bytes, .. } = route else {
        unreachable!("scenario checked the route");
    };
    assert!(kv_bytes > 0, "no KV crossed");
    let p = peer_entry(&home, &edge).expect("the home still knows the edge");
    assert_eq!(p["link"], "relayed", "{home}");
    assert!(
        relay["nat"]["circuits_relayed"].as_u64().unwrap_or(0) >= 1,
        "{relay}"
    );
}
