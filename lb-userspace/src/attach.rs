//! Attachments of the tc program to pod interfaces that outlive the process that made them.
//!
//! Layout under the agent's bpffs directory:
//!
//! ```text
//! <bpffs>/progs/lb_tc_ingress         the loaded tc programs, pinned by the agent at every start
//! <bpffs>/progs/lb_tc_egress
//! <bpffs>/links/<ifname>              one pinned TCX ingress link per attached interface
//! <bpffs>/links-egress/<ifname>       and one egress link (reverse NAT of replies into the pod)
//! ```
//!
//! An interface counts as attached only with both links; every function here handles the pair.
//!
//! A TCX link is detached when its last reference goes: the pin is that reference, so a link
//! made by a short-lived process (`lb-cni`) stays attached after it exits, and removing the pin
//! detaches it. The agent and `lb-cni` both go through [`attach_pinned`], which creates the pin
//! under an exclusive lock on `links/` after checking for one: whoever comes first attaches, the
//! other finds the pin and leaves the interface alone, so an interface never runs the program
//! twice. Pins are named after the host interface (readable in `ls`), and every use checks that
//! the pinned link is still attached to the interface of that name (same ifindex): names are
//! reused when pods come and go, and the kernel detaches a TCX link when its interface vanishes.
use std::{
    ffi::CString,
    fs::File,
    io,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use aya::{
    pin::PinError,
    programs::{
        links::{FdLink, LinkError, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
        LinkOrder, ProgramError, SchedClassifier, TcAttachType,
    },
    util::KernelVersion,
};
use lb_common::program_names;

/// Directory (under the bpffs dir) of the pinned program.
pub const PROGRAM_PIN_DIR: &str = "progs";
/// Directory (under the bpffs dir) of the pinned ingress links, one per interface.
pub const LINK_PIN_DIR: &str = "links";
/// Directory (under the bpffs dir) of the pinned egress links, one per interface.
pub const EGRESS_LINK_PIN_DIR: &str = "links-egress";

/// One of the two attachments of an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hook {
    Ingress,
    Egress,
}

impl Hook {
    const BOTH: [Hook; 2] = [Hook::Ingress, Hook::Egress];

    fn program_name(self) -> &'static str {
        match self {
            Hook::Ingress => program_names::TC_INGRESS,
            Hook::Egress => program_names::TC_EGRESS,
        }
    }

    fn link_dir(self) -> &'static str {
        match self {
            Hook::Ingress => LINK_PIN_DIR,
            Hook::Egress => EGRESS_LINK_PIN_DIR,
        }
    }

    fn attach_type(self) -> TcAttachType {
        match self {
            Hook::Ingress => TcAttachType::Ingress,
            Hook::Egress => TcAttachType::Egress,
        }
    }

    fn kernel_attach_type(self) -> u32 {
        match self {
            Hook::Ingress => BPF_TCX_INGRESS,
            Hook::Egress => BPF_TCX_EGRESS,
        }
    }

    fn link_pin_path(self, bpffs: &Path, iface: &str) -> PathBuf {
        bpffs.join(self.link_dir()).join(iface.replace('.', ":"))
    }

    fn program_pin_path(self, bpffs: &Path) -> PathBuf {
        bpffs.join(PROGRAM_PIN_DIR).join(self.program_name())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "the tc program is not pinned at {path}: the agent is not running (or has not started \
         yet) with --bpffs {bpffs}"
    )]
    ProgramPinMissing { path: PathBuf, bpffs: PathBuf },
    #[error("opening the pinned program {path}: {source}")]
    OpenProgramPin { path: PathBuf, source: ProgramError },
    #[error("pinning the tc program at {path}: {source}")]
    PinProgram { path: PathBuf, source: PinError },
    #[error("replacing the program pin {path}: {source}")]
    ReplaceProgramPin { path: PathBuf, source: io::Error },
    #[error("creating {path}: {source}")]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("locking {path}: {source}")]
    Lock { path: PathBuf, source: io::Error },
    #[error("interface {iface} does not exist")]
    NoInterface { iface: String },
    #[error(
        "pinned links need TCX (Linux 6.6 or later); this kernel is {kernel}: attach with the \
         agent's --iface instead, which falls back to netlink tc filters"
    )]
    TcxUnsupported { kernel: String },
    #[error("attaching {program} to tc of {iface} (TCX): {source}")]
    Attach {
        program: &'static str,
        iface: String,
        source: ProgramError,
    },
    #[error("pinning the TCX link of {iface} at {path}: {source}")]
    PinLink {
        iface: String,
        path: PathBuf,
        source: PinError,
    },
    #[error("the link made for {iface} is not a TCX link: {source}")]
    NotTcxLink { iface: String, source: LinkError },
    #[error("reading the pinned link {path}: {source}")]
    ReadLink { path: PathBuf, source: io::Error },
    #[error("removing the pinned link {path}: {source}")]
    Unpin { path: PathBuf, source: io::Error },
    #[error("pointing the pinned link {path} at the new program: {source}")]
    UpdateLink { path: PathBuf, source: ProgramError },
    #[error("opening the pinned link {path}: {source}")]
    OpenLink { path: PathBuf, source: LinkError },
    #[error("listing {path}: {source}")]
    ListLinks { path: PathBuf, source: io::Error },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// `<bpffs>/progs/lb_tc_ingress`.
