//! healthCheckNodePort servers, as kube-proxy runs them.
//!
//! A LoadBalancer Service with externalTrafficPolicy=Local gets a `spec.healthCheckNodePort`; the
//! cloud load balancer probes it on every node and sends traffic only to nodes that answer 200.
//! kube-proxy answers any path there with 200 when the node has local ready endpoints for the
//! Service and 503 when it has none, with a JSON body naming the Service and the count. The agent
//! does the same: one listener per distinct port on `0.0.0.0`, counts updated on every sync,
//! listeners closed when their Service goes away.
//!
//! The count is the largest local-endpoint count among the Service's ports and IP families (the
//! model computes it per ServicePort; the ports of one Service normally have the same endpoints).
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr, TcpListener},
    os::fd::{AsRawFd, RawFd},
    sync::{Arc, Mutex},
    thread::JoinHandle,
};

use crate::{
    health::{serve_listener, Health, Response},
    model::Model,
};

/// What one healthCheckNodePort reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceHealth {
    pub namespace: String,
    pub name: String,
    pub local_endpoints: usize,
}

/// The healthCheckNodePorts the model asks for, with what each reports.
pub fn wanted(model: &Model) -> BTreeMap<u16, ServiceHealth> {
    let mut out: BTreeMap<u16, ServiceHealth> = BTreeMap::new();
    for sp in model.service_ports.values() {
        let Some(hc) = sp.health_check else { continue };
        let entry = out.entry(hc.node_port).or_insert_with(|| ServiceHealth {
            namespace: sp.id.namespace.clone(),
            name: sp.id.name.clone(),
            local_endpoints: 0,
        });
        entry.local_endpoints = entry.local_endpoints.max(hc.local_endpoints);
    }
    out
}

/// kube-proxy's answer (pkg/proxy/healthcheck): 200 with local endpoints and a healthy proxy,
/// 503 otherwise; the same JSON body either way, tab-indented as kube-proxy prints it.
pub fn response(service: &ServiceHealth, proxy_healthy: bool) -> Response {
    let ok = service.local_endpoints > 0 && proxy_healthy;
    Response {
        status: if ok {
            "200 OK"
        } else {
            "503 Service Unavailable"
        },
        content_type: "application/json",
        headers: vec![
            ("X-Content-Type-Options", "nosniff".into()),
            (
                "X-Load-Balancing-Endpoint-Weight",
                service.local_endpoints.to_string(),
            ),
        ],
        body: format!(
            "{{\n\t\"service\": {{\n\t\t\"namespace\": {},\n\t\t\"name\": {}\n\t}},\n\t\"localEndpoints\": {},\n\t\"serviceProxyHealthy\": {}\n}}",
            json_string(&service.namespace),
            json_string(&service.name),
            service.local_endpoints,
            proxy_healthy
        ),
    }
}

