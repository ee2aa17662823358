//! `lb-cni install` / `lb-cni uninstall`: put the plugin binary into the runtime's CNI binary
//! directory and chain `{"type": "lb-cni", ...}` after the node's existing plugins.
//!
//! Which file: container runtimes (containerd, CRI-O) use the first file of the configuration
//! directory in lexical order among `*.conf`, `*.conflist` and `*.json`. We edit that file when it
//! is a `.conflist`. A single-plugin `.conf`/`.json` cannot be chained; rather than rewrite the
//! cluster CNI's own file (which its installer may put back at any time), install refuses with a
//! message saying so. Edits are idempotent (a second install changes nothing), keep every other
//! key in its order, and are written atomically (temporary file in the same directory, then
//! rename), so a runtime never reads half a file.
use std::{
    io,
    path::{Path, PathBuf},
};

use serde_json::{json, Value};

use super::PLUGIN_TYPE;

/// Where `install` puts the binary, and the name runtimes look for.
const BINARY_NAME: &str = PLUGIN_TYPE;
/// Extensions runtimes read configurations from.
const CONFIG_EXTENSIONS: &[&str] = &["conf", "conflist", "json"];

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("writing {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("{path} is not valid JSON: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: {reason}")]
    NotAConflist { path: PathBuf, reason: String },
    #[error(
        "no CNI configuration (*.conf, *.conflist, *.json) in {dir}: install the cluster's CNI \
         plugin first; lb-cni is chained after it"
    )]
    NoConfig { dir: PathBuf },
    #[error(
        "{path} is the configuration the runtime uses, and it is a single-plugin configuration, \
         which cannot be chained: convert it to a .conflist (its fields become one element of \
         \"plugins\"), or run the agent with --attach-mode agent instead of lb-cni"
    )]
    SinglePluginConfig { path: PathBuf },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The plugin entry that install adds.
pub fn plugin_entry(bpffs: &Path) -> Value {
    json!({"type": PLUGIN_TYPE, "bpffs": bpffs.to_string_lossy()})
}

/// Adds `entry` at the end of `conflist.plugins`, or updates an existing lb-cni entry in place.
/// Returns whether anything changed.
pub fn add_plugin(conflist: &mut Value, entry: &Value) -> Result<bool, String> {
    let plugins = plugins_mut(conflist)?;
    match plugins.iter_mut().find(|p| is_lb_cni(p)) {
        Some(existing) if existing == entry => Ok(false),
        Some(existing) => {
            *existing = entry.clone();
            Ok(true)
        }
        None => {
            plugins.push(entry.clone());
            Ok(true)
        }
    }
}

/// Removes every lb-cni entry from `conflist.plugins`; returns whether there was one.
pub fn remove_plugin(conflist: &mut Value) -> Result<bool, String> {
    let plugins = plugins_mut(conflist)?;
    let before = plugins.len();
    plugins.retain(|p| !is_lb_cni(p));
    Ok(plugins.len() != before)
}

fn is_lb_cni(plugin: &Value) -> bool {
    plugin.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE)
}

fn plugins_mut(conflist: &mut Value) -> Result<&mut Vec<Value>, String> {
    conflist
        .as_object_mut()
        .ok_or("not a JSON object")?
        .get_mut("plugins")
        .ok_or("has no \"plugins\" array")?
        .as_array_mut()
        .ok_or_else(|| "\"plugins\" is not an array".to_string())
}

/// Configuration files of `dir` in the order runtimes consider them.
fn config_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(|source| Error::Read {
        path: dir.into(),
        source,
    })?;
    let mut files: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| CONFIG_EXTENSIONS.contains(&e))
        })
        .collect();
    files.sort();
    Ok(files)
}

fn is_conflist(path: &Path) -> bool {
    path.extension().and_then(|e| e.to_str()) == Some("conflist")
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read(path).map_err(|source| Error::Read {
        path: path.into(),
        source,
    })?;
    serde_json::from_slice(&text).map_err(|source| Error::Parse {
        path: path.into(),
        source,
    })
}

/// Writes `contents` to `path` through a temporary file in the same directory and a rename. The
/// temporary name starts with a dot and has no configuration extension, so runtimes skip it.
fn write_atomically(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let write_error = |source| Error::Write {
        path: path.into(),
        source,
    };
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    let tmp = path.with_file_name(format!(".{}.lb-cni-tmp", name.unwrap_or_default()));
    std::fs::write(&tmp, contents).map_err(write_error)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).map_err(write_error)?;
    std::fs::rename(&tmp, path).map_err(|source| {
        let _ = std::fs::remove_file(&tmp);
        write_error(source)
    })
}

