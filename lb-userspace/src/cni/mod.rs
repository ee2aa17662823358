//! `lb-cni`: a chained CNI plugin that attaches the agent's pinned tc program to the host side of
//! every pod interface the plugins before it created (see [`crate::attach`] for the pins).
//!
//! The protocol (CNI spec 1.0.0 and 0.4.0) is small enough to write here with serde_json: the
//! command and its arguments come in `CNI_*` environment variables, the network configuration
//! as JSON on stdin; the result, or an error object `{cniVersion, code, msg, details}`, goes to
//! stdout, with a non-zero exit status for errors. `prevResult` is kept as raw JSON and printed
//! back unchanged, so fields this plugin does not know about survive.
pub mod install;

use std::{
    fs::File,
    io,
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
};

use serde_json::{json, Value};

use crate::{
    attach::{self, Attachment},
    netlink,
};

/// The `type` of this plugin in a network configuration.
pub const PLUGIN_TYPE: &str = "lb-cni";
/// Configuration versions this plugin speaks.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.4.0", "1.0.0"];
/// Used for output when the configuration does not say (or says something unsupported).
const DEFAULT_VERSION: &str = "1.0.0";
/// The agent's default `--bpffs`.
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf/lb";

/// Error codes: 1–99 are the spec's, 100+ this plugin's.
pub mod codes {
    /// The configuration's `cniVersion` is not one this plugin supports.
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// A required `CNI_*` variable is missing or invalid.
    pub const INVALID_ENVIRONMENT: u32 = 4;
    /// stdin is not JSON (or not a JSON object).
    pub const DECODING_FAILURE: u32 = 6;
    /// The configuration is JSON but not a valid lb-cni configuration.
    pub const INVALID_NETWORK_CONFIG: u32 = 7;
    /// Transient: the agent has not pinned its program (yet); the runtime retries.
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// Attaching (or detaching) failed.
    pub const ATTACH_FAILED: u32 = 100;
    /// The host side of the pod's interface cannot be found.
    pub const HOST_INTERFACE_NOT_FOUND: u32 = 101;
    /// CHECK: the pod's interface is not attached.
    pub const NOT_ATTACHED: u32 = 102;
    /// A bug: the plugin panicked.
    pub const INTERNAL: u32 = 199;
}

/// A CNI error, printed as `{cniVersion, code, msg, details}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> CniError {
        CniError {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }
}

/// The `CNI_*` variables.
#[derive(Debug, Clone, Default)]
pub struct Environment {
    pub command: Option<String>,
    pub container_id: Option<String>,
    pub netns: Option<String>,
    pub ifname: Option<String>,
    pub args: Option<String>,
    pub path: Option<String>,
}

impl Environment {
    /// Reads the variables through `var` (`std::env::var` in the binary); empty counts as unset.
    pub fn read(var: impl Fn(&str) -> Option<String>) -> Environment {
        let get = |name: &str| var(name).filter(|v| !v.is_empty());
        Environment {
            command: get("CNI_COMMAND"),
            container_id: get("CNI_CONTAINERID"),
            netns: get("CNI_NETNS"),
            ifname: get("CNI_IFNAME"),
            args: get("CNI_ARGS"),
            path: get("CNI_PATH"),
        }
    }

    fn require<'a>(&self, value: &'a Option<String>, name: &str) -> Result<&'a str, CniError> {
        value.as_deref().ok_or_else(|| {
            CniError::new(
                codes::INVALID_ENVIRONMENT,
                format!("{name} is not set"),
                format!(
                    "CNI_COMMAND={} needs {name}",
                    self.command.as_deref().unwrap_or("")
                ),
            )
        })
    }
}

/// What the plugin prints and how it exits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    pub stdout: String,
    pub exit_code: i32,
}

/// The lb-cni part of a network configuration.
#[derive(Debug, Clone)]
struct NetConf {
    cni_version: String,
    bpffs: PathBuf,
    prev_result: Option<Value>,
}

/// Runs one plugin invocation: the whole protocol, without touching the process environment or
/// stdio, so it can be tested.
pub fn run(env: &Environment, stdin: &[u8]) -> Output {
    // The version for error output: the configuration's if it is one we speak.
    let version = serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| v.get("cniVersion")?.as_str().map(String::from))
        .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| DEFAULT_VERSION.to_string());
    match dispatch(env, stdin) {
        Ok(Some(result)) => Output {
            stdout: format!("{result}\n"),
            exit_code: 0,
        },
        Ok(None) => Output {
            stdout: String::new(),
            exit_code: 0,
        },
        Err(e) => Output {
            stdout: format!(
                "{}\n",
                json!({"cniVersion": version, "code": e.code, "msg": e.msg, "details": e.details})
            ),
            exit_code: 1,
        },
    }
}

