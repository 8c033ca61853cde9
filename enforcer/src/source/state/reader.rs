//! Listing a state directory's files and splitting them into documents, and a
//! path-tracking view of a document so that every error can name its field.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{Metadata, OpenOptions};
use std::io::Read as _;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::Deserialize;
use serde_json::Value;

use super::StateError;
use crate::model::Cidr;

/// One JSON or YAML document of a state file.
#[derive(Debug)]
pub(crate) struct Document {
    pub file: PathBuf,
    /// 1-based position in its file (YAML files may hold several).
    pub index: usize,
    pub value: Value,
}

/// The files `load` reads: `*.json`, `*.yaml`, `*.yml`, not hidden, sorted by name.
/// Hidden names also cover the `..data` and `..2024_…` entries of ConfigMap mounts,
/// whose visible files are symlinks into them; `metadata` follows those links.
pub(crate) fn state_files(dir: &Path) -> Result<Vec<PathBuf>, StateError> {
    let unreadable = |e: std::io::Error| StateError {
        file: dir.to_path_buf(),
        object: String::new(),
        field: None,
        message: format!("cannot read the state directory: {e}"),
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(unreadable)? {
        let path = entry.map_err(unreadable)?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if !is_state_file_name(name) {
            continue;
        }
        // A symlink to a directory (or a dangling one) is not a state file; the
        // dangling case surfaces as a read error below, which names it.
        if std::fs::metadata(&path).is_ok_and(|m| m.is_dir()) {
            continue;
        }
        files.push(path);
    }
    files.sort();
    Ok(files)
}

/// A name [`state_files`] reads.
pub(crate) fn is_state_file_name(name: &str) -> bool {
    let wanted = [".json", ".yaml", ".yml"].iter().any(|e| name.ends_with(e));
    wanted && !name.starts_with('.')
}

/// The largest state file read: far above any real node's state, and a bound on
/// what a runaway or hostile file can make the agent allocate.
pub(crate) const MAX_FILE_BYTES: u64 = 64 << 20;

/// Why a file's metadata rules it out: only regular files (symlinks followed) of at
/// most [`MAX_FILE_BYTES`] are read; a FIFO or a device could block or never end.
fn unreadable_kind(metadata: &Metadata) -> Option<String> {
    if !metadata.is_file() {
        return Some(format!(
            "not a regular file ({:?}): a state file must be one, or a symlink to one",
            metadata.file_type()
        ));
    }
    (metadata.len() > MAX_FILE_BYTES).then(|| {
        format!(
            "{} bytes, more than the {} MiB a state file may hold",
            metadata.len(),
            MAX_FILE_BYTES >> 20
        )
    })
}

/// The text of a state file, or why it cannot be used as a whole.
fn read_state_file(file: &Path) -> Result<String, String> {
    let cannot_read = |e: std::io::Error| format!("cannot read: {e}");
    // Judged before opening: opening a FIFO blocks, opening a device may act on it.
    if let Some(message) = unreadable_kind(&std::fs::metadata(file).map_err(cannot_read)?) {
        return Err(message);
    }
    let mut opened = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(file)
        .map_err(cannot_read)?;
    // The name may have been re-pointed since: judge what was opened too.
    let at_open = opened.metadata().map_err(cannot_read)?;
    if let Some(message) = unreadable_kind(&at_open) {
        return Err(message);
    }
    let mut bytes = Vec::new();
    (&mut opened)
        .take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(cannot_read)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(format!(
            "grew past the {} MiB a state file may hold while it was read",
            MAX_FILE_BYTES >> 20
        ));
    }
    let at_end = opened.metadata().map_err(cannot_read)?;
    if at_end.len() != bytes.len() as u64 || at_end.modified().ok() != at_open.modified().ok() {
        return Err("changed while it was read (still being written?)".to_string());
    }
    String::from_utf8(bytes).map_err(|e| format!("cannot read: not UTF-8 text: {e}"))
}

/// The documents of one file; a syntax error ends the file (later documents
/// cannot be located reliably) and is reported against the document it broke.
/// A file without any document is an error: an empty, comment-only or
/// half-written file must not read as a state without its objects (an
/// explicit empty list says there are none).
pub(crate) fn documents(file: &Path, errors: &mut Vec<StateError>) -> Vec<Document> {
    let file_error = |message: String| StateError {
        file: file.to_path_buf(),
        object: String::new(),
        field: None,
        message,
    };
    match read_state_file(file) {
        Ok(text) => parse_documents(file, &text, errors),
        Err(message) => {
            errors.push(file_error(message));
            Vec::new()
        }
    }
}

