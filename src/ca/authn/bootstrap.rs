//! Bootstrap tokens: a file mapping secret tokens to node names, for nodes outside Kubernetes.
//! A `.yaml`/`.yml` file is a list of `{token, node}`; any other is `TOKEN NODE` lines (blank
//! lines and `#` comments skipped). The file is read again when it changes, so that removing
//! a line revokes its token at the next call; a file that no longer loads refuses every token
//! until it is fixed (fail closed), and says why.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::{Authenticator, AuthnError, node_name};
use crate::model::loader;

/// The shortest token accepted: a guessable token is a node identity anyone can claim.
pub const MIN_TOKEN_CHARS: usize = 16;

/// Why a bootstrap token file cannot be used.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum TokenFileError {
    /// The file cannot be read.
    #[error("--bootstrap-tokens {}: {error}", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        error: String,
    },
    /// The YAML does not parse, or is not a list.
    #[error("--bootstrap-tokens {}: {error}", .path.display())]
    Syntax {
        /// The file.
        path: PathBuf,
        /// Why.
        error: String,
    },
    /// One line (or list entry, in YAML) is wrong.
    #[error("--bootstrap-tokens {}: {what} {number}: {error}", .path.display())]
    Entry {
        /// The file.
        path: PathBuf,
        /// `line`, or `entry` in a YAML list.
        what: &'static str,
        /// Its number, from 1.
        number: usize,
        /// Why.
        error: String,
    },
    /// The file has no token at all.
    #[error("--bootstrap-tokens {}: no token in the file", .path.display())]
    Empty {
        /// The file.
        path: PathBuf,
    },
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    token: String,
    node: String,
}

/// What makes a file a different version: a changed file is read again.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    modified: Option<std::time::SystemTime>,
    len: u64,
    #[cfg(unix)]
    inode: u64,
}

impl Stamp {
    fn of(meta: &std::fs::Metadata) -> Self {
        #[cfg(unix)]
        use std::os::unix::fs::MetadataExt as _;
        Self {
            modified: meta.modified().ok(),
            len: meta.len(),
            #[cfg(unix)]
            inode: meta.ino(),
        }
    }
}

#[derive(Debug)]
struct Loaded {
    stamp: Option<Stamp>,
    tokens: Result<HashMap<String, String>, TokenFileError>,
}

/// The tokens of a bootstrap token file, followed as it changes.
#[derive(Debug)]
pub struct BootstrapTokens {
    path: PathBuf,
    loaded: Mutex<Loaded>,
}

/// Checks one token and its node; the error says which is wrong.
fn entry(token: &str, node: &str) -> Result<(), String> {
    if token.chars().count() < MIN_TOKEN_CHARS {
        return Err(format!(
            "the token is shorter than {MIN_TOKEN_CHARS} characters"
        ));
    }
    // A token travels in an HTTP header: visible ASCII only.
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("the token has a character other than visible ASCII".into());
    }
    crate::tracker::subscriber::node_name(node)
}

