//! Loads a clusterset directory: one subdirectory per cluster, holding manifests.

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde_json::Value;

use super::cluster::InvalidClusterId;
use super::{
    Cluster, ClusterId, ClusterSet, ClusterSettings, EndpointSlice, FieldError, IdentityPolicy,
    Namespace, NetworkPolicy, Node, ObjectError, Pod, Service, labels, schema,
};

/// The per-cluster settings file at the top of a cluster directory (not a manifest).
pub const SETTINGS_FILE: &str = "cluster.yaml";

/// Where something was found: a file, the document in it (from 1) and the `kind: List` item
/// (from 0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// The file, as the directory given joined with its relative path (shared by every
    /// object of the file).
    pub file: Arc<Path>,
    /// The document, counted by `---` separators from 1 (JSON files have one).
    pub document: Option<usize>,
    /// The item of a `kind: List` document, from 0 (its index in `items`).
    pub item: Option<usize>,
}

impl Origin {
    fn new(file: Arc<Path>, document: Option<usize>) -> Self {
        Self {
            file,
            document,
            item: None,
        }
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_location(f, Some(&self.file), self.document, self.item)
    }
}

/// Writes `<file>, document <n>, items[<i>]`, leaving out the parts that are `None`.
fn write_location(
    f: &mut fmt::Formatter<'_>,
    file: Option<&Path>,
    document: Option<usize>,
    item: Option<usize>,
) -> fmt::Result {
    let mut sep = "";
    if let Some(file) = file {
        write!(f, "{}", file.display())?;
        sep = ", ";
    }
    if let Some(n) = document {
        write!(f, "{sep}document {n}")?;
        sep = ", ";
    }
    if let Some(i) = item {
        write!(f, "{sep}items[{i}]")?;
    }
    Ok(())
}

/// A non-fatal finding, with where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadWarning {
    /// The file, if the finding is about one.
    pub file: Option<PathBuf>,
    /// The document in the file, from 1.
    pub document: Option<usize>,
    /// The `kind: List` item in the document, from 0.
    pub item: Option<usize>,
    /// What was found.
    pub message: String,
}

impl LoadWarning {
    fn at(origin: &Origin, message: String) -> Self {
        Self {
            file: Some(origin.file.to_path_buf()),
            document: origin.document,
            item: origin.item,
            message,
        }
    }
}

impl fmt::Display for LoadWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_location(f, self.file.as_deref(), self.document, self.item)?;
        if self.file.is_some() || self.document.is_some() || self.item.is_some() {
            f.write_str(": ")?;
        }
        f.write_str(&self.message)
    }
}

/// Why a clusterset or cluster could not be loaded; each names the file (and document, object
/// and field) at fault.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A directory could not be listed.
    #[error("{}: cannot read directory: {source}", dir.display())]
    ReadDir {
        /// The directory.
        dir: PathBuf,
        /// The system's error.
        source: io::Error,
    },
    /// A file could not be read.
    #[error("{}: cannot read: {source}", file.display())]
    ReadFile {
        /// The file.
        file: PathBuf,
        /// The system's error.
        source: io::Error,
    },
    /// A file is not UTF-8 text.
    #[error("{}: not UTF-8 text (invalid byte on line {line})", file.display())]
    NotUtf8 {
        /// The file.
        file: PathBuf,
        /// The line of the first invalid byte, from 1.
        line: usize,
    },
    /// A cluster directory's name is not a valid cluster id.
    #[error("{}: the directory's name must be a cluster id: {source}", dir.display())]
    ClusterId {
        /// The directory.
        dir: PathBuf,
        /// Why the name is not a cluster id.
        source: InvalidClusterId,
    },
    /// The clusterset directory holds no cluster directory.
    #[error("{}: no cluster directory in the clusterset", dir.display())]
    NoClusters {
        /// The clusterset directory.
        dir: PathBuf,
    },
    /// A cluster's settings file is invalid.
    #[error("{}: {source}", file.display())]
    Settings {
        /// The settings file.
        file: PathBuf,
        /// The field at fault.
        source: FieldError,
    },
    /// A document is not valid YAML or JSON.
    #[error("{at}: {message}")]
    Syntax {
        /// Where.
        at: Origin,
        /// The parser's message.
        message: String,
    },
    /// A document is not a Kubernetes object weft can read (no `apiVersion` or `kind`, not a
    /// mapping, a list inside a list).
    #[error("{at}: {message}")]
    Document {
        /// Where.
        at: Origin,
        /// What is wrong.
        message: String,
    },
    /// A policy weft cannot enforce: it is never skipped, since skipping it widens access.
    #[error(
        "{at}: {kind} {name} ({api_version}) is not supported: weft enforces only \
         networking.k8s.io/v1 NetworkPolicy, and skipping a policy would widen access"
    )]
    UnsupportedPolicy {
        /// Where.
        at: Origin,
        /// Its `apiVersion`.
        api_version: String,
        /// Its `kind`.
        kind: String,
        /// Its `namespace/name` or `name`.
        name: String,
    },
    /// An object with an invalid field.
    #[error("{at}: {source}")]
    Object {
        /// Where.
        at: Origin,
        /// The object and field at fault.
        source: Box<ObjectError>,
    },
    /// The same kind, namespace and name twice in one cluster.
    #[error("{at}: {object} is already defined at {first}")]
    DuplicateObject {
        /// Where the second one is.
        at: Origin,
        /// `Kind namespace/name`.
        object: String,
        /// Where the first one is.
        first: Origin,
    },
}

/// A loaded clusterset and what was found on the way.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// Every cluster.
    pub clusterset: ClusterSet,
    /// Non-fatal findings, in load order.
    pub warnings: Vec<LoadWarning>,
}

/// The cluster directories of a clusterset, each with its id.
pub type ClusterDirs = Vec<(ClusterId, PathBuf)>;

/// The cluster directories of clusterset `dir`; other entries are skipped with a warning,
/// and a directory whose name is no cluster id is an error.
pub fn cluster_dirs(dir: &Path) -> Result<(ClusterDirs, Vec<LoadWarning>), LoadError> {
    let mut dirs = Vec::new();
    let mut warnings = Vec::new();
    for path in entries(dir)? {
        if !metadata(&path)?.is_dir() {
            warnings.push(LoadWarning::at(
                &Origin::new(path.as_path().into(), None),
                "not a directory, skipped: each cluster is a directory".into(),
            ));
            continue;
        }
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let id = ClusterId::new(&name).map_err(|source| LoadError::ClusterId {
            dir: path.clone(),
            source,
        })?;
        dirs.push((id, path));
    }
    Ok((dirs, warnings))
}

