//! `q3vl fetch` and `q3vl convert --hf-id` through the binary against a mock hub on
//! loopback: the environment variables, the cache layout, provenance in the bundle,
//! tokens, and clear errors.

#[path = "../convert/tests/mockhub/mod.rs"]
mod mockhub;

mod common;

use common::*;
use mockhub::{MockHub, MockRepo};
use std::path::Path;
use std::process::{Command, Output};

const SHA: &str = "feedfacefeedfacefeedfacefeedfacefeedface";
const ID: &str = "Org/Mini-Model.v1";

/// A hub serving the mini checkpoint as `Org/Mini-Model.v1`.
fn hub(tmp: &Path) -> MockHub {
    let src = tmp.join("mini");
    write_checkpoint(&src, &mini_config());
    let hub = MockHub::start();
    hub.add_repo(ID, MockRepo::from_dir(&src, SHA));
    hub
}

/// `q3vl ARGS` with a clean hub environment: only `env` is set.
fn q3vl_env(home: &Path, env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut c: Command = q3vl();
    for k in [
        "HF_ENDPOINT",
        "HF_HOME",
        "HF_HUB_CACHE",
        "HF_TOKEN",
        "XDG_CACHE_HOME",
    ] {
        c.env_remove(k);
    }
    c.env("HOME", home);
    for (k, v) in env {
        c.env(k, v);
    }
    c.args(args).output().unwrap()
}

/// The environment that points q3vl at the hub `url` with its cache in `cache`.
fn hub_env<'a>(url: &'a str, cache: &'a Path) -> [(&'static str, &'a str); 2] {
    [("HF_ENDPOINT", url), ("HF_HUB_CACHE", s(cache))]
}

fn stdout(o: &Output) -> String {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout.clone()).unwrap()
}

#[test]
fn fetch_honours_the_environment_and_convert_records_provenance() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = hub(tmp.path());
    let cache = tmp.path().join("hub-cache");
    let env = hub_env(&hub.url, &cache);
    let out = stdout(&q3vl_env(tmp.path(), &env, &["fetch", "--hf-id", ID]));
    let snap = cache.join("models--Org--Mini-Model.v1/snapshots").join(SHA);
    assert_eq!(out.trim(), s(&snap));
    assert!(snap.join("model.safetensors").exists());

    // HF_HOME puts the cache in HF_HOME/hub; --cache-dir beats both.
    let home = tmp.path().join("hf-home");
    let o = q3vl_env(
        tmp.path(),
        &[("HF_ENDPOINT", &hub.url), ("HF_HOME", s(&home))],
        &["fetch", "--hf-id", ID, "--json"],
    );
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["commit"], SHA);
    assert!(v["snapshot"]
        .as_str()
        .unwrap()
        .starts_with(s(&home.join("hub"))));
    let explicit = tmp.path().join("explicit");
    let o = q3vl_env(
        tmp.path(),
        &env,
        &["fetch", "--hf-id", ID, "--cache-dir", s(&explicit)],
    );
    assert!(stdout(&o).trim().starts_with(s(&explicit)));

    let dest = tmp.path().join("out");
    let o = q3vl_env(
        tmp.path(),
        &env,
        &[
            "convert",
            "--hf-id",
            ID,
            "--revision",
            "main",
            "--out",
            s(&dest),
        ],
    );
    stdout(&o);
    let pair = q3vl_bundle::Bundles::open(&dest).unwrap();
    assert_eq!(
        pair.language.dir(),
        dest.join("mini_model_v1_decode_int8hu")
    );
    let src = &pair.language.metadata().source;
    assert_eq!(src.hf_id.as_deref(), Some(ID));
    assert_eq!(src.revision.as_deref(), Some(SHA));
    assert_eq!(src.folder, SHA);
    let want = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
        std::fs::read(snap.join("model.safetensors")).unwrap(),
    ));
    assert_eq!(src.files["model.safetensors"].sha256, want);
}

#[test]
fn tokens_come_from_hf_token() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = hub(tmp.path());
    hub.require_token("hf_s3cret");
    let cache = tmp.path().join("c");
    let env = hub_env(&hub.url, &cache);
    fails(
        &q3vl_env(tmp.path(), &env, &["fetch", "--hf-id", ID]),
        &[ID, "HF_TOKEN"],
    );
    let mut with = env.to_vec();
    with.push(("HF_TOKEN", "hf_s3cret"));
    stdout(&q3vl_env(tmp.path(), &with, &["fetch", "--hf-id", ID]));
}

#[test]
fn hub_errors_are_one_clear_line() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = hub(tmp.path());
    let cache = tmp.path().join("c");
    let env = hub_env(&hub.url, &cache);
    fails(
        &q3vl_env(tmp.path(), &env, &["fetch", "--hf-id", "Org/Missing"]),
        &["Org/Missing", "not found"],
    );
    fails(
        &q3vl_env(
            tmp.path(),
            &env,
            &["fetch", "--hf-id", ID, "--revision", "nope"],
        ),
        &["revision \"nope\""],
    );
    hub.set_corrupt("model.safetensors", true);
    fails(
        &q3vl_env(
            tmp.path(),
            &env,
            &["convert", "--hf-id", ID, "--out", s(&tmp.path().join("o"))],
        ),
        &["model.safetensors", "sha256", "run again"],
    );
    no_bundle_left(&tmp.path().join("o"));
    // Nothing listens on this port once the mock is gone.
    let url = hub.url.clone();
    drop(hub);
    let line = fails(
        &q3vl_env(
            tmp.path(),
            &hub_env(&url, &cache),
            &["fetch", "--hf-id", "Org/Other"],
        ),
        &["cannot reach"],
    );
    assert!(line.contains(&url), "{line}");
}