pub fn program_pin_path(bpffs: &Path) -> PathBuf {
    Hook::Ingress.program_pin_path(bpffs)
}

/// `<bpffs>/progs/lb_tc_egress`.
pub fn egress_program_pin_path(bpffs: &Path) -> PathBuf {
    Hook::Egress.program_pin_path(bpffs)
}

/// `<bpffs>/links/<ifname>`, with `.` written as `:`: bpffs refuses names containing a dot
/// (VLAN interfaces have one), and `:` cannot occur in an interface name.
pub fn link_pin_path(bpffs: &Path, iface: &str) -> PathBuf {
    Hook::Ingress.link_pin_path(bpffs, iface)
}

/// Whether this kernel has TCX (6.6+), which pinned links need.
pub fn tcx_supported() -> bool {
    KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0))
}

/// Pins the agent's freshly loaded program at [`program_pin_path`], replacing an earlier agent's
/// pin atomically: pin under a temporary name, then rename over the old one, so `lb-cni` never
/// finds the path missing while an agent restarts.
pub fn pin_program(program: &mut SchedClassifier, bpffs: &Path) -> Result<PathBuf> {
    pin_hook_program(program, bpffs, Hook::Ingress)
}

/// Pins the agent's egress program at [`egress_program_pin_path`], as [`pin_program`] does.
pub fn pin_egress_program(program: &mut SchedClassifier, bpffs: &Path) -> Result<PathBuf> {
    pin_hook_program(program, bpffs, Hook::Egress)
}

fn pin_hook_program(program: &mut SchedClassifier, bpffs: &Path, hook: Hook) -> Result<PathBuf> {
    let dir = bpffs.join(PROGRAM_PIN_DIR);
    create_dir(&dir)?;
    let path = hook.program_pin_path(bpffs);
    // No dot in the name: bpffs refuses those.
    let tmp = dir.join(format!(
        "{}-new-{}",
        hook.program_name(),
        std::process::id()
    ));
    // A leftover from a killed agent with the same pid would make the pin fail with EEXIST.
    let _ = std::fs::remove_file(&tmp);
    program.pin(&tmp).map_err(|source| Error::PinProgram {
        path: tmp.clone(),
        source,
    })?;
    std::fs::rename(&tmp, &path).map_err(|source| {
        let _ = std::fs::remove_file(&tmp);
        Error::ReplaceProgramPin {
            path: path.clone(),
            source,
        }
    })?;
    Ok(path)
}

/// Opens the program the agent pinned (what `lb-cni` attaches).
pub fn pinned_program(bpffs: &Path) -> Result<SchedClassifier> {
    pinned_hook_program(bpffs, Hook::Ingress)
}

fn pinned_hook_program(bpffs: &Path, hook: Hook) -> Result<SchedClassifier> {
    let path = hook.program_pin_path(bpffs);
    if !path.exists() {
        return Err(Error::ProgramPinMissing {
            path,
            bpffs: bpffs.into(),
        });
    }
    SchedClassifier::from_pin(&path).map_err(|source| Error::OpenProgramPin { path, source })
}

