//! Network namespaces joined by `tc tbf`-shaped veth links, for benchmarks and tests that run real
//! node processes on real (shaped) links. Needs root.
//!
//! Topology: a star. One *hub* namespace (IP forwarding on; the benchmark's client lives there)
//! and one namespace per node, each joined to the hub by a veth pair whose two ends are shaped
//! with `tbf` to that node's uplink rate. Node `i` is `10.99.i.2`, its hub side `10.99.i.1`;
//! traffic between nodes `i` and `j` crosses both uplinks, so it gets `min(rate_i, rate_j)`.
//! Addresses repeat across topologies: each lives in its own namespaces.
//!
//! Every namespace is deleted on drop (also when a test panics); names carry the process id, so
//! namespaces left behind by a killed run are recognised and removed by the next one.
//!
//! Shared with `tests/netns_e2e.rs` (included there by path): no dependency on the CLI.

use std::net::Ipv4Addr;
use std::process::{Command, Output, Stdio};

/// Names of every namespace made here start with this.
const PREFIX: &str = "prfaas-e2e-";

/// What went wrong setting up or driving the namespaces.
#[derive(Debug)]
pub struct NetnsError(pub String);

impl std::fmt::Display for NetnsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NetnsError {}

/// Why this machine cannot make namespaces (not root, `ip`/`tc` missing), or `None` when it can.
pub fn unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some("network namespaces need root".into());
    }
    for tool in ["ip", "tc", "taskset"] {
        let found = Command::new(tool)
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok();
        if !found {
            return Some(format!("`{tool}` not found (iproute2 / util-linux)"));
        }
    }
    None
}

fn run(cmd: &mut Command) -> Result<Output, NetnsError> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| NetnsError(format!("{cmd:?}: {e}")))?;
    if !out.status.success() {
        return Err(NetnsError(format!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(out)
}

fn ip(args: &[&str]) -> Result<Output, NetnsError> {
    run(Command::new("ip").args(args))
}

/// tbf parameters as in `scripts/netns-setup`: a bucket of ~4 ms at the rate (at least a few
/// MTUs) and a queue bounded at 50 ms, so a stream that idled cannot burst.
fn tbf_args(mbit: f64) -> Vec<String> {
    let burst = ((mbit * 1e6 / 8.0 / 250.0) as u64).max(15_000);
    vec![
        "tbf".into(),
        "rate".into(),
        format!("{}kbit", (mbit * 1000.0).round() as u64),
        "burst".into(),
        burst.to_string(),
        "latency".into(),
        "50ms".into(),
    ]
}

/// Deletes namespaces of earlier runs whose process is gone (a run killed before its drop).
fn sweep_stale() {
    let Ok(out) = ip(&["netns", "list"]) else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let pid = rest.split('-').next().unwrap_or_default();
        if !pid.is_empty() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = ip(&["netns", "del", name]);
        }
    }
}

/// Joins two namespaces by a veth pair: each end `(namespace, interface, address/prefix)`,
/// addressed and up.
pub fn veth_pair(a: (&str, &str, &str), b: (&str, &str, &str)) -> Result<(), NetnsError> {
    ip(&[
        "-n", a.0, "link", "add", a.1, "type", "veth", "peer", "name", b.1, "netns", b.0,
    ])?;
    for (ns, dev, addr) in [a, b] {
        ip(&["-n", ns, "addr", "add", addr, "dev", dev])?;
        ip(&["-n", ns, "link", "set", dev, "up"])?;
    }
    Ok(())
}

/// A hub and `n` node namespaces on shaped uplinks; removed on drop.
#[derive(Debug)]
pub struct Topology {
    hub: String,
    nodes: Vec<String>,
}

/// Interface of node `i`'s uplink inside its namespace.
const NODE_IF: &str = "up0";

fn hub_if(i: usize) -> String {
    format!("n{i}")
}

impl Topology {
    /// Creates the hub and one namespace per entry of `uplink_mbit`, shaped to that rate.
    /// `tag` (a few letters) makes the names readable in `ip netns list`.
    pub fn create(tag: &str, uplink_mbit: &[f64]) -> Result<Self, NetnsError> {
        if uplink_mbit.is_empty() || uplink_mbit.len() > 200 {
            return Err(NetnsError("between 1 and 200 nodes".into()));
        }
        sweep_stale();
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let base = format!("{PREFIX}{}-{tag}-{stamp:x}", std::process::id());
        let mut t = Topology {
            hub: format!("{base}-hub"),
            nodes: Vec::new(),
        };
        // From here on, drop cleans up whatever was made.
        ip(&["netns", "add", &t.hub])?;
        t.exec_ok(
            &t.hub.clone(),
            "sh",
            &["-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"],
        )?;
        ip(&["-n", &t.hub, "link", "set", "lo", "up"])?;
        for (i, &rate) in uplink_mbit.iter().enumerate() {
            let ns = format!("{base}-n{i}");
            ip(&["netns", "add", &ns])?;
            t.nodes.push(ns.clone());
            let hif = hub_if(i);
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            veth_pair(
                (&t.hub, &hif, &format!("10.99.{i}.1/24")),
                (&ns, NODE_IF, &format!("10.99.{i}.2/24")),
            )?;
            ip(&[
                "-n",
                &ns,
                "route",
                "add",
                "default",
                "via",
                &format!("10.99.{i}.1"),
            ])?;
            for (space, dev) in [(t.hub.clone(), hif.clone()), (ns.clone(), NODE_IF.into())] {
                // veth offloads would hand tbf 64 KiB super-packets larger than the bucket.
                let _ = t.exec_ok(
                    &space,
                    "ethtool",
                    &["-K", &dev, "tso", "off", "gso", "off", "gro", "off"],
                );
                let mut args = vec!["-n", &space, "qdisc", "add", "dev", &dev, "root"];
                let tbf = tbf_args(rate);
                args.extend(tbf.iter().map(String::as_str));
                run(Command::new("tc").args(&args))?;
            }
        }
        Ok(t)
    }

