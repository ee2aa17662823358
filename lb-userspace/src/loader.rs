//! Loading the kernel object, pinning its maps under the agent's bpffs directory, and attaching
//! its programs to interfaces.
use std::{
    ffi::CString,
    mem::size_of,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

use aya::{
    maps::MapData,
    programs::{SchedClassifier, TcAttachType, Xdp},
    Ebpf, EbpfLoader,
};
use lb_common::{
    maglev::{MaglevChunk, MaglevKey},
    map_names, program_names, AffinityKey, AffinityValue, BackendValue, CtKey, CtValue,
    RejectBucket, RevNatValue, ServiceKey, ServiceValue, SockKey, SockValue, SourceRangeKey,
    TrafficCounters,
};

/// The kernel object built by build.rs (lb-ebpf, binary `lb`).
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb"));

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("creating bpffs directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("mounting bpffs at {path}: {source}")]
    Mount {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("statfs {path}: {source}")]
    Statfs {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "pinned map {path} has key size {found_key} and value size {found_value}, this agent expects \
         {want_key} and {want_value} (map layout version {abi}); it was written by an incompatible \
         agent: run `lb-agent cleanup --bpffs {dir}` or remove the pins, then start again"
    )]
    IncompatiblePin {
        path: PathBuf,
        dir: PathBuf,
        found_key: u32,
        found_value: u32,
        want_key: u32,
        want_value: u32,
        abi: u32,
    },
    #[error("opening pinned map {path}: {source}")]
    OpenPin {
        path: PathBuf,
        source: aya::maps::MapError,
    },
    #[error("removing pin {path}: {source}")]
    RemovePin {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "reject rate limit {}/s with burst {} is out of range: both must be at most {}",
        .0.per_sec, .0.burst, RejectLimit::MAX
    )]
    RejectLimit(RejectLimit),
    #[error("loading the eBPF object (maps pinned under {dir}): {source}")]
    Load {
        dir: PathBuf,
        source: Box<aya::EbpfError>,
    },
    #[error("program {0} is missing from the eBPF object")]
    MissingProgram(&'static str),
    #[error("loading program {name} into the kernel: {source}")]
    LoadProgram {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("attaching {name} to tc of {iface}: {source}")]
    Attach {
        name: &'static str,
        iface: String,
        source: aya::programs::ProgramError,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Makes sure `dir` is on a bpffs, mounting a fresh one there when it is not. Returns whether a
/// mount was made.
pub fn ensure_bpffs(dir: &Path) -> Result<bool> {
    // The default /sys/fs/bpf/lb sits below the standard bpffs mount point. When that is not
    // mounted (as on a fresh machine), nothing can be created inside sysfs: mount bpffs on the
    // standard point first, as systemd would have.
    let mut mounted = false;
    if !dir.exists() {
        let standard = Path::new(STANDARD_BPFFS);
        if dir.starts_with(standard) && standard.is_dir() && !is_bpffs(standard)? {
            mount_bpffs(standard)?;
            mounted = true;
        }
    }
    std::fs::create_dir_all(dir).map_err(|source| Error::CreateDir {
        path: dir.into(),
        source,
    })?;
    if is_bpffs(dir)? {
        return Ok(mounted);
    }
    mount_bpffs(dir)?;
    // Tells `lb-agent cleanup` that this mount is ours to remove (bpffs holds only pins and
    // directories, so the record is an empty directory).
    let marker = dir.join(MOUNT_MARKER);
    std::fs::create_dir(&marker).map_err(|source| Error::CreateDir {
        path: marker,
        source,
    })?;
    Ok(true)
}

/// Directory the agent creates in a bpffs it mounted itself on its `--bpffs` directory.
pub const MOUNT_MARKER: &str = "mounted_by_lb_agent";

/// Where systemd mounts bpffs.
const STANDARD_BPFFS: &str = "/sys/fs/bpf";

fn mount_bpffs(dir: &Path) -> Result<()> {
    let target = CString::new(dir.as_os_str().as_bytes()).expect("path without NUL");
    // SAFETY: all pointers are valid NUL-terminated strings for the duration of the call; the
    // data argument may be null for bpffs.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(Error::Mount {
            path: dir.into(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Whether `dir` is on a bpffs.
pub fn is_bpffs(dir: &Path) -> Result<bool> {
    let path = CString::new(dir.as_os_str().as_bytes()).expect("path without NUL");
    // SAFETY: statfs writes into the zeroed struct we own; `path` is a valid C string.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statfs(path.as_ptr(), &mut st) } != 0 {
        return Err(Error::Statfs {
            path: dir.into(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(st.f_type as i64 == BPF_FS_MAGIC)
}

/// The maps the agent pins, with the key and value sizes this build expects.
pub const PINNED_MAPS: [(&str, usize, usize); 12] = [
    (
        map_names::SERVICES,
        size_of::<ServiceKey>(),
        size_of::<ServiceValue>(),
    ),
    (
        map_names::BACKENDS,
        size_of::<u32>(),
        size_of::<BackendValue>(),
    ),
    (
        map_names::REV_NAT,
        size_of::<u16>(),
        size_of::<RevNatValue>(),
    ),
    (
        map_names::CONNTRACK,
        size_of::<CtKey>(),
        size_of::<CtValue>(),
    ),
    (
        map_names::FRONTEND_STATS,
        size_of::<u32>(),
        size_of::<TrafficCounters>(),
    ),
    (
        map_names::BACKEND_STATS,
        size_of::<u32>(),
        size_of::<TrafficCounters>(),
    ),
    (map_names::DROPS, size_of::<u32>(), size_of::<u64>()),
    (
        map_names::AFFINITY,
        size_of::<AffinityKey>(),
        size_of::<AffinityValue>(),
    ),
    (
        map_names::SOURCE_RANGES,
        // bpf_lpm_trie_key: a u32 prefix length, then the data.
        size_of::<u32>() + size_of::<SourceRangeKey>(),
        size_of::<u8>(),
    ),
    (
        map_names::REJECT_BUCKET,
        size_of::<u32>(),
        size_of::<RejectBucket>(),
    ),
    (
        map_names::MAGLEV,
        size_of::<MaglevKey>(),
        size_of::<MaglevChunk>(),
    ),
    (
        map_names::SOCK,
        size_of::<SockKey>(),
        size_of::<SockValue>(),
    ),
];

/// Refuses to reuse pins whose layout differs from this build's: the kernel would accept them and
/// the programs would read garbage.
pub fn check_pinned_layouts(dir: &Path) -> Result<()> {
    for (name, key, value) in PINNED_MAPS {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        let data = MapData::from_pin(&path).map_err(|source| Error::OpenPin {
            path: path.clone(),
            source,
        })?;
        let info = data.info().map_err(|source| Error::OpenPin {
            path: path.clone(),
            source,
        })?;
        if info.key_size() as usize != key || info.value_size() as usize != value {
            return Err(Error::IncompatiblePin {
                path,
                dir: dir.into(),
                found_key: info.key_size(),
                found_value: info.value_size(),
                want_key: key as u32,
                want_value: value as u32,
                abi: lb_common::ABI_VERSION,
            });
        }
    }
    Ok(())
}

/// The drop counters pinned by an agent from before the array grew to
/// [`drop_reason::COUNT`](lb_common::stats::drop_reason::COUNT) entries are unpinned, so that
/// the loader creates the array anew (their counts start again from zero; the programs still
/// running keep the old array until they are replaced).
fn retire_small_drops_map(dir: &Path) -> Result<()> {
    let path = dir.join(map_names::DROPS);
    if !path.exists() {
        return Ok(());
    }
    let data = MapData::from_pin(&path).map_err(|source| Error::OpenPin {
        path: path.clone(),
        source,
    })?;
    let info = data.info().map_err(|source| Error::OpenPin {
        path: path.clone(),
        source,
    })?;
    if info.max_entries() < lb_common::stats::drop_reason::COUNT {
        tracing::info!(
            path = %path.display(),
            entries = info.max_entries(),
            "the pinned drop counters have too few entries for this agent's reasons: recreating them"
        );
        std::fs::remove_file(&path).map_err(|source| Error::RemovePin {
            path: path.clone(),
            source,
        })?;
    }
    Ok(())
}

/// Limits on the answers to new flows for ServicePorts without endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RejectLimit {
    /// Answers each CPU may send per second (tokens added per second). 0: none are added, so a
    /// CPU sends at most `burst` answers in all (for tests).
    pub per_sec: u32,
    /// Answers a CPU may send back to back.
    pub burst: u32,
}

impl RejectLimit {
    /// Largest rate or burst accepted: keeps the kernel's token arithmetic far from overflowing.
    pub const MAX: u32 = 1_000_000;

    /// `per_sec` answers per second per CPU, with a burst of as many.
    pub fn per_second(per_sec: u32) -> Self {
        Self {
            per_sec,
            burst: per_sec,
        }
    }
}

impl Default for RejectLimit {
    fn default() -> Self {
        Self::per_second(lb_common::reject::DEFAULT_REJECT_RATE)
    }
}

/// Options for [`load`].
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// bpffs directory for the pins (must be on a bpffs: see [`ensure_bpffs`]).
    pub bpffs: PathBuf,
    /// Conntrack capacity; only takes effect when the map is created (not when adopted).
    pub conntrack_size: u32,
    /// Rate limit of rejects, fixed in the programs at load time.
    pub reject_limit: RejectLimit,
    /// Maglev table size `M` (validated prime by the caller): given to the programs, and sizes
    /// the chunk map when it is created.
    pub maglev_table_size: u32,
}

/// Loads the object with every map pinned under `opts.bpffs` (reusing pins that exist, so a
/// restarted agent keeps conntrack and service state) and loads the tc program into the kernel.
pub fn load(opts: &LoadOptions) -> Result<Ebpf> {
    check_pinned_layouts(&opts.bpffs)?;
    retire_small_drops_map(&opts.bpffs)?;
    let limit = opts.reject_limit;
    if limit.per_sec > RejectLimit::MAX || limit.burst > RejectLimit::MAX {
        return Err(Error::RejectLimit(limit));
    }
    let paths: Vec<(&str, PathBuf)> = PINNED_MAPS
        .iter()
        .map(|(n, _, _)| (*n, opts.bpffs.join(n)))
        .collect();
    let maglev_size = opts.maglev_table_size;
    let mut loader = EbpfLoader::new();
    loader.override_global(lb_common::MAGLEV_TABLE_SIZE_GLOBAL, &maglev_size, true);
    loader.map_max_entries(
        map_names::MAGLEV,
        lb_common::map_sizes::MAGLEV_TABLES * lb_common::maglev::chunks(maglev_size),
    );
    for (name, path) in &paths {
        loader.map_pin_path(name, path.as_path());
    }
    loader.map_max_entries(map_names::CONNTRACK, opts.conntrack_size);
    loader.override_global("REJECT_RATE", &limit.per_sec, true);
    loader.override_global("REJECT_BURST", &limit.burst, true);
    // The host-process socket hooks serve this (the node's) network namespace only.
    let netns_cookie = current_netns_cookie();
    if netns_cookie == 0 {
        tracing::warn!(
            "cannot read this network namespace's cookie (SO_NETNS_COOKIE, Linux 5.14+): the \
             host-process socket hooks translate sockets of every namespace in --cgroup, pods \
             included"
        );
    }
    loader.override_global(HOST_NETNS_COOKIE, &netns_cookie, true);
    let mut ebpf = loader.load(EBPF_OBJECT).map_err(|source| Error::Load {
        dir: opts.bpffs.clone(),
        source: Box::new(source),
    })?;
    tc_program(&mut ebpf)?
        .load()
        .map_err(|source| Error::LoadProgram {
            name: program_names::TC_INGRESS,
            source,
        })?;
    tc_egress_program(&mut ebpf)?
        .load()
        .map_err(|source| Error::LoadProgram {
            name: program_names::TC_EGRESS,
            source,
        })?;
    xdp_program(&mut ebpf)?
        .load()
        .map_err(|source| Error::LoadProgram {
            name: program_names::XDP,
            source,
        })?;
    Ok(ebpf)
}

/// The global of the kernel object holding the network namespace the socket hooks serve.
const HOST_NETNS_COOKIE: &str = "HOST_NETNS_COOKIE";

/// The cookie of the calling thread's network namespace, 0 if the kernel cannot tell.
pub fn current_netns_cookie() -> u64 {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    // SAFETY: plain socket(2); closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return 0;
    }
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `cookie`, which outlives the call.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            &mut cookie as *mut u64 as *mut libc::c_void,
            &mut len,
        )
    };
    // SAFETY: `fd` is ours.
    unsafe { libc::close(fd) };
    if rc != 0 {
        return 0;
    }
    cookie
}

/// The XDP program of a loaded object (external traffic on uplinks).
pub fn xdp_program(ebpf: &mut Ebpf) -> Result<&mut Xdp> {
    ebpf.program_mut(program_names::XDP)
        .and_then(|p| p.try_into().ok())
        .ok_or(Error::MissingProgram(program_names::XDP))
}

/// The tc egress program of a loaded object (reverse NAT of replies into pods).
pub fn tc_egress_program(ebpf: &mut Ebpf) -> Result<&mut SchedClassifier> {
    ebpf.program_mut(program_names::TC_EGRESS)
        .and_then(|p| p.try_into().ok())
        .ok_or(Error::MissingProgram(program_names::TC_EGRESS))
}

/// The tc ingress program of a loaded object.
pub fn tc_program(ebpf: &mut Ebpf) -> Result<&mut SchedClassifier> {
    ebpf.program_mut(program_names::TC_INGRESS)
        .and_then(|p| p.try_into().ok())
        .ok_or(Error::MissingProgram(program_names::TC_INGRESS))
}

/// Attaches the ingress and egress programs to `iface` for the lifetime of the `Ebpf` (no pins):
/// the fallback for kernels without TCX, where aya uses netlink tc filters on a clsact qdisc.
pub fn attach_tc(ebpf: &mut Ebpf, iface: &str) -> Result<()> {
    if !aya::util::KernelVersion::current()
        .is_ok_and(|v| v >= aya::util::KernelVersion::new(6, 6, 0))
    {
        // Netlink filters need the qdisc; "exists" is fine.
        let _ = aya::programs::tc::qdisc_add_clsact(iface);
    }
    let attach_error = |name: &'static str| {
        let iface = iface.to_string();
        move |source| Error::Attach {
            name,
            iface,
            source,
        }
    };
    tc_program(ebpf)?
        .attach(iface, TcAttachType::Ingress)
        .map_err(attach_error(program_names::TC_INGRESS))?;
    tc_egress_program(ebpf)?
        .attach(iface, TcAttachType::Egress)
        .map_err(attach_error(program_names::TC_EGRESS))?;
    Ok(())
}

/// Interfaces the agent attaches to when none are named: the host ends of veth pairs, which is
/// what pod interfaces look like from the node. A veth is recognised by `/sys/class/net/X/device`
/// being absent and `iflink` differing from `ifindex` (it names the peer).
pub fn detect_pod_interfaces() -> Vec<String> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/sys/class/net") else {
        return out;
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        let read = |f: &str| {
            std::fs::read_to_string(dir.join(f))
                .map(|s| s.trim().to_string())
                .ok()
        };
        let is_veth = std::fs::read_link(dir.join("device")).is_err()
            && read("type").as_deref() == Some("1")
            && read("iflink").is_some()
            && read("iflink") != read("ifindex");
        if is_veth {
            out.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    out.sort();
    out
}
