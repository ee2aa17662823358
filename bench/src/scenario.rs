//! The Services and endpoints every contender is given: the same set, rendered as manifests for
//! the agent and as kube-proxy rules for the baselines.
//!
//! One Service is the one traffic goes to (the *target*, at index `n / 2`, so that in iptables'
//! linear KUBE-SERVICES chain it sits in the middle: the average case). Its endpoints are real pods.
//! Every other Service is filler: TCP port 80 on its own ClusterIP, with endpoints at addresses
//! that no packet ever reaches.
use std::{fmt::Write as _, net::Ipv4Addr};

/// Node name given to the agent; every endpoint is on it.
pub const NODE_NAME: &str = "node-1";
/// Port every Service exposes, and the port its endpoints listen on.
pub const PORT: u16 = 80;
pub const TARGET_PORT: u16 = 8080;
/// The NodePort of the target Service.
pub const TARGET_NODE_PORT: u16 = 32_000;
/// Pod network (cluster CIDR): traffic from outside it is masqueraded by kube-proxy's rules.
pub const CLUSTER_CIDR: &str = "198.18.0.0/16";

#[derive(Debug, Clone)]
pub struct Scenario {
    pub services: usize,
    pub endpoints_per_service: usize,
    /// Endpoints of the target Service.
    pub target_endpoints: Vec<Ipv4Addr>,
}

/// One Service port as the contenders see it.
#[derive(Debug, Clone)]
pub struct ServicePort {
    pub index: usize,
    pub name: String,
    pub cluster_ip: Ipv4Addr,
    /// "tcp" or "udp".
    pub proto: &'static str,
    pub node_port: Option<u16>,
    pub endpoints: Vec<Ipv4Addr>,
}

impl Scenario {
    pub fn target(&self) -> usize {
        self.services / 2
    }

