//! Control plane and memory: how long each contender takes to program N Services x M endpoints
//! from empty, how long one endpoint change takes to reach the kernel, and what the agent costs
//! in memory once everything is programmed.
//!
//! - lb: the real agent on a manifests directory (files of 100 Services). From empty = agent
//!   start to its first "maps programmed" log line (also its own `elapsed_us` for the apply).
//!   One change = one manifest file rewritten (rename into place) with one endpoint address of one
//!   Service changed; measured from the rename to the agent's next "maps programmed" line, and
//!   the agent's own `since_change_us` (from the poll that saw the change to maps programmed).
//! - iptables: `iptables-restore` of the full nat table from empty; one change = the partial
//!   sync kube-proxy does by default since 1.27 (`--noflush`; the top-level chains rewritten for
//!   every Service, only the changed Service's own chains rewritten, stale endpoint chains
//!   deleted).
//! - nftables: `nft -f` of the whole table from empty in one transaction, as kube-proxy sends it,
//!   stopped at `--nft-limit-s` (the kernel's cost grows with the square of the transaction:
//!   binding each service chain's anonymous verdict map walks the whole pending transaction);
//!   the figure is then a lower bound and the table is filled in pieces for what follows. One
//!   change = the incremental transaction kube-proxy's nftables mode sends (rewrite the service
//!   chain, add/delete endpoint chains).
//! - Memory: the agent's VmRSS and VmHWM from /proc, read after the changes once the agent has
//!   been idle for a second (steady state), and BPF map memory as the sum of `memlock`
//!   over the map fds the agent holds (/proc/<pid>/fdinfo), as bpftool reports it.
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use lb_tests::{BpfFs, ChildGuard, Node};

use crate::{
    e2e::{
        load_nft_in_pieces, load_rules, load_rules_within, start_agent, Loaded, TempDir,
        NFT_LINES_PER_TRANSACTION,
    },
    kube_proxy, percentile,
    scenario::{Scenario, ServicePort},
    Args, Part, Plan, Results,
};

pub fn run(args: &Args, plan: &Plan, results: &mut Results) -> Result<()> {
    let scenario = Scenario {
        services: plan.control_services,
        endpoints_per_service: plan.control_endpoints,
        target_endpoints: crate::e2e::BACKENDS.to_vec(),
    };
    let size = format!(
        "{} services x {} endpoints",
        scenario.services, scenario.endpoints_per_service
    );
    results.notes.push(format!(
        "Control plane: {size}, {} Services per manifest file; the agent runs with \
         --poll-interval-ms {} (its default: inotify wakes the manifests source at once, the \
         interval is the fallback scan). A change rewrites one file (write + rename) and is timed \
         from the rename to the agent's `maps programmed` log line. Changes: {} for lb, {} for \
         iptables (kube-proxy's partial sync: `iptables-restore --noflush` of KUBE-SERVICES, \
         KUBE-NODEPORTS and the changed Service's chains), {} for nftables (kube-proxy's \
         incremental transaction); p99 of fewer than 100 samples is their maximum. Memory is \
         read after the changes, once the agent has been idle for a second (it gives freed heap \
         back to the system after 200 ms without changes); VmHWM is the peak of the whole run.",
        Scenario::PER_FILE,
        plan.poll_interval_ms,
        plan.changes_agent,
        plan.changes_iptables,
        plan.changes_nft
    ));
    if let Some(limit) = plan.nft_limit_s {
        results.notes.push(format!(
            "nftables from empty: kube-proxy sends the whole table as one transaction. The \
             kernel's cost of that transaction grows with the square of its size: binding each \
             service chain's anonymous `numgen ... vmap` walks every pending entry of the \
             transaction (`__nft_set_trans_bind`, 62% of the samples of `perf record` on a \
             2,000-Service load here), and there is one such map per service port. The bench \
             stops that load after {limit} s (`--nft-limit-s`, 0 waits for it) and reports the \
             time as a lower bound; the table is then filled in transactions of at most \
             {NFT_LINES_PER_TRANSACTION} lines for the change measurements."
        ));
    }
    let control = plan.wants(&args.only, Part::Control);
    agent(args, plan, &scenario, &size, control, results)?;
    if control {
        iptables(plan, &scenario, &size, results)?;
        nftables(plan, &scenario, &size, results)?;
    }
    Ok(())
}