/// Loads every cluster directory of `dir`; any error fails the whole load.
pub fn load_clusterset(dir: &Path) -> Result<Loaded, LoadError> {
    let mut clusterset = ClusterSet::default();
    let (dirs, mut warnings) = cluster_dirs(dir)?;
    for (id, path) in dirs {
        let (cluster, found) = load_cluster(id.clone(), &path)?;
        warnings.extend(found);
        clusterset.clusters.insert(id, cluster);
    }
    if clusterset.clusters.is_empty() {
        return Err(LoadError::NoClusters {
            dir: dir.to_owned(),
        });
    }
    Ok(Loaded {
        clusterset,
        warnings,
    })
}

/// Loads one cluster directory: its settings and every manifest under it, recursively.
pub fn load_cluster(id: ClusterId, dir: &Path) -> Result<(Cluster, Vec<LoadWarning>), LoadError> {
    let settings = load_settings(&dir.join(SETTINGS_FILE))?;
    let mut files = Vec::new();
    find_manifests(dir, true, &mut files)?;
    let mut loader = ClusterLoader {
        cluster: Cluster::new(id, settings),
        warnings: Vec::new(),
        defined: BTreeMap::new(),
        pod_uids: BTreeMap::new(),
        referenced: BTreeMap::new(),
    };
    for file in &files {
        loader.load_file(file)?;
    }
    Ok(loader.finish())
}

/// The entries of `dir`, hidden ones left out, sorted by name.
fn entries(dir: &Path) -> Result<Vec<PathBuf>, LoadError> {
    let read_dir = |source| LoadError::ReadDir {
        dir: dir.to_owned(),
        source,
    };
    let mut paths = Vec::new();
    for entry in fs::read_dir(dir).map_err(read_dir)? {
        let entry = entry.map_err(read_dir)?;
        if !entry.file_name().as_encoded_bytes().starts_with(b".") {
            paths.push(entry.path());
        }
    }
    paths.sort();
    Ok(paths)
}

/// The metadata of `path`, symlinks followed.
fn metadata(path: &Path) -> Result<fs::Metadata, LoadError> {
    fs::metadata(path).map_err(|source| LoadError::ReadFile {
        file: path.to_owned(),
        source,
    })
}

/// Appends the manifests under `dir` to `out`, in sorted path order.
fn find_manifests(dir: &Path, top: bool, out: &mut Vec<PathBuf>) -> Result<(), LoadError> {
    for path in entries(dir)? {
        let meta = metadata(&path)?;
        if meta.is_dir() {
            find_manifests(&path, false, out)?;
        } else if meta.is_file()
            && is_manifest(&path)
            && !(top && path.file_name().is_some_and(|n| n == SETTINGS_FILE))
        {
            out.push(path);
        }
    }
    Ok(())
}

fn is_manifest(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e == "yaml" || e == "yml" || e == "json")
}

fn is_json(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "json")
}

/// The text of `file`, without a byte-order mark.
fn read_text(file: &Path) -> Result<String, LoadError> {
    let bytes = fs::read(file).map_err(|source| LoadError::ReadFile {
        file: file.to_owned(),
        source,
    })?;
    let mut text = String::from_utf8(bytes).map_err(|e| {
        let valid = &e.as_bytes()[..e.utf8_error().valid_up_to()];
        LoadError::NotUtf8 {
            file: file.to_owned(),
            line: valid.iter().filter(|&&b| b == b'\n').count() + 1,
        }
    })?;
    if text.starts_with('\u{feff}') {
        text.remove(0);
    }
    Ok(text)
}

/// The settings in `file`, or the defaults when there is none.
fn load_settings(file: &Path) -> Result<ClusterSettings, LoadError> {
    match fs::symlink_metadata(file) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(ClusterSettings::default()),
        _ => {}
    }
    let text = read_text(file)?;
    let value = match yaml_documents(&text).as_slice() {
        [] => Value::Null,
        [doc] => parse_yaml(doc.text, doc.first_line).map_err(|message| LoadError::Syntax {
            at: Origin::new(file.into(), None),
            message,
        })?,
        [_, second, ..] => {
            return Err(LoadError::Document {
                at: Origin::new(file.into(), Some(second.number)),
                message: "a settings file holds one document".into(),
            });
        }
    };
    let settings_error = |source| LoadError::Settings {
        file: file.to_owned(),
        source,
    };
    match value {
        Value::Null => return Ok(ClusterSettings::default()),
        // Serde would take a list as the fields in order.
        Value::Object(_) => {}
        _ => {
            return Err(settings_error(FieldError::new(
                TOP_LEVEL,
                "expected a mapping of settings",
            )));
        }
    }
    let settings: ClusterSettings = deserialize(value).map_err(settings_error)?;
    settings.validate().map_err(settings_error)?;
    Ok(settings)
}

/// One document of a YAML stream.
#[derive(Debug, PartialEq, Eq)]
struct YamlDocument<'a> {
    /// Its number, from 1, as a reader counts: by `---` separators.
    number: usize,
    /// The index of its first line in the file.
    first_line: usize,
    /// Its text, from its `---` line (if any) to the next one.
    text: &'a str,
}

/// Splits a YAML stream into its documents. A document begins at a `---` line (even if empty)
/// or, before the first `---` and after a `...` line, at the first line with content (not blank,
/// a comment or a directive). A `---` or `...` at the start of a line always is a marker in
/// YAML, even inside a block scalar, so splitting by lines is exact.
fn yaml_documents(text: &str) -> Vec<YamlDocument<'_>> {
    let mut docs = Vec::new();
    let mut push = |start: usize, end: usize, first_line: usize, counts: bool| {
        if counts {
            docs.push(YamlDocument {
                number: docs.len() + 1,
                first_line,
                text: &text[start..end],
            });
        }
    };
    let (mut start, mut first_line, mut counts) = (0, 0, false);
    let mut offset = 0;
    for (n, line) in text.split_inclusive('\n').enumerate() {
        let marker = |m: &str| {
            line.strip_prefix(m).is_some_and(|rest| {
                rest.is_empty() || rest.starts_with(|c: char| c.is_ascii_whitespace())
            })
        };
        let end = offset + line.len();
        if marker("---") {
            push(start, offset, first_line, counts);
            (start, first_line, counts) = (offset, n, true);
        } else if marker("...") {
            push(start, end, first_line, counts);
            (start, first_line, counts) = (end, n + 1, false);
        } else if !counts {
            let trimmed = line.trim_start();
            counts = !(trimmed.is_empty() || trimmed.starts_with('#') || line.starts_with('%'));
        }
        offset = end;
    }
    push(start, text.len(), first_line, counts);
    docs
}

