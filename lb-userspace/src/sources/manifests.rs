//! The manifests source: Services and EndpointSlices read from YAML files in a directory, in the
//! form `kubectl get -o yaml` prints (single objects, multi-document files, or `kind: List`).
//!
//! [`DirSource`] follows the directory and reports what changed. Every round it lists the files
//! and compares each one's size and modification time with the last round (a cheap fingerprint
//! that catches every way editors, `kubectl` and ConfigMap mounts replace files: rename, truncate,
//! symlink swaps); only files whose fingerprint changed are read again, and inside such a file
//! only the YAML documents whose text changed are parsed again. The objects of the changed
//! documents are compared with what the directory held before, and only those that differ are
//! reported. A change to one Service in a directory of 10,000 therefore costs one file read and
//! one document parse, not a re-parse of everything.
//!
//! Objects are trimmed to what the model reads, as the Kubernetes source trims them (`kubectl get
//! -o yaml` output carries managedFields and more, which would otherwise stay in memory).
//!
//! An object defined twice (same kind, namespace and name) is taken from the first file in name
//! order, and from the first document within a file; the others are reported once as warnings.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fs,
    hash::{Hash, Hasher},
    path::{Path, PathBuf},
    sync::Arc,
    time::SystemTime,
};

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use serde::Deserialize;

use super::{name_of, Changes, Name, Objects};

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
    /// 1-based index of the YAML document in the file (0: the file as a whole).
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