/// Follows the agent's log for its `maps programmed` lines. It reads only what was appended since
/// the last look: re-reading and re-parsing the whole log every few milliseconds would burn a
/// core the agent under measurement needs (this machine may have two).
struct Syncs {
    file: std::fs::File,
    partial: Vec<u8>,
    seen: Vec<serde_json::Value>,
}

impl Syncs {
    fn open(agent: &ChildGuard) -> Result<Syncs> {
        let file = std::fs::File::open(agent.log_path())
            .with_context(|| format!("opening {}", agent.log_path().display()))?;
        Ok(Syncs {
            file,
            partial: Vec::new(),
            seen: Vec::new(),
        })
    }

    /// Reads what the agent appended; the sync lines so far.
    fn poll(&mut self) -> Result<&[serde_json::Value]> {
        use std::io::Read;
        let mut buf = Vec::new();
        self.file.read_to_end(&mut buf)?;
        self.partial.extend_from_slice(&buf);
        if let Some(end) = self.partial.iter().rposition(|b| *b == b'\n') {
            let complete: Vec<u8> = self.partial.drain(..=end).collect();
            for line in String::from_utf8_lossy(&complete).lines() {
                if line.contains("maps programmed") {
                    if let Ok(v) = serde_json::from_str(line) {
                        self.seen.push(v);
                    }
                }
            }
        }
        Ok(&self.seen)
    }

