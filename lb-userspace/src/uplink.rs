//! XDP on the node's uplinks: the external-traffic program, attached through pinned bpf_links so
//! it keeps serving while the agent restarts, and adopted (`BPF_LINK_UPDATE`) by the next agent.
//!
//! ```text
//! <bpffs>/links-xdp/<ifname>     one pinned XDP link per uplink
//! ```
//!
//! Native (driver) mode is tried first and generic (skb) mode is the fallback; the log says which
//! one an uplink got. Each uplink also gets `accept_local=1`: when the next hop of a translated
//! packet is not resolved yet, the program hands the packet to the stack, and that packet's
//! source is one of the node's own addresses, which the stack would otherwise drop as martian.
use std::{
    io,
    path::{Path, PathBuf},
};

use aya::programs::{
    links::{FdLink, LinkError, PinnedLink},
    xdp::XdpLink,
    ProgramError, Xdp, XdpMode,
};
use tracing::{info, warn};

use crate::attach;

/// Directory (under the bpffs dir) of the pinned XDP links, one per uplink.
pub const XDP_LINK_PIN_DIR: &str = "links-xdp";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("uplink {0} does not exist")]
    NoInterface(String),
    #[error("attaching the XDP program to uplink {iface}: native mode: {native}; generic mode: {source}")]
    Attach {
        iface: String,
        native: Box<ProgramError>,
        source: Box<ProgramError>,
    },
    #[error(
        "attaching the XDP program to uplink {iface} in native mode (--xdp-mode native): {source}"
    )]
    AttachNative {
        iface: String,
        source: Box<ProgramError>,
    },
    #[error("attaching the XDP program to uplink {iface} in generic mode: {source}")]
    AttachGeneric {
        iface: String,
        source: Box<ProgramError>,
    },
    #[error("the XDP attachment of {iface} is not a bpf_link (kernel too old?): {source}")]
    NotLink { iface: String, source: LinkError },
    #[error("pinning the XDP link of {iface} at {path}: {source}")]
    Pin {
        iface: String,
        path: PathBuf,
        source: aya::pin::PinError,
    },
    #[error("opening the pinned XDP link {path}: {source}")]
    OpenLink { path: PathBuf, source: LinkError },
    #[error("pointing the pinned XDP link {path} at the new program: {source}")]
    UpdateLink {
        path: PathBuf,
        source: Box<ProgramError>,
    },
    #[error("setting {key}: {source}")]
    Sysctl { key: String, source: io::Error },
    #[error(transparent)]
    Pins(#[from] attach::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Which XDP mode to attach in (`--xdp-mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum XdpModeArg {
    /// Native (driver) mode, generic when the driver has none.
    Auto,
    /// Native only: fail when the driver cannot.
    Native,
    /// Generic (skb) mode only.
    Generic,
}

/// How an uplink runs the program.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Native,
    Generic,
    /// A pinned link from an earlier agent was pointed at this agent's program.
    Adopted,
}

/// `<bpffs>/links-xdp/<iface>`.
pub fn link_pin_path(bpffs: &Path, iface: &str) -> PathBuf {
    bpffs.join(XDP_LINK_PIN_DIR).join(iface.replace('.', ":"))
}

/// Attaches `program` to every uplink (or adopts the pinned link already there) and logs the
/// mode of each. Pins of uplinks that are not named any more are left alone: `lb-agent
/// cleanup` or `--on-exit detach` removes them.
pub fn attach_all(
    program: &mut Xdp,
    bpffs: &Path,
    uplinks: &[String],
    mode: XdpModeArg,
) -> Result<()> {
    if uplinks.is_empty() {
        warn!(
            "no uplink: NodePort, LoadBalancer and externalIP traffic from outside this node is \
             not served (name the node's external interfaces with --uplink)"
        );
    }
    for iface in uplinks {
        let outcome = attach_one(program, bpffs, iface, mode)?;
        let key = format!("net.ipv4.conf.{iface}.accept_local");
        set_sysctl(&key, "1")?;
        match outcome {
            Outcome::Native => info!(iface, "XDP attached in native (driver) mode"),
            Outcome::Generic => warn!(
                iface,
                "XDP attached in generic (skb) mode: the driver has no native XDP; external \
                 traffic is served, more slowly"
            ),
            Outcome::Adopted => info!(
                iface,
                "XDP link from the previous agent now runs this agent's program"
            ),
        }
    }
    Ok(())
}

