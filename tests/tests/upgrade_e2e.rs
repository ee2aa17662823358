//! Map layout versions with real pins: an agent finding version 1 pins migrates the conntrack
//! entries into the current layout (values converted, nothing lost, the old map released), and an
//! agent finding pins of a version it does not know refuses to start and says what to do.
use std::{
    net::Ipv4Addr,
    os::fd::{FromRawFd, OwnedFd},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use aya::maps::{HashMap, Map, MapData};
use lb_common::{conntrack, legacy, map_names, CtKey, CtValue, ABI_VERSION};
use lb_tests::{cluster::agent_bin, spawn_in, BpfFs, ChildGuard, Node};

/// A manifests directory with one empty file; removed on drop.
struct Manifests(PathBuf);

impl Manifests {
    fn new(tag: &str) -> Self {
        let dir = Path::new(lb_tests::RUN_DIR).join(format!("{tag}_m-{}-0", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("services.yaml"), "").unwrap();
        Self(dir)
    }
}

impl Drop for Manifests {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn start_agent(node: &Node, bpffs: &BpfFs, manifests: &Manifests, tag: &str) -> ChildGuard {
    let mut cmd = Command::new(agent_bin().unwrap());
    cmd.arg("--cgroup")
        .arg(lb_tests::idle_cgroup())
        .arg("--manifests")
        .arg(&manifests.0)
        .args(["--node-name", "node-1", "--pod-iface-pattern", ""])
        .arg("--bpffs")
        .arg(bpffs.path());
    spawn_in(&node.ns, cmd, tag).unwrap()
}

/// Creates an LRU hash map in the version 1 conntrack layout and pins it where the agent looks.
fn pin_v1_conntrack(dir: &Path) -> HashMap<MapData, CtKey, legacy::v1::CtValue> {
    #[repr(C)]
    struct CreateAttr {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
        _rest: [u32; 11],
    }
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_MAP_TYPE_LRU_HASH: u32 = 9;
    let attr = CreateAttr {
        map_type: BPF_MAP_TYPE_LRU_HASH,
        key_size: size_of::<CtKey>() as u32,
        value_size: size_of::<legacy::v1::CtValue>() as u32,
        max_entries: 1024,
        map_flags: 0,
        _rest: [0; 11],
    };
    // SAFETY: BPF_MAP_CREATE reads `attr` (size given), which outlives the call; it returns a new
    // descriptor or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_CREATE,
            &attr as *const CreateAttr,
            size_of::<CreateAttr>() as u32,
        )
    };
    assert!(
        fd >= 0,
        "BPF_MAP_CREATE: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: the kernel just returned this descriptor and nothing else owns it.
    let data = MapData::from_fd(unsafe { OwnedFd::from_raw_fd(fd as i32) }).unwrap();
    data.pin(dir.join(map_names::CONNTRACK)).unwrap();
    HashMap::try_from(Map::LruHashMap(data)).unwrap()
}

fn key(client: Ipv4Addr, port: u16, dst: Ipv4Addr, dport: u16, dir: u8) -> CtKey {
    CtKey {
        src_addr: lb_common::ipv4_to_net(client),
        dst_addr: lb_common::ipv4_to_net(dst),
        src_port: port.to_be(),
        dst_port: dport.to_be(),
        proto: lb_common::proto::TCP,
        dir,
        _pad: 0,
    }
}

#[test]
fn version_1_conntrack_entries_are_migrated_with_their_values() {
    lb_tests::require_root();
    let node = Node::new("upgr").unwrap();
    let bpffs = BpfFs::new("upgr").unwrap();
    let manifests = Manifests::new("upgr");
    let mut v1 = pin_v1_conntrack(bpffs.path());
    let vip = Ipv4Addr::new(198, 19, 0, 10);
    let mut written = Vec::new();
    for i in 0..20u16 {
        let client = Ipv4Addr::new(198, 18, 1, 10);
        let backend = Ipv4Addr::new(198, 18, 2, 1 + (i % 3) as u8);
        let fwd = key(client, 40000 + i, vip, 80, conntrack::CT_DIR_FORWARD);
        let rev = key(backend, 8080, client, 40000 + i, conntrack::CT_DIR_REPLY);
        let flags = if i % 4 == 0 {
            conntrack::CT_FLAG_CLOSING
        } else {
            0
        };
        let common = legacy::v1::CtValue {
            backend_id: 1 + (i % 3) as u32,
            rev_nat_id: 7,
            flags,
            last_seen_ns: 1_000_000 + i as u64,
            ..Default::default()
        };
        let fwd_v = legacy::v1::CtValue {
            nat_addr: lb_common::ipv4_to_net(backend),
            nat_port: 8080u16.to_be(),
            ..common
        };
        let rev_v = legacy::v1::CtValue {
            nat_addr: lb_common::ipv4_to_net(vip),
            nat_port: 80u16.to_be(),
            ..common
        };
        v1.insert(fwd, fwd_v, 0).unwrap();
        v1.insert(rev, rev_v, 0).unwrap();
        written.push((fwd, fwd_v));
        written.push((rev, rev_v));
    }
    drop(v1);
    assert_eq!(
        lb_userspace::upgrade::pinned_version(bpffs.path()).unwrap(),
        Some(1),
        "a 24-byte conntrack value is version 1"
    );

    let mut agent = start_agent(&node, &bpffs, &manifests, "upgr");
    agent
        .wait_for_log("maps programmed", Duration::from_secs(20))
        .unwrap();
    assert!(
        agent.logs().contains("conntrack migrated"),
        "{}",
        agent.logs()
    );

    let data = MapData::from_pin(bpffs.path().join(map_names::CONNTRACK)).unwrap();
    let v2: HashMap<_, CtKey, CtValue> = HashMap::try_from(Map::LruHashMap(data)).unwrap();
    let migrated: std::collections::HashMap<CtKey, CtValue> =
        v2.iter().map(|e| e.unwrap()).collect();
    assert_eq!(migrated.len(), written.len(), "every entry, no more");
    for (k, old) in &written {
        let new = migrated
            .get(k)
            .unwrap_or_else(|| panic!("{k:?} was not migrated"));
        assert_eq!(
            *new,
            CtValue {
                backend_id: old.backend_id,
                rev_nat_id: old.rev_nat_id,
                flags: old.flags,
                nat_addr: old.nat_addr,
                nat_port: old.nat_port,
                peer_port: 0,
                peer_addr: 0,
                _pad: 0,
                last_seen_ns: old.last_seen_ns,
            }
        );
    }
    assert!(
        !bpffs
            .path()
            .join(lb_userspace::upgrade::CONNTRACK_V1_ASIDE)
            .exists(),
        "the version 1 map is unpinned once copied"
    );
    assert_eq!(
        lb_userspace::upgrade::pinned_version(bpffs.path()).unwrap(),
        Some(ABI_VERSION)
    );

    // The next start adopts the migrated maps as they are.
    assert!(agent.stop().unwrap().success(), "{}", agent.logs());
    let mut next = start_agent(&node, &bpffs, &manifests, "upgr2");
    next.wait_for_log("maps programmed", Duration::from_secs(20))
        .unwrap();
    assert!(
        next.logs().contains("adopting the pinned maps"),
        "{}",
        next.logs()
    );
    let data = MapData::from_pin(bpffs.path().join(map_names::CONNTRACK)).unwrap();
    let again: HashMap<_, CtKey, CtValue> = HashMap::try_from(Map::LruHashMap(data)).unwrap();
    assert_eq!(again.iter().count(), written.len());
}

#[test]
fn pins_of_a_newer_layout_are_refused_with_both_versions_and_the_fix() {
    lb_tests::require_root();
    let node = Node::new("newer").unwrap();
    let bpffs = BpfFs::new("newer").unwrap();
    let manifests = Manifests::new("newer");
    lb_userspace::upgrade::write_version(bpffs.path(), ABI_VERSION + 97).unwrap();

    let mut agent = start_agent(&node, &bpffs, &manifests, "newer");
    let status = agent.stop_waiting(Duration::from_secs(20));
    assert!(!status.success(), "{}", agent.logs());
    let logs = agent.logs();
    assert!(
        logs.contains(&format!(
            "have layout version {}, newer than this agent's version {ABI_VERSION}",
            ABI_VERSION + 97
        )),
        "{logs}"
    );
    assert!(logs.contains("lb-agent cleanup --bpffs"), "{logs}");
    assert!(
        !bpffs.path().join(map_names::SERVICES).exists(),
        "nothing was created beside the refused pins"
    );
}

#[test]
fn pins_from_before_source_ranges_and_rejects_get_the_new_maps_and_bigger_drop_counters() {
    lb_tests::require_root();
    let bpffs = BpfFs::new("upg-newmaps").unwrap();
    // The drop counters as an agent with 8 reasons pinned them.
    #[repr(C)]
    struct CreateAttr {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
        _rest: [u32; 11],
    }
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = 6;
    let attr = CreateAttr {
        map_type: BPF_MAP_TYPE_PERCPU_ARRAY,
        key_size: 4,
        value_size: 8,
        max_entries: 8,
        map_flags: 0,
        _rest: [0; 11],
    };
    // SAFETY: as in `pin_v1_conntrack`.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_CREATE,
            &attr as *const CreateAttr,
            size_of::<CreateAttr>() as u32,
        )
    };
    assert!(
        fd >= 0,
        "BPF_MAP_CREATE: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: the kernel just returned this descriptor and nothing else owns it.
    let old = MapData::from_fd(unsafe { OwnedFd::from_raw_fd(fd as i32) }).unwrap();
    old.pin(bpffs.path().join(map_names::DROPS)).unwrap();

    let _ebpf = lb_userspace::loader::load(&lb_userspace::loader::LoadOptions {
        bpffs: bpffs.path().to_path_buf(),
        conntrack_size: 1024,
        maglev_table_size: lb_common::maglev::DEFAULT_TABLE_SIZE,
        reject_limit: lb_userspace::loader::RejectLimit::default(),
    })
    .expect("load over the older pins");
    let drops = MapData::from_pin(bpffs.path().join(map_names::DROPS)).unwrap();
    assert_eq!(
        drops.info().unwrap().max_entries(),
        lb_common::stats::drop_reason::COUNT,
        "the small drop array was replaced"
    );
    for name in [map_names::SOURCE_RANGES, map_names::REJECT_BUCKET] {
        assert!(
            bpffs.path().join(name).exists(),
            "{name} is created when missing"
        );
    }
}