/// What [`attach_pinned`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachOutcome {
    /// A new link was made and pinned.
    Attached,
    /// A pinned link already attaches the program to this interface; nothing was changed.
    AlreadyAttached,
}

/// Attaches `program` to the TCX ingress of `iface` and the agent's pinned egress program to its
/// egress, pinning both links ([`link_pin_path`] and its `links-egress` twin), unless pinned
/// links already serve this interface. A pin of the same name that serves another interface (the
/// name was reused, or the interface is gone) is replaced. Returns `Attached` when either link
/// had to be made.
pub fn attach_pinned(
    program: &mut SchedClassifier,
    bpffs: &Path,
    iface: &str,
) -> Result<AttachOutcome> {
    if !tcx_supported() {
        return Err(Error::TcxUnsupported {
            kernel: KernelVersion::current()
                .map(|v| v.to_string())
                .unwrap_or_else(|e| format!("unknown ({e})")),
        });
    }
    let _lock = LinksLock::acquire(bpffs)?;
    let ifindex = ifindex(iface).ok_or_else(|| Error::NoInterface {
        iface: iface.into(),
    })?;
    let ingress = attach_hook(program, bpffs, iface, ifindex, Hook::Ingress)?;
    let mut egress_program = pinned_hook_program(bpffs, Hook::Egress)?;
    let egress = attach_hook(&mut egress_program, bpffs, iface, ifindex, Hook::Egress)?;
    Ok(
        if ingress == AttachOutcome::Attached || egress == AttachOutcome::Attached {
            AttachOutcome::Attached
        } else {
            AttachOutcome::AlreadyAttached
        },
    )
}

/// One link of [`attach_pinned`]; the caller holds the links lock.
fn attach_hook(
    program: &mut SchedClassifier,
    bpffs: &Path,
    iface: &str,
    ifindex: u32,
    hook: Hook,
) -> Result<AttachOutcome> {
    let path = hook.link_pin_path(bpffs, iface);
    if let Some(existing) = read_pinned_link(&path)? {
        if existing.ifindex == ifindex && existing.is_tcx(hook) {
            return Ok(AttachOutcome::AlreadyAttached);
        }
        // The name belongs to another interface now. A link of a vanished interface is already
        // detached; one of a live (renamed) interface would keep running unpinned here, so it
        // is detached too: the owner of that interface re-attaches under its current name.
        unpin(&path)?;
    }
    create_dir(&bpffs.join(hook.link_dir()))?;
    let link_id = program
        .attach_with_options(
            iface,
            hook.attach_type(),
            TcAttachOptions::TcxOrder(LinkOrder::default()),
        )
        .map_err(|source| Error::Attach {
            program: hook.program_name(),
            iface: iface.into(),
            source,
        })?;
    let link = program.take_link(link_id).map_err(|source| Error::Attach {
        program: hook.program_name(),
        iface: iface.into(),
        source,
    })?;
    let fd_link = FdLink::try_from(link).map_err(|source| Error::NotTcxLink {
        iface: iface.into(),
        source,
    })?;
    // Dropping the returned PinnedLink closes our descriptor: from now on the pin alone holds
    // the link, so removing it detaches at once.
    fd_link.pin(&path).map_err(|source| Error::PinLink {
        iface: iface.into(),
        path,
        source,
    })?;
    Ok(AttachOutcome::Attached)
}

/// Removes the pin of `iface`, which detaches it. Returns whether there was one; a missing
/// bpffs directory or pin is not an error (DEL must tolerate what is already gone).
pub fn detach_pinned(bpffs: &Path, iface: &str) -> Result<bool> {
    if !bpffs.join(LINK_PIN_DIR).is_dir() {
        return Ok(false);
    }
    let _lock = LinksLock::acquire(bpffs)?;
    let mut removed = false;
    for hook in Hook::BOTH {
        removed |= unpin(&hook.link_pin_path(bpffs, iface))?;
    }
    Ok(removed)
}

/// The state of an interface's attachment, as CHECK reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attachment {
    /// The pinned link attaches a program to this interface's TCX ingress.
    Attached { program_id: u32 },
    /// No attachment: the reason says which part is missing.
    Missing(String),
}

