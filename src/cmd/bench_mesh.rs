//! `prfaas bench mesh`: KV goodput vs raw TCP, auction latency and advert convergence at 50/100
//! nodes, and (when root) goodput through a `tc tbf`-shaped veth pair via `scripts/netns-shaped-kv`.
//! The measuring code lives in `prfaas_mesh::bench`; this file only parses flags and prints.

use std::path::PathBuf;
use std::process::Command;

use anyhow::Context;
use prfaas_mesh::bench::{self, MeshBenchOptions, ShapedGoodput};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print one JSON object with every figure instead of a table.
    #[arg(long)]
    pub json: bool,
    /// MiB per KV goodput measurement.
    #[arg(long, default_value_t = 1024)]
    pub kv_mib: u64,
    /// Skip the loopback KV goodput part.
    #[arg(long)]
    pub no_kv: bool,
    /// Mesh sizes for auction latency and advert convergence.
    #[arg(long, value_delimiter = ',', default_value = "50,100")]
    pub nodes: Vec<usize>,
    /// Auction rounds per mesh size.
    #[arg(long, default_value_t = 200)]
    pub rounds: usize,
    /// Shaped-link rates (Mbit/s) for the netns part (root only); empty to skip.
    #[arg(long, value_delimiter = ',', default_value = "50,500")]
    pub shaped_mbit: Vec<u64>,
    /// MiB moved per shaped-link measurement.
    #[arg(long, default_value_t = 64)]
    pub shaped_mib: u64,
    /// Internal (used by scripts/netns-shaped-kv): run a KV receiver listening here.
    #[arg(long, hide = true)]
    pub kv_serve: Option<String>,
    /// Internal: where `--kv-serve` writes its address.
    #[arg(long, hide = true)]
    pub addr_file: Option<PathBuf>,
    /// Internal: send one transfer to this address and print the goodput as JSON.
    #[arg(long, hide = true)]
    pub kv_send: Option<String>,
    /// Internal: run a raw TCP receiver listening on this `IP:PORT` (shaped-link baseline).
    #[arg(long, hide = true)]
    pub tcp_serve: Option<String>,
    /// Internal: send the same bytes over raw TCP to this `IP:PORT` and print JSON.
    #[arg(long, hide = true)]
    pub tcp_send: Option<String>,
    /// Internal: configured link rate for `--kv-send`'s ratio.
    #[arg(long, hide = true, default_value_t = 0.0)]
    pub rate_mbit: f64,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if let Some(listen) = &args.kv_serve {
        let file = args
            .addr_file
            .as_deref()
            .context("--kv-serve needs --addr-file")?;
        bench::serve_kv(listen, file)?;
        return Ok(());
    }
    if let Some(listen) = &args.tcp_serve {
        let file = args
            .addr_file
            .as_deref()
            .context("--tcp-serve needs --addr-file")?;
        bench::serve_tcp(listen, file)?;
        return Ok(());
    }
    if let Some(addr) = &args.tcp_send {
        let r = bench::send_tcp(addr, args.kv_mib, args.rate_mbit)?;
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    if let Some(addr) = &args.kv_send {
        let r = bench::send_kv(addr, args.kv_mib, args.rate_mbit)?;
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }

    let opts = MeshBenchOptions {
        kv_mib: args.kv_mib,
        scales: args.nodes.clone(),
        rounds: args.rounds,
        kv: !args.no_kv,
        ..MeshBenchOptions::default()
    };
    let report = bench::run(&opts)?;
    let shaped = shaped(&args);

    if args.json {
        let v = serde_json::json!({ "kv": report.kv, "scale": report.scale, "shaped": shaped });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    if !report.kv.is_empty() {
        println!("KV stream goodput vs raw TCP (loopback, same bytes, same run):");
        println!(
            "  transport streams   MiB   mesh MiB/s  raw TCP MiB/s  ratio   CPU s/GiB mesh  raw TCP  ratio"
        );
        for k in &report.kv {
            println!(
                "  {:<9} {:>7} {:>5} {:>12.1} {:>14.1} {:>6.3} {:>15.2} {:>8.2} {:>6.2}",
                k.transport,
                k.streams,
                k.bytes >> 20,
                k.mesh_mib_s,
                k.raw_tcp_mib_s,
                k.ratio,
                k.mesh_cpu_s_per_gib,
                k.raw_tcp_cpu_s_per_gib,
                k.mesh_cpu_s_per_gib / k.raw_tcp_cpu_s_per_gib
            );
        }
    }
    println!("Auction call→award and advert convergence (one process):");
    println!(
        "  nodes  converged  convergence ms (after last start)  rounds ok/tried  no-bid  refused  bids  silent  P50 ms  P99 ms  CPU cores"
    );
    for s in &report.scale {
        println!(
            "  {:>5} {:>9} {:>15.0} {:>18.0} {:>9}/{:<6} {:>6} {:>8} {:>5} {:>7} {:>7.2} {:>7.2} {:>10.2}",
            s.nodes,
            s.converged,
            s.convergence_ms,
            s.convergence_after_last_start_ms,
            s.rounds,
            s.rounds_tried,
            s.rounds_without_bids,
            s.awards_refused,
            s.bids,
            s.silent,
            s.p50_ms,
            s.p99_ms,
            s.cpu_cores_during_rounds
        );
    }
    for s in &report.scale {
        println!(
            "  {} nodes: adverts published {}, accepted {} ({} through table sync), refused {}; CPU cores while converging {:.2}",
            s.nodes, s.adverts_published, s.adverts_accepted, s.adverts_from_sync, s.adverts_refused, s.cpu_cores_converging
        );
    }
    match &shaped {
        Ok(v) if v.is_empty() => println!("Shaped links: skipped (no rates requested)"),
        Ok(v) => {
            println!(
                "Goodput through a tc tbf-shaped veth pair (netns), ratio to the configured rate:"
            );
            println!(
                "    rate Mbit/s  raw TCP Mbit/s  ratio   mesh KV Mbit/s  ratio   mesh/raw TCP"
            );
            for s in v {
                println!(
                    "  {:>12.0} {:>15.1} {:>6.3} {:>16.1} {:>6.3} {:>14.3}",
                    s.mesh.rate_mbit,
                    s.tcp.goodput_mbit,
                    s.tcp.ratio,
                    s.mesh.goodput_mbit,
                    s.mesh.ratio,
                    s.mesh.goodput_mbit / s.tcp.goodput_mbit
                );
            }
        }
        Err(why) => println!("Shaped links: skipped ({why})"),
    }
    Ok(())
}

/// One shaped-link rate: raw TCP and the mesh KV stream moving the same bytes, in the same run.
/// Raw TCP is the ceiling: tbf counts Ethernet, IP and TCP headers against the rate
/// (1448 payload bytes per 1514 on the wire ≈ 0.956).
#[derive(Debug, serde::Serialize)]
struct ShapedPair {
    tcp: ShapedGoodput,
    mesh: ShapedGoodput,
}

/// Runs `scripts/netns-shaped-kv` per rate; `Err(reason)` when it cannot (not root, no script).
fn shaped(args: &Args) -> Result<Vec<ShapedPair>, String> {
    if args.shaped_mbit.is_empty() {
        return Ok(vec![]);
    }
    let euid = Command::new("id")
        .arg("-u")
        .output()
        .map_err(|e| format!("id -u: {e}"))?;
    if String::from_utf8_lossy(&euid.stdout).trim() != "0" {
        return Err("not root".into());
    }
    let script = PathBuf::from("scripts/netns-shaped-kv");
    if !script.exists() {
        return Err("run from the repository root (scripts/netns-shaped-kv not found)".into());
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for &rate in &args.shaped_mbit {
        // Enough bytes for ~4 s at the rate, at least the requested size.
        let mib = args.shaped_mib.max(rate / 2);
        let o = Command::new(&script)
            .arg(rate.to_string())
            .arg(mib.to_string())
            .arg(&exe)
            .output()
            .map_err(|e| format!("netns-shaped-kv: {e}"))?;
        if !o.status.success() {
            return Err(format!(
                "netns-shaped-kv {rate} failed: {}",
                String::from_utf8_lossy(&o.stderr)
                    .lines()
                    .last()
                    .unwrap_or("")
            ));
        }
        // The script prints two JSON lines: raw TCP first, then the mesh transfer.
        let text = String::from_utf8_lossy(&o.stdout);
        let parsed: Vec<ShapedGoodput> = text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l.trim()).map_err(|e| format!("bad output {l}: {e}")))
            .collect::<Result<_, _>>()?;
        let [tcp, mesh]: [ShapedGoodput; 2] = parsed
            .try_into()
            .map_err(|v: Vec<_>| format!("expected 2 result lines, got {}", v.len()))?;
        out.push(ShapedPair { tcp, mesh });
    }
    Ok(out)
}
