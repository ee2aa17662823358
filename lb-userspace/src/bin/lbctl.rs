//! lbctl: inspects the pinned maps directly, so it works while the agent is down.
use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::Result;
use clap::{Parser, Subcommand, ValueEnum};
use lb_userspace::{dataplane::bpf::BpfMaps, inspect, trace, upgrade};

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
    /// Output format.
    #[arg(long, short, global = true, value_enum, default_value_t = Output::Text)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Frontends and their backends with active and inactive connections (like `ipvsadm -Ln`).
    Services,
    /// Packets, bytes and new flows per frontend and backend (like `ipvsadm -Ln --stats`).
    Stats,
    /// Tracked flows, optionally filtered.
    Conntrack {
        /// Only flows to this frontend (address, or address:port).
        #[arg(long)]
        frontend: Option<String>,
        /// Only flows given this backend (address, or address:port).
        #[arg(long)]
        backend: Option<String>,
        /// Only flows from this client address.
        #[arg(long)]
        client: Option<IpAddr>,
    },
    /// Canonical, sorted dump of frontends (scope, flags, rev_nat id) and their backend slots
    /// (stable, diffable: no counters, no conntrack).
    Dump,
    /// Which frontend and backend a packet would hit, and why: runs the real program on a
    /// synthesized packet against the live maps, leaving no conntrack entry or counter behind.
    Trace {
        /// Source `ADDR` or `ADDR:PORT` (port 40000 if omitted).
        source: String,
        /// Destination `ADDR:PORT/PROTO`, PROTO `tcp` (default) or `udp`.
        destination: String,
    },
}

fn main() -> Result<()> {
    let args = Args::parse();
    let json = matches!(args.output, Output::Json);
    check_layout(&args.bpffs)?;
    match args.command {
        Command::Dump => {
            let maps = BpfMaps::from_pins(&args.bpffs)?;
            let frontends = inspect::dump(&maps)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&frontends)?);
            } else {
                print!("{}", inspect::dump_text(&frontends));
            }
        }
        Command::Services => {
            let s = inspect::read(&args.bpffs)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s.frontends)?);
            } else {
                print!("{}", inspect::services_table(&s));
            }
        }
        Command::Stats => {
            let s = inspect::read(&args.bpffs)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s.frontends)?);
            } else {
                print!("{}", inspect::stats_table(&s));
            }
        }
        Command::Trace {
            source,
            destination,
        } => {
            let Some(src) = trace::parse_source(&source) else {
                anyhow::bail!("source {source:?}: expected ADDR or ADDR:PORT (IPv4)");
            };
            let Some((dst, protocol)) = trace::parse_destination(&destination) else {
                anyhow::bail!(
                    "destination {destination:?}: expected ADDR:PORT/tcp or ADDR:PORT/udp (IPv4)"
                );
            };
            let t = trace::trace(&args.bpffs, src, dst, protocol)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&t)?);
            } else {
                println!(
                    "{} {} -> {}: {}",
                    t.protocol, t.source, t.destination, t.verdict
                );
                println!("  {}", t.reason);
            }
        }
        Command::Conntrack {
            frontend,
            backend,
            client,
        } => {
            let s = inspect::read(&args.bpffs)?;
            let matches = |filter: &Option<String>, addr: std::net::SocketAddrV4| match filter {
                None => true,
                Some(f) => f == &addr.to_string() || f == &addr.ip().to_string(),
            };
            let flows: Vec<&inspect::FlowView> = s
                .flows
                .iter()
                .filter(|f| matches(&frontend, f.frontend) && matches(&backend, f.backend))
                .filter(|f| client.is_none_or(|c| c == IpAddr::V4(*f.client.ip())))
                .collect();
            if json {
                println!("{}", serde_json::to_string_pretty(&flows)?);
            } else {
                print!("{}", inspect::conntrack_table(&flows));
            }
        }
    }
    Ok(())
}

/// Refuses pins of another map layout: read with this lbctl's types they would show garbage.
fn check_layout(dir: &Path) -> Result<()> {
    let Some(found) = upgrade::pinned_version(dir)? else {
        anyhow::bail!(
            "nothing of lb-agent is pinned under {}: is the agent's --bpffs elsewhere (pass it \
             with --bpffs), or has it never run on this node?",
            dir.display()
        );
    };
    let ours = lb_common::ABI_VERSION;
    if found == ours {
        return Ok(());
    }
    let fix = if found < ours {
        format!(
            "start the newer lb-agent (it migrates the maps to version {ours}), or use the lbctl \
             shipped with the agent that pinned them"
        )
    } else {
        format!("use the lbctl shipped with the agent that pinned them (version {found} or newer)")
    };
    anyhow::bail!(
        "the maps pinned under {} have layout version {found}, but this lbctl reads layout \
         version {ours}: {fix}",
        dir.display()
    )
}
