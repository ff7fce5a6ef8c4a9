//! The valid files every mutation starts from: the committed fixtures, a sharded
//! split of one of them, JPEG copies of the PNG fixtures, and a language + vision pair
//! converted from `fixtures/shapes` once per run (held in memory, its folder deleted).

use safetensors::SafeTensors;
use serde_json::json;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The fixture checkpoints.
pub const MODELS: [&str; 3] = ["shapes", "tied", "odd"];

/// `fixtures/` of this repository.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// The bytes of `fixtures/REL`.
pub fn fixture(rel: &str) -> Vec<u8> {
    let p = fixtures().join(rel);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Writes `bytes` to `dir/rel`, creating folders.
pub fn put(dir: &Path, rel: &str, bytes: &[u8]) {
    let p = dir.join(rel);
    if let Some(parent) = p.parent() {
        std::fs::create_dir_all(parent).expect("a scratch folder");
    }
    std::fs::write(&p, bytes).expect("a scratch file");
}

/// The oracle traces, small ones first (the last, 6.7 MB, is drawn less often); the
/// fullvocab ones are version 2 (F64 log-sum-exp rows).
pub const TRACES: [&str; 8] = [
    "fullvocab/untied/traces/text.safetensors",
    "fullvocab/tied/traces/image.safetensors",
    "odd/traces/text.safetensors",
    "shapes/traces/text.safetensors",
    "tied/traces/text.safetensors",
    "odd/traces/image.safetensors",
    "tied/traces/image.safetensors",
    "shapes/traces/image.safetensors",
];

/// The PNG fixtures.
pub const PNGS: [&str; 4] = [
    "shapes/images/demo_0.png",
    "shapes/images/demo_4.png",
    "tied/traces/image.png",
    "odd/traces/image.png",
];

/// JPEG copies of the PNG fixtures (baseline, quality 85), made once.
pub fn jpegs() -> &'static [Vec<u8>] {
    static JPEGS: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    JPEGS.get_or_init(|| {
        PNGS.iter()
            .map(|p| {
                let img = image::load_from_memory(&fixture(p)).expect("a fixture PNG decodes");
                let mut out = Vec::new();
                image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 85)
                    .encode_image(&img.to_rgb8())
                    .expect("a JPEG encodes");
                out
            })
            .collect()
    })
}

/// `fixtures/tied`'s weights split into two shards with their
/// `model.safetensors.index.json` (file name → bytes), made once.
pub fn sharded() -> &'static BTreeMap<String, Vec<u8>> {
    static SHARDED: OnceLock<BTreeMap<String, Vec<u8>>> = OnceLock::new();
    SHARDED.get_or_init(|| {
        let whole = fixture("tied/model.safetensors");
        let st = SafeTensors::deserialize(&whole).expect("the fixture parses");
        let mut names: Vec<String> = st.names().into_iter().map(str::to_owned).collect();
        names.sort();
        let shard = |i: usize| format!("model-0000{}-of-00002.safetensors", i + 1);
        let mut out = BTreeMap::new();
        let mut map = serde_json::Map::new();
        for i in 0..2 {
            let mine: Vec<(String, _)> = names
                .iter()
                .enumerate()
                .filter(|(k, _)| k % 2 == i)
                .map(|(_, n)| (n.clone(), st.tensor(n).expect("listed")))
                .collect();
            for (n, _) in &mine {
                map.insert(n.clone(), json!(shard(i)));
            }
            out.insert(
                shard(i),
                safetensors::serialize(mine, None).expect("a shard serializes"),
            );
        }
        let index = json!({"metadata": {"total_size": whole.len()}, "weight_map": map});
        out.insert(
            "model.safetensors.index.json".into(),
            serde_json::to_vec_pretty(&index).expect("serializes"),
        );
        out
    })
}

/// A converted language + vision pair: folder names and every file, relative to the
/// output folder.
pub struct Pair {
    /// The language bundle's folder name.
    pub language: String,
    /// The vision bundle's folder name.
    pub vision: String,
    /// Relative path → bytes.
    pub files: BTreeMap<String, Vec<u8>>,
}

impl Pair {
    /// Writes the pair into `out`.
    pub fn write(&self, out: &Path) {
        for (rel, bytes) in &self.files {
            put(out, rel, bytes);
        }
    }

    /// The relative paths of one bundle's files.
    pub fn files_of(&self, bundle: &str) -> Vec<String> {
        let prefix = format!("{bundle}/");
        self.files
            .keys()
            .filter(|k| k.starts_with(&prefix))
            .cloned()
            .collect()
    }
}

/// `fixtures/shapes` converted (int8hu) by the library's converter, once per run.
pub fn pair() -> &'static Pair {
    static PAIR: OnceLock<Pair> = OnceLock::new();
    PAIR.get_or_init(|| {
        let tmp = tempfile::tempdir().expect("a temp dir");
        let out = tmp.path().join("out");
        let mut o = q3vl_convert::ConvertOptions::new(fixtures().join("shapes"), &out);
        o.threads = Some(1);
        let s = q3vl_convert::convert(&o, &q3vl_convert::Quiet, &q3vl_convert::Cancel::new())
            .expect("fixtures/shapes converts");
        let name = |p: &Path| {
            p.file_name()
                .expect("a folder")
                .to_string_lossy()
                .into_owned()
        };
        let mut files = BTreeMap::new();
        read_tree(&out, "", &mut files);
        Pair {
            language: name(&s.language.path),
            vision: name(&s.vision.path),
            files,
        }
    })
}

fn read_tree(dir: &Path, prefix: &str, out: &mut BTreeMap<String, Vec<u8>>) {
    for e in std::fs::read_dir(dir).expect("a readable folder") {
        let e = e.expect("an entry");
        let rel = format!("{prefix}{}", e.file_name().to_string_lossy());
        if e.file_type().expect("a type").is_dir() {
            read_tree(&e.path(), &format!("{rel}/"), out);
        } else {
            out.insert(rel, std::fs::read(e.path()).expect("a readable file"));
        }
    }
}

/// The pair of [`pair`] exported to GGUF by `q3vl export gguf`, once per run: (text
/// model, projector) bytes.
pub fn gguf_pair() -> &'static (Vec<u8>, Vec<u8>) {
    static GGUF: OnceLock<(Vec<u8>, Vec<u8>)> = OnceLock::new();
    GGUF.get_or_init(|| {
        let tmp = tempfile::tempdir().expect("a temp dir");
        let (out, gguf) = (tmp.path().join("out"), tmp.path().join("gguf"));
        pair().write(&out);
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_q3vl"))
            .args(["export", "gguf", "--allow-unverified", "--bundle"])
            .arg(&out)
            .arg("--out")
            .arg(&gguf)
            .output()
            .expect("q3vl runs");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let read = |name: &str| std::fs::read(gguf.join(name)).expect("exported");
        (read("shapes-Q8_0.gguf"), read("mmproj-shapes-F16.gguf"))
    })
}
