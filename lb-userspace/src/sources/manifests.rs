//! The manifests source: Services and EndpointSlices read from YAML files in a directory, in the
//! form `kubectl get -o yaml` prints (single objects, multi-document files, or `kind: List`).
//!
//! The directory is polled: a cheap fingerprint (names, sizes, modification times) is compared
//! every poll interval and the files are re-read only when it changes. Polling is used instead of
//! inotify because editors and `kubectl` replace files in several ways (rename, truncate, symlink
//! swaps as in a mounted ConfigMap) that a fingerprint catches uniformly.
use std::{
    fs,
    path::{Path, PathBuf},
    time::SystemTime,
};

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use serde::Deserialize;

use super::Objects;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading manifests directory {path}: {source}")]
    ReadDir {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A problem with one document; the rest of the directory is still used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocumentWarning {
    pub file: PathBuf,
    /// 1-based index of the YAML document in the file.
    pub document: usize,
    pub message: String,
}

impl std::fmt::Display for DocumentWarning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (document {}): {}",
            self.file.display(),
            self.document,
            self.message
        )
    }
}

/// Reads every `*.yaml`, `*.yml` and `*.json` file in `dir` (not recursive), in name order.
pub fn load_dir(dir: &Path) -> Result<(Objects, Vec<DocumentWarning>), Error> {
    let mut objects = Objects::default();
    let mut warnings = Vec::new();
    for path in manifest_files(dir)? {
        match fs::read_to_string(&path) {
            Ok(text) => parse_into(&path, &text, &mut objects, &mut warnings),
            Err(e) => warnings.push(DocumentWarning {
                file: path.clone(),
                document: 0,
                message: format!("cannot read file: {e}"),
            }),
        }
    }
    Ok((objects, warnings))
}

fn manifest_files(dir: &Path) -> Result<Vec<PathBuf>, Error> {
    let read_err = |source| Error::ReadDir {
        path: dir.to_path_buf(),
        source,
    };
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).map_err(read_err)? {
        let path = entry.map_err(read_err)?.path();
        let is_manifest = matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml" | "json")
        );
        // Hidden files are editors' swap files and ConfigMap mount internals (..data).
        let hidden = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.'));
        if is_manifest && !hidden && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Parses the documents of one file into `objects`; bad documents become warnings.
pub fn parse_into(
    file: &Path,
    text: &str,
    objects: &mut Objects,
    warnings: &mut Vec<DocumentWarning>,
) {
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let mut warn = |message: String| {
            warnings.push(DocumentWarning {
                file: file.to_path_buf(),
                document: i + 1,
                message,
            })
        };
        match serde_yaml::Value::deserialize(doc) {
            Ok(serde_yaml::Value::Null) => {}
            Ok(value) => add_object(value, objects, &mut warn),
            // After a syntax error the stream cannot be resynchronised (the iterator would yield
            // the same error forever): keep what came before and say where it stopped.
            Err(e) => {
                warn(format!(
                    "invalid YAML, the rest of the file is skipped: {e}"
                ));
                break;
            }
        }
    }
}

fn add_object(value: serde_yaml::Value, objects: &mut Objects, warn: &mut impl FnMut(String)) {
    let str_field = |v: &serde_yaml::Value, f: &str| {
        v.get(f)
            .and_then(|x| x.as_str())
            .unwrap_or_default()
            .to_string()
    };
    let kind = str_field(&value, "kind");
    // namespace/name for messages about an object that does not parse.
    let meta = value.get("metadata");
    let name = format!(
        "{}/{}",
        meta.and_then(|m| m.get("namespace"))
            .and_then(|n| n.as_str())
            .unwrap_or("default"),
        meta.and_then(|m| m.get("name"))
            .and_then(|n| n.as_str())
            .unwrap_or("<no name>")
    );
    let api_version = str_field(&value, "apiVersion");
    match (api_version.as_str(), kind.as_str()) {
        ("v1", "List") => match value.get("items").and_then(|i| i.as_sequence()) {
            Some(items) => {
                for item in items {
                    add_object(item.clone(), objects, warn);
                }
            }
            None => warn("kind List without an items list".into()),
        },
        ("v1", "Service") => match serde_yaml::from_value::<Service>(value) {
            Ok(svc) => objects.services.push(svc),
            Err(e) => warn(format!("Service {name} does not parse and is skipped: {e}")),
        },
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            match serde_yaml::from_value::<EndpointSlice>(value) {
                Ok(slice) => objects.endpoint_slices.push(slice),
                Err(e) => warn(format!(
                    "EndpointSlice {name} does not parse and is skipped: {e}"
                )),
            }
        }
        ("v1", "Node") => match serde_yaml::from_value::<Node>(value) {
            Ok(node) => objects.nodes.push(node),
            Err(e) => warn(format!("Node {name} does not parse and is skipped: {e}")),
        },
        // Other kinds (Deployments, Pods, ...) often share files with Services: not ours to read.
        _ => {}
    }
}

