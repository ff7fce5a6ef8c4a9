//! Downloading a checkpoint from the Hugging Face hub (or a mirror) into the standard
//! cache layout, `models--org--name/{blobs,snapshots/<sha>,refs/<revision>}`, with
//! every file checked against what the hub reports.
//!
//! The transfer itself is hf-hub's: partial downloads go to `<blob>.part` and resume
//! with a `Range` request on the next attempt. This module adds what hf-hub 0.4 lacks:
//! the environment variables (`HF_ENDPOINT`, `HF_HOME`, `HF_HUB_CACHE`, `HF_TOKEN`;
//! `Api::new()` ignores them), pinning every file to one commit, choosing the files a
//! conversion needs, and verifying sizes and LFS sha256 after download (a mismatch
//! removes the bad blob so the next attempt downloads it afresh).

use crate::error::{ConvertError, Result};
use crate::source::SIDE_FILES;
use hf_hub::api::sync::{ApiBuilder, ApiError};
use hf_hub::{Cache, Repo, RepoType};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The public hub.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// Where to fetch from and to.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// `org/name`.
    pub hf_id: String,
    /// A branch, tag or commit (`main` when `None`).
    pub revision: Option<String>,
    /// The hub's base URL.
    pub endpoint: String,
    /// The hub cache folder (the one holding `models--org--name`).
    pub cache_dir: PathBuf,
    /// A bearer token for private or gated repos.
    pub token: Option<String>,
    /// Show hf-hub's per-file progress bars.
    pub progress: bool,
    /// In-process retries of a failed transfer (each resumes where the last stopped).
    pub retries: usize,
}

impl FetchOptions {
    /// Options from the environment, as the Python hub client reads it: `HF_ENDPOINT`;
    /// the cache from `cache_dir`, else `HF_HUB_CACHE`, else `HF_HOME/hub`, else
    /// `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`; the token
    /// from `HF_TOKEN`, else the `token` file beside the cache.
    pub fn from_env(hf_id: &str, revision: Option<String>, cache_dir: Option<PathBuf>) -> Self {
        let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
        let endpoint = var("HF_ENDPOINT")
            .map(|v| v.to_string_lossy().trim_end_matches('/').to_string())
            .unwrap_or_else(|| DEFAULT_ENDPOINT.into());
        let cache_dir = cache_dir
            .or_else(|| var("HF_HUB_CACHE").map(PathBuf::from))
            .or_else(|| var("HF_HOME").map(|h| PathBuf::from(h).join("hub")))
            .or_else(|| var("XDG_CACHE_HOME").map(|h| PathBuf::from(h).join("huggingface/hub")))
            .unwrap_or_else(|| {
                let home = var("HOME")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| PathBuf::from("."));
                home.join(".cache/huggingface/hub")
            });
        let token = var("HF_TOKEN")
            .map(|t| t.to_string_lossy().trim().to_string())
            .or_else(|| Cache::new(cache_dir.clone()).token());
        FetchOptions {
            hf_id: hf_id.into(),
            revision,
            endpoint,
            cache_dir,
            token,
            progress: false,
            retries: 3,
        }
    }
}

/// One fetched file.
#[derive(Debug, Clone, Serialize)]
pub struct FetchedFile {
    /// Its size.
    pub size: u64,
    /// Its sha256, for LFS files (checked against the hub's).
    pub sha256: Option<String>,
    /// False when a verified copy was already in the cache.
    pub downloaded: bool,
}

/// A fetched snapshot.
#[derive(Debug, Clone, Serialize)]
pub struct Fetched {
    /// The repo.
    pub hf_id: String,
    /// The commit sha every file was fetched at.
    pub commit: String,
    /// The local snapshot folder (`.../snapshots/<commit>`).
    pub snapshot: PathBuf,
    /// Every file, by repo-relative name.
    pub files: BTreeMap<String, FetchedFile>,
}

#[derive(Debug, Clone, Deserialize)]
struct Lfs {
    sha256: String,
    size: u64,
}

#[derive(Debug, Clone, Deserialize)]
struct Sibling {
    rfilename: String,
    #[serde(default)]
    size: Option<u64>,
    #[serde(default)]
    lfs: Option<Lfs>,
}

#[derive(Debug, Clone, Deserialize)]
struct RepoInfo {
    sha: String,
    #[serde(default)]
    siblings: Vec<Sibling>,
}

