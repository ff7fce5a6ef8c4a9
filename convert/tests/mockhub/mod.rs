//! A mock Hugging Face hub on 127.0.0.1 (random port) for fetch tests: the repo-info
//! API and ranged `resolve` downloads, with switches for a cut-off transfer, a corrupt
//! file and a required token. Nothing leaves the loopback interface; the server stops
//! when dropped and after a bounded number of requests.

#![allow(dead_code)]

use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// Requests served at most, so a runaway client cannot keep a test alive.
const MAX_REQUESTS: usize = 2000;

/// One repo the mock serves.
#[derive(Clone, Default)]
pub struct MockRepo {
    /// Its commit sha.
    pub sha: String,
    /// Files by name.
    pub files: BTreeMap<String, Vec<u8>>,
    /// Files served as LFS (with an `lfs.sha256` and `X-Linked-Etag`).
    pub lfs: BTreeSet<String>,
}

impl MockRepo {
    /// Every file of a checkpoint folder; `.safetensors` files are LFS.
    pub fn from_dir(dir: &std::path::Path, sha: &str) -> Self {
        let mut r = MockRepo {
            sha: sha.into(),
            ..Default::default()
        };
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_file() {
                let name = p.file_name().unwrap().to_string_lossy().into_owned();
                if name.ends_with(".safetensors") {
                    r.lfs.insert(name.clone());
                }
                r.files.insert(name, std::fs::read(&p).unwrap());
            }
        }
        r
    }
}

#[derive(Default)]
struct State {
    repos: BTreeMap<String, MockRepo>,
    /// Files whose next full download is cut off half way.
    cut_once: BTreeSet<String>,
    /// Files served with one byte flipped.
    corrupt: BTreeSet<String>,
    /// Token required in `Authorization: Bearer`.
    token: Option<String>,
    /// "METHOD path range" of every request.
    log: Vec<String>,
}

/// The running mock.
pub struct MockHub {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl MockHub {
    /// Starts serving.
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(State::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp) = (state.clone(), stop.clone());
        let handle = std::thread::spawn(move || {
            for (served, conn) in listener.incoming().enumerate() {
                if sp.load(Ordering::SeqCst) || served >= MAX_REQUESTS {
                    break;
                }
                if let Ok(c) = conn {
                    let _ = serve(c, &st);
                }
            }
        });
        MockHub {
            url,
            state,
            stop,
            handle: Some(handle),
        }
    }

    /// Adds a repo under `id`.
    pub fn add_repo(&self, id: &str, repo: MockRepo) {
        self.state.lock().unwrap().repos.insert(id.into(), repo);
    }

    /// Cuts the next full download of `file` off half way.
    pub fn cut_once(&self, file: &str) {
        self.state.lock().unwrap().cut_once.insert(file.into());
    }

    /// Serves `file` with a byte flipped (or not).
    pub fn set_corrupt(&self, file: &str, on: bool) {
        let mut s = self.state.lock().unwrap();
        if on {
            s.corrupt.insert(file.into());
        } else {
            s.corrupt.remove(file);
        }
    }

    /// Requires `Authorization: Bearer <token>`.
    pub fn require_token(&self, token: &str) {
        self.state.lock().unwrap().token = Some(token.into());
    }

    /// Every request so far.
    pub fn log(&self) -> Vec<String> {
        self.state.lock().unwrap().log.clone()
    }
}

