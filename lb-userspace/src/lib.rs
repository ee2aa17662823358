//! The userspace side of the load balancer: where Services come from (`sources`), what kube-proxy
//! would do with them (`model`), and how that becomes BPF map contents (`dataplane`) and attached
//! programs (`loader`).
pub mod attach;
mod bpf_link;
pub mod cgroup_hooks;
pub mod cleanup;
pub mod cni;
pub mod conntrack_gc;
pub mod control;
pub mod dataplane;
pub mod health;
pub mod inspect;
pub mod loader;
pub mod metrics;
pub mod model;
pub mod netlink;
pub mod pin_lock;
pub mod pod_interfaces;
pub mod service_health;
pub mod sock_destroy;
pub mod sources;
pub mod trace;
pub mod upgrade;
pub mod uplink;