fn to_pretty(value: &Value) -> Vec<u8> {
    let mut text = serde_json::to_vec_pretty(value).expect("a JSON value serializes");
    text.push(b'\n');
    text
}

/// What install or uninstall changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// Configuration files rewritten.
    pub configs: Vec<PathBuf>,
    /// The binary was written or removed.
    pub binary: Option<PathBuf>,
}

/// Copies `self_binary` to `<bin_dir>/lb-cni` (unless identical) and chains the plugin into the
/// configuration the runtime uses.
pub fn install(
    conflist_dir: &Path,
    bin_dir: &Path,
    bpffs: &Path,
    self_binary: &Path,
) -> Result<Changes> {
    let mut changes = Changes::default();
    // Pick and check the configuration before touching anything.
    let config = config_files(conflist_dir)?
        .into_iter()
        .next()
        .ok_or_else(|| Error::NoConfig {
            dir: conflist_dir.into(),
        })?;
    if !is_conflist(&config) {
        return Err(Error::SinglePluginConfig { path: config });
    }
    let mut conflist = read_json(&config)?;
    // The binary first: a runtime must never find a configuration naming a missing plugin.
    let target = bin_dir.join(BINARY_NAME);
    let binary = std::fs::read(self_binary).map_err(|source| Error::Read {
        path: self_binary.into(),
        source,
    })?;
    if std::fs::read(&target).ok().as_deref() != Some(binary.as_slice()) {
        std::fs::create_dir_all(bin_dir).map_err(|source| Error::Write {
            path: bin_dir.into(),
            source,
        })?;
        write_atomically(&target, &binary, 0o755)?;
        changes.binary = Some(target);
    }
    let changed =
        add_plugin(&mut conflist, &plugin_entry(bpffs)).map_err(|reason| Error::NotAConflist {
            path: config.clone(),
            reason,
        })?;
    if changed {
        write_atomically(&config, &to_pretty(&conflist), 0o644)?;
        changes.configs.push(config);
    }
    Ok(changes)
}