    /// Waits until `count` syncs were logged.
    fn wait(&mut self, agent: &mut ChildGuard, count: usize, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            if self.poll()?.len() >= count {
                return Ok(());
            }
            if !agent.is_running() {
                bail!("the agent exited; log:\n{}", agent.logs());
            }
            if start.elapsed() > timeout {
                bail!(
                    "no sync #{count} within {timeout:?}; agent log tail:\n{}",
                    tail(&agent.logs(), 20)
                );
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

fn field(v: &serde_json::Value, name: &str) -> Option<f64> {
    v.get("fields")
        .and_then(|f| f.get(name))
        .or_else(|| v.get(name))
        .and_then(|x| x.as_f64())
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn agent(
    args: &Args,
    plan: &Plan,
    scenario: &Scenario,
    size: &str,
    control: bool,
    results: &mut Results,
) -> Result<()> {
    let node = Node::new("bench-cp")?;
    let dir = TempDir::new("bench-cp-manifests")?;
    for (name, yaml) in scenario.manifest_files() {
        std::fs::write(dir.0.join(name), yaml)?;
    }
    let bpffs = BpfFs::new("bench-cp")?;
    let start = Instant::now();
    let mut agent = start_agent(
        &args.agent_bin,
        &node,
        &dir.0,
        &bpffs,
        &[],
        plan.poll_interval_ms,
    )?;
    let mut syncs = Syncs::open(&agent)?;
    syncs.wait(&mut agent, 1, Duration::from_secs(600))?;
    let from_empty = start.elapsed();
    let first = syncs.poll()?[0].clone();
    let frontends = field(&first, "frontends").unwrap_or(f64::NAN);
    eprintln!(
        "lb-bench: control: agent programmed {size} ({frontends} frontends) in {:.2}s",
        from_empty.as_secs_f64()
    );
    if control {
        results
            .figure(
                &format!("control: program {size} from empty"),
                "lb",
                "s",
                false,
            )
            .samples
            .push(from_empty.as_secs_f64());
        if let Some(us) = field(&first, "elapsed_us") {
            results
                .figure(
                    &format!("control: program {size} from empty, the agent's own apply time (model + map writes, elapsed_us)"),
                    "lb",
                    "s",
                    false,
                )
                .samples
                .push(us / 1e6);
        }
        let mut wall = Vec::new();
        let mut agent_says = Vec::new();
        let mut apply = Vec::new();
        for c in 0..plan.changes_agent {
            let service = pick(scenario, c);
            let file = service / Scenario::PER_FILE;
            let yaml = scenario.file_yaml(file, Some((service, c as u32 + 1)));
            let before = syncs.poll()?.len();
            let tmp = dir.0.join(".change.tmp");
            std::fs::write(&tmp, yaml)?;
            let t = Instant::now();
            std::fs::rename(&tmp, dir.0.join(Scenario::file_name(file)))?;
            syncs.wait(&mut agent, before + 1, Duration::from_secs(60))?;
            wall.push(t.elapsed().as_secs_f64() * 1e3);
            let last = syncs.poll()?.last().cloned();
            if let Some(us) = last.as_ref().and_then(|v| field(v, "since_change_us")) {
                agent_says.push(us / 1e3);
            }
            if let Some(us) = last.as_ref().and_then(|v| field(v, "elapsed_us")) {
                apply.push(us / 1e3);
            }
        }
        push_latencies(
            results,
            &format!("control: one endpoint change until programmed, {size}"),
            "lb",
            &wall,
        );
        push_latencies(
            results,
            &format!("control: one endpoint change until programmed, {size}, as the agent measures it (since_change_us)"),
            "lb",
            &agent_says,
        );
        push_latencies(
            results,
            &format!("control: one endpoint change, {size}, the agent's sync alone (model + diff + map writes, elapsed_us)"),
            "lb",
            &apply,
        );
    }
    if plan.wants(&args.only, Part::Memory) {
        memory(&agent, size, results)?;
    }
    Ok(())
}

/// Change `c` of a baseline: the Service [`pick`] names gets its variant `c + 1`. Returns where
/// its port is in `current` and the port as it is after the change.
fn baseline_change(
    scenario: &Scenario,
    current: &[ServicePort],
    c: usize,
) -> Result<(usize, ServicePort)> {
    let s = pick(scenario, c);
    let i = current
        .iter()
        .position(|p| p.index == s)
        .context("changed Service has a port")?;
    let new = scenario.ports(Some((s, c as u32 + 1))).swap_remove(i);
    Ok((i, new))
}

/// The Service changed by change `c`: spread over all of them, never the target.
fn pick(scenario: &Scenario, c: usize) -> usize {
    let mut s = (c * 7_919 + 13) % scenario.services;
    if s == scenario.target() {
        s = (s + 1) % scenario.services;
    }
    s
}

/// p50 and p99 figures of a series of latencies (ms).
fn push_latencies(results: &mut Results, group: &str, mode: &str, ms: &[f64]) {
    for p in [50.0, 99.0] {
        let f = results.figure(&format!("{group}, p{p}"), mode, "ms", false);
        f.samples = vec![percentile(ms, p)];
        f.note = Some(format!("{} changes", ms.len()));
    }
}

/// How long the agent is left idle before its memory is read: it gives freed heap back after
/// one quiet tick (200 ms) following its last sync, so this reads the steady state.
const SETTLE_BEFORE_MEMORY: Duration = Duration::from_secs(1);

fn memory(agent: &ChildGuard, size: &str, results: &mut Results) -> Result<()> {
    std::thread::sleep(SETTLE_BEFORE_MEMORY);
    let pid = agent.pid();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = |key: &str| -> Result<f64> {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .with_context(|| format!("{key} in /proc/{pid}/status"))
    };
    let mib = |k: f64| k / 1024.0;
    results
        .figure(&format!("memory: agent VmRSS, {size}"), "lb", "MiB", false)
        .samples
        .push(mib(kib("VmRSS:")?));
    results
        .figure(
            &format!("memory: agent VmHWM (peak RSS), {size}"),
            "lb",
            "MiB",
            false,
        )
        .samples
        .push(mib(kib("VmHWM:")?));
    let (maps, bytes) = map_memlock(pid)?;
    let f = results.figure(
        &format!("memory: BPF maps (memlock of the agent's map fds), {size}"),
        "lb",
        "MiB",
        false,
    );
    f.samples.push(bytes as f64 / (1024.0 * 1024.0));
    f.note = Some(format!("{maps} maps"));
    Ok(())
}

/// (number of distinct maps, sum of memlock bytes) over the BPF map fds of `pid`.
fn map_memlock(pid: u32) -> Result<(usize, u64)> {
    let mut seen = std::collections::BTreeSet::new();
    let mut total = 0;
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))? {
        let Ok(text) = std::fs::read_to_string(entry?.path()) else {
            continue;
        };
        if !text.contains("map_type:") {
            continue;
        }
        let get = |key: &str| {
            text.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        };
        let id = get("map_id:").unwrap_or(0);
        if seen.insert(id) {
            total += get("memlock:").unwrap_or(0);
        }
    }
    Ok((seen.len(), total))
}

fn iptables(plan: &Plan, scenario: &Scenario, size: &str, results: &mut Results) -> Result<()> {
    let node = Node::new("bench-cp-ipt")?;
    let base = scenario.ports(None);
    let took = load_rules(
        &node.ns,
        "iptables-restore",
        &[],
        &kube_proxy::iptables_rules(&base),
    )?;
    eprintln!(
        "lb-bench: control: iptables-restore of {size} from empty: {:.2}s",
        took.as_secs_f64()
    );
    results
        .figure(
            &format!("control: program {size} from empty"),
            "iptables",
            "s",
            false,
        )
        .samples
        .push(took.as_secs_f64());
    // kube-proxy's partial sync: the current endpoints of every changed Service (a Service may
    // be changed more than once) decide which endpoint chains go away.
    let mut current = base;
    let mut ms = Vec::new();
    for c in 0..plan.changes_iptables {
        let (i, new) = baseline_change(scenario, &current, c)?;
        let old = std::mem::replace(&mut current[i], new);
        let text = kube_proxy::iptables_partial(&current, &old, &current[i]);
        ms.push(
            load_rules(&node.ns, "iptables-restore", &["--noflush"], &text)?.as_secs_f64() * 1e3,
        );
    }
    push_latencies(
        results,
        &format!("control: one endpoint change until programmed, {size}"),
        "iptables",
        &ms,
    );
    Ok(())
}

fn nftables(plan: &Plan, scenario: &Scenario, size: &str, results: &mut Results) -> Result<()> {
    let node = Node::new("bench-cp-nft")?;
    let base = scenario.ports(None);
    let script = kube_proxy::nft_rules(&base);
    let limit = plan.nft_limit_s.map(Duration::from_secs);
    let group = format!("control: program {size} from empty");
    match load_rules_within(&node.ns, "nft", &["-f"], &script, limit)? {
        Loaded::Done(took) => {
            eprintln!(
                "lb-bench: control: nft -f of {size} from empty: {:.2}s",
                took.as_secs_f64()
            );
            results
                .figure(&group, "nftables", "s", false)
                .samples
                .push(took.as_secs_f64());
        }
        Loaded::Stopped(after) => {
            eprintln!(
                "lb-bench: control: nft -f of {size} from empty: not done after {:.1}s, stopped; \
                 filling the table in pieces for the change measurements",
                after.as_secs_f64()
            );
            let f = results.figure(&group, "nftables", "s", false);
            f.samples.push(after.as_secs_f64());
            f.lower_bound = true;
            f.note = Some(format!(
                "one transaction, as kube-proxy sends it: not finished after {:.0} s (the \
                 bench's limit, --nft-limit-s), stopped",
                after.as_secs_f64()
            ));
            let pieces = load_nft_in_pieces(&node.ns, &script)?;
            eprintln!(
                "lb-bench: control: the same table in transactions of at most \
                 {NFT_LINES_PER_TRANSACTION} lines: {:.2}s",
                pieces.as_secs_f64()
            );
        }
    }
    // The current endpoints of every changed Service (a Service may be changed more than once).
    let mut current = base.clone();
    let mut ms = Vec::new();
    for c in 0..plan.changes_nft {
        let (i, new) = baseline_change(scenario, &current, c)?;
        let tx = kube_proxy::nft_change(&current[i], &new);
        ms.push(load_rules(&node.ns, "nft", &["-f"], &tx)?.as_secs_f64() * 1e3);
        current[i] = new;
    }
    push_latencies(
        results,
        &format!("control: one endpoint change until programmed, {size}"),
        "nftables",
        &ms,
    );
    Ok(())
}