    fn exec_ok(&self, ns: &str, prog: &str, args: &[&str]) -> Result<Output, NetnsError> {
        run(Command::new("ip")
            .args(["netns", "exec", ns, prog])
            .args(args))
    }

    /// Number of node namespaces.
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// Node `i`'s address.
    pub fn addr(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 99, i as u8, 2)
    }

    /// A command that runs `program` in node `i`'s namespace, pinned to `cores` (`taskset -c`).
    /// The process is killed if the thread that spawns it ends (a bench stopped with Ctrl-C
    /// leaves no node running).
    pub fn command(&self, i: usize, cores: &str, program: &std::path::Path) -> Command {
        use std::os::unix::process::CommandExt;
        let mut c = Command::new("taskset");
        c.args(["-c", cores, "ip", "netns", "exec", &self.nodes[i]])
            .arg(program);
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec here.
        unsafe {
            c.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        c
    }

    /// Reshapes node `i`'s uplink (both directions) to `mbit`.
    pub fn set_rate(&self, i: usize, mbit: f64) -> Result<(), NetnsError> {
        for (space, dev) in [(&self.hub, hub_if(i)), (&self.nodes[i], NODE_IF.to_owned())] {
            let mut args = vec!["-n", space, "qdisc", "change", "dev", &dev, "root"];
            let tbf = tbf_args(mbit);
            args.extend(tbf.iter().map(String::as_str));
            run(Command::new("tc").args(&args))?;
        }
        Ok(())
    }

    /// Takes node `i`'s uplink down (a partition: the hub side of its veth, so the node's own
    /// interface and addresses stay as they are) or back up.
    #[allow(dead_code)] // the chaos suite (tests/chaos_netns.rs) includes this file
    pub fn set_link(&self, i: usize, up: bool) -> Result<(), NetnsError> {
        let state = if up { "up" } else { "down" };
        ip(&["-n", &self.hub, "link", "set", &hub_if(i), state]).map(|_| ())
    }

    /// Bytes node `i` has sent on its uplink so far (its egress, as the kernel counts it).
    pub fn egress_bytes(&self, i: usize) -> Result<u64, NetnsError> {
        let out = ip(&[
            "-j",
            "-s",
            "-n",
            &self.nodes[i],
            "link",
            "show",
            "dev",
            NODE_IF,
        ])?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .map_err(|e| NetnsError(format!("`ip -j -s link` output: {e}")))?;
        v.pointer("/0/stats64/tx/bytes")
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| NetnsError("`ip -j -s link` has no stats64.tx.bytes".into()))
    }

    /// Moves the calling thread into the hub namespace: sockets it (and threads it spawns)
    /// opens from now on live there. The rest of the process is unaffected.
    pub fn enter_hub(&self) -> Result<(), NetnsError> {
        enter(&self.hub_path())
    }

    /// Path of the hub namespace, for [`enter`] from another thread.
    #[allow(dead_code)] // the chaos suite (tests/chaos_netns.rs) includes this file
    pub fn hub_path(&self) -> String {
        format!("/var/run/netns/{}", self.hub)
    }
}

/// Moves the calling thread into the namespace at `path` (see [`Topology::enter_hub`]).
pub fn enter(path: &str) -> Result<(), NetnsError> {
    let f = std::fs::File::open(path).map_err(|e| NetnsError(format!("{path}: {e}")))?;
    use std::os::fd::AsRawFd;
    // SAFETY: a valid, open namespace file descriptor; setns affects only this thread.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(NetnsError(format!(
            "setns {path}: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in self.nodes.iter().chain(std::iter::once(&self.hub)) {
            if let Err(e) = ip(&["netns", "del", ns]) {
                eprintln!("netns cleanup: {e}");
            }
        }
    }
}

/// A child process (a node) that is stopped on drop: SIGINT (graceful), then SIGKILL after a
/// bounded wait.
#[derive(Debug)]
pub struct ChildGuard(pub std::process::Child);

impl ChildGuard {
    /// Whether the process has exited (and how).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.0.try_wait().ok().flatten()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if self.exited().is_some() {
            return;
        }
        if let Ok(pid) = i32::try_from(self.0.id()) {
            // SAFETY: signalling our own child, which has not been reaped (try_wait saw it alive).
            unsafe { libc::kill(pid, libc::SIGINT) };
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while std::time::Instant::now() < deadline {
            if self.exited().is_some() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
