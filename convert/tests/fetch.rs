//! Fetch against a mock hub on loopback: clean download, resume after a cut-off
//! transfer, a corrupt file rejected and removed, missing repos and revisions, tokens.

mod mockhub;

use mockhub::{MockHub, MockRepo};
use q3vl_convert::fetch::{check_repo_id, fetch, FetchOptions};
use std::path::Path;

const SHA: &str = "0123456789abcdef0123456789abcdef01234567";
const SHARD1: &str = "model-00001-of-00002.safetensors";
const SHARD2: &str = "model-00002-of-00002.safetensors";

fn pseudo_bytes(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3] ^ seed)
        .collect()
}

fn repo() -> MockRepo {
    let mut r = MockRepo {
        sha: SHA.into(),
        ..Default::default()
    };
    let files: [(&str, Vec<u8>); 7] = [
        ("config.json", br#"{"model_type": "qwen3_vl"}"#.to_vec()),
        ("tokenizer.json", b"{}".to_vec()),
        ("tokenizer_config.json", b"{}".to_vec()),
        ("README.md", b"not fetched".to_vec()),
        (
            "model.safetensors.index.json",
            format!(r#"{{"weight_map": {{"a": "{SHARD1}", "b": "{SHARD2}"}}}}"#).into_bytes(),
        ),
        (SHARD1, pseudo_bytes(300_000, 1)),
        (SHARD2, pseudo_bytes(200_000, 2)),
    ];
    for (n, b) in files {
        r.files.insert(n.into(), b);
    }
    r.lfs.insert(SHARD1.into());
    r.lfs.insert(SHARD2.into());
    r
}

fn opts(hub: &MockHub, cache: &Path, id: &str) -> FetchOptions {
    FetchOptions {
        hf_id: id.into(),
        revision: None,
        endpoint: hub.url.clone(),
        cache_dir: cache.to_path_buf(),
        token: None,
        progress: false,
        retries: 0,
    }
}

fn resolves(hub: &MockHub, file: &str) -> Vec<String> {
    hub.log()
        .into_iter()
        .filter(|l| l.contains("/resolve/") && l.contains(file))
        .collect()
}

#[test]
fn clean_download_lands_in_the_standard_cache_layout() {
    let hub = MockHub::start();
    hub.add_repo("org/model", repo());
    let cache = tempfile::tempdir().unwrap();
    let f = fetch(&opts(&hub, cache.path(), "org/model")).unwrap();
    let root = cache.path().join("models--org--model");
    assert_eq!(f.snapshot, root.join("snapshots").join(SHA));
    assert_eq!(f.commit, SHA);
    let r = repo();
    for name in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors.index.json",
        SHARD1,
        SHARD2,
    ] {
        assert_eq!(
            std::fs::read(f.snapshot.join(name)).unwrap(),
            r.files[name],
            "{name}"
        );
        assert!(f.files[name].downloaded);
    }
    assert!(
        !f.snapshot.join("README.md").exists(),
        "only what a conversion needs is fetched"
    );
    assert_eq!(f.files[SHARD1].sha256.as_deref().unwrap().len(), 64);
    assert_eq!(
        std::fs::read_to_string(root.join("refs/main")).unwrap(),
        SHA
    );
    assert!(!root.join("refs").join(SHA).exists());
    // A second run finds verified copies and downloads nothing.
    let before = resolves(&hub, SHARD1).len();
    let again = fetch(&opts(&hub, cache.path(), "org/model")).unwrap();
    assert!(again.files.values().all(|x| !x.downloaded));
    assert_eq!(resolves(&hub, SHARD1).len(), before);
}

#[test]
fn an_interrupted_download_resumes_where_it_stopped() {
    let hub = MockHub::start();
    hub.add_repo("org/model", repo());
    hub.cut_once(SHARD1);
    let cache = tempfile::tempdir().unwrap();
    let e = fetch(&opts(&hub, cache.path(), "org/model"))
        .unwrap_err()
        .to_string();
    assert!(e.contains(SHARD1), "{e}");
    assert!(!cache
        .path()
        .join("models--org--model/snapshots")
        .join(SHA)
        .join(SHARD1)
        .exists());
    let f = fetch(&opts(&hub, cache.path(), "org/model")).unwrap();
    assert_eq!(
        std::fs::read(f.snapshot.join(SHARD1)).unwrap(),
        repo().files[SHARD1]
    );
    let ranges = resolves(&hub, SHARD1);
    assert!(
        ranges.iter().any(|l| l.contains("bytes=150000-")),
        "the second attempt resumes from the partial file: {ranges:?}"
    );
}

#[test]
fn retries_resume_within_one_run() {
    let hub = MockHub::start();
    hub.add_repo("org/model", repo());
    hub.cut_once(SHARD2);
    let cache = tempfile::tempdir().unwrap();
    let mut o = opts(&hub, cache.path(), "org/model");
    o.retries = 1;
    let f = fetch(&o).unwrap();
    assert_eq!(
        std::fs::read(f.snapshot.join(SHARD2)).unwrap(),
        repo().files[SHARD2]
    );
}

#[test]
fn a_corrupt_file_is_rejected_and_removed() {
    let hub = MockHub::start();
    hub.add_repo("org/model", repo());
    hub.set_corrupt(SHARD2, true);
    let cache = tempfile::tempdir().unwrap();
    let e = fetch(&opts(&hub, cache.path(), "org/model"))
        .unwrap_err()
        .to_string();
    assert!(e.contains(SHARD2) && e.contains("sha256"), "{e}");
    let blobs = cache.path().join("models--org--model/blobs");
    let good = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
        &repo().files[SHARD2],
    ));
    assert!(!blobs.join(&good).exists(), "the bad blob is removed");
    hub.set_corrupt(SHARD2, false);
    let f = fetch(&opts(&hub, cache.path(), "org/model")).unwrap();
    assert_eq!(
        std::fs::read(f.snapshot.join(SHARD2)).unwrap(),
        repo().files[SHARD2]
    );
}