/// Removes the lb-cni entry from every `.conflist` of `conflist_dir` (the runtime's choice may
/// have changed since install), then the binary.
pub fn uninstall(conflist_dir: &Path, bin_dir: &Path) -> Result<Changes> {
    let mut changes = Changes::default();
    for config in config_files(conflist_dir)? {
        if !is_conflist(&config) {
            continue;
        }
        let mut conflist = read_json(&config)?;
        // A file that is not a proper conflist holds no entry of ours.
        if remove_plugin(&mut conflist).unwrap_or(false) {
            write_atomically(&config, &to_pretty(&conflist), 0o644)?;
            changes.configs.push(config);
        }
    }
    let target = bin_dir.join(BINARY_NAME);
    match std::fs::remove_file(&target) {
        Ok(()) => changes.binary = Some(target),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(Error::Write {
                path: target,
                source,
            })
        }
    }
    Ok(changes)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFLIST: &str = r#"{
  "name": "k8s-pod-network",
  "cniVersion": "1.0.0",
  "plugins": [
    {"type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local", "subnet": "10.1.0.0/16"}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ],
  "zzz_vendor_field": {"b": 1, "a": 2}
}"#;

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            let dir = std::env::temp_dir().join(format!(
                "lb-cni-install-{tag}-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(dir.join("net.d")).unwrap();
            std::fs::create_dir_all(dir.join("bin")).unwrap();
            std::fs::write(dir.join("self"), b"binary").unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn add_appends_once_and_keeps_the_rest_in_order() {
        let mut conflist: Value = serde_json::from_str(CONFLIST).unwrap();
        let entry = plugin_entry(Path::new("/sys/fs/bpf/lb"));
        assert!(add_plugin(&mut conflist, &entry).unwrap());
        let once = conflist.clone();
        assert!(!add_plugin(&mut conflist, &entry).unwrap());
        assert_eq!(conflist, once);
        let plugins = conflist["plugins"].as_array().unwrap();
        let types: Vec<&str> = plugins
            .iter()
            .map(|p| p["type"].as_str().unwrap())
            .collect();
        assert_eq!(types, ["bridge", "portmap", "lb-cni"]);
        let keys: Vec<&String> = conflist.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["name", "cniVersion", "plugins", "zzz_vendor_field"]);
        let vendor: Vec<&String> = conflist["zzz_vendor_field"]
            .as_object()
            .unwrap()
            .keys()
            .collect();
        assert_eq!(vendor, ["b", "a"]);
    }

    #[test]
    fn add_updates_an_existing_entry_in_place() {
        let mut conflist: Value = serde_json::from_str(CONFLIST).unwrap();
        add_plugin(&mut conflist, &plugin_entry(Path::new("/a"))).unwrap();
        assert!(add_plugin(&mut conflist, &plugin_entry(Path::new("/b"))).unwrap());
        let plugins = conflist["plugins"].as_array().unwrap();
        assert_eq!(plugins.len(), 3);
        assert_eq!(plugins[2]["bpffs"], "/b");
    }

    #[test]
    fn remove_takes_out_exactly_our_entry() {
        let original: Value = serde_json::from_str(CONFLIST).unwrap();
        let mut conflist = original.clone();
        add_plugin(&mut conflist, &plugin_entry(Path::new("/sys/fs/bpf/lb"))).unwrap();
        assert!(remove_plugin(&mut conflist).unwrap());
        assert_eq!(conflist, original);
        assert!(!remove_plugin(&mut conflist).unwrap());
    }

    #[test]
    fn a_conflist_without_plugins_is_refused() {
        let mut value = json!({"name": "x", "type": "bridge"});
        assert!(add_plugin(&mut value, &plugin_entry(Path::new("/x"))).is_err());
    }

    #[test]
    fn install_edits_the_first_config_and_a_second_install_changes_nothing() {
        let tmp = TempDir::new("twice");
        let first = tmp.0.join("net.d/10-bridge.conflist");
        let second = tmp.0.join("net.d/20-other.conflist");
        std::fs::write(&first, CONFLIST).unwrap();
        std::fs::write(&second, CONFLIST).unwrap();
        let (net_d, bin) = (tmp.0.join("net.d"), tmp.0.join("bin"));
        let bpffs = Path::new("/sys/fs/bpf/lb");
        let changes = install(&net_d, &bin, bpffs, &tmp.0.join("self")).unwrap();
        assert_eq!(changes.configs, std::slice::from_ref(&first));
        assert_eq!(changes.binary, Some(bin.join("lb-cni")));
        assert_eq!(std::fs::read(bin.join("lb-cni")).unwrap(), b"binary");
        let after_first = std::fs::read_to_string(&first).unwrap();
        assert_eq!(std::fs::read_to_string(&second).unwrap(), CONFLIST);

        let again = install(&net_d, &bin, bpffs, &tmp.0.join("self")).unwrap();
        assert_eq!(again, Changes::default());
        assert_eq!(std::fs::read_to_string(&first).unwrap(), after_first);

        let removed = uninstall(&net_d, &bin).unwrap();
        assert_eq!(removed.configs, std::slice::from_ref(&first));
        assert!(!bin.join("lb-cni").exists());
        let restored: Value =
            serde_json::from_str(&std::fs::read_to_string(&first).unwrap()).unwrap();
        assert_eq!(restored, serde_json::from_str::<Value>(CONFLIST).unwrap());
        assert_eq!(uninstall(&net_d, &bin).unwrap(), Changes::default());
        let leftovers: Vec<_> = std::fs::read_dir(&net_d)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(leftovers.len(), 2, "temporary files left: {leftovers:?}");
    }

    #[test]
    fn install_refuses_when_the_runtime_uses_a_single_plugin_conf() {
        let tmp = TempDir::new("conf");
        std::fs::write(
            tmp.0.join("net.d/05-bridge.conf"),
            r#"{"cniVersion":"1.0.0","name":"n","type":"bridge"}"#,
        )
        .unwrap();
        std::fs::write(tmp.0.join("net.d/10-later.conflist"), CONFLIST).unwrap();
        let err = install(
            &tmp.0.join("net.d"),
            &tmp.0.join("bin"),
            Path::new("/x"),
            &tmp.0.join("self"),
        )
        .unwrap_err();
        assert!(matches!(err, Error::SinglePluginConfig { .. }), "{err}");
        assert!(
            !tmp.0.join("bin/lb-cni").exists(),
            "nothing is installed on refusal"
        );
        assert_eq!(
            std::fs::read_to_string(tmp.0.join("net.d/10-later.conflist")).unwrap(),
            CONFLIST
        );
    }

    #[test]
    fn install_without_any_config_says_what_is_missing() {
        let tmp = TempDir::new("empty");
        let err = install(
            &tmp.0.join("net.d"),
            &tmp.0.join("bin"),
            Path::new("/x"),
            &tmp.0.join("self"),
        )
        .unwrap_err();
        assert!(matches!(err, Error::NoConfig { .. }), "{err}");
    }
}
