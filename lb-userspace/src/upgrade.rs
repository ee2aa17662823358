//! The map layout version of a pin directory, and upgrades from older versions.
//!
//! The version ([`lb_common::ABI_VERSION`]) lives in `<bpffs>/LB_META`, a pinned one-entry
//! `ARRAY` map holding a `u32` (bpffs holds only pins and directories, no regular files). Pins from
//! before `LB_META` existed carry their version in their shape: a 24-byte conntrack value is
//! version 1, a 32-byte one version 2.
//!
//! On start ([`prepare`]):
//! - no pins: a fresh directory; `LB_META` is written once the maps exist;
//! - same version: adopt everything as it is;
//! - version 1: migrate (below);
//! - anything else (newer, or unknown): refuse, naming both versions and the fix.
//!
//! Migration from version 1 changes only the conntrack map (values grew from 24 to 32 bytes;
//! `LB_DROPS` is new and simply created). The order keeps established flows:
//! 1. [`prepare`]: the v1 map's pin is renamed to `LB_CONNTRACK_v1`. The running (old) programs
//!    keep using the map itself through their references; only the name moves.
//! 2. The loader creates a fresh `LB_CONNTRACK` in the new layout and loads the new programs.
//! 3. [`Upgrade::before_attach`]: every v1 entry is copied, converted, into the new map. Only the
//!    agent writes the new map at this point: the new programs are not attached yet.
//! 4. The agent moves every pinned link to the new programs (`BPF_LINK_UPDATE`, atomic per link).
//! 5. [`Upgrade::finish`]: a second copy pass, insert-if-absent, picks up entries the old programs
//!    created between step 3 and their replacement in step 4 (entries the new programs made in the
//!    meantime win); then the v1 pin is removed and `LB_META` says the new version.
//!
//! The window: a flow whose *first* packet reached an old program after the copy of step 3 and
//! whose next packet reaches a new program before step 5 is seen as new and may be given another
//! backend. Steps 3 to 5 take milliseconds; flows established before step 3 are never affected.
//! An agent killed in the middle leaves `LB_CONNTRACK_v1` behind, and the next start resumes from
//! step 2 with it.
//!
//! Maps added within a version need nothing here: the loader creates every pin that is missing
//! (`LB_SRC_RANGES`, `LB_REJECT_BKT`), and recreates a `LB_DROPS` smaller than this build's
//! reason count (see `loader::load`).
use std::path::{Path, PathBuf};

use aya::maps::{Array, HashMap, Map, MapData, MapError};
use lb_common::{legacy, map_names, CtKey, CtValue, ABI_VERSION};

/// Where the v1 conntrack map waits while it is copied.
pub const CONNTRACK_V1_ASIDE: &str = "LB_CONNTRACK_v1";

/// `BPF_NOEXIST`: insert only if the key is absent.
const BPF_NOEXIST: u64 = 1;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "the maps pinned under {dir} have layout version {found}, newer than this agent's \
         version {ABI_VERSION}: run an agent of version {found} or newer, or remove the data path \
         with `lb-agent cleanup --bpffs {dir}` (established connections through it break) and start \
         this one again"
    )]
    Newer { dir: PathBuf, found: u32 },
    #[error(
        "the maps pinned under {dir} have layout version {found}, which this agent (version \
         {ABI_VERSION}) cannot migrate: remove them with `lb-agent cleanup --bpffs {dir}` \
         (established connections through them break) and start again"
    )]
    Unknown { dir: PathBuf, found: u32 },
    #[error(
        "the conntrack map pinned at {path} has values of {value_size} bytes, which matches no \
         known layout version (1: 24 bytes, 2: 32 bytes): remove the pins with `lb-agent cleanup \
         --bpffs {dir}` and start again"
    )]
    UnknownShape {
        path: PathBuf,
        dir: PathBuf,
        value_size: u32,
    },
    #[error("{op} {path}: {source}")]
    Map {
        op: &'static str,
        path: PathBuf,
        source: Box<MapError>,
    },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

fn map_err(op: &'static str, path: &Path) -> impl FnOnce(MapError) -> Error {
    let path = path.to_path_buf();
    move |source| Error::Map {
        op,
        path,
        source: Box::new(source),
    }
}

/// What [`prepare`] found, and what remains to do once the new maps exist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upgrade {
    /// Nothing was pinned.
    Fresh,
    /// The pins have this agent's version.
    Current,
    /// Version 1 pins: the conntrack map waits at `aside` to be copied.
    FromV1 { aside: PathBuf },
}

/// The layout version of the pins under `dir`, `None` when nothing is pinned there.
pub fn pinned_version(dir: &Path) -> Result<Option<u32>> {
    let meta = dir.join(map_names::META);
    if meta.exists() {
        return read_meta(&meta).map(Some);
    }
    // An interrupted migration from version 1.
    if dir.join(CONNTRACK_V1_ASIDE).exists() {
        return Ok(Some(1));
    }
    // Pins from before LB_META: the conntrack value tells.
    let ct = dir.join(map_names::CONNTRACK);
    if ct.exists() {
        let data = MapData::from_pin(&ct).map_err(map_err("opening", &ct))?;
        let info = data.info().map_err(map_err("reading the info of", &ct))?;
        return match info.value_size() {
            24 => Ok(Some(1)),
            32 => Ok(Some(2)),
            value_size => Err(Error::UnknownShape {
                path: ct,
                dir: dir.into(),
                value_size,
            }),
        };
    }
    Ok(None)
}