/// Whether `iface` is attached through its pins (both links).
pub fn check_pinned(bpffs: &Path, iface: &str) -> Result<Attachment> {
    let Some(ifindex) = ifindex(iface) else {
        return Ok(Attachment::Missing(format!(
            "interface {iface} does not exist"
        )));
    };
    let mut program_id = 0;
    for hook in Hook::BOTH {
        let path = hook.link_pin_path(bpffs, iface);
        let direction = match hook {
            Hook::Ingress => "ingress",
            Hook::Egress => "egress",
        };
        match read_pinned_link(&path)? {
            None => {
                return Ok(Attachment::Missing(format!(
                    "no pinned {direction} link at {}",
                    path.display()
                )))
            }
            Some(link) if link.ifindex == 0 => {
                return Ok(Attachment::Missing(format!(
                    "the link pinned at {} is no longer attached to any interface",
                    path.display()
                )))
            }
            Some(link) if link.ifindex != ifindex || !link.is_tcx(hook) => {
                return Ok(Attachment::Missing(format!(
                    "the link pinned at {} is attached to ifindex {} (attach type {}), not to the \
                     tc {direction} of {iface} (ifindex {ifindex})",
                    path.display(),
                    link.ifindex,
                    link.attach_type
                )))
            }
            Some(link) => {
                if hook == Hook::Ingress {
                    program_id = link.program_id;
                }
            }
        }
    }
    Ok(Attachment::Attached { program_id })
}

/// Removes the pin of `iface` if its link no longer serves that interface (it vanished, or the
/// name now belongs to another one). Returns whether a pin was removed.
pub fn remove_if_stale(bpffs: &Path, iface: &str) -> Result<bool> {
    if !bpffs.join(LINK_PIN_DIR).is_dir() {
        return Ok(false);
    }
    let _lock = LinksLock::acquire(bpffs)?;
    let mut removed = false;
    for hook in Hook::BOTH {
        let path = hook.link_pin_path(bpffs, iface);
        removed |= match read_pinned_link(&path)? {
            Some(link) if link.ifindex == 0 || ifindex(iface) != Some(link.ifindex) => {
                unpin(&path)?
            }
            _ => false,
        };
    }
    Ok(removed)
}

/// Removes every pin whose link no longer serves the interface it is named after; returns the
/// names removed. Interfaces vanish without a DEL (a node reboot of the runtime, a crash), so
/// DEL and the agent sweep.
pub fn sweep_stale(bpffs: &Path) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    for iface in pinned_interfaces(bpffs)? {
        if remove_if_stale(bpffs, &iface)? {
            removed.push(iface);
        }
    }
    Ok(removed)
}

/// Names of the interfaces with a pin under `links/` or `links-egress/`.
pub fn pinned_interfaces(bpffs: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for hook in Hook::BOTH {
        names.extend(pinned_in(bpffs, hook)?);
    }
    names.sort();
    names.dedup();
    Ok(names)
}

fn pinned_in(bpffs: &Path, hook: Hook) -> Result<Vec<String>> {
    let dir = bpffs.join(hook.link_dir());
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(Error::ListLinks { path: dir, source }),
    };
    Ok(entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().replace(':', "."))
        .collect())
}

/// Points every live pinned link at `program` (a restarted agent's new program) in one
/// `BPF_LINK_UPDATE` each, so upgrades never leave an interface without the program, and removes
/// the pins of links that are no longer attached. Returns how many links were updated.
pub fn adopt_pinned_links(program: &mut SchedClassifier, bpffs: &Path) -> Result<usize> {
    sweep_stale(bpffs)?;
    let _lock = LinksLock::acquire(bpffs)?;
    let mut updated = adopt_hook(program, bpffs, Hook::Ingress)?;
    if !pinned_in(bpffs, Hook::Egress)?.is_empty() {
        let mut egress = pinned_hook_program(bpffs, Hook::Egress)?;
        updated += adopt_hook(&mut egress, bpffs, Hook::Egress)?;
    }
    Ok(updated)
}