impl RepoInfo {
    /// The hub's answer names cache paths (`snapshots/<sha>`, `blobs/<sha256>`, the
    /// files): a commit that is not 40 hex digits, an LFS digest that is not 64, or a
    /// file name that is absolute or climbs out with `..` would make a hostile or broken
    /// endpoint write or delete outside the cache, so it is refused.
    fn check(&self) -> std::result::Result<(), String> {
        let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
        if !hex(&self.sha, 40) {
            return Err(format!("commit {:?} is not 40 hex digits", self.sha));
        }
        for s in &self.siblings {
            let p = Path::new(&s.rfilename);
            let plain = !s.rfilename.is_empty()
                && !s.rfilename.contains('\\')
                && p.components()
                    .all(|c| matches!(c, std::path::Component::Normal(_)));
            if !plain {
                return Err(format!(
                    "file name {:?} is not a relative path inside the repo",
                    s.rfilename
                ));
            }
            if let Some(lfs) = &s.lfs {
                if !hex(&lfs.sha256, 64) {
                    return Err(format!(
                        "{}: LFS sha256 {:?} is not 64 hex digits",
                        s.rfilename, lfs.sha256
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Checks `id` against the hub's rules for a model repository id (`name` or
/// `owner/name`; letters, digits, `-`, `_` and `.`; each part at most 96 characters,
/// starting and ending with a letter, digit or `_`; no `--` or `..`), so that a typo
/// is named here rather than reported as a failed request (or a DNS error) later.
pub fn check_repo_id(id: &str) -> Result<()> {
    let bad = |msg: &str| ConvertError::RepoId {
        id: id.into(),
        msg: msg.into(),
    };
    let parts: Vec<&str> = id.split('/').collect();
    if parts.len() > 2 {
        return Err(bad("has more than one '/' (expected owner/name)"));
    }
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    for p in &parts {
        if p.is_empty() || p.len() > 96 {
            return Err(bad("each part of owner/name must be 1 to 96 characters"));
        }
        if let Some(c) = p.chars().find(|&c| !(word(c) || c == '-' || c == '.')) {
            return Err(bad(&format!(
                "{c:?} is not allowed (letters, digits, '-', '_' and '.' only)"
            )));
        }
        if !p.starts_with(word) || !p.ends_with(word) {
            return Err(bad("a part starts or ends with '-' or '.'"));
        }
    }
    if id.contains("--") || id.contains("..") {
        return Err(bad("'--' and '..' are not allowed"));
    }
    Ok(())
}

/// Fetches the files a conversion needs: `config.json`, the tokenizer, generation and
/// preprocessor configs and chat templates present in the repo, and the weights
/// (`model.safetensors.index.json` and every shard it names, or `model.safetensors`).
pub fn fetch(opts: &FetchOptions) -> Result<Fetched> {
    check_repo_id(&opts.hf_id)?;
    let rev = opts.revision.clone().unwrap_or_else(|| "main".into());
    let api = ApiBuilder::from_env()
        .with_endpoint(opts.endpoint.clone())
        .with_cache_dir(opts.cache_dir.clone())
        .with_token(opts.token.clone())
        .with_progress(opts.progress)
        .with_retries(opts.retries)
        .with_user_agent("q3vl", env!("CARGO_PKG_VERSION"))
        .build()
        .map_err(|e| hub_err(&opts.endpoint, e))?;
    let info = repo_info(&api, opts, &rev)?;
    let mut snap = Snapshot::new(&api, opts, &info);
    snap.get("config.json")?;
    let weights = snap.weight_files()?;
    for f in SIDE_FILES
        .iter()
        .filter(|f| **f != "config.json" && **f != INDEX_FILE)
    {
        if snap.siblings.contains_key(f) {
            snap.get(f)?;
        }
    }
    for w in &weights {
        snap.get(w)?;
    }
    write_refs(&snap.cache_repo, &rev, &info.sha)?;
    Ok(Fetched {
        hf_id: opts.hf_id.clone(),
        commit: info.sha.clone(),
        snapshot: snap.snapshot,
        files: snap.files,
    })
}

/// The index of sharded weights.
const INDEX_FILE: &str = "model.safetensors.index.json";

/// A snapshot being fetched, every file at the one commit the revision resolved to.
struct Snapshot<'a> {
    opts: &'a FetchOptions,
    /// The commit.
    sha: &'a str,
    /// The repo pinned to `sha`, so a branch that moves during the download cannot
    /// mix two commits.
    pinned: hf_hub::api::sync::ApiRepo,
    /// `models--org--name` in the cache.
    cache_repo: PathBuf,
    /// `snapshots/<sha>` in it.
    snapshot: PathBuf,
    /// The repo's files at `sha`, by name.
    siblings: BTreeMap<&'a str, &'a Sibling>,
    /// The files fetched so far.
    files: BTreeMap<String, FetchedFile>,
}

impl<'a> Snapshot<'a> {
    fn new(api: &hf_hub::api::sync::Api, opts: &'a FetchOptions, info: &'a RepoInfo) -> Self {
        let sha = info.sha.as_str();
        let pinned = api.repo(Repo::with_revision(
            opts.hf_id.clone(),
            RepoType::Model,
            sha.to_string(),
        ));
        let cache_repo = opts
            .cache_dir
            .join(Repo::model(opts.hf_id.clone()).folder_name());
        let snapshot = cache_repo.join("snapshots").join(sha);
        let siblings = info
            .siblings
            .iter()
            .map(|s| (s.rfilename.as_str(), s))
            .collect();
        Snapshot {
            opts,
            sha,
            pinned,
            cache_repo,
            snapshot,
            siblings,
            files: BTreeMap::new(),
        }
    }

    /// The download URL of file `f`.
    fn url(&self, f: &str) -> String {
        let o = self.opts;
        format!("{}/{}/resolve/{}/{}", o.endpoint, o.hf_id, self.sha, f)
    }

    /// Fetches file `name` (or finds a verified copy) and records it.
    fn get(&mut self, name: &str) -> Result<PathBuf> {
        let sib = self
            .siblings
            .get(name)
            .copied()
            .ok_or_else(|| ConvertError::Hub {
                url: self.url(name),
                msg: format!("the repo has no {name} at {}", self.sha),
            })?;
        let (path, downloaded) = get_verified(&self.pinned, &self.snapshot, sib, &self.url(name))?;
        let size = std::fs::metadata(&path)
            .map_err(|e| ConvertError::io(&path, e))?
            .len();
        self.files.insert(
            name.to_string(),
            FetchedFile {
                size,
                sha256: sib.lfs.as_ref().map(|l| l.sha256.clone()),
                downloaded,
            },
        );
        Ok(path)
    }

    /// The weights files: every shard the index names (fetching the index), or
    /// `model.safetensors`.
    fn weight_files(&mut self) -> Result<BTreeSet<String>> {
        let mut weights = BTreeSet::new();
        if self.siblings.contains_key(INDEX_FILE) {
            let p = self.get(INDEX_FILE)?;
            let v = q3vl_model::config::read_json(&p)?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| ConvertError::input(&p, "weight_map is missing"))?;
            weights.extend(map.values().filter_map(|f| f.as_str()).map(str::to_owned));
        } else if self.siblings.contains_key("model.safetensors") {
            weights.insert("model.safetensors".to_string());
        } else {
            return Err(ConvertError::Hub {
                url: format!("{}/{}", self.opts.endpoint, self.opts.hf_id),
                msg: format!(
                    "the repo has no model.safetensors or {INDEX_FILE} at {}",
                    self.sha
                ),
            });
        }
        Ok(weights)
    }
}

/// Standard cache refs: `refs/<rev>` holds the commit; none for a commit itself.
/// (hf-hub, asked for files at the commit, wrote `refs/<commit>`: drop that.)
fn write_refs(cache_repo: &Path, rev: &str, sha: &str) -> Result<()> {
    let refs = cache_repo.join("refs");
    let _ = std::fs::remove_file(refs.join(sha));
    if rev != sha {
        let r = refs.join(rev);
        if let Some(parent) = r.parent() {
            std::fs::create_dir_all(parent).map_err(|e| ConvertError::io(parent, e))?;
        }
        std::fs::write(&r, sha).map_err(|e| ConvertError::io(&r, e))?;
    }
    Ok(())
}

fn hub_err(url: &str, e: impl std::fmt::Display) -> ConvertError {
    ConvertError::Hub {
        url: url.into(),
        msg: e.to_string(),
    }
}

/// `GET {endpoint}/api/models/{id}/revision/{rev}?blobs=true`: the commit and every
/// file with its size and, for LFS files, sha256.
fn repo_info(api: &hf_hub::api::sync::Api, opts: &FetchOptions, rev: &str) -> Result<RepoInfo> {
    let repo = api.repo(Repo::with_revision(
        opts.hf_id.clone(),
        RepoType::Model,
        rev.to_string(),
    ));
    let url = format!(
        "{}/api/models/{}/revision/{}",
        opts.endpoint,
        opts.hf_id,
        rev.replace('/', "%2F")
    );
    match repo.info_request().query("blobs", "true").call() {
        Ok(resp) => {
            let body = resp.into_string().map_err(|e| hub_err(&url, e))?;
            let info: RepoInfo = serde_json::from_str(&body)
                .map_err(|e| hub_err(&url, format!("unexpected repo info: {e}")))?;
            info.check().map_err(|e| hub_err(&url, e))?;
            Ok(info)
        }
        Err(ureq::Error::Status(code, resp)) => {
            let kind = resp.header("x-error-code").unwrap_or_default().to_string();
            let msg = match (code, kind.as_str()) {
                (_, "RevisionNotFound") => format!("revision {rev:?} not found in {}", opts.hf_id),
                (401 | 403 | 404, "GatedRepo") => format!(
                    "{} is gated: accept its terms on the hub and set HF_TOKEN (HTTP {code})",
                    opts.hf_id
                ),
                (401 | 404, _) => format!(
                    "repository {} not found (HTTP {code}); check the id, or set HF_TOKEN if it is private",
                    opts.hf_id
                ),
                _ => format!("HTTP {code} {kind}"),
            };
            Err(ConvertError::Hub { url, msg })
        }
        Err(e) => Err(hub_err(&url, format!("cannot reach the hub: {e}"))),
    }
}

/// The snapshot path of `sib`, downloading it unless a copy that passes the checks is
/// already there; any copy that fails them is removed.
fn get_verified(
    repo: &hf_hub::api::sync::ApiRepo,
    snapshot: &Path,
    sib: &Sibling,
    url: &str,
) -> Result<(PathBuf, bool)> {
    let pointer = snapshot.join(&sib.rfilename);
    if pointer.exists() {
        if check(&pointer, sib).is_ok() {
            return Ok((pointer, false));
        }
        remove_copy(&pointer);
    }
    let path = match repo.download(&sib.rfilename) {
        Err(ApiError::InvalidResume) => {
            // A partial file longer than the real one cannot be resumed: restart it.
            remove_partials(snapshot, sib);
            repo.download(&sib.rfilename)
        }
        r => r,
    }
    .map_err(|e| hub_err(url, e))?;
    if path != pointer {
        remove_copy(&path);
        return Err(ConvertError::Hub {
            url: url.into(),
            msg: format!(
                "the hub served another commit than {}",
                snapshot
                    .file_name()
                    .map(|n| n.to_string_lossy())
                    .unwrap_or_default()
            ),
        });
    }
    if let Err(msg) = check(&pointer, sib) {
        remove_copy(&pointer);
        return Err(ConvertError::Integrity {
            file: sib.rfilename.clone(),
            msg,
        });
    }
    Ok((pointer, true))
}

/// Size (and sha256 for LFS files) against the hub's.
fn check(path: &Path, sib: &Sibling) -> std::result::Result<(), String> {
    let len = std::fs::metadata(path).map_err(|e| e.to_string())?.len();
    let want = sib.lfs.as_ref().map(|l| l.size).or(sib.size);
    if let Some(want) = want {
        if len != want {
            return Err(format!("size {len} bytes, the hub says {want}"));
        }
    }
    if let Some(lfs) = &sib.lfs {
        let got = q3vl_bundle::sha256_file(path)
            .map_err(|e| e.to_string())?
            .sha256;
        if !got.eq_ignore_ascii_case(&lfs.sha256) {
            return Err(format!("sha256 {got}, the hub says {}", lfs.sha256));
        }
    }
    Ok(())
}

/// Removes a snapshot entry and the blob it points to.
fn remove_copy(pointer: &Path) {
    if let Ok(blob) = std::fs::canonicalize(pointer) {
        let _ = std::fs::remove_file(blob);
    }
    let _ = std::fs::remove_file(pointer);
}

/// Removes the `.part` file of `sib`'s blob (named by its LFS sha256 or any etag).
fn remove_partials(snapshot: &Path, sib: &Sibling) {
    let Some(blobs) = snapshot
        .parent()
        .and_then(Path::parent)
        .map(|r| r.join("blobs"))
    else {
        return;
    };
    if let Some(lfs) = &sib.lfs {
        let _ = std::fs::remove_file(blobs.join(format!("{}.part", lfs.sha256)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(sha: &str, name: &str, lfs: Option<&str>) -> RepoInfo {
        RepoInfo {
            sha: sha.into(),
            siblings: vec![Sibling {
                rfilename: name.into(),
                size: Some(1),
                lfs: lfs.map(|d| Lfs {
                    sha256: d.into(),
                    size: 1,
                }),
            }],
        }
    }

    /// A hostile endpoint cannot steer cache paths (found reading the code while fuzzing
    /// the readers: the commit and file names become path parts).
    #[test]
    fn hub_answers_that_would_leave_the_cache_are_refused() {
        let sha = "0123456789abcdef0123456789abcdef01234567";
        let digest = "a".repeat(64);
        assert!(info(sha, "model.safetensors", Some(&digest))
            .check()
            .is_ok());
        assert!(info(sha, "sub/config.json", None).check().is_ok());
        for bad_sha in ["../../x", "", &"a".repeat(41)] {
            let e = info(bad_sha, "config.json", None).check().unwrap_err();
            assert!(e.contains("40 hex"), "{e}");
        }
        for bad_name in ["../config.json", "/etc/passwd", "a/../../b", "", "a\\b"] {
            let e = info(sha, bad_name, None).check().unwrap_err();
            assert!(e.contains("relative path"), "{bad_name}: {e}");
        }
        let e = info(sha, "m.safetensors", Some("../../x"))
            .check()
            .unwrap_err();
        assert!(e.contains("64 hex"), "{e}");
    }
}