fn dispatch(env: &Environment, stdin: &[u8]) -> Result<Option<Value>, CniError> {
    let command = env.require(&env.command, "CNI_COMMAND")?;
    match command {
        "VERSION" => Ok(Some(version_result(stdin))),
        "ADD" => add(env, &parse_config(stdin)?).map(Some),
        "DEL" => del(env, &parse_config(stdin)?).map(|()| None),
        "CHECK" => check(env, &parse_config(stdin)?).map(|()| None),
        other => Err(CniError::new(
            codes::INVALID_ENVIRONMENT,
            format!("unknown CNI_COMMAND {other:?}"),
            "lb-cni supports ADD, DEL, CHECK and VERSION",
        )),
    }
}

fn version_result(stdin: &[u8]) -> Value {
    let asked = serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| v.get("cniVersion")?.as_str().map(String::from))
        .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| DEFAULT_VERSION.to_string());
    json!({"cniVersion": asked, "supportedVersions": SUPPORTED_VERSIONS})
}

fn parse_config(stdin: &[u8]) -> Result<NetConf, CniError> {
    let value: Value = serde_json::from_slice(stdin).map_err(|e| {
        CniError::new(
            codes::DECODING_FAILURE,
            "the network configuration on stdin is not JSON",
            e.to_string(),
        )
    })?;
    let Some(object) = value.as_object() else {
        return Err(CniError::new(
            codes::DECODING_FAILURE,
            "the network configuration on stdin is not a JSON object",
            value.to_string(),
        ));
    };
    let invalid = |msg: String| CniError::new(codes::INVALID_NETWORK_CONFIG, msg, "");
    let cni_version = match object.get("cniVersion") {
        Some(Value::String(v)) => v.clone(),
        Some(other) => return Err(invalid(format!("cniVersion must be a string, not {other}"))),
        None => return Err(invalid("cniVersion is missing".into())),
    };
    if !SUPPORTED_VERSIONS.contains(&cni_version.as_str()) {
        return Err(CniError::new(
            codes::INCOMPATIBLE_VERSION,
            format!("incompatible CNI version {cni_version:?}"),
            format!("lb-cni supports {}", SUPPORTED_VERSIONS.join(", ")),
        ));
    }
    match object.get("name") {
        Some(Value::String(n)) if !n.is_empty() => {}
        _ => return Err(invalid("name is missing or not a non-empty string".into())),
    }
    match object.get("type") {
        Some(Value::String(t)) if t == PLUGIN_TYPE => {}
        other => {
            return Err(invalid(format!(
                "type must be {PLUGIN_TYPE:?}, found {}",
                other.map_or("nothing".to_string(), |t| t.to_string())
            )))
        }
    }
    let bpffs = match object.get("bpffs") {
        None => PathBuf::from(DEFAULT_BPFFS),
        Some(Value::String(p)) if Path::new(p).is_absolute() => PathBuf::from(p),
        Some(other) => {
            return Err(invalid(format!(
                "bpffs must be an absolute path (the agent's --bpffs), not {other}"
            )))
        }
    };
    let prev_result = match object.get("prevResult") {
        None | Some(Value::Null) => None,
        Some(v @ Value::Object(_)) => Some(v.clone()),
        Some(other) => {
            return Err(invalid(format!(
                "prevResult must be an object, not {other}"
            )))
        }
    };
    Ok(NetConf {
        cni_version,
        bpffs,
        prev_result,
    })
}

fn add(env: &Environment, conf: &NetConf) -> Result<Value, CniError> {
    env.require(&env.container_id, "CNI_CONTAINERID")?;
    let netns = env.require(&env.netns, "CNI_NETNS")?;
    let ifname = env.require(&env.ifname, "CNI_IFNAME")?;
    let Some(mut result) = conf.prev_result.clone() else {
        return Err(CniError::new(
            codes::INVALID_NETWORK_CONFIG,
            "lb-cni is a chained plugin: prevResult is missing",
            "list lb-cni in a .conflist after the plugin that creates the pod's interface",
        ));
    };
    let host = host_side(netns, ifname)?;
    let mut program = attach::pinned_program(&conf.bpffs).map_err(|e| match e {
        attach::Error::ProgramPinMissing { .. } => CniError::new(
            codes::TRY_AGAIN_LATER,
            "agent not running: program pin missing",
            e.to_string(),
        ),
        e => CniError::new(
            codes::ATTACH_FAILED,
            "cannot open the agent's program",
            e.to_string(),
        ),
    })?;
    attach::attach_pinned(&mut program, &conf.bpffs, &host.name).map_err(|e| {
        CniError::new(
            codes::ATTACH_FAILED,
            format!("attaching to {} failed", host.name),
            e.to_string(),
        )
    })?;
    // Runtimes may hand prevResult over without its version; the result must carry one.
    if let Some(object) = result.as_object_mut() {
        object
            .entry("cniVersion")
            .or_insert_with(|| Value::String(conf.cni_version.clone()));
    }
    Ok(result)
}