/// Parses a JSON document, refusing duplicate keys: serde_json would silently keep the last
/// one, and in a policy either choice may widen access.
fn parse_json(text: &str) -> Result<Value, String> {
    serde_json::from_str::<DistinctKeys>(text)
        .map(|v| v.0)
        .map_err(|e| format!("invalid JSON: {e}"))
}

/// A JSON value whose objects have distinct keys.
struct DistinctKeys(Value);

impl<'de> serde::Deserialize<'de> for DistinctKeys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(DistinctKeysVisitor).map(DistinctKeys)
    }
}

struct DistinctKeysVisitor;

impl<'de> serde::de::Visitor<'de> for DistinctKeysVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(v.into())
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(v.into())
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(v.into())
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(v.into())
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(v.into())
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(DistinctKeys(v)) = seq.next_element()? {
            items.push(v);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut object = serde_json::Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if object.contains_key(&key) {
                return Err(serde::de::Error::custom(format!("duplicate key {key:?}")));
            }
            let DistinctKeys(v) = map.next_value()?;
            object.insert(key, v);
        }
        Ok(Value::Object(object))
    }
}

/// Parses one YAML document that begins on line `first_line` (from 0) of its file; an error
/// names the line in the file.
pub fn parse_yaml(text: &str, first_line: usize) -> Result<Value, String> {
    let parse = |text: &str| {
        serde_saphyr::from_str_with_options(text, serde_saphyr::options! { with_snippet: false })
            // The parser's advice to its own callers is no help to someone editing a manifest.
            .map_err(|e| {
                let e = e.to_string();
                format!(
                    "invalid YAML: {}",
                    e.replace(", set DuplicateKeyPolicy in Options if acceptable", "")
                )
            })
    };
    // Padding every document to its place in the file would make a large file quadratic to
    // read; only a document in error is parsed again, padded, so that the parser's line
    // numbers are the file's.
    parse(text).map_err(|_| {
        let padded = "\n".repeat(first_line) + text;
        parse(&padded).err().unwrap_or_default()
    })
}

/// The path of a whole document in a [`FieldError`].
const TOP_LEVEL: &str = "(top level)";

/// Deserializes `value`; the error names the field's path.
fn deserialize<T: DeserializeOwned>(value: Value) -> Result<T, FieldError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { TOP_LEVEL.into() } else { path };
        FieldError::new(path, e.into_inner().to_string())
    })
}

/// `namespace/name` (namespace `default` when unset) or `name` of a raw object.
fn raw_name(value: &Value, namespaced: bool) -> String {
    let nonempty = |v: &Value| v.as_str().filter(|s| !s.is_empty()).map(str::to_owned);
    let meta = &value["metadata"];
    let name = nonempty(&meta["name"]).unwrap_or_else(|| "<unnamed>".into());
    if namespaced {
        let ns = nonempty(&meta["namespace"]).unwrap_or_else(|| "default".into());
        format!("{ns}/{name}")
    } else {
        name
    }
}

/// Deserializes a raw object of a kind weft uses into its API type. Unknown fields are checked
/// first, since the API types drop them silently: everywhere in a NetworkPolicy, and in the
/// metadata of the other kinds (a misspelled `labels` on a pod would leave it unselected, so
/// unisolated).
fn typed<T: DeserializeOwned>(
    kind: &'static str,
    namespaced: bool,
    value: Value,
) -> Result<T, ObjectError> {
    let name = raw_name(&value, namespaced);
    schema::check_fields(kind, &value)
        .and_then(|()| deserialize(value))
        .map_err(|field| ObjectError { kind, name, field })
}

/// The `apiVersion` and `kind` of a document.
fn type_of(at: &Origin, value: &Value) -> Result<(String, String), LoadError> {
    let error = |message: String| LoadError::Document {
        at: at.clone(),
        message,
    };
    if !value.is_object() {
        return Err(error(
            "not a Kubernetes object: expected a mapping with apiVersion and kind".into(),
        ));
    }
    let field = |name: &str| match &value[name] {
        Value::String(s) if !s.is_empty() => Ok(s.clone()),
        Value::Null => Err(error(format!("{name} is missing"))),
        other => Err(error(format!(
            "{name} must be a non-empty string, not {other}"
        ))),
    };
    Ok((field("apiVersion")?, field("kind")?))
}

/// Whether a document is a list to expand: `kind: List`, or a typed list (`PodList`) with
/// `items`.
fn is_list(kind: &str, value: &Value) -> bool {
    kind == "List" || (kind.ends_with("List") && value["items"].is_array())
}

/// Loads one cluster's files, keeping where each object came from.
struct ClusterLoader {
    cluster: Cluster,
    warnings: Vec<LoadWarning>,
    /// Where each object was defined, by kind and `namespace/name` (or `name`).
    defined: BTreeMap<(&'static str, String), Origin>,
    /// Each pod's `namespace/name` and origin, by uid.
    pod_uids: BTreeMap<String, (String, Origin)>,
    /// Namespaces pods and policies are in, each with the first object in it and its origin.
    referenced: BTreeMap<String, (String, Origin)>,
}

impl ClusterLoader {
    fn load_file(&mut self, file: &Path) -> Result<(), LoadError> {
        let text = read_text(file)?;
        let file: Arc<Path> = file.into();
        if is_json(&file) {
            let at = Origin::new(file, Some(1));
            let value = parse_json(&text).map_err(|message| LoadError::Syntax {
                at: at.clone(),
                message,
            })?;
            return self.load_document(&at, value);
        }
        for doc in yaml_documents(&text) {
            let at = Origin::new(file.clone(), Some(doc.number));
            let value =
                parse_yaml(doc.text, doc.first_line).map_err(|message| LoadError::Syntax {
                    at: at.clone(),
                    message,
                })?;
            self.load_document(&at, value)?;
        }
        Ok(())
    }