/// Points the live pinned links of one hook at `program`; the caller holds the links lock.
fn adopt_hook(program: &mut SchedClassifier, bpffs: &Path, hook: Hook) -> Result<usize> {
    let mut updated = 0;
    for iface in pinned_in(bpffs, hook)? {
        let path = hook.link_pin_path(bpffs, &iface);
        let update_error = |source| Error::UpdateLink {
            path: path.clone(),
            source,
        };
        let pinned = match PinnedLink::from_pin(&path) {
            Ok(pinned) => pinned,
            // Removed since we listed it.
            Err(LinkError::SyscallError(e)) if e.io_error.kind() == io::ErrorKind::NotFound => {
                continue
            }
            Err(source) => return Err(Error::OpenLink { path, source }),
        };
        let link = SchedClassifierLink::try_from(FdLink::from(pinned)).map_err(|source| {
            Error::OpenLink {
                path: path.clone(),
                source,
            }
        })?;
        let id = program.attach_to_link(link).map_err(update_error)?;
        // Drop our descriptor: the pin keeps the link.
        drop(program.take_link(id).map_err(update_error)?);
        updated += 1;
    }
    Ok(updated)
}

fn create_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| Error::CreateDir {
        path: dir.into(),
        source,
    })
}

/// Removes a pin; whether there was one.
pub fn unpin(path: &Path) -> Result<bool> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(Error::Unpin {
            path: path.into(),
            source,
        }),
    }
}

/// The ifindex of `iface` in the calling thread's network namespace.
pub fn ifindex(iface: &str) -> Option<u32> {
    let name = CString::new(iface).ok()?;
    // SAFETY: `name` is a valid NUL-terminated string for the duration of the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}

/// An exclusive `flock` on the `links/` directory, held while a pin is checked and created, so
/// the agent and `lb-cni` (and parallel `lb-cni` runs) cannot both attach one interface.
struct LinksLock {
    /// Closing the descriptor releases the lock.
    _dir: File,
}

impl LinksLock {
    fn acquire(bpffs: &Path) -> Result<LinksLock> {
        let dir = bpffs.join(LINK_PIN_DIR);
        create_dir(&dir)?;
        let lock_error = |source| Error::Lock {
            path: dir.clone(),
            source,
        };
        let file = File::open(&dir).map_err(lock_error)?;
        loop {
            // SAFETY: flock on a descriptor we own; it only blocks.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } == 0 {
                return Ok(LinksLock { _dir: file });
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(lock_error(e));
            }
        }
    }
}

/// What the kernel says about a pinned link (`struct bpf_link_info`, TCX part).
#[derive(Debug, Clone, Copy)]
struct PinnedLinkInfo {
    link_type: u32,
    program_id: u32,
    /// 0 once the interface is gone (the kernel detached the link).
    ifindex: u32,
    attach_type: u32,
}

const BPF_LINK_TYPE_TCX: u32 = 11;
const BPF_TCX_INGRESS: u32 = 46;
const BPF_TCX_EGRESS: u32 = 47;

impl PinnedLinkInfo {
    fn is_tcx(&self, hook: Hook) -> bool {
        self.link_type == BPF_LINK_TYPE_TCX && self.attach_type == hook.kernel_attach_type()
    }
}

/// The interface a pinned link (TCX or XDP) is attached to; `None` without a pin, `Some(0)` when
/// its interface is gone.
pub fn pinned_link_ifindex(path: &Path) -> Result<Option<u32>> {
    Ok(read_pinned_link(path)?.map(|l| l.ifindex))
}

/// Reads the pinned link at `path`; `None` if there is no pin. aya's `LinkInfo` exposes neither
/// the ifindex nor the attach type, which is what tells a live attachment from a dead one.
fn read_pinned_link(path: &Path) -> Result<Option<PinnedLinkInfo>> {
    let read_error = |source| Error::ReadLink {
        path: path.into(),
        source,
    };
    let Some(fd) = crate::bpf_link::open_pinned(path).map_err(read_error)? else {
        return Ok(None);
    };
    // EINVAL here means the pin is not a link (a map or a program pinned by mistake).
    let info = crate::bpf_link::link_info(&fd).map_err(read_error)?;
    let (ifindex, attach_type) = info.ifindex_and_attach_type();
    Ok(Some(PinnedLinkInfo {
        link_type: info.link_type,
        program_id: info.prog_id,
        ifindex,
        attach_type,
    }))
}
