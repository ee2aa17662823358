//! lbctl: inspects the pinned maps directly, so it works while the agent is down.
use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};
use lb_userspace::dataplane::{bpf::BpfMaps, BackendAddr, Dataplane, FrontendAddr};

#[derive(Parser)]
#[command(
    name = "lbctl",
    version,
    about = "Inspect the load balancer's BPF maps"
)]
struct Args {
    /// The agent's pin directory.
    #[arg(long, global = true, default_value = "/sys/fs/bpf/lb")]
    bpffs: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Canonical, sorted dump of frontends and their backends (stable, diffable).
    Dump,
}

fn main() -> Result<()> {
    let args = Args::parse();
    match args.command {
        Command::Dump => print!("{}", dump(&BpfMaps::from_pins(&args.bpffs)?)?),
    }
    Ok(())
}

fn proto_name(p: u8) -> String {
    match p {
        lb_common::proto::TCP => "TCP".into(),
        lb_common::proto::UDP => "UDP".into(),
        other => format!("proto{other}"),
    }
}

/// One line per frontend, then one per backend slot, sorted by frontend.
fn dump(maps: &impl Dataplane) -> Result<String> {
    use std::{collections::BTreeMap, fmt::Write};
    let backends: BTreeMap<u32, _> = maps.backends()?.into_iter().collect();
    let services: BTreeMap<_, _> = maps.services()?.into_iter().collect();
    let mut out = String::new();
    let mut masters: Vec<_> = services.iter().filter(|(k, _)| k.slot == 0).collect();
    masters.sort_by_key(|(k, _)| FrontendAddr::from_key(k));
    for (key, master) in masters {
        let fe = FrontendAddr::from_key(key);
        writeln!(
            out,
            "{}:{}/{} rev_nat={} backends={}",
            fe.addr,
            fe.port,
            proto_name(fe.proto),
            master.rev_nat_id,
            master.count
        )?;
        for slot in 1..=master.count {
            let id = services
                .get(&lb_common::ServiceKey { slot, ..*key })
                .map(|v| v.backend_id);
            match id.and_then(|id| backends.get(&id).map(|b| (id, BackendAddr::from_value(b)))) {
                Some((id, b)) => {
                    writeln!(out, "  slot {slot}: backend {id} {}:{}", b.addr, b.port)?
                }
                None => writeln!(out, "  slot {slot}: MISSING")?,
            }
        }
    }
    Ok(out)
}