    /// Loads a document: nothing if empty, each item of a list, else one object.
    fn load_document(&mut self, at: &Origin, mut value: Value) -> Result<(), LoadError> {
        if value.is_null() {
            return Ok(());
        }
        let (api_version, kind) = type_of(at, &value)?;
        if !is_list(&kind, &value) {
            return self.load_object(at, value, api_version, kind);
        }
        let items = match value["items"].take() {
            Value::Null => Vec::new(),
            Value::Array(items) => items,
            other => {
                return Err(LoadError::Document {
                    at: at.clone(),
                    message: format!("items must be a list, not {other}"),
                });
            }
        };
        // A typed list's items may leave out their type, which is the list's.
        let item_kind = kind.strip_suffix("List").filter(|k| !k.is_empty());
        for (i, mut item) in items.into_iter().enumerate() {
            let at = Origin {
                item: Some(i),
                ..at.clone()
            };
            if let (Some(item_kind), Value::Object(map)) = (item_kind, &mut item) {
                map.entry("apiVersion")
                    .or_insert_with(|| api_version.clone().into());
                map.entry("kind").or_insert_with(|| item_kind.into());
            }
            let (item_api_version, item_kind) = type_of(&at, &item)?;
            if is_list(&item_kind, &item) {
                return Err(LoadError::Document {
                    at,
                    message: format!("a {item_kind} inside a list is not supported"),
                });
            }
            self.load_object(&at, item, item_api_version, item_kind)?;
        }
        Ok(())
    }

    /// Loads one object of a kind weft uses, rejects unsupported policies, skips the rest.
    fn load_object(
        &mut self,
        at: &Origin,
        value: Value,
        api_version: String,
        kind: String,
    ) -> Result<(), LoadError> {
        let id = self.cluster.id.clone();
        let invalid = |source| LoadError::Object {
            at: at.clone(),
            source: Box::new(source),
        };
        match (api_version.as_str(), kind.as_str()) {
            ("v1", "Namespace") => {
                let api = typed("Namespace", false, value).map_err(invalid)?;
                let (ns, corrections) = Namespace::from_api(&id, &api).map_err(invalid)?;
                self.define("Namespace", &ns.name, at)?;
                for c in corrections {
                    self.warnings.push(LoadWarning::at(
                        at,
                        format!(
                            "Namespace {}: label {} claims cluster {:?}; corrected to {id:?}, \
                             the cluster it was loaded from",
                            ns.name, c.label, c.claimed
                        ),
                    ));
                }
                self.cluster.namespaces.insert(ns.name.clone(), ns);
            }
            ("v1", "Pod") => {
                let api = typed("Pod", true, value).map_err(invalid)?;
                let pod = Pod::from_api(&id, &api).map_err(invalid)?;
                let name = format!("{}/{}", pod.namespace, pod.name);
                self.define("Pod", &name, at)?;
                self.reference("Pod", &pod.namespace, &pod.name, at)?;
                if let Some((first_pod, first)) = self.pod_uids.get(&pod.uid) {
                    return Err(invalid(ObjectError {
                        kind: "Pod",
                        name,
                        field: FieldError::new(
                            "metadata.uid",
                            format!(
                                "{:?} is already the uid of Pod {first_pod} at {first}",
                                pod.uid
                            ),
                        ),
                    }));
                }
                self.pod_uids.insert(pod.uid.clone(), (name, at.clone()));
                self.cluster.pods.insert(pod.uid.clone(), pod);
            }
            ("v1", "Node") => {
                let api = typed("Node", false, value).map_err(invalid)?;
                let node = Node::from_api(&id, &api).map_err(invalid)?;
                self.define("Node", &node.name, at)?;
                self.cluster.nodes.insert(node.name.clone(), node);
            }
            ("v1", "Service") => {
                let api = typed("Service", true, value).map_err(invalid)?;
                let svc = Service::from_api(&id, &api).map_err(invalid)?;
                self.define("Service", &format!("{}/{}", svc.namespace, svc.name), at)?;
                self.reference("Service", &svc.namespace, &svc.name, at)?;
                self.cluster
                    .services
                    .insert((svc.namespace.clone(), svc.name.clone()), svc);
            }
            ("discovery.k8s.io/v1", "EndpointSlice") => {
                let api = typed("EndpointSlice", true, value).map_err(invalid)?;
                let slice = EndpointSlice::from_api(&id, &api).map_err(invalid)?;
                self.define(
                    "EndpointSlice",
                    &format!("{}/{}", slice.namespace, slice.name),
                    at,
                )?;
                self.reference("EndpointSlice", &slice.namespace, &slice.name, at)?;
                self.cluster
                    .endpoint_slices
                    .insert((slice.namespace.clone(), slice.name.clone()), slice);
            }
            ("networking.k8s.io/v1", "NetworkPolicy") => {
                let api = typed("NetworkPolicy", true, value).map_err(invalid)?;
                let mut found = Vec::new();
                let np = NetworkPolicy::from_api(&id, &api, &mut found).map_err(invalid)?;
                let name = format!("{}/{}", np.namespace, np.name);
                self.define("NetworkPolicy", &name, at)?;
                self.reference("NetworkPolicy", &np.namespace, &np.name, at)?;
                self.warnings.extend(
                    found
                        .into_iter()
                        .map(|w| LoadWarning::at(at, format!("NetworkPolicy {name}: {w}"))),
                );
                self.cluster
                    .policies
                    .insert((np.namespace.clone(), np.name.clone()), np);
            }
            (super::identity_policy::API_VERSION, "IdentityPolicy") => {
                let policy = IdentityPolicy::from_value(&id, value).map_err(invalid)?;
                let name = format!("{}/{}", policy.namespace, policy.name);
                self.define("IdentityPolicy", &name, at)?;
                self.reference("IdentityPolicy", &policy.namespace, &policy.name, at)?;
                self.cluster
                    .identity_policies
                    .insert((policy.namespace.clone(), policy.name.clone()), policy);
            }
            _ => {
                let name = raw_name(&value, value["metadata"]["namespace"].is_string());
                if kind.ends_with("Policy") {
                    return Err(LoadError::UnsupportedPolicy {
                        at: at.clone(),
                        api_version,
                        kind,
                        name,
                    });
                }
                self.warnings.push(LoadWarning::at(
                    at,
                    format!("skipped {kind} {name} ({api_version}): weft does not use this kind"),
                ));
            }
        }
        Ok(())
    }

    /// Records where `kind name` is defined; an error if it already was.
    fn define(&mut self, kind: &'static str, name: &str, at: &Origin) -> Result<(), LoadError> {
        match self.defined.entry((kind, name.to_owned())) {
            Entry::Occupied(first) => Err(LoadError::DuplicateObject {
                at: at.clone(),
                object: format!("{kind} {name}"),
                first: first.get().clone(),
            }),
            Entry::Vacant(slot) => {
                slot.insert(at.clone());
                Ok(())
            }
        }
    }

