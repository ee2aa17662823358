//! The userspace side of the load balancer: where Services come from (`sources`), what kube-proxy
//! would do with them (`model`), and how that becomes BPF map contents (`dataplane`) and attached
//! programs (`loader`).
pub mod dataplane;
pub mod inspect;
pub mod loader;
pub mod model;
pub mod sources;
pub mod trace;
