//! Two `prfaas node` processes (the built binary) in two network namespaces joined through a
//! hub by `tc tbf`-shaped veth links: one long prompt is offloaded from the home to the prefill
//! node over the shaped link, and its answer must equal the greedy answer of a local prefill of
//! the same prompt (on the other node, which also serves it from its own API).
//!
//! Needs root (namespaces, tc); skips loudly without it, and `PRFAAS_REQUIRE_NETNS=1` (CI) turns
//! the skip into a failure. Namespaces carry this process's id and are removed on drop, also
//! when an assertion fails.

mod netns_nodes;

use std::time::Duration;

use netns_nodes::netns::{self, Topology};
use netns_nodes::{api_url, node_config, spawn_in, wait_healthy, wait_prefiller, NEVER_OFFLOAD};
use prfaas_node::api::client::{self, ChatParams};
use prfaas_node::config::{NodeConfig, NodeRole};
use prfaas_node::service::PrefillRoute;

/// Node `i` of `topo` (mesh port 4100); every node but the first bootstraps from node 0.
fn config(topo: &Topology, i: usize, roles: &[NodeRole]) -> NodeConfig {
    let mut c = node_config(&format!("node-{i}"), roles, topo.addr(i).into(), 4100);
    // Veth addresses in network namespaces this run created: nobody else can reach them.
    c.mesh.open = true;
    if i > 0 {
        c.mesh.bootstrap = vec![format!("/ip4/{}/tcp/4100", topo.addr(0))];
    }
    c
}

#[test]
fn offloaded_request_over_a_shaped_link_matches_local_prefill() {
    if let Some(why) = netns::unavailable() {
        if std::env::var("PRFAAS_REQUIRE_NETNS").as_deref() == Ok("1") {
            panic!("netns test cannot run ({why}) and PRFAAS_REQUIRE_NETNS=1");
        }
        eprintln!("SKIP offloaded_request_over_a_shaped_link_matches_local_prefill: {why} (set PRFAAS_REQUIRE_NETNS=1 to make this a failure)");
        return;
    }
    let topo = Topology::create("test", &[100.0, 100.0]).expect("namespaces");
    let dir = std::env::temp_dir().join(format!("prfaas-netns-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");

    // Home: offloads prompts longer than 16 tokens, and its own bid never wins. Node 1: a `pd`
    // node that never offloads: it serves the home's prefill and, on its own API, the local
    // reference.
    let mut home = config(&topo, 0, &[NodeRole::Pd]);
    home.policy.offload_threshold_tokens = 16;
    home.policy.reserve_price_factor = 1e6;
    let mut other = config(&topo, 1, &[NodeRole::Pd]);
    other.policy.offload_threshold_tokens = NEVER_OFFLOAD;
    let mut procs = Vec::new();
    let (home_url, other_url) = (api_url(topo.addr(0)), api_url(topo.addr(1)));

    let prompt = "Prefill as a service ships the KV cache of long prompts across a shaped link, \
                  layer by layer, while the prompt is still being prefilled. ";
    let (remote, local) = std::thread::scope(|s| {
        s.spawn(|| {
            topo.enter_hub().expect("enter the hub namespace");
            actix_rt::System::new().block_on(async {
                // A node dials its bootstrap peer once, at start: the home first.
                for (i, (cfg, url)) in [(&home, &home_url), (&other, &other_url)]
                    .into_iter()
                    .enumerate()
                {
                    let log = format!("node{i}.log");
                    procs.push(spawn_in(&topo, i, cfg, &dir, &log));
                    let log = dir.join(log);
                    wait_healthy(url, procs.last_mut().expect("just pushed"), &log).await;
                }
                wait_prefiller(&home_url).await;
                let params = ChatParams {
                    timeout: Duration::from_secs(120),
                    ..ChatParams::greedy(12)
                };
                let remote = client::complete(&home_url, prompt, &params, true)
                    .await
                    .expect("remote request");
                let local = client::complete(&other_url, prompt, &params, true)
                    .await
                    .expect("local request");
                (remote, local)
            })
        })
        .join()
        .expect("client thread")
    });
    drop(procs);
    drop(topo);
    let _ = std::fs::remove_dir_all(&dir);

    let route = remote.prfaas.as_ref().map(|p| p.route.clone());
    let Some(PrefillRoute::Remote { kv_bytes, .. }) = route else {
        panic!("the long prompt was not offloaded: {route:?}");
    };
    assert!(kv_bytes > 0, "no KV crossed the link");
    let local_route = local.prfaas.as_ref().map(|p| p.route.clone());
    assert!(
        matches!(local_route, Some(PrefillRoute::Local { .. })),
        "the reference was not prefilled locally: {local_route:?}"
    );
    let n = remote.usage.map_or(0, |u| u.completion_tokens);
    assert!(n > 0, "no tokens generated");
    assert_eq!(
        remote.usage.map(|u| u.completion_tokens),
        local.usage.map(|u| u.completion_tokens)
    );
    assert_eq!(
        remote.text, local.text,
        "remote prefill over the shaped link must decode to the local prefill's greedy tokens"
    );
}
