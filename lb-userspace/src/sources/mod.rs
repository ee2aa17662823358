//! Where Services and EndpointSlices come from. Every source produces the same [`Objects`] snapshot.
pub mod feed;
pub mod kube;
pub mod manifests;

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};

/// A full snapshot of the objects the model reads.
#[derive(Debug, Clone, Default)]
pub struct Objects {
    pub services: Vec<Service>,
    pub endpoint_slices: Vec<EndpointSlice>,
    /// Node objects; the model reads the zone label of its own.
    pub nodes: Vec<Node>,
}