/// The host side of the pod's interface, as a CNI error when it cannot be found.
fn host_side(netns: &str, ifname: &str) -> Result<HostInterface, CniError> {
    host_interface(Path::new(netns), ifname).map_err(|e| {
        CniError::new(
            codes::HOST_INTERFACE_NOT_FOUND,
            format!("cannot find the host side of {ifname} in {netns}"),
            e.to_string(),
        )
    })
}

fn check(env: &Environment, conf: &NetConf) -> Result<(), CniError> {
    env.require(&env.container_id, "CNI_CONTAINERID")?;
    let netns = env.require(&env.netns, "CNI_NETNS")?;
    let ifname = env.require(&env.ifname, "CNI_IFNAME")?;
    let host = host_side(netns, ifname)?;
    match attach::check_pinned(&conf.bpffs, &host.name) {
        Ok(Attachment::Attached { .. }) => Ok(()),
        Ok(Attachment::Missing(reason)) => Err(CniError::new(
            codes::NOT_ATTACHED,
            format!("{} is not attached", host.name),
            reason,
        )),
        Err(e) => Err(CniError::new(
            codes::NOT_ATTACHED,
            format!("cannot check the attachment of {}", host.name),
            e.to_string(),
        )),
    }
}

/// Removes the pod's attachment, tolerating everything already gone: without the namespace or
/// the interface the kernel has detached the link already, and the sweep removes its pin.
fn del(env: &Environment, conf: &NetConf) -> Result<(), CniError> {
    env.require(&env.container_id, "CNI_CONTAINERID")?;
    let ifname = env.require(&env.ifname, "CNI_IFNAME")?;
    let failed = |e: attach::Error| {
        CniError::new(
            codes::ATTACH_FAILED,
            "removing the attachment failed",
            e.to_string(),
        )
    };
    if let Some(netns) = &env.netns {
        if let Ok(host) = host_interface(Path::new(netns), ifname) {
            attach::detach_pinned(&conf.bpffs, &host.name).map_err(failed)?;
        }
    }
    attach::sweep_stale(&conf.bpffs).map_err(failed)?;
    Ok(())
}

/// The host side of a pod's veth.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostInterface {
    pub name: String,
    pub ifindex: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error("opening the network namespace {path}: {source}")]
    OpenNetns { path: PathBuf, source: io::Error },
    #[error("entering the network namespace {path}: {source}")]
    EnterNetns { path: PathBuf, source: io::Error },
    #[error("there is no interface {ifname} in the pod's namespace")]
    NoPodInterface { ifname: String },
    #[error("{ifname} in the pod's namespace has no peer (is it a veth?)")]
    NoPeer { ifname: String },
    #[error(
        "the peer of {ifname} (ifindex {peer}) is not in this namespace: run lb-cni in the \
         namespace where the pod's host-side interfaces are"
    )]
    PeerElsewhere { ifname: String, peer: u32 },
    #[error("netlink: {0}")]
    Netlink(io::Error),
}