    /// Records that an object is in `namespace`, which must be a valid namespace name.
    fn reference(
        &mut self,
        kind: &'static str,
        namespace: &str,
        name: &str,
        at: &Origin,
    ) -> Result<(), LoadError> {
        labels::validate_dns_label(namespace).map_err(|message| LoadError::Object {
            at: at.clone(),
            source: Box::new(ObjectError {
                kind,
                name: format!("{namespace}/{name}"),
                field: FieldError::new("metadata.namespace", message),
            }),
        })?;
        self.referenced
            .entry(namespace.to_owned())
            .or_insert_with(|| (format!("{kind} {namespace}/{name}"), at.clone()));
        Ok(())
    }

    /// Implies the namespaces objects are in but no manifest declares.
    fn finish(mut self) -> (Cluster, Vec<LoadWarning>) {
        for (ns, (object, at)) in &self.referenced {
            if !self.cluster.namespaces.contains_key(ns) {
                self.warnings.push(LoadWarning::at(
                    at,
                    format!(
                        "namespace {ns:?} of {object} is not declared: implied, with only its \
                         automatic labels"
                    ),
                ));
                let implied = Namespace::implied(&self.cluster.id, ns);
                self.cluster.namespaces.insert(ns.clone(), implied);
            }
        }
        (self.cluster, self.warnings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tempfile::TempDir;

    const NS: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: demo}\n";
    const POD: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: demo}\n";
    const NODE: &str = "apiVersion: v1\nkind: Node\nmetadata: {name: n1}\n";
    const NETPOL: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
                          metadata: {name: deny, namespace: demo}\nspec: {podSelector: {}}\n";

    fn cm(name: &str) -> String {
        format!("apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: {name}, namespace: demo}}\n")
    }