/// The documents of the text of `file` (read from disk or held in memory by a live
/// source), by the rules of [`documents`].
pub(crate) fn parse_documents(
    file: &Path,
    text: &str,
    errors: &mut Vec<StateError>,
) -> Vec<Document> {
    let error = |index: usize, message: String| StateError {
        file: file.to_path_buf(),
        object: format!("document {index}"),
        field: None,
        message,
    };
    let file_error = |message: String| StateError {
        file: file.to_path_buf(),
        object: String::new(),
        field: None,
        message,
    };
    let document = |index, value| Document {
        file: file.to_path_buf(),
        index,
        value,
    };
    if file.extension().is_some_and(|e| e == "json") {
        return match serde_json::from_str(text) {
            Ok(value) => vec![document(1, value)],
            Err(e) => {
                errors.push(error(1, format!("malformed JSON: {e}")));
                Vec::new()
            }
        };
    }
    let mut docs = Vec::new();
    for (i, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        match Value::deserialize(de) {
            // `---` followed by nothing, as editors and `kubectl` leave at the end.
            Ok(Value::Null) => {}
            Ok(value) => docs.push(document(i + 1, value)),
            Err(e) => {
                errors.push(error(i + 1, format!("malformed YAML: {e}")));
                return docs;
            }
        }
    }
    if docs.is_empty() {
        errors.push(file_error(NO_DOCUMENT.to_string()));
    }
    docs
}

/// Why a file without any document is refused.
const NO_DOCUMENT: &str = "no object: the file is empty or holds only comments (half-written?); \
     a state without such objects is an explicit empty list, e.g. `kind: List` with `items: []`";

/// A problem inside one object, before the object's name is known.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Invalid {
    /// Path from the object's root; `None` for the object as a whole.
    pub field: Option<String>,
    pub message: String,
}

impl Invalid {
    pub fn new(field: &str, message: impl fmt::Display) -> Self {
        Self {
            field: (!field.is_empty()).then(|| field.to_string()),
            message: message.to_string(),
        }
    }
}

/// The problems of one object, collected so that parsing goes on after each.
#[derive(Debug, Default)]
pub(crate) struct Problems(Vec<Invalid>);

impl Problems {
    /// The value, or `None` after recording why not.
    pub fn ok<T>(&mut self, result: Result<T, Invalid>) -> Option<T> {
        result.map_err(|e| self.0.push(e)).ok()
    }

    pub fn push(&mut self, invalid: Invalid) {
        self.0.push(invalid);
    }

    /// Names the object and the file of every problem.
    pub fn report(self, file: &Path, object: &str, errors: &mut Vec<StateError>) {
        errors.extend(self.into_errors(file, object));
    }

    pub fn into_errors(self, file: &Path, object: &str) -> Vec<StateError> {
        self.0
            .into_iter()
            .map(|i| StateError {
                file: file.to_path_buf(),
                object: object.to_string(),
                field: i.field,
                message: i.message,
            })
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A value inside a document together with its path from the object's root,
/// in the style `IpPermissions[2].FromPort` or `metadata.annotations["a/b"]`.
#[derive(Clone, Debug)]
pub(crate) struct Field<'v> {
    pub value: &'v Value,
    pub path: String,
}

impl<'v> Field<'v> {
    pub fn root(value: &'v Value) -> Self {
        Self {
            value,
            path: String::new(),
        }
    }

    pub fn path_of(&self, key: &str) -> String {
        let plain = key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        match (self.path.is_empty(), plain) {
            (true, true) => key.to_string(),
            (false, true) => format!("{}.{key}", self.path),
            (_, false) => format!("{}[{key:?}]", self.path),
        }
    }

    /// The member `key`; absent and `null` members are both `None`, as
    /// Kubernetes and the AWS CLI print either for an unset field.
    pub fn get(&self, key: &str) -> Option<Field<'v>> {
        let value = self.value.as_object()?.get(key)?;
        (!value.is_null()).then(|| Field {
            value,
            path: self.path_of(key),
        })
    }