fn read_meta(path: &Path) -> Result<u32> {
    let data = MapData::from_pin(path).map_err(map_err("opening", path))?;
    let meta: Array<_, u32> =
        Array::try_from(Map::Array(data)).map_err(map_err("opening", path))?;
    meta.get(&0, 0).map_err(map_err("reading", path))
}

/// Writes `version` into `<dir>/LB_META`, creating and pinning the map when missing.
pub fn write_version(dir: &Path, version: u32) -> Result<()> {
    let path = dir.join(map_names::META);
    if !path.exists() {
        let meta: Array<MapData, u32> = Array::create(1, 0).map_err(map_err("creating", &path))?;
        meta.pin(&path).map_err(|e| Error::Io {
            op: "pinning",
            path: path.clone(),
            source: std::io::Error::other(e),
        })?;
    }
    let data = MapData::from_pin(&path).map_err(map_err("opening", &path))?;
    let mut meta: Array<MapData, u32> =
        Array::try_from(Map::Array(data)).map_err(map_err("opening", &path))?;
    meta.set(0, version, 0).map_err(map_err("writing", &path))
}

/// Checks the version of the pins under `dir` before the loader reuses them, and sets a v1
/// conntrack map aside for migration. Refuses versions it cannot adopt or migrate.
pub fn prepare(dir: &Path) -> Result<Upgrade> {
    match pinned_version(dir)? {
        None => Ok(Upgrade::Fresh),
        Some(v) if v == ABI_VERSION => Ok(Upgrade::Current),
        Some(1) => {
            let aside = dir.join(CONNTRACK_V1_ASIDE);
            let ct = dir.join(map_names::CONNTRACK);
            if !aside.exists() {
                std::fs::rename(&ct, &aside).map_err(|source| Error::Io {
                    op: "setting the version 1 conntrack map aside:",
                    path: ct.clone(),
                    source,
                })?;
            } else if ct.exists() {
                // Resuming: the new map was created by the interrupted run; keep its entries
                // unless it is not in the new layout after all.
                let data = MapData::from_pin(&ct).map_err(map_err("opening", &ct))?;
                let info = data.info().map_err(map_err("reading the info of", &ct))?;
                if info.value_size() as usize != size_of::<CtValue>() {
                    std::fs::remove_file(&ct).map_err(|source| Error::Io {
                        op: "removing",
                        path: ct.clone(),
                        source,
                    })?;
                }
            }
            Ok(Upgrade::FromV1 { aside })
        }
        Some(found) if found > ABI_VERSION => Err(Error::Newer {
            dir: dir.into(),
            found,
        }),
        Some(found) => Err(Error::Unknown {
            dir: dir.into(),
            found,
        }),
    }
}

impl Upgrade {
    /// After the new maps exist, before the new programs are attached: the first copy pass.
    /// Returns how many entries were copied.
    pub fn before_attach(&self, dir: &Path) -> Result<usize> {
        match self {
            Upgrade::FromV1 { aside } => copy_v1_conntrack(aside, &dir.join(map_names::CONNTRACK)),
            Upgrade::Fresh | Upgrade::Current => Ok(0),
        }
    }

    /// After the attachments run the new programs: the last copy pass, removal of the old map's
    /// pin, and the version written. Returns how many entries the last pass copied.
    pub fn finish(&self, dir: &Path) -> Result<usize> {
        let copied = match self {
            Upgrade::FromV1 { aside } => {
                let n = copy_v1_conntrack(aside, &dir.join(map_names::CONNTRACK))?;
                std::fs::remove_file(aside).map_err(|source| Error::Io {
                    op: "removing",
                    path: aside.clone(),
                    source,
                })?;
                n
            }
            Upgrade::Fresh | Upgrade::Current => 0,
        };
        write_version(dir, ABI_VERSION)?;
        Ok(copied)
    }
}

/// Copies every entry of the v1 map at `from` into the current-layout map at `to`, converted,
/// without overwriting entries `to` already has. Returns how many were inserted.
pub fn copy_v1_conntrack(from: &Path, to: &Path) -> Result<usize> {
    let old = MapData::from_pin(from).map_err(map_err("opening", from))?;
    let old: HashMap<_, CtKey, legacy::v1::CtValue> =
        HashMap::try_from(Map::LruHashMap(old)).map_err(map_err("opening", from))?;
    let new = MapData::from_pin(to).map_err(map_err("opening", to))?;
    let mut new: HashMap<_, CtKey, CtValue> =
        HashMap::try_from(Map::LruHashMap(new)).map_err(map_err("opening", to))?;
    // Read first: inserting while walking another map is fine, but a consistent list is simpler.
    let entries: Vec<(CtKey, legacy::v1::CtValue)> = old
        .iter()
        .collect::<std::result::Result<_, _>>()
        .map_err(map_err("reading", from))?;
    let mut copied = 0;
    for (k, v) in entries {
        match new.insert(k, v.upgrade(), BPF_NOEXIST) {
            Ok(()) => copied += 1,
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => return Err(map_err("copying an entry into", to)(e)),
        }
    }
    Ok(copied)
}