impl Drop for MockHub {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        let _ = TcpStream::connect(self.url.trim_start_matches("http://"));
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn sha256(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

fn respond(
    c: &mut TcpStream,
    status: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> std::io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {status}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    c.write_all(head.as_bytes())?;
    c.write_all(body)?;
    c.flush()
}

/// An error answer as the hub gives one: `status`, the `X-Error-Code` header, `body`.
fn hub_error(c: &mut TcpStream, status: &str, code: &str, body: &[u8]) -> std::io::Result<()> {
    respond(c, status, &[("X-Error-Code", code.into())], body)
}

fn serve(mut c: TcpStream, state: &Mutex<State>) -> std::io::Result<()> {
    c.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    let mut reader = BufReader::new(c.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let target = parts.next().unwrap_or("").to_string();
    let mut range = None;
    let mut auth = None;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" {
            break;
        }
        let (k, v) = h.split_once(':').unwrap_or((&h, ""));
        match k.trim().to_ascii_lowercase().as_str() {
            "range" => range = Some(v.trim().to_string()),
            "authorization" => auth = Some(v.trim().to_string()),
            _ => {}
        }
    }
    let mut st = state.lock().unwrap();
    st.log.push(format!(
        "{method} {target} {}",
        range.clone().unwrap_or_default()
    ));
    if let Some(t) = &st.token {
        if auth.as_deref() != Some(&format!("Bearer {t}")) {
            return hub_error(&mut c, "401 Unauthorized", "RepoNotFound", b"{}");
        }
    }
    let path = target.split('?').next().unwrap_or("").to_string();
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    // GET /api/models/{org}/{name}/revision/{rev}
    if segs.len() >= 6 && segs[0] == "api" && segs[1] == "models" && segs[4] == "revision" {
        let id = format!("{}/{}", segs[2], segs[3]);
        let rev = segs[5..].join("/");
        let Some(repo) = st.repos.get(&id) else {
            return hub_error(
                &mut c,
                "404 Not Found",
                "RepoNotFound",
                b"{\"error\":\"Repository not found\"}",
            );
        };
        if rev != "main" && rev != repo.sha {
            return hub_error(&mut c, "404 Not Found", "RevisionNotFound", b"{}");
        }
        let siblings: Vec<serde_json::Value> = repo
            .files
            .iter()
            .map(|(name, data)| {
                let mut s = serde_json::json!({"rfilename": name, "size": data.len(), "blobId": &sha256(data)[..40]});
                if repo.lfs.contains(name) {
                    s["lfs"] = serde_json::json!({"sha256": sha256(data), "size": data.len(), "pointerSize": 134});
                }
                s
            })
            .collect();
        let body = serde_json::json!({"id": id, "sha": repo.sha, "siblings": siblings}).to_string();
        return respond(
            &mut c,
            "200 OK",
            &[("Content-Type", "application/json".into())],
            body.as_bytes(),
        );
    }
    // GET /{org}/{name}/resolve/{rev}/{file}
    if segs.len() >= 5 && segs[2] == "resolve" {
        let id = format!("{}/{}", segs[0], segs[1]);
        let rev = segs[3];
        let file = segs[4..].join("/");
        let Some(repo) = st.repos.get(&id).cloned() else {
            return hub_error(&mut c, "404 Not Found", "RepoNotFound", b"{}");
        };
        if rev != "main" && rev != repo.sha {
            return hub_error(&mut c, "404 Not Found", "RevisionNotFound", b"{}");
        }
        let Some(data) = repo.files.get(&file) else {
            return hub_error(&mut c, "404 Not Found", "EntryNotFound", b"{}");
        };
        let mut headers = vec![("X-Repo-Commit", repo.sha.clone())];
        if repo.lfs.contains(&file) {
            headers.push(("X-Linked-Etag", format!("\"{}\"", sha256(data))));
            headers.push(("X-Linked-Size", data.len().to_string()));
        }
        headers.push(("ETag", format!("\"{}\"", &sha256(data)[..40])));
        let mut body = data.clone();
        if st.corrupt.contains(&file) && !body.is_empty() {
            let mid = body.len() / 2;
            body[mid] ^= 0xff;
        }
        let n = body.len();
        let (a, b) = match range.as_deref().and_then(|r| r.strip_prefix("bytes=")) {
            Some(r) => {
                let (a, b) = r.split_once('-').unwrap_or((r, ""));
                let a: usize = a.parse().unwrap_or(0);
                let b: usize = if b.is_empty() {
                    n.saturating_sub(1)
                } else {
                    b.parse().unwrap_or(n - 1)
                };
                (a.min(n), b.min(n.saturating_sub(1)))
            }
            None => (0, n.saturating_sub(1)),
        };
        headers.push(("Content-Range", format!("bytes {a}-{b}/{n}")));
        let part = if n == 0 { &body[..0] } else { &body[a..=b] };
        let full_transfer = part.len() > 1 && a == 0;
        if full_transfer && st.cut_once.remove(&file) {
            // Promise the whole body, send half, hang up.
            let mut head = format!(
                "HTTP/1.1 206 Partial Content\r\nConnection: close\r\nContent-Length: {}\r\n",
                part.len()
            );
            for (k, v) in &headers {
                head.push_str(&format!("{k}: {v}\r\n"));
            }
            head.push_str("\r\n");
            drop(st);
            c.write_all(head.as_bytes())?;
            c.write_all(&part[..part.len() / 2])?;
            c.flush()?;
            return c.shutdown(std::net::Shutdown::Both);
        }
        drop(st);
        return respond(&mut c, "206 Partial Content", &headers, part);
    }
    respond(&mut c, "404 Not Found", &[], b"{}")
}