/// Finds the host side of `ifname` in the pod namespace at `netns`: its peer ifindex is read
/// from inside the pod namespace (on a thread that joins it), then that index is looked up here
/// and must name a link whose own peer is the pod's interface.
pub fn host_interface(netns: &Path, ifname: &str) -> Result<HostInterface, LookupError> {
    let file = File::open(netns).map_err(|source| LookupError::OpenNetns {
        path: netns.into(),
        source,
    })?;
    let (pod_ifindex, peer) = std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: setns only reads the descriptor, which `file` keeps open; it moves
                // this thread (which ends right after) and nothing else.
                if unsafe { libc::setns(file.as_fd().as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(LookupError::EnterNetns {
                        path: netns.into(),
                        source: io::Error::last_os_error(),
                    });
                }
                let ifindex =
                    attach::ifindex(ifname).ok_or_else(|| LookupError::NoPodInterface {
                        ifname: ifname.into(),
                    })?;
                let link = netlink::link_by_index(ifindex)
                    .map_err(LookupError::Netlink)?
                    .ok_or_else(|| LookupError::NoPodInterface {
                        ifname: ifname.into(),
                    })?;
                match link.link {
                    Some(peer) if peer != 0 && peer != ifindex => Ok((ifindex, peer)),
                    _ => Err(LookupError::NoPeer {
                        ifname: ifname.into(),
                    }),
                }
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })?;
    let elsewhere = || LookupError::PeerElsewhere {
        ifname: ifname.into(),
        peer,
    };
    let host = netlink::link_by_index(peer)
        .map_err(LookupError::Netlink)?
        .ok_or_else(elsewhere)?;
    // An unrelated interface may have the same index when the peer lives in another namespace.
    if host.link != Some(pod_ifindex) {
        return Err(elsewhere());
    }
    let name = host.name.ok_or_else(elsewhere)?;
    Ok(HostInterface {
        name,
        ifindex: peer,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(command: &str) -> Environment {
        Environment {
            command: Some(command.into()),
            container_id: Some("c1".into()),
            netns: Some("/run/netns/none".into()),
            ifname: Some("eth0".into()),
            ..Default::default()
        }
    }

    fn error_of(output: &Output) -> Value {
        assert_eq!(output.exit_code, 1, "{}", output.stdout);
        serde_json::from_str(&output.stdout).expect("error output is JSON")
    }

    #[test]
    fn version_lists_both_supported_versions() {
        let out = run(&env("VERSION"), br#"{"cniVersion":"0.4.0"}"#);
        assert_eq!(out.exit_code, 0);
        let v: Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(v["cniVersion"], "0.4.0");
        assert_eq!(v["supportedVersions"], json!(["0.4.0", "1.0.0"]));
    }

    #[test]
    fn malformed_json_is_a_decoding_failure() {
        let e = error_of(&run(&env("ADD"), b"{not json"));
        assert_eq!(e["code"], codes::DECODING_FAILURE);
        assert_eq!(e["cniVersion"], DEFAULT_VERSION);
    }

    #[test]
    fn unsupported_version_is_incompatible() {
        let e = error_of(&run(
            &env("ADD"),
            br#"{"cniVersion":"0.2.0","name":"n","type":"lb-cni"}"#,
        ));
        assert_eq!(e["code"], codes::INCOMPATIBLE_VERSION);
    }

    #[test]
    fn wrong_type_or_relative_bpffs_is_an_invalid_config() {
        for conf in [
            r#"{"cniVersion":"1.0.0","name":"n","type":"bridge"}"#,
            r#"{"cniVersion":"1.0.0","name":"n","type":"lb-cni","bpffs":"lb"}"#,
            r#"{"cniVersion":"1.0.0","type":"lb-cni"}"#,
        ] {
            let e = error_of(&run(&env("ADD"), conf.as_bytes()));
            assert_eq!(e["code"], codes::INVALID_NETWORK_CONFIG, "{conf}");
            assert_eq!(e["cniVersion"], "1.0.0");
        }
    }

    #[test]
    fn add_without_prev_result_says_it_must_be_chained() {
        let e = error_of(&run(
            &env("ADD"),
            br#"{"cniVersion":"1.0.0","name":"n","type":"lb-cni"}"#,
        ));
        assert_eq!(e["code"], codes::INVALID_NETWORK_CONFIG);
        assert!(e["msg"].as_str().unwrap().contains("chained"));
    }

    #[test]
    fn missing_environment_is_reported_by_name() {
        let mut environment = env("ADD");
        environment.netns = None;
        let e = error_of(&run(
            &environment,
            br#"{"cniVersion":"1.0.0","name":"n","type":"lb-cni","prevResult":{}}"#,
        ));
        assert_eq!(e["code"], codes::INVALID_ENVIRONMENT);
        assert!(e["msg"].as_str().unwrap().contains("CNI_NETNS"));
        let e = error_of(&run(&env("GC"), b"{}"));
        assert_eq!(e["code"], codes::INVALID_ENVIRONMENT);
    }

    #[test]
    fn del_of_a_vanished_pod_succeeds() {
        let out = run(
            &env("DEL"),
            br#"{"cniVersion":"1.0.0","name":"n","type":"lb-cni","bpffs":"/nonexistent/lb"}"#,
        );
        assert_eq!(
            out,
            Output {
                stdout: String::new(),
                exit_code: 0
            }
        );
    }
}