    pub fn require(&self, key: &str) -> Result<Field<'v>, Invalid> {
        self.get(key)
            .ok_or_else(|| Invalid::new(&self.path_of(key), "missing"))
    }

    fn expected(&self, what: &str) -> Invalid {
        let found = match self.value {
            Value::Null => "null",
            Value::Bool(_) => "a boolean",
            Value::Number(_) => "a number",
            Value::String(_) => "a string",
            Value::Array(_) => "a list",
            Value::Object(_) => "a mapping",
        };
        Invalid::new(&self.path, format!("expected {what}, found {found}"))
    }

    pub fn str(&self) -> Result<&'v str, Invalid> {
        self.value.as_str().ok_or_else(|| self.expected("a string"))
    }

    /// A non-empty string.
    pub fn name(&self) -> Result<&'v str, Invalid> {
        match self.str()? {
            "" => Err(Invalid::new(&self.path, "must not be empty")),
            s => Ok(s),
        }
    }

    pub fn bool(&self) -> Result<bool, Invalid> {
        self.value
            .as_bool()
            .ok_or_else(|| self.expected("true or false"))
    }

    pub fn int(&self) -> Result<i64, Invalid> {
        self.value
            .as_i64()
            .ok_or_else(|| self.expected("an integer"))
    }

    /// An integer within `range`, converted to the field's type.
    pub fn int_in<T: TryFrom<i64>>(
        &self,
        range: std::ops::RangeInclusive<i64>,
    ) -> Result<T, Invalid> {
        let n = self.int()?;
        let out_of_range = || {
            Invalid::new(
                &self.path,
                format!("{n} is out of range {}..={}", range.start(), range.end()),
            )
        };
        if !range.contains(&n) {
            return Err(out_of_range());
        }
        T::try_from(n).map_err(|_| out_of_range())
    }

    /// The elements of a list, each with its index in the path.
    pub fn items(&self) -> Result<Vec<Field<'v>>, Invalid> {
        let items = self
            .value
            .as_array()
            .ok_or_else(|| self.expected("a list"))?;
        Ok(items
            .iter()
            .enumerate()
            .map(|(i, value)| Field {
                value,
                path: format!("{}[{i}]", self.path),
            })
            .collect())
    }

    /// The members of a mapping, in document order.
    pub fn entries(&self) -> Result<Vec<(&'v str, Field<'v>)>, Invalid> {
        let map = self
            .value
            .as_object()
            .ok_or_else(|| self.expected("a mapping"))?;
        Ok(map
            .iter()
            .map(|(k, value)| {
                let path = self.path_of(k);
                (k.as_str(), Field { value, path })
            })
            .collect())
    }

    /// A mapping of strings to strings, such as labels and annotations.
    pub fn string_map(&self) -> Result<BTreeMap<String, String>, Invalid> {
        self.entries()?
            .into_iter()
            .map(|(k, v)| Ok((k.to_string(), v.str()?.to_string())))
            .collect()
    }

    /// Members not in `known`: in hand-written objects they are typos that
    /// would otherwise silently change what is enforced.
    pub fn unknown_keys(&self, known: &[&str]) -> Vec<Invalid> {
        self.value
            .as_object()
            .into_iter()
            .flat_map(|m| m.keys())
            .filter(|k| !known.contains(&k.as_str()))
            .map(|k| {
                Invalid::new(
                    &self.path_of(k),
                    format!("unknown field (expected one of: {})", known.join(", ")),
                )
            })
            .collect()
    }

    pub fn ip(&self) -> Result<IpAddr, Invalid> {
        let s = self.str()?;
        IpAddr::from_str(s)
            .map_err(|_| Invalid::new(&self.path, format!("{s:?} is not an IP address")))
    }

    /// A CIDR with no host bits set, as EC2 and the VPC CNI write them.
    pub fn cidr(&self) -> Result<Cidr, Invalid> {
        let s = self.str()?;
        Cidr::from_str(s).map_err(|_| {
            let network = s
                .split_once('/')
                .and_then(|(a, l)| Some((a.parse().ok()?, l.parse().ok()?)))
                .and_then(|(addr, len)| Cidr::new(addr, len));
            let message = match network {
                Some(network) => format!("{s:?} has host bits set (the network is {network})"),
                None => format!("{s:?} is not a CIDR"),
            };
            Invalid::new(&self.path, message)
        })
    }
}