fn attach_one(program: &mut Xdp, bpffs: &Path, iface: &str, mode: XdpModeArg) -> Result<Outcome> {
    let ifindex = attach::ifindex(iface).ok_or_else(|| Error::NoInterface(iface.into()))?;
    let path = link_pin_path(bpffs, iface);
    if attach::pinned_link_ifindex(&path)? == Some(ifindex) {
        let pinned = PinnedLink::from_pin(&path).map_err(|source| Error::OpenLink {
            path: path.clone(),
            source,
        })?;
        let link = XdpLink::try_from(FdLink::from(pinned)).map_err(|source| Error::OpenLink {
            path: path.clone(),
            source,
        })?;
        let id = program
            .attach_to_link(link)
            .map_err(|source| Error::UpdateLink {
                path: path.clone(),
                source: Box::new(source),
            })?;
        // The pin keeps the link; drop our descriptor.
        drop(program.take_link(id).map_err(|source| Error::UpdateLink {
            path,
            source: Box::new(source),
        })?);
        return Ok(Outcome::Adopted);
    }
    // A pin of a vanished (or renamed) interface: its link is detached already or must go.
    attach::unpin(&path)?;
    let veth = driver(iface).as_deref() == Some("veth");
    let native = match mode {
        XdpModeArg::Generic => None,
        XdpModeArg::Auto if veth => {
            info!(
                iface,
                "uplink is a veth: using generic XDP (native XDP_TX on a veth needs its peer, \
                 which this node does not own, to be set up for it; see docs/ARCHITECTURE.md)"
            );
            None
        }
        _ => Some(program.attach(iface, XdpMode::Driver)),
    };
    let (id, outcome) = match native {
        Some(Ok(id)) => (id, Outcome::Native),
        Some(Err(source)) if mode == XdpModeArg::Native => {
            return Err(Error::AttachNative {
                iface: iface.into(),
                source: Box::new(source),
            })
        }
        None => match program.attach(iface, XdpMode::Skb) {
            Ok(id) => (id, Outcome::Generic),
            Err(source) => {
                return Err(Error::AttachGeneric {
                    iface: iface.into(),
                    source: Box::new(source),
                })
            }
        },
        Some(Err(native)) => match program.attach(iface, XdpMode::Skb) {
            Ok(id) => (id, Outcome::Generic),
            Err(source) => {
                return Err(Error::Attach {
                    iface: iface.into(),
                    native: Box::new(native),
                    source: Box::new(source),
                })
            }
        },
    };
    let link = program.take_link(id).map_err(|source| Error::UpdateLink {
        path: path.clone(),
        source: Box::new(source),
    })?;
    let fd_link = FdLink::try_from(link).map_err(|source| Error::NotLink {
        iface: iface.into(),
        source,
    })?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| attach::Error::CreateDir {
            path: dir.into(),
            source,
        })?;
    }
    fd_link.pin(&path).map_err(|source| Error::Pin {
        iface: iface.into(),
        path,
        source,
    })?;
    Ok(outcome)
}

/// Detaches every pinned XDP link under `bpffs`; returns the uplinks detached.
pub fn detach_all(bpffs: &Path) -> Result<Vec<String>> {
    let dir = bpffs.join(XDP_LINK_PIN_DIR);
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok(out);
    };
    for entry in entries.flatten() {
        if attach::unpin(&entry.path())? {
            out.push(entry.file_name().to_string_lossy().replace(':', "."));
        }
    }
    Ok(out)
}

/// Interfaces that carry an IPv4 default route in this network namespace: the uplinks when
/// none are named.
pub fn detect() -> Vec<String> {
    let Ok(table) = std::fs::read_to_string("/proc/net/route") else {
        return Vec::new();
    };
    let mut out: Vec<String> = table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 7 && f[1] == "00000000" && f[7] == "00000000").then(|| f[0].to_string())
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The kernel driver of `iface` (ETHTOOL_GDRVINFO), e.g. "veth"; `None` if it cannot be read.
fn driver(iface: &str) -> Option<String> {
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        rest: [u8; 160],
    }
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        data: *mut DrvInfo,
        _pad: [u8; 16],
    }
    const ETHTOOL_GDRVINFO: u32 = 3;
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    if iface.len() >= 16 {
        return None;
    }
    let mut info = DrvInfo {
        cmd: ETHTOOL_GDRVINFO,
        driver: [0; 32],
        rest: [0; 160],
    };
    let mut req = IfReq {
        name: [0; 16],
        data: &mut info,
        _pad: [0; 16],
    };
    req.name[..iface.len()].copy_from_slice(iface.as_bytes());
    // SAFETY: a datagram socket for the ioctl, closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: SIOCETHTOOL reads the ifreq and writes at most sizeof(ethtool_drvinfo) (196
    // bytes) into `info`, both alive for the call.
    let rc = unsafe { libc::ioctl(fd, SIOCETHTOOL, &mut req as *mut IfReq) };
    // SAFETY: `fd` is ours.
    unsafe { libc::close(fd) };
    if rc != 0 {
        return None;
    }
    let end = info.driver.iter().position(|&b| b == 0).unwrap_or(32);
    Some(String::from_utf8_lossy(&info.driver[..end]).into_owned())
}

fn set_sysctl(key: &str, value: &str) -> Result<()> {
    let path = Path::new("/proc/sys").join(key.replace('.', "/"));
    std::fs::write(&path, value).map_err(|source| Error::Sysctl {
        key: key.into(),
        source,
    })
}