/// Parses a token file's text; `yaml` chooses the format. Errors name `path` and the line or
/// entry.
pub fn parse(
    path: &Path,
    text: &str,
    yaml: bool,
) -> Result<HashMap<String, String>, TokenFileError> {
    let at = |what, number, error: String| TokenFileError::Entry {
        path: path.to_owned(),
        what,
        number,
        error,
    };
    let (what, entries): (&'static str, Vec<(usize, String, String)>) = if yaml {
        let items = match loader::parse_yaml(text, 0) {
            Ok(serde_json::Value::Array(items)) => items,
            Ok(serde_json::Value::Null) => Vec::new(),
            Ok(_) => {
                return Err(TokenFileError::Syntax {
                    path: path.to_owned(),
                    error: "expected a list of {token, node}".into(),
                });
            }
            Err(error) => {
                return Err(TokenFileError::Syntax {
                    path: path.to_owned(),
                    error,
                });
            }
        };
        let entries = items
            .into_iter()
            .enumerate()
            .map(|(i, item)| {
                serde_json::from_value::<Entry>(item)
                    .map(|e| (i + 1, e.token, e.node))
                    .map_err(|e| at("entry", i + 1, e.to_string()))
            })
            .collect::<Result<_, _>>()?;
        ("entry", entries)
    } else {
        let mut entries = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            match line.split_whitespace().collect::<Vec<_>>().as_slice() {
                [token, node] => entries.push((i + 1, (*token).to_owned(), (*node).to_owned())),
                _ => return Err(at("line", i + 1, "expected `TOKEN NODE`".into())),
            }
        }
        ("line", entries)
    };
    let mut tokens = HashMap::with_capacity(entries.len());
    let mut first_seen: HashMap<&str, usize> = HashMap::new();
    for (number, token, node) in &entries {
        entry(token, node).map_err(|e| at(what, *number, e))?;
        if let Some(earlier) = first_seen.insert(token, *number) {
            return Err(at(
                what,
                *number,
                format!("the same token as {what} {earlier}"),
            ));
        }
        tokens.insert(token.clone(), node.clone());
    }
    if tokens.is_empty() {
        return Err(TokenFileError::Empty {
            path: path.to_owned(),
        });
    }
    Ok(tokens)
}

fn read(path: &Path) -> Loaded {
    let failed = |error: std::io::Error| Loaded {
        stamp: None,
        tokens: Err(TokenFileError::Read {
            path: path.to_owned(),
            error: error.to_string(),
        }),
    };
    let stamp = match std::fs::metadata(path) {
        Ok(meta) => Stamp::of(&meta),
        Err(e) => return failed(e),
    };
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) => return failed(e),
    };
    let yaml = matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml")
    );
    Loaded {
        stamp: Some(stamp),
        tokens: parse(path, &text, yaml),
    }
}

impl BootstrapTokens {
    /// Reads the token file at `path`; at start, a file that does not load is an error.
    pub fn load(path: &Path) -> Result<Self, TokenFileError> {
        let loaded = read(path);
        if let Err(e) = &loaded.tokens {
            return Err(e.clone());
        }
        Ok(Self {
            path: path.to_owned(),
            loaded: Mutex::new(loaded),
        })
    }

    /// The node of `token` in the file as it now is.
    fn lookup(&self, token: &str) -> Result<String, AuthnError> {
        let stamp = std::fs::metadata(&self.path).ok().map(|m| Stamp::of(&m));
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        if stamp.is_none() || stamp != loaded.stamp {
            *loaded = read(&self.path);
            match &loaded.tokens {
                Ok(tokens) => {
                    tracing::info!(file = %self.path.display(), tokens = tokens.len(), "bootstrap tokens read again")
                }
                Err(e) => {
                    tracing::error!(error = %e, "bootstrap tokens: every token is refused until the file loads")
                }
            }
        }
        match &loaded.tokens {
            Ok(tokens) => tokens
                .get(token)
                .cloned()
                .ok_or_else(|| AuthnError::Refused("not a known bootstrap token".into())),
            Err(e) => Err(AuthnError::Unavailable(e.to_string())),
        }
    }
}