/// What the poller compares between rounds.
type Fingerprint = Vec<(PathBuf, u64, Option<SystemTime>)>;

/// Follows a manifests directory: `changed()` is true on the first call and whenever a file was
/// added, removed or modified since the last call.
pub struct DirWatcher {
    dir: PathBuf,
    last: Option<Fingerprint>,
}

impl DirWatcher {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            last: None,
        }
    }

    pub fn changed(&mut self) -> Result<bool, Error> {
        let mut now = Fingerprint::new();
        for path in manifest_files(&self.dir)? {
            // A file that vanishes between listing and stat shows up as changed next round.
            if let Ok(meta) = fs::metadata(&path) {
                now.push((path, meta.len(), meta.modified().ok()));
            }
        }
        let changed = self.last.as_ref() != Some(&now);
        self.last = Some(now);
        Ok(changed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIST: &str = r#"
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Service
  metadata: {name: web, namespace: default}
  spec: {clusterIP: 198.19.0.10, ports: [{name: http, port: 80, protocol: TCP, targetPort: 8080}]}
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata: {name: web-abc, namespace: default, labels: {kubernetes.io/service-name: web}}
  addressType: IPv4
  endpoints: [{addresses: [198.18.1.2]}]
  ports: [{name: http, port: 8080, protocol: TCP}]
"#;

    #[test]
    fn kubectl_list_output_yields_service_and_slice() {
        let (mut objects, mut warnings) = (Objects::default(), Vec::new());
        parse_into(Path::new("a.yaml"), LIST, &mut objects, &mut warnings);
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(objects.services.len(), 1);
        assert_eq!(objects.endpoint_slices.len(), 1);
        assert_eq!(objects.services[0].metadata.name.as_deref(), Some("web"));
    }

    #[test]
    fn bad_document_is_reported_and_the_rest_is_kept() {
        let text = "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {ports: 7}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: b}\n---\nkey: [unclosed\n---\napiVersion: v1\nkind: Service\nmetadata: {name: c}\n";
        let (mut objects, mut warnings) = (Objects::default(), Vec::new());
        parse_into(Path::new("x.yaml"), text, &mut objects, &mut warnings);
        assert_eq!(objects.services.len(), 1);
        assert_eq!(objects.services[0].metadata.name.as_deref(), Some("b"));
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert_eq!(warnings[0].document, 1);
        assert!(warnings[0]
            .message
            .contains("Service default/a does not parse"));
        assert_eq!(warnings[1].document, 3);
        assert!(warnings[1].message.contains("invalid YAML"));
    }

    #[test]
    fn watcher_sees_added_modified_and_removed_files() {
        let dir = std::env::temp_dir().join(format!("lb-watch-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let mut w = DirWatcher::new(&dir);
        assert!(w.changed().unwrap(), "first call reports the initial state");
        assert!(!w.changed().unwrap());
        fs::write(dir.join("a.yaml"), "x: 1\n").unwrap();
        assert!(w.changed().unwrap());
        fs::write(dir.join("a.yaml"), "x: 12\n").unwrap();
        assert!(w.changed().unwrap());
        fs::write(dir.join(".swp.yaml"), "ignored").unwrap();
        assert!(!w.changed().unwrap(), "hidden files are ignored");
        fs::remove_file(dir.join("a.yaml")).unwrap();
        assert!(w.changed().unwrap());
        fs::remove_dir_all(&dir).unwrap();
    }
}