    /// ClusterIPs from 198.19.128.0 up (room for 32k Services).
    pub fn cluster_ip(i: usize) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 19, 128, 0)) + 1 + i as u32)
    }

    /// Filler endpoint `j` of Service `i`: addresses in 198.18.64.0/18 and up, wrapping, never
    /// routed anywhere. `variant` changes one address (for single-change measurements).
    pub fn filler_endpoint(&self, i: usize, j: usize, variant: u32) -> Ipv4Addr {
        if j == 0 && variant != 0 {
            return Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 19, 120, 0)) + variant % 4096);
        }
        let k = (i * self.endpoints_per_service + j) % 49_152;
        Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 64, 0)) + k as u32)
    }

    pub fn target_cluster_ip(&self) -> Ipv4Addr {
        Self::cluster_ip(self.target())
    }

    /// Every Service port: the target has TCP and UDP and a NodePort; fillers have TCP only.
    /// `variant` is applied to Service `changed` only.
    pub fn ports(&self, changed: Option<(usize, u32)>) -> Vec<ServicePort> {
        let mut out = Vec::with_capacity(self.services + 1);
        for i in 0..self.services {
            let cluster_ip = Self::cluster_ip(i);
            if i == self.target() {
                for proto in ["tcp", "udp"] {
                    out.push(ServicePort {
                        index: i,
                        name: format!("bench/svc-{i}:{proto}"),
                        cluster_ip,
                        proto,
                        node_port: Some(TARGET_NODE_PORT),
                        endpoints: self.target_endpoints.clone(),
                    });
                }
                continue;
            }
            let variant = match changed {
                Some((c, v)) if c == i => v,
                _ => 0,
            };
            out.push(ServicePort {
                index: i,
                name: format!("bench/svc-{i}:tcp"),
                cluster_ip,
                proto: "tcp",
                node_port: None,
                endpoints: (0..self.endpoints_per_service)
                    .map(|j| self.filler_endpoint(i, j, variant))
                    .collect(),
            });
        }
        out
    }

    /// The Service and EndpointSlice of Service `i` as YAML documents.
    pub fn service_yaml(&self, i: usize, variant: u32) -> String {
        let mut y = String::new();
        let target = i == self.target();
        let (kind, ports, slice_ports) = if target {
            (
                "NodePort",
                format!(
                    "  - {{name: tcp, port: {PORT}, protocol: TCP, targetPort: {TARGET_PORT}, nodePort: {TARGET_NODE_PORT}}}\n  - {{name: udp, port: {PORT}, protocol: UDP, targetPort: {TARGET_PORT}, nodePort: {TARGET_NODE_PORT}}}\n"
                ),
                format!("- {{name: tcp, port: {TARGET_PORT}, protocol: TCP}}\n- {{name: udp, port: {TARGET_PORT}, protocol: UDP}}\n"),
            )
        } else {
            (
                "ClusterIP",
                format!(
                    "  - {{name: tcp, port: {PORT}, protocol: TCP, targetPort: {TARGET_PORT}}}\n"
                ),
                format!("- {{name: tcp, port: {TARGET_PORT}, protocol: TCP}}\n"),
            )
        };
        let _ = write!(
            y,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}, namespace: bench}}\nspec:\n  type: {kind}\n  clusterIP: {}\n  ports:\n{ports}---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: svc-{i}-1\n  namespace: bench\n  labels: {{kubernetes.io/service-name: svc-{i}}}\naddressType: IPv4\nports:\n{slice_ports}endpoints:\n",
            Self::cluster_ip(i)
        );
        let endpoints: Vec<Ipv4Addr> = if target {
            self.target_endpoints.clone()
        } else {
            (0..self.endpoints_per_service)
                .map(|j| self.filler_endpoint(i, j, variant))
                .collect()
        };
        for e in endpoints {
            let _ = writeln!(
                y,
                "- {{addresses: [{e}], conditions: {{ready: true}}, nodeName: {NODE_NAME}}}"
            );
        }
        y
    }

    /// Services per manifest file.
    pub const PER_FILE: usize = 100;

    /// The manifest files: (file name, YAML), `PER_FILE` Services each.
    pub fn manifest_files(&self) -> Vec<(String, String)> {
        (0..self.services.div_ceil(Self::PER_FILE))
            .map(|f| (Self::file_name(f), self.file_yaml(f, None)))
            .collect()
    }

    pub fn file_name(f: usize) -> String {
        format!("svc-{f:04}.yaml")
    }

    /// The YAML of file `f`, with `changed` = (Service, variant) applied when it is in the file.
    pub fn file_yaml(&self, f: usize, changed: Option<(usize, u32)>) -> String {
        let start = f * Self::PER_FILE;
        let end = (start + Self::PER_FILE).min(self.services);
        (start..end)
            .map(|i| {
                let v = match changed {
                    Some((c, v)) if c == i => v,
                    _ => 0,
                };
                self.service_yaml(i, v)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_has_tcp_udp_and_a_node_port_and_fillers_have_their_endpoints() {
        let s = Scenario {
            services: 4,
            endpoints_per_service: 3,
            target_endpoints: vec![Ipv4Addr::new(198, 18, 2, 1)],
        };
        let ports = s.ports(None);
        assert_eq!(ports.len(), 5);
        let target: Vec<_> = ports.iter().filter(|p| p.index == 2).collect();
        assert_eq!(target.len(), 2);
        assert!(target.iter().all(|p| p.node_port == Some(TARGET_NODE_PORT)));
        assert_eq!(ports[0].endpoints.len(), 3);
        assert_ne!(
            s.ports(Some((0, 7)))[0].endpoints[0],
            ports[0].endpoints[0],
            "a variant changes the first endpoint"
        );
        let yaml = s.file_yaml(0, None);
        assert_eq!(yaml.matches("kind: Service\n").count(), 4);
        assert_eq!(yaml.matches("kind: EndpointSlice").count(), 4);
        assert!(yaml.contains("nodePort: 32000"));
    }
}