#[tonic::async_trait]
impl Authenticator for BootstrapTokens {
    async fn authenticate(&self, token: &str) -> Result<String, AuthnError> {
        node_name(&self.lookup(token)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T1: &str = "0123456789abcdef-one";
    const T2: &str = "0123456789abcdef-two";

    fn lines(text: &str) -> Result<HashMap<String, String>, TokenFileError> {
        parse(Path::new("tokens"), text, false)
    }

    fn yaml(text: &str) -> Result<HashMap<String, String>, TokenFileError> {
        parse(Path::new("tokens.yaml"), text, true)
    }

    #[test]
    fn both_formats_map_tokens_to_nodes() {
        let t = lines(&format!("# nodes\n\n{T1} node-a\n  {T2}\tnode-b  \n")).expect("lines");
        assert_eq!(t.get(T1).map(String::as_str), Some("node-a"));
        assert_eq!(t.get(T2).map(String::as_str), Some("node-b"));
        let t = yaml(&format!(
            "- token: {T1}\n  node: node-a\n- {{token: {T2}, node: node-a}}\n"
        ))
        .expect("yaml");
        assert_eq!(t.len(), 2);
        assert_eq!(t.get(T2).map(String::as_str), Some("node-a"));
    }

    #[test]
    fn errors_name_the_file_and_the_line() {
        for (text, says) in [
            (
                format!("{T1} node-a\n{T1}\n"),
                "tokens: line 2: expected `TOKEN NODE`",
            ),
            (
                format!("{T1} node-a extra\n"),
                "line 1: expected `TOKEN NODE`",
            ),
            (
                "short node-a\n".into(),
                "line 1: the token is shorter than 16",
            ),
            (
                format!("{T1} Node_A\n"),
                "line 1: \"Node_A\" is not a valid node name",
            ),
            (
                format!("{T1} node-a\n\n{T1} node-b\n"),
                "line 3: the same token as line 1",
            ),
            ("# nothing\n\n".into(), "tokens: no token in the file"),
        ] {
            let e = lines(&text).expect_err(&text);
            assert!(e.to_string().contains(says), "{text:?}: {e}");
            assert!(
                e.to_string().starts_with("--bootstrap-tokens tokens"),
                "{e}"
            );
        }
        for (text, says) in [
            ("tokens: {}\n".to_owned(), "expected a list"),
            (format!("- token: {T1}\n"), "entry 1: missing field `node`"),
            (
                format!("- {{token: {T1}, node: a}}\n- {{token: {T2}, node: b, role: x}}\n"),
                "entry 2: unknown field `role`",
            ),
            ("- [unclosed\n".into(), "invalid YAML"),
            (
                format!("- {{token: {T1}, node: a}}\n- {{token: {T1}, node: b}}\n"),
                "entry 2: the same token as entry 1",
            ),
            (
                "- {token: \"0123456789abcdef ghi\", node: a}\n".into(),
                "entry 1: the token has a character other than visible ASCII",
            ),
        ] {
            let e = yaml(&text).expect_err(&text);
            assert!(e.to_string().contains(says), "{text:?}: {e}");
        }
    }

    #[tokio::test]
    async fn a_changed_file_is_read_again_and_a_broken_one_refuses_everyone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tokens");
        std::fs::write(&path, format!("{T1} node-a\n{T2} node-b\n")).expect("write");
        let tokens = BootstrapTokens::load(&path).expect("loads");
        assert_eq!(tokens.authenticate(T2).await, Ok("node-b".into()));
        assert!(matches!(
            tokens.authenticate("0123456789abcdef-other").await,
            Err(AuthnError::Refused(_))
        ));
        // Revoked: the line is gone (a rewrite through a new file, as editors and tools do).
        let next = dir.path().join("tokens.new");
        std::fs::write(&next, format!("{T1} node-a\n")).expect("write");
        std::fs::rename(&next, &path).expect("rename");
        assert!(matches!(
            tokens.authenticate(T2).await,
            Err(AuthnError::Refused(_))
        ));
        assert_eq!(tokens.authenticate(T1).await, Ok("node-a".into()));
        std::fs::write(&next, "garbage\n").expect("write");
        std::fs::rename(&next, &path).expect("rename");
        let e = tokens.authenticate(T1).await.expect_err("broken file");
        assert!(
            matches!(&e, AuthnError::Unavailable(m) if m.contains("line 1")),
            "{e}"
        );
        std::fs::remove_file(&path).expect("remove");
        assert!(matches!(
            tokens.authenticate(T1).await,
            Err(AuthnError::Unavailable(_))
        ));
        let e = BootstrapTokens::load(&path).expect_err("missing");
        assert!(e.to_string().starts_with("--bootstrap-tokens "), "{e}");
    }
}
