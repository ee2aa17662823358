//! The few raw bpf(2) commands on pinned links that aya 0.14 does not offer: open a pin of a
//! link, read its info (the attach point and type, which tell a live attachment from one whose
//! interface or cgroup is gone), and point it at another program. Shared by the tc/XDP
//! attachments (`attach.rs`, `uplink.rs`) and the cgroup socket hooks (`cgroup_hooks.rs`).
use std::{
    ffi::CString,
    io,
    mem::size_of,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_UPDATE: libc::c_long = 29;

/// `union bpf_attr` for BPF_OBJ_GET.
#[repr(C)]
#[derive(Default)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

/// `union bpf_attr` for BPF_OBJ_GET_INFO_BY_FD.
#[repr(C)]
#[derive(Default)]
struct InfoByFdAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// `union bpf_attr` for BPF_LINK_UPDATE.
#[repr(C)]
#[derive(Default)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

/// `struct bpf_link_info`: type, id, prog_id, then a union (8-byte aligned) whose member depends
/// on the link type; room for its largest members, which the kernel may fill.
#[repr(C)]
#[derive(Default)]
struct LinkInfoBuf {
    link_type: u32,
    id: u32,
    prog_id: u32,
    _pad: u32,
    union: [u64; 16],
}

/// What the kernel says about a link.
pub(crate) struct LinkInfo {
    pub link_type: u32,
    pub prog_id: u32,
    union: [u64; 16],
}

impl LinkInfo {
    /// TCX and XDP links: `{ifindex, attach_type}` (ifindex 0 once the interface is gone).
    pub fn ifindex_and_attach_type(&self) -> (u32, u32) {
        let b = self.union[0].to_ne_bytes();
        (
            u32::from_ne_bytes(b[0..4].try_into().expect("4 bytes")),
            u32::from_ne_bytes(b[4..8].try_into().expect("4 bytes")),
        )
    }

    /// cgroup links: `{cgroup_id, attach_type}` (cgroup_id 0 once the cgroup is gone).
    pub fn cgroup_id_and_attach_type(&self) -> (u64, u32) {
        let b = self.union[1].to_ne_bytes();
        (
            self.union[0],
            u32::from_ne_bytes(b[0..4].try_into().expect("4 bytes")),
        )
    }
}

fn bpf(cmd: libc::c_long, attr: *const u8, size: usize) -> io::Result<libc::c_long> {
    // SAFETY: callers pass a pointer to a live `bpf_attr` prefix of `size` bytes, and whatever it
    // points to stays alive for the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr, size as u32) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc)
}

/// The object pinned at `path` (for us: a link); `None` without a pin.
pub(crate) fn open_pinned(path: &Path) -> io::Result<Option<OwnedFd>> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let attr = ObjGetAttr {
        pathname: c_path.as_ptr() as u64,
        ..Default::default()
    };
    match bpf(
        BPF_OBJ_GET,
        &attr as *const ObjGetAttr as *const u8,
        size_of::<ObjGetAttr>(),
    ) {
        // SAFETY: the kernel just returned this descriptor and nothing else owns it.
        Ok(fd) => Ok(Some(unsafe { OwnedFd::from_raw_fd(fd as i32) })),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// The info of the link `link` (EINVAL: the descriptor is not a link).
pub(crate) fn link_info(link: &OwnedFd) -> io::Result<LinkInfo> {
    let mut info = LinkInfoBuf::default();
    let attr = InfoByFdAttr {
        bpf_fd: link.as_raw_fd() as u32,
        info_len: size_of::<LinkInfoBuf>() as u32,
        info: &mut info as *mut LinkInfoBuf as u64,
    };
    // The kernel writes at most `info_len` bytes into `info`, which outlives the call.
    bpf(
        BPF_OBJ_GET_INFO_BY_FD,
        &attr as *const InfoByFdAttr as *const u8,
        size_of::<InfoByFdAttr>(),
    )?;
    Ok(LinkInfo {
        link_type: info.link_type,
        prog_id: info.prog_id,
        union: info.union,
    })
}

/// Points `link` at `prog_fd`, atomically for whatever the link serves.
pub(crate) fn update_link(link: &OwnedFd, prog_fd: i32) -> io::Result<()> {
    let attr = LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: prog_fd as u32,
        ..Default::default()
    };
    bpf(
        BPF_LINK_UPDATE,
        &attr as *const LinkUpdateAttr as *const u8,
        size_of::<LinkUpdateAttr>(),
    )
    .map(|_| ())
}