#[test]
fn malformed_repo_ids_are_named_before_any_request() {
    let hub = MockHub::start();
    hub.add_repo("org/model", repo());
    let cache = tempfile::tempdir().unwrap();
    for (id, why) in [
        ("a b", "' '"),
        ("org/sub/model", "more than one '/'"),
        ("org/", "1 to 96"),
        ("/model", "1 to 96"),
        ("-org/model", "starts or ends"),
        ("org/model.", "starts or ends"),
        ("org--x/model", "'--'"),
        ("org/mo..del", "'..'"),
    ] {
        let e = fetch(&opts(&hub, cache.path(), id))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!("{id:?}")) && e.contains(why),
            "{id}: {e}"
        );
    }
    assert!(hub.log().is_empty(), "requests were sent: {:?}", hub.log());
    let long = format!("org/{}", "m".repeat(97));
    assert!(check_repo_id(&long).is_err());
    // The real ids, and the other forms the hub accepts, pass.
    for id in [
        "Qwen/Qwen3-VL-8B-Instruct",
        "Qwen/Qwen3-VL-2B-Instruct",
        "gpt2",
        "org_1/model.v2",
        &format!("org/{}", "m".repeat(96)),
    ] {
        check_repo_id(id).unwrap_or_else(|e| panic!("{id}: {e}"));
    }
}

#[test]
fn missing_repos_and_revisions_are_named() {
    let hub = MockHub::start();
    hub.add_repo("org/model", repo());
    let cache = tempfile::tempdir().unwrap();
    let e = fetch(&opts(&hub, cache.path(), "org/nope"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("org/nope") && e.contains("not found"), "{e}");
    let mut o = opts(&hub, cache.path(), "org/model");
    o.revision = Some("v9".into());
    let e = fetch(&o).unwrap_err().to_string();
    assert!(e.contains("revision \"v9\""), "{e}");
    // A pinned commit works and writes no ref.
    o.revision = Some(SHA.into());
    let f = fetch(&o).unwrap();
    assert_eq!(f.commit, SHA);
    assert!(!cache
        .path()
        .join("models--org--model/refs")
        .join(SHA)
        .exists());
}

#[test]
fn private_repos_need_the_token() {
    let hub = MockHub::start();
    hub.add_repo("org/model", repo());
    hub.require_token("s3cret");
    let cache = tempfile::tempdir().unwrap();
    let e = fetch(&opts(&hub, cache.path(), "org/model"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("HF_TOKEN"), "{e}");
    let mut o = opts(&hub, cache.path(), "org/model");
    o.token = Some("s3cret".into());
    fetch(&o).unwrap();
}