    fn pod(name: &str, extra: &str) -> String {
        format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: demo{extra}}}\n")
    }

    fn policy(spec: &str) -> String {
        format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
             metadata: {{name: deny, namespace: demo}}\nspec: {spec}\n"
        )
    }

    /// Files of a test case: path under `clusters`, text.
    type Files = Vec<(&'static str, String)>;

    /// A temporary directory holding `clusters/<path>` for each file.
    fn tree(files: &[(&str, impl AsRef<str>)]) -> TempDir {
        let tmp = TempDir::new().unwrap();
        fs::create_dir(tmp.path().join("clusters")).unwrap();
        for (path, text) in files {
            let path = tmp.path().join("clusters").join(path);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, text.as_ref()).unwrap();
        }
        tmp
    }

    /// Loads `clusters` of `tmp`; paths in messages are made relative to `tmp`.
    fn load(tmp: &TempDir) -> Result<(ClusterSet, Vec<String>), String> {
        let prefix = format!("{}/", tmp.path().display());
        let relative = |s: String| s.replace(&prefix, "");
        load_clusterset(&tmp.path().join("clusters"))
            .map(|l| {
                let warnings = l.warnings.iter().map(|w| relative(w.to_string()));
                (l.clusterset, warnings.collect())
            })
            .map_err(|e| relative(e.to_string()))
    }

    fn c(id: &str) -> ClusterId {
        ClusterId::new(id).unwrap()
    }

    #[test]
    fn loads_services_and_endpoint_slices() {
        let svc = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: demo}\n\
                   spec: {clusterIP: 10.96.0.10, selector: {app: web}, ports: [{port: 80, targetPort: http}]}\n";
        let slice = "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
                     metadata: {name: web-1, namespace: demo, labels: {kubernetes.io/service-name: web}}\n\
                     addressType: IPv4\nendpoints: [{addresses: [10.0.0.1]}]\nports: [{port: 8080}]\n";
        let tmp = tree(&[("c1/a.yaml", format!("{NS}---\n{svc}---\n{slice}"))]);
        let (set, warnings) = load(&tmp).expect("loads");
        assert!(warnings.is_empty(), "{warnings:?}");
        let cluster = &set.clusters[&c("c1")];
        let web = &cluster.services[&("demo".to_owned(), "web".to_owned())];
        assert_eq!(
            web.cluster_ips,
            vec!["10.96.0.10".parse::<std::net::IpAddr>().unwrap()]
        );
        let s = &cluster.endpoint_slices[&("demo".to_owned(), "web-1".to_owned())];
        assert_eq!(s.service.as_deref(), Some("web"));

        let bad = tree(&[(
            "c1/a.yaml",
            format!("{NS}---\n{}", svc.replace("10.96.0.10", "10.96.0.300")),
        )]);
        assert_eq!(
            load(&bad).unwrap_err(),
            "clusters/c1/a.yaml, document 2: Service demo/web: spec.clusterIP: invalid IP address \"10.96.0.300\""
        );
        let twice = tree(&[("c1/a.yaml", format!("{NS}---\n{svc}---\n{svc}"))]);
        assert!(load(&twice).unwrap_err().contains("Service demo/web"));
    }

    #[test]
    fn loads_a_clusterset() {
        let list = r#"{"apiVersion": "v1", "kind": "List", "items": [
            {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
             "metadata": {"name": "allow", "namespace": "demo-c1"},
             "spec": {"podSelector": {}, "ingress": [{}]}}]}"#;
        let c2 = "---\napiVersion: v1\nkind: Namespace\nmetadata: {name: demo-c2}\n\
                  ---\napiVersion: v1\nkind: Pod\nmetadata: {name: web}\n\
                  ---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicyList\n\
                  items: [{metadata: {name: deny, namespace: demo-c2}, spec: {podSelector: {}}}]\n";
        let tmp = tree(&[
            (
                "cluster-1/cluster.yaml",
                "trustDomain: c1.example\nnetwork: net-a\n",
            ),
            (
                "cluster-1/ns.yaml",
                "\u{feff}apiVersion: v1\nkind: Namespace\nmetadata: {name: demo-c1, labels: {team: a}}\n---\napiVersion: v1\nkind: Node\nmetadata: {name: n1}\nstatus: {addresses: [{type: InternalIP, address: 192.168.0.1}]}\n",
            ),
            (
                "cluster-1/apps/web.yml",
                "apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: demo-c1, uid: u1}\nstatus: {phase: Running, podIP: 10.0.0.1}\n",
            ),
            ("cluster-1/policies/list.json", list),
            ("cluster-1/README.md", "not: [a manifest"),
            ("cluster-1/.git/bad.yaml", "not: [a manifest"),
            ("cluster-1/.hidden.yaml", "not: [a manifest"),
            ("cluster-2/all.yaml", c2),
            (
                "cluster-2/sub/cluster.yaml",
                "apiVersion: v1\nkind: Pod\nmetadata: {name: db, namespace: demo-c2}\n",
            ),
            (".trash/bad.yaml", "not: [a manifest"),
        ]);
        let (set, warnings) = load(&tmp).unwrap();
        assert_eq!(
            warnings,
            [
                "clusters/cluster-2/all.yaml, document 2: namespace \"default\" of Pod default/web \
              is not declared: implied, with only its automatic labels"
            ]
        );
        let ids: Vec<_> = set.clusters.keys().map(ClusterId::as_str).collect();
        assert_eq!(ids, ["cluster-1", "cluster-2"]);

        let c1 = &set.clusters[&c("cluster-1")];
        assert_eq!(c1.settings.trust_domain.as_deref(), Some("c1.example"));
        assert_eq!(c1.settings.network.as_deref(), Some("net-a"));
        assert_eq!(c1.namespaces["demo-c1"].labels["team"], "a");
        assert_eq!(
            c1.namespaces["demo-c1"].labels["cluster.clusterset.k8s.io"],
            "cluster-1"
        );
        assert_eq!(
            c1.pods["u1"].ips,
            ["10.0.0.1".parse::<std::net::IpAddr>().unwrap()]
        );
        assert_eq!(c1.nodes["n1"].addresses.len(), 1);
        let allow = &c1.policies[&("demo-c1".to_owned(), "allow".to_owned())];
        assert_eq!(allow.cluster, c("cluster-1"));

        let c2 = &set.clusters[&c("cluster-2")];
        assert_eq!(c2.settings, ClusterSettings::default());
        let names: Vec<_> = c2.namespaces.keys().collect();
        assert_eq!(names, ["default", "demo-c2"]);
        assert_eq!(
            c2.namespaces["default"],
            Namespace::implied(&c("cluster-2"), "default")
        );
        assert!(c2.pod("default", "web").is_some());
        assert!(
            c2.pod("demo-c2", "db").is_some(),
            "cluster.yaml below the top is a manifest"
        );
        assert!(
            c2.policies
                .contains_key(&("demo-c2".to_owned(), "deny".to_owned()))
        );
    }

    #[test]
    fn load_cluster_reloads_one_cluster() {
        let tmp = tree(&[(
            "c1/a.yaml",
            &format!("{NS}---\n{POD}---\n{NODE}---\n{NETPOL}"),
        )]);
        let (cluster, warnings) = load_cluster(c("c1"), &tmp.path().join("clusters/c1")).unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(cluster.id, c("c1"));
        let counts = (
            cluster.namespaces.len(),
            cluster.pods.len(),
            cluster.nodes.len(),
            cluster.policies.len(),
        );
        assert_eq!(counts, (1, 1, 1, 1));
    }

    #[test]
    fn document_numbers_count_separators() {
        let (a, b) = (cm("a"), cm("b"));
        let cases = [
            (a.clone(), vec![1]),
            (format!("---\n{a}"), vec![1]),
            (format!("---\n{a}---\n{b}"), vec![1, 2]),
            (format!("{a}---\n---\n{b}"), vec![1, 3]),
            (format!("{a}---\n# nothing here\n---\n{b}"), vec![1, 3]),
            (format!("# a comment\n\n---\n{a}"), vec![1]),
            (format!("%YAML 1.2\n---\n{a}---\n{b}"), vec![1, 2]),
            (format!("{a}...\n---\n{b}"), vec![1, 2]),
            (format!("{a}...\n{b}"), vec![1, 2]),
            (format!("{a}---\n~\n---\n{b}"), vec![1, 3]),
            (format!("{a}---\r\n{b}"), vec![1, 2]),
            (
                format!("--- {{apiVersion: v1, kind: ConfigMap, metadata: {{name: a}}}}\n---\n{b}"),
                vec![1, 2],
            ),
            ("---\n---\n".to_owned(), vec![]),
        ];
        for (text, want) in cases {
            let tmp = tree(&[("c1/a.yaml", &text)]);
            let (_, warnings) = load(&tmp).unwrap();
            let got: Vec<_> = warnings
                .iter()
                .map(|w| {
                    let n = w.split(", document ").nth(1).unwrap();
                    n[..n.find(':').unwrap()].parse::<usize>().unwrap()
                })
                .collect();
            assert_eq!(got, want, "{text:?}");
        }
    }

    #[test]
    fn yaml_syntax_errors_give_the_file_line() {
        let tmp = tree(&[(
            "c1/a.yaml",
            &format!("{}---\n\n---\napiVersion: v1\nkind: [Pod\n", cm("a")),
        )]);
        let e = load(&tmp).unwrap_err();
        assert!(
            e.starts_with("clusters/c1/a.yaml, document 3: invalid YAML: ") && e.contains("line 8"),
            "{e}"
        );
    }

    #[test]
    fn errors_name_file_document_object_and_field() {
        let cases: Vec<(Files, &str)> = vec![
            (vec![], "clusters: no cluster directory in the clusterset"),
            (vec![("README.md", "x".into())], "clusters: no cluster directory in the clusterset"),
            (
                vec![("c1/a.yaml", cm("a")), ("bad_id!/a.yaml", cm("a"))],
                "clusters/bad_id!: the directory's name must be a cluster id: invalid cluster id \
                 \"bad_id!\": may contain only letters, digits, '-', '_' and '.'",
            ),
            (
                vec![("c1/a.json", "{\"apiVersion\": ".into())],
                "clusters/c1/a.json, document 1: invalid JSON: EOF while parsing a value at line 1 column 15",
            ),
            (
                vec![("c1/a.yaml", format!("{}---\n- a\n", cm("a")))],
                "clusters/c1/a.yaml, document 2: not a Kubernetes object: expected a mapping with apiVersion and kind",
            ),
            (
                vec![("c1/a.yaml", "kind: Pod\n".into())],
                "clusters/c1/a.yaml, document 1: apiVersion is missing",
            ),
            (
                vec![("c1/a.json", "{\"apiVersion\": \"networking.k8s.io/v1\", \"kind\": \"NetworkPolicy\", \"metadata\": {\"name\": \"p\"}, \"spec\": {\"ingress\": [], \"ingress\": [{}]}}".into())],
                "clusters/c1/a.json, document 1: invalid JSON: duplicate key \"ingress\" at line 1 column 124",
            ),
            (
                vec![("c1/a.yaml", "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p}\nspec:\n  ingress: []\n  ingress: [{}]\n".into())],
                "clusters/c1/a.yaml, document 1: invalid YAML: duplicate mapping key: ingress at line 6, column 3",
            ),
            (
                vec![("c1/a.yaml", "apiVersion: v1\nkind: 3\n".into())],
                "clusters/c1/a.yaml, document 1: kind must be a non-empty string, not 3",
            ),
            (
                vec![("c1/a.yaml", "apiVersion: v1\nkind: List\nitems: [{kind: Pod, metadata: {name: a}}]\n".into())],
                "clusters/c1/a.yaml, document 1, items[0]: apiVersion is missing",
            ),
            (
                vec![("c1/a.yaml", "apiVersion: extensions/v1beta1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: demo}\n".into())],
                "clusters/c1/a.yaml, document 1: NetworkPolicy demo/p (extensions/v1beta1) is not supported: \
                 weft enforces only networking.k8s.io/v1 NetworkPolicy, and skipping a policy would widen access",
            ),
            (
                vec![("c1/a.yaml", format!("{}---\napiVersion: v1\nkind: List\nitems:\n- {{apiVersion: v1, kind: ConfigMap, metadata: {{name: x}}}}\n- {{apiVersion: policy.networking.k8s.io/v1alpha1, kind: AdminNetworkPolicy, metadata: {{name: anp}}}}\n", cm("a")))],
                "clusters/c1/a.yaml, document 2, items[1]: AdminNetworkPolicy anp (policy.networking.k8s.io/v1alpha1) is not supported: \
                 weft enforces only networking.k8s.io/v1 NetworkPolicy, and skipping a policy would widen access",
            ),
            (
                vec![("c1/a.yaml", "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p, namespace: demo}\n".into())],
                "clusters/c1/a.yaml, document 1: CiliumNetworkPolicy demo/p (cilium.io/v2) is not supported: \
                 weft enforces only networking.k8s.io/v1 NetworkPolicy, and skipping a policy would widen access",
            ),
            (
                vec![("c1/a.yaml", "apiVersion: v1\nkind: List\nitems: [{apiVersion: v1, kind: List, items: []}]\n".into())],
                "clusters/c1/a.yaml, document 1, items[0]: a List inside a list is not supported",
            ),
            (
                vec![("c1/a.yaml", "apiVersion: v1\nkind: List\nitems: {a: 1}\n".into())],
                "clusters/c1/a.yaml, document 1: items must be a list, not {\"a\":1}",
            ),
            (
                vec![("c1/a.yaml", format!("{NS}---\n{}spec:\n  containers:\n  - name: c\n    ports: [{{containerPort: http}}]\n", pod("web", "")))],
                "clusters/c1/a.yaml, document 2: Pod demo/web: spec.containers[0].ports[0].containerPort: \
                 invalid type: string \"http\", expected i32",
            ),
            (
                vec![("c1/a.yaml", format!("{NS}---\n{}spec:\n  containers: []\n  hostNetwork: \"yes\"\n", pod("web", "")))],
                "clusters/c1/a.yaml, document 2: Pod demo/web: spec.hostNetwork: invalid type: string \"yes\", expected a boolean",
            ),
            (
                vec![("c1/a.yaml", policy("{ingress: [{from: [{ipblock: {cidr: 10.0.0.0/8}}]}]}"))],
                "clusters/c1/a.yaml, document 1: NetworkPolicy demo/deny: spec.ingress[0].from[0].ipblock: \
                 unknown field \"ipblock\"; did you mean \"ipBlock\"?",
            ),
            (
                vec![("c1/a.yaml", policy("{egress: [{to: [{ipBlock: {cidr: 10.0.0.0/8, exept: [10.1.0.0/16]}}]}]}"))],
                "clusters/c1/a.yaml, document 1: NetworkPolicy demo/deny: spec.egress[0].to[0].ipBlock.exept: \
                 unknown field \"exept\"; did you mean \"except\"?",
            ),
            (
                vec![("c2/app.yaml", format!("{NS}---\n{POD}---\n{}", policy("{ingress: [{from: [{podSelector: {}}, {ipBlock: {cidr: 10.0.0/8}}]}]}").replace("namespace: demo", "namespace: demo-c2")))],
                "clusters/c2/app.yaml, document 3: NetworkPolicy demo-c2/deny: spec.ingress[0].from[1].ipBlock.cidr: \
                 invalid CIDR \"10.0.0/8\"",
            ),
            (
                vec![("c1/a.yaml", policy("{ingress: [{ports: [{port: 80, endPort: 70}]}]}"))],
                "clusters/c1/a.yaml, document 1: NetworkPolicy demo/deny: spec.ingress[0].ports[0].endPort: 70 is below port 80",
            ),
            (
                vec![("c1/a.yaml", "apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: Demo}\n".into())],
                "clusters/c1/a.yaml, document 1: Pod Demo/web: metadata.namespace: \"Demo\" is not a lowercase DNS label of at most 63 characters",
            ),
            (
                vec![("c1/a.yaml", "apiVersion: v1\nkind: Namespace\nmetadata: {name: demo, labels: {team: a b}}\n".into())],
                "clusters/c1/a.yaml, document 1: Namespace demo: metadata.labels.team: invalid label value \"a b\": \
                 may contain only letters, digits, '-', '_' and '.'",
            ),
            (
                vec![("c1/a.yaml", "apiVersion: v1\nkind: Node\nmetadata: {}\n".into())],
                "clusters/c1/a.yaml, document 1: Node <unnamed>: metadata.name: is required",
            ),
            (
                vec![("c1/b.yaml", POD.into()), ("c1/a.yaml", format!("{NS}---\n{POD}"))],
                "clusters/c1/b.yaml, document 1: Pod demo/web is already defined at clusters/c1/a.yaml, document 2",
            ),
            (
                vec![("c1/a.yaml", format!("{NETPOL}---\n{NS}---\n{NETPOL}"))],
                "clusters/c1/a.yaml, document 3: NetworkPolicy demo/deny is already defined at clusters/c1/a.yaml, document 1",
            ),
            (
                vec![("c1/a.yaml", format!("{NS}---\n{NS}"))],
                "clusters/c1/a.yaml, document 2: Namespace demo is already defined at clusters/c1/a.yaml, document 1",
            ),
            (
                vec![("c1/a.yaml", "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Node, metadata: {name: n1}}\n- {apiVersion: v1, kind: Node, metadata: {name: n1}}\n".into())],
                "clusters/c1/a.yaml, document 1, items[1]: Node n1 is already defined at clusters/c1/a.yaml, document 1, items[0]",
            ),
            (
                vec![("c1/a.yaml", format!("{NS}---\n{}---\n{}", pod("a", ", uid: u1"), pod("b", ", uid: u1")))],
                "clusters/c1/a.yaml, document 3: Pod demo/b: metadata.uid: \"u1\" is already the uid of Pod demo/a at clusters/c1/a.yaml, document 2",
            ),
            (
                vec![("c1/cluster.yaml", "trustdomain: x\n".into())],
                "clusters/c1/cluster.yaml: trustdomain: unknown field `trustdomain`, expected one of `trustDomain`, `network`, `uid`",
            ),
            (
                vec![("c1/cluster.yaml", "trustDomain: Bad!\n".into())],
                "clusters/c1/cluster.yaml: trustDomain: invalid trust domain \"Bad!\": lowercase letters, digits, '.', '-' and '_' only",
            ),
            (
                vec![("c1/cluster.yaml", "network: [a]\n".into())],
                "clusters/c1/cluster.yaml: network: invalid type: sequence, expected a string",
            ),
            (
                vec![("c1/cluster.yaml", "- network\n".into())],
                "clusters/c1/cluster.yaml: (top level): expected a mapping of settings",
            ),
            (
                vec![("c1/cluster.yaml", "network: a\n---\nuid: b\n".into())],
                "clusters/c1/cluster.yaml, document 2: a settings file holds one document",
            ),
        ];
        for (files, want) in cases {
            let tmp = tree(&files);
            assert_eq!(load(&tmp).unwrap_err(), want, "{files:?}");
        }
    }

    #[test]
    fn settings_syntax_errors_name_the_file() {
        let tmp = tree(&[("c1/cluster.yaml", "network: [a\n")]);
        let e = load(&tmp).unwrap_err();
        assert!(
            e.starts_with("clusters/c1/cluster.yaml: invalid YAML: "),
            "{e}"
        );
    }

    #[test]
    fn unreadable_files_are_errors() {
        let tmp = tree(&[("c1/a.yaml", NS)]);
        let clusters = tmp.path().join("clusters");
        std::os::unix::fs::symlink(clusters.join("c1/missing"), clusters.join("c1/b.yaml"))
            .unwrap();
        let e = load(&tmp).unwrap_err();
        assert!(e.starts_with("clusters/c1/b.yaml: cannot read: "), "{e}");

        let tmp = tree(&[("c1/a.yaml", NS)]);
        let file = tmp.path().join("clusters/c1/b.yaml");
        fs::write(
            &file,
            b"apiVersion: v1\nkind: Namespace\nmetadata: {name: \xff}\n",
        )
        .unwrap();
        assert_eq!(
            load(&tmp).unwrap_err(),
            "clusters/c1/b.yaml: not UTF-8 text (invalid byte on line 3)"
        );

        let missing = tmp.path().join("nowhere");
        let e = load_clusterset(&missing).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("{}: cannot read directory: ", missing.display())),
            "{e}"
        );
    }

    #[test]
    fn warnings_name_file_and_document() {
        let forged = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: demo\n  labels: {cluster.clusterset.k8s.io: c1, networking.k8s.io/multicluster-name: c2}\n";
        let cases: Vec<(Files, Vec<&str>)> = vec![
            (
                vec![("notes.txt", "x".into()), ("c1/a.yaml", NS.into())],
                vec!["clusters/notes.txt: not a directory, skipped: each cluster is a directory"],
            ),
            (
                vec![(
                    "c1/a.yaml",
                    format!(
                        "{NS}---\n{}---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: d}}\n",
                        cm("cfg")
                    ),
                )],
                vec![
                    "clusters/c1/a.yaml, document 2: skipped ConfigMap demo/cfg (v1): weft does not use this kind",
                    "clusters/c1/a.yaml, document 3: skipped Deployment d (apps/v1): weft does not use this kind",
                ],
            ),
            (
                vec![(
                    "c1/a.yaml",
                    format!(
                        "{NS}---\napiVersion: v1\nkind: List\nitems: [{{apiVersion: v1, kind: Secret, metadata: {{name: s, namespace: demo}}}}]\n"
                    ),
                )],
                vec![
                    "clusters/c1/a.yaml, document 2, items[0]: skipped Secret demo/s (v1): weft does not use this kind",
                ],
            ),
            (
                vec![
                    ("c1/a.yaml", format!("{POD}---\n{}", pod("db", ""))),
                    ("c1/b.yaml", NETPOL.replace("demo", "other")),
                ],
                vec![
                    "clusters/c1/a.yaml, document 1: namespace \"demo\" of Pod demo/web is not declared: implied, with only its automatic labels",
                    "clusters/c1/b.yaml, document 1: namespace \"other\" of NetworkPolicy other/deny is not declared: implied, with only its automatic labels",
                ],
            ),
            (
                vec![("c2/a.yaml", forged.into())],
                vec![
                    "clusters/c2/a.yaml, document 1: Namespace demo: label cluster.clusterset.k8s.io claims cluster \"c1\"; \
                     corrected to \"c2\", the cluster it was loaded from",
                ],
            ),
            (
                vec![(
                    "c1/a.yaml",
                    format!(
                        "{NS}---\n{}",
                        policy("{ingress: [{from: [{ipBlock: {cidr: 10.1.2.3/8}}]}]}")
                    ),
                )],
                vec![
                    "clusters/c1/a.yaml, document 2: NetworkPolicy demo/deny: spec.ingress[0].from[0].ipBlock.cidr: \
                     CIDR \"10.1.2.3/8\" has host bits set; using 10.0.0.0/8",
                ],
            ),
        ];
        for (files, want) in cases {
            let tmp = tree(&files);
            assert_eq!(load(&tmp).unwrap().1, want, "{files:?}");
        }
    }

    #[test]
    fn forged_cluster_labels_are_corrected() {
        let tmp = tree(&[(
            "c2/a.yaml",
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: demo, labels: {cluster.clusterset.k8s.io: c1}}\n",
        )]);
        let (set, _) = load(&tmp).unwrap();
        let labels = &set.clusters[&c("c2")].namespaces["demo"].labels;
        for label in labels::CLUSTER_LABELS {
            assert_eq!(labels[label], "c2");
        }
    }

    #[test]
    fn warning_display_leaves_out_missing_parts() {
        let w = |file: Option<&str>, document, item| LoadWarning {
            file: file.map(PathBuf::from),
            document,
            item,
            message: "m".into(),
        };
        let cases = [
            (
                w(Some("a.yaml"), Some(2), Some(0)),
                "a.yaml, document 2, items[0]: m",
            ),
            (w(Some("a.yaml"), Some(2), None), "a.yaml, document 2: m"),
            (w(Some("a.yaml"), None, None), "a.yaml: m"),
            (w(None, Some(1), None), "document 1: m"),
            (w(None, None, None), "m"),
        ];
        for (warning, want) in cases {
            assert_eq!(warning.to_string(), want);
        }
    }
}