fn json_string(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

/// One listener.
struct Server {
    state: Arc<Mutex<ServiceHealth>>,
    fd: RawFd,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        // SAFETY: shutdown on the listening socket the server thread still owns (it closes it only
        // after accept fails, which this causes); no memory is passed.
        unsafe { libc::shutdown(self.fd, libc::SHUT_RDWR) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The running healthCheckNodePort listeners.
pub struct ServiceHealthServers {
    address: Ipv4Addr,
    health: Arc<Health>,
    servers: BTreeMap<u16, Server>,
}

impl ServiceHealthServers {
    /// Listeners bind `address` (the agent uses 0.0.0.0, as kube-proxy does by default).
    pub fn new(address: Ipv4Addr, health: Arc<Health>) -> Self {
        Self {
            address,
            health,
            servers: BTreeMap::new(),
        }
    }

    /// Ports with a running listener.
    pub fn ports(&self) -> Vec<u16> {
        self.servers.keys().copied().collect()
    }

    /// Opens listeners for new ports, updates the counts of existing ones and closes those no
    /// longer wanted. A port that cannot be bound is logged with its Service and retried on the
    /// next sync; the other ports are unaffected.
    pub fn sync(&mut self, wanted: &BTreeMap<u16, ServiceHealth>) {
        self.servers.retain(|port, _| {
            let keep = wanted.contains_key(port);
            if !keep {
                tracing::info!(
                    port,
                    "closing healthCheckNodePort listener: its Service is gone"
                );
            }
            keep
        });
        for (port, service) in wanted {
            if let Some(server) = self.servers.get(port) {
                *server.state.lock().unwrap_or_else(|e| e.into_inner()) = service.clone();
                continue;
            }
            match self.open(*port, service) {
                Ok(server) => {
                    tracing::info!(
                        port,
                        service = %format!("{}/{}", service.namespace, service.name),
                        local_endpoints = service.local_endpoints,
                        "serving healthCheckNodePort"
                    );
                    self.servers.insert(*port, server);
                }
                Err(e) => tracing::error!(
                    port,
                    service = %format!("{}/{}", service.namespace, service.name),
                    "cannot serve healthCheckNodePort {port} of Service {}/{}: {e}; retrying on the next sync",
                    service.namespace,
                    service.name
                ),
            }
        }
    }

    fn open(&self, port: u16, service: &ServiceHealth) -> std::io::Result<Server> {
        let listener = TcpListener::bind(SocketAddr::from((self.address, port)))?;
        let fd = listener.as_raw_fd();
        let state = Arc::new(Mutex::new(service.clone()));
        let handler_state = Arc::clone(&state);
        let health = Arc::clone(&self.health);
        let handler = move |_method: &str, _path: &str| {
            let service = handler_state
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            response(&service, health.is_ready())
        };
        let thread = serve_listener(listener, format!("hc-{port}"), Arc::new(handler))?;
        Ok(Server {
            state,
            fd,
            thread: Some(thread),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{
        io::{Read, Write},
        net::TcpStream,
        time::Duration,
    };

    fn svc(n: usize) -> ServiceHealth {
        ServiceHealth {
            namespace: "web".into(),
            name: "front".into(),
            local_endpoints: n,
        }
    }

    #[test]
    fn answers_like_kube_proxy() {
        let r = response(&svc(2), true);
        assert_eq!(r.status, "200 OK");
        assert_eq!(r.content_type, "application/json");
        assert!(r
            .headers
            .contains(&("X-Content-Type-Options", "nosniff".into())));
        assert_eq!(
            r.body,
            "{\n\t\"service\": {\n\t\t\"namespace\": \"web\",\n\t\t\"name\": \"front\"\n\t},\n\t\"localEndpoints\": 2,\n\t\"serviceProxyHealthy\": true\n}"
        );
        let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(v["localEndpoints"], 2);
        assert_eq!(v["service"]["name"], "front");

        let none = response(&svc(0), true);
        assert_eq!(none.status, "503 Service Unavailable");
        assert!(none.body.contains("\"localEndpoints\": 0"));
        // Endpoints but an unhealthy proxy: kube-proxy says 503 too.
        assert_eq!(response(&svc(1), false).status, "503 Service Unavailable");
    }

    fn get(port: u16) -> String {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(s, "GET /anything HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    #[test]
    fn servers_follow_syncs_and_a_taken_port_does_not_stop_the_others() {
        let health = Arc::new(Health::default());
        health.set_ready();
        let mut servers = ServiceHealthServers::new(Ipv4Addr::LOCALHOST, health);
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let taken_port = taken.local_addr().unwrap().port();
        let port = free_port();
        let mut wanted = BTreeMap::from([(port, svc(1)), (taken_port, svc(3))]);
        servers.sync(&wanted);
        assert_eq!(servers.ports(), vec![port], "the taken port is skipped");
        let answer = get(port);
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.contains("\"localEndpoints\": 1"), "{answer}");
        assert!(
            answer.contains("X-Content-Type-Options: nosniff"),
            "{answer}"
        );

        wanted.insert(port, svc(0));
        servers.sync(&wanted);
        let answer = get(port);
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");

        servers.sync(&BTreeMap::new());
        assert!(servers.ports().is_empty());
        assert!(
            TcpStream::connect(("127.0.0.1", port)).is_err(),
            "closed with its Service"
        );
        drop(taken);
    }
}