/// One object read from a document.
#[derive(Debug, Clone)]
enum Obj {
    Service(Arc<Service>),
    Slice(Arc<EndpointSlice>),
    Node(Arc<Node>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Kind {
    Service,
    Slice,
    Node,
}

impl Obj {
    fn key(&self) -> (Kind, Name) {
        match self {
            Obj::Service(s) => (Kind::Service, name_of(&s.metadata, true)),
            Obj::Slice(s) => (Kind::Slice, name_of(&s.metadata, true)),
            Obj::Node(n) => (Kind::Node, name_of(&n.metadata, false)),
        }
    }

    fn same(&self, other: &Obj) -> bool {
        match (self, other) {
            (Obj::Service(a), Obj::Service(b)) => Arc::ptr_eq(a, b),
            (Obj::Slice(a), Obj::Slice(b)) => Arc::ptr_eq(a, b),
            (Obj::Node(a), Obj::Node(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

/// The objects of one chunk of a file (one document, or several when they are separated only by
/// `...` end markers), with its document count for numbering warnings.
#[derive(Debug, Clone)]
struct Chunk {
    hash: u64,
    documents: usize,
    objects: Vec<Obj>,
}

/// Splits a YAML stream at its `---` document markers (a marker is a line starting with `---`
/// followed by nothing or by white space; YAML does not allow one inside a document, not even in
/// a block scalar). The text before the first marker is a chunk of its own.
fn split_documents(text: &str) -> Vec<&str> {
    let mut chunks = Vec::new();
    let mut start = 0;
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let marker = line.strip_prefix("---").is_some_and(|rest| {
            rest.is_empty() || rest.starts_with(|c: char| c.is_ascii_whitespace())
        });
        if marker && offset > start {
            chunks.push(&text[start..offset]);
            start = offset;
        }
        offset += line.len();
    }
    if offset > start {
        chunks.push(&text[start..offset]);
    }
    chunks
}

fn text_hash(text: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut h);
    h.finish()
}

/// Parses one chunk; `first_document` numbers its first document in warnings.
fn parse_chunk(
    file: &Path,
    text: &str,
    first_document: usize,
    warnings: &mut Vec<DocumentWarning>,
) -> Chunk {
    let mut objects = Vec::new();
    let mut documents = 0;
    for doc in serde_yaml::Deserializer::from_str(text) {
        let number = first_document + documents;
        let mut warn = |message: String| {
            warnings.push(DocumentWarning {
                file: file.to_path_buf(),
                document: number,
                message,
            })
        };
        match serde_yaml::Value::deserialize(doc) {
            Ok(serde_yaml::Value::Null) => documents += 1,
            Ok(value) => {
                documents += 1;
                add_object(value, &mut objects, &mut warn);
            }
            // After a syntax error the stream cannot be resynchronised (the iterator would yield
            // the same error forever): keep what came before and say where it stopped. The next
            // `---` starts a new chunk, so only this document is lost.
            Err(e) => {
                documents += 1;
                warn(format!(
                    "invalid YAML, the rest of this document is skipped: {e}"
                ));
                break;
            }
        }
    }
    // Kept for as long as the file does not change: one per document, 20,000 at 10k Services.
    objects.shrink_to_fit();
    Chunk {
        hash: text_hash(text),
        documents,
        objects,
    }
}

/// Parses a file's chunks, reusing the chunks of `previous` whose text did not change.
fn parse_file(
    file: &Path,
    text: &str,
    previous: &[Chunk],
    warnings: &mut Vec<DocumentWarning>,
) -> Vec<Chunk> {
    let mut reusable: HashMap<u64, &Chunk> = previous.iter().map(|c| (c.hash, c)).collect();
    let mut next_document = 1;
    let mut chunks = Vec::new();
    for text in split_documents(text) {
        let chunk = match reusable.remove(&text_hash(text)) {
            Some(old) => old.clone(),
            None => parse_chunk(file, text, next_document, warnings),
        };
        next_document += chunk.documents;
        chunks.push(chunk);
    }
    chunks
}

/// Parses the documents of one file into `objects`; bad documents become warnings.
pub fn parse_into(
    file: &Path,
    text: &str,
    objects: &mut Objects,
    warnings: &mut Vec<DocumentWarning>,
) {
    for chunk in parse_file(file, text, &[], warnings) {
        for obj in chunk.objects {
            match obj {
                Obj::Service(s) => objects.services.push((*s).clone()),
                Obj::Slice(s) => objects.endpoint_slices.push((*s).clone()),
                Obj::Node(n) => objects.nodes.push((*n).clone()),
            }
        }
    }
}

fn add_object(value: serde_yaml::Value, objects: &mut Vec<Obj>, warn: &mut impl FnMut(String)) {
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
            Ok(mut svc) => {
                super::kube::trim_service(&mut svc);
                objects.push(Obj::Service(Arc::new(svc)))
            }
            Err(e) => warn(format!("Service {name} does not parse and is skipped: {e}")),
        },
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            match serde_yaml::from_value::<EndpointSlice>(value) {
                Ok(mut slice) => {
                    super::kube::trim_endpoint_slice(&mut slice);
                    objects.push(Obj::Slice(Arc::new(slice)))
                }
                Err(e) => warn(format!(
                    "EndpointSlice {name} does not parse and is skipped: {e}"
                )),
            }
        }
        ("v1", "Node") => match serde_yaml::from_value::<Node>(value) {
            Ok(mut node) => {
                super::kube::trim_node(&mut node);
                objects.push(Obj::Node(Arc::new(node)))
            }
            Err(e) => warn(format!("Node {name} does not parse and is skipped: {e}")),
        },
        // Other kinds (Deployments, Pods, ...) often share files with Services: not ours to read.
        _ => {}
    }
}

/// The `*.yaml`, `*.yml` and `*.json` files of `dir` (not recursive, hidden files left out), in
/// name order, with their fingerprint.
fn manifest_files(dir: &Path) -> Result<Vec<(PathBuf, Fingerprint)>, Error> {
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
        if !is_manifest || hidden {
            continue;
        }
        // Follows symlinks (ConfigMap mounts); a file that vanishes between listing and stat is
        // simply not there this round.
        if let Ok(meta) = fs::metadata(&path) {
            if meta.is_file() {
                files.push((path, (meta.len(), meta.modified().ok())));
            }
        }
    }
    files.sort();
    Ok(files)
}

/// Size and modification time.
type Fingerprint = (u64, Option<SystemTime>);

/// Every definition of each object, sorted by where it stands: (file, position in the file).
/// Nearly every object has one definition, so a small vector (with the file's path shared by
/// all its objects) rather than a map: a one-entry `BTreeMap` costs a whole B-tree node, and
/// with 20,000 objects those nodes and per-object path copies came to about 16 MiB.
type Definitions = BTreeMap<(Kind, Name), Vec<Definition>>;

#[derive(Debug, Clone)]
struct Definition {
    file: Arc<Path>,
    position: usize,
    obj: Obj,
}

impl Definition {
    fn place(&self) -> (&Path, usize) {
        (&self.file, self.position)
    }
}

struct FileState {
    fingerprint: Fingerprint,
    chunks: Vec<Chunk>,
}

/// Follows a manifests directory and reports what changed in it (see the module documentation).
pub struct DirSource {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
    definitions: Definitions,
    /// The first poll reports even an empty directory: "no objects" is a state to program.
    polled: bool,
}

impl DirSource {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            files: BTreeMap::new(),
            definitions: BTreeMap::new(),
            polled: false,
        }
    }

    /// Reads what changed since the last call (everything on the first call). `None` when no
    /// file changed. A directory that cannot be listed is an error and changes nothing; a file
    /// that cannot be read keeps its previous objects and is tried again next round.
    pub fn poll(&mut self) -> Result<Option<(Changes, Vec<DocumentWarning>)>, Error> {
        let listed = manifest_files(&self.dir)?;
        let mut warnings = Vec::new();
        let mut updates: Vec<(PathBuf, Option<FileState>)> = Vec::new();
        let listed_paths: BTreeSet<&PathBuf> = listed.iter().map(|(p, _)| p).collect();
        for path in self.files.keys() {
            if !listed_paths.contains(path) {
                updates.push((path.clone(), None));
            }
        }
        let stale: Vec<&(PathBuf, Fingerprint)> = listed
            .iter()
            .filter(|(path, fp)| self.files.get(path).is_none_or(|f| f.fingerprint != *fp))
            .collect();
        // Parsing dominates a full read (10,000 Services: seconds): spread the files over the
        // cores, in contiguous runs so that warnings keep the file order.
        let workers = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .clamp(1, 8)
            .min(stale.len().max(1));
        let files = &self.files;
        let read_one = |(path, fingerprint): &(PathBuf, Fingerprint)| {
            let previous = files.get(path);
            let mut warnings = Vec::new();
            let update = match fs::read_to_string(path) {
                Ok(text) => {
                    let old = previous.map(|f| f.chunks.as_slice()).unwrap_or(&[]);
                    let chunks = parse_file(path, &text, old, &mut warnings);
                    Some((
                        path.clone(),
                        Some(FileState {
                            fingerprint: *fingerprint,
                            chunks,
                        }),
                    ))
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    previous.map(|_| (path.clone(), None))
                }
                Err(e) => {
                    warnings.push(DocumentWarning {
                        file: path.clone(),
                        document: 0,
                        message: format!("cannot read file, keeping what it held before: {e}"),
                    });
                    None
                }
            };
            (update, warnings)
        };
        let results: Vec<_> = if workers <= 1 {
            stale.iter().map(|f| read_one(f)).collect()
        } else {
            let per = stale.len().div_ceil(workers);
            std::thread::scope(|scope| {
                let handles: Vec<_> = stale
                    .chunks(per)
                    .map(|run| {
                        scope.spawn(move || run.iter().map(|f| read_one(f)).collect::<Vec<_>>())
                    })
                    .collect();
                handles
                    .into_iter()
                    .flat_map(|h| h.join().expect("a manifest parser thread panicked"))
                    .collect()
            })
        };
        for (update, mut file_warnings) in results {
            updates.extend(update);
            warnings.append(&mut file_warnings);
        }
        let first = !std::mem::replace(&mut self.polled, true);
        if updates.is_empty() {
            let report = first || !warnings.is_empty();
            return Ok(report.then(|| (Changes::default(), warnings)));
        }
        // The winning definition of every object the updated files define, before and after.
        let mut touched = BTreeMap::new();
        let winner = |defs: &Definitions, key: &(Kind, Name)| {
            defs.get(key).and_then(|d| d.first()).map(|d| d.obj.clone())
        };
        for (path, state) in &updates {
            let file: Arc<Path> = Arc::from(path.as_path());
            let old = self
                .files
                .get(path)
                .map(|f| f.chunks.as_slice())
                .unwrap_or(&[]);
            let new = state.as_ref().map(|f| f.chunks.as_slice()).unwrap_or(&[]);
            for obj in old.iter().chain(new).flat_map(|c| &c.objects) {
                let key = obj.key();
                if let std::collections::btree_map::Entry::Vacant(e) = touched.entry(key) {
                    let before = winner(&self.definitions, e.key());
                    e.insert(before);
                }
            }
            for (position, obj) in old.iter().flat_map(|c| &c.objects).enumerate() {
                let key = obj.key();
                if let Some(defs) = self.definitions.get_mut(&key) {
                    defs.retain(|d| d.place() != (path.as_path(), position));
                    if defs.is_empty() {
                        self.definitions.remove(&key);
                    }
                }
            }
            for (position, obj) in new.iter().flat_map(|c| &c.objects).enumerate() {
                let defs = self.definitions.entry(obj.key()).or_default();
                let at = defs.partition_point(|d| d.place() < (path.as_path(), position));
                if defs.len() == defs.capacity() {
                    defs.reserve_exact(1);
                }
                defs.insert(
                    at,
                    Definition {
                        file: Arc::clone(&file),
                        position,
                        obj: obj.clone(),
                    },
                );
                let first = &defs[0].file;
                if at != 0 {
                    let (kind, (ns, name)) = obj.key();
                    warnings.push(DocumentWarning {
                        file: path.clone(),
                        document: 0,
                        message: format!(
                            "{kind:?} {ns}/{name} is defined more than once; the first definition, in {}, is used",
                            first.display()
                        ),
                    });
                }
            }
        }
        for (path, state) in updates {
            match state {
                Some(s) => self.files.insert(path, s),
                None => self.files.remove(&path),
            };
        }
        let mut changes = Changes::default();
        for (key, before) in touched {
            let after = winner(&self.definitions, &key);
            let same = match (&before, &after) {
                (Some(a), Some(b)) => a.same(b),
                (None, None) => true,
                _ => false,
            };
            if same {
                continue;
            }
            let (kind, name) = key;
            match (kind, after) {
                (Kind::Service, after) => {
                    let obj = match after {
                        Some(Obj::Service(s)) => Some(s),
                        _ => None,
                    };
                    changes.services.insert(name, obj);
                }
                (Kind::Slice, after) => {
                    let obj = match after {
                        Some(Obj::Slice(s)) => Some(s),
                        _ => None,
                    };
                    changes.endpoint_slices.insert(name, obj);
                }
                (Kind::Node, after) => {
                    let obj = match after {
                        Some(Obj::Node(n)) => Some(n),
                        _ => None,
                    };
                    changes.nodes.insert(name, obj);
                }
            }
        }
        Ok(Some((changes, warnings)))
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
        let names: Vec<_> = objects
            .services
            .iter()
            .map(|s| s.metadata.name.clone().unwrap())
            .collect();
        assert_eq!(
            names,
            ["b", "c"],
            "a syntax error loses its own document only"
        );
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert_eq!(warnings[0].document, 1);
        assert!(warnings[0]
            .message
            .contains("Service default/a does not parse"));
        assert_eq!(warnings[1].document, 3);
        assert!(warnings[1].message.contains("invalid YAML"));
    }

    #[test]
    fn documents_split_at_markers_only() {
        let text = "a: 1\n---\nb: |\n  --- not a marker\n---   \nc: 3\n--- {d: 4}\n";
        assert_eq!(
            split_documents(text),
            [
                "a: 1\n",
                "---\nb: |\n  --- not a marker\n",
                "---   \nc: 3\n",
                "--- {d: 4}\n"
            ]
        );
        assert_eq!(split_documents("---\nx: 1\n"), ["---\nx: 1\n"]);
        assert!(split_documents("").is_empty());
    }

    fn svc(name: &str, ip: &str) -> String {
        format!("---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{clusterIP: {ip}, ports: [{{port: 80}}]}}\n")
    }

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("lb-manifests-{tag}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }

        /// Writes through a rename, as kubectl and editors do, so the fingerprint always moves.
        fn write(&self, name: &str, text: &str) {
            let tmp = self.0.join(".tmp");
            fs::write(&tmp, text).unwrap();
            fs::rename(&tmp, self.0.join(name)).unwrap();
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn names<K>(m: &BTreeMap<Name, Option<Arc<K>>>) -> Vec<String> {
        m.iter()
            .map(|((_, n), o)| format!("{}{n}", if o.is_some() { "+" } else { "-" }))
            .collect()
    }

    #[test]
    fn an_empty_directory_is_reported_once() {
        let dir = TempDir::new("empty");
        let mut source = DirSource::new(&dir.0);
        let (changes, warnings) = source.poll().unwrap().expect("first poll reports");
        assert!(changes.is_empty() && warnings.is_empty());
        assert!(source.poll().unwrap().is_none());
    }

    #[test]
    fn only_changed_objects_are_reported_and_unchanged_documents_are_not_parsed_again() {
        let dir = TempDir::new("delta");
        dir.write(
            "a.yaml",
            &format!("{}{}", svc("a", "198.19.0.1"), svc("b", "198.19.0.2")),
        );
        dir.write("c.yaml", &svc("c", "198.19.0.3"));
        let mut source = DirSource::new(&dir.0);
        let (changes, _) = source.poll().unwrap().unwrap();
        assert_eq!(names(&changes.services), ["+a", "+b", "+c"]);
        let b_before = source.files[&dir.0.join("a.yaml")].chunks[1].objects[0].clone();
        assert!(source.poll().unwrap().is_none(), "nothing changed");

        // b changes; a is the same text and is not parsed again.
        dir.write(
            "a.yaml",
            &format!("{}{}", svc("a", "198.19.0.1"), svc("b", "198.19.0.9")),
        );
        let a_before = match &source.definitions[&(Kind::Service, ("default".into(), "a".into()))]
            .first()
            .map(|d| &d.obj)
        {
            Some(Obj::Service(s)) => Arc::clone(s),
            _ => unreachable!(),
        };
        let (changes, _) = source.poll().unwrap().unwrap();
        assert_eq!(names(&changes.services), ["+b"]);
        assert!(!b_before.same(&Obj::Service(Arc::clone(
            changes.services.values().next().unwrap().as_ref().unwrap()
        ))));
        match &source.files[&dir.0.join("a.yaml")].chunks[0].objects[0] {
            Obj::Service(s) => assert!(Arc::ptr_eq(s, &a_before), "a was re-parsed"),
            _ => unreachable!(),
        }

        // A file removed: its objects are deleted.
        fs::remove_file(dir.0.join("c.yaml")).unwrap();
        let (changes, _) = source.poll().unwrap().unwrap();
        assert_eq!(names(&changes.services), ["-c"]);

        // Hidden files are ignored.
        fs::write(dir.0.join(".swp.yaml"), svc("x", "198.19.0.7")).unwrap();
        assert!(source.poll().unwrap().is_none());
    }

    #[test]
    fn a_duplicate_definition_warns_and_the_first_file_wins_until_it_goes() {
        let dir = TempDir::new("dup");
        dir.write("1.yaml", &svc("a", "198.19.0.1"));
        let mut source = DirSource::new(&dir.0);
        source.poll().unwrap().unwrap();
        dir.write("2.yaml", &svc("a", "198.19.0.2"));
        let (changes, warnings) = source.poll().unwrap().unwrap();
        assert!(changes.is_empty(), "the first file still wins: {changes:?}");
        assert_eq!(warnings.len(), 1);
        assert!(
            warnings[0]
                .message
                .contains("Service default/a is defined more than once")
                && warnings[0].message.contains("1.yaml"),
            "{}",
            warnings[0]
        );
        fs::remove_file(dir.0.join("1.yaml")).unwrap();
        let (changes, _) = source.poll().unwrap().unwrap();
        let a = changes.services[&("default".into(), "a".into())]
            .as_ref()
            .unwrap();
        assert_eq!(
            a.spec.as_ref().unwrap().cluster_ip.as_deref(),
            Some("198.19.0.2"),
            "the remaining definition takes over"
        );
    }

    #[test]
    fn an_unreadable_directory_is_an_error_and_changes_nothing() {
        let dir = TempDir::new("gone");
        dir.write("a.yaml", &svc("a", "198.19.0.1"));
        let mut source = DirSource::new(&dir.0);
        source.poll().unwrap().unwrap();
        fs::remove_dir_all(&dir.0).unwrap();
        assert!(source.poll().is_err());
        fs::create_dir_all(&dir.0).unwrap();
        dir.write("a.yaml", &svc("a", "198.19.0.1"));
        // The same text again: its document is recognised, nothing changed.
        let (changes, _) = source.poll().unwrap().unwrap();
        assert!(changes.is_empty(), "{changes:?}");
    }
}
