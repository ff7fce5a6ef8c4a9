//! Names in a bundle: folder names, file names, and the names of the tensors that a
//! quantized weight adds.

/// The metadata file of every bundle.
pub const METADATA_FILE: &str = "metadata.json";
/// The source checkpoint's config, copied verbatim.
pub const CONFIG_FILE: &str = "config.json";
/// The folder of the tokenizer files in a language bundle.
pub const TOKENIZER_DIR: &str = "tokenizer";
/// The image preprocessor settings (vision bundle).
pub const PREPROCESSOR_FILE: &str = "preprocessor_config.json";
/// The weights of an unsharded bundle.
pub const SINGLE_WEIGHTS_FILE: &str = "model.safetensors";
/// The index of a sharded bundle.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// Prefix of a run's hidden staging folder (see [`staging_dir`]); such a folder is
/// never a bundle, and one seen by the holder of its claim's lock is stale.
pub const TMP_PREFIX: &str = ".q3vl-tmp-";
/// Prefix of the hidden folder an old item is moved to while a new one replaces it.
pub const OLD_PREFIX: &str = ".q3vl-old-";
/// The lock file of a claim on a whole folder (see [`lock_file`]); never removed.
pub const LOCK_FILE: &str = ".q3vl-lock";
/// Ends the claimed entry's name in the names of an entry claim's staging and old
/// folders. Whole-folder claims never use it in theirs (their items are bundle names,
/// which cannot contain it), and the part after the last one never contains it, so a
/// name always tells which claim it belongs to: leaf `a`'s `.q3vl-tmp-a~…` is never
/// leaf `a-b`'s `.q3vl-tmp-a-b~…`, nor leaf `a~1`'s `.q3vl-tmp-a~1~…`.
pub const ENTRY_END: char = '~';
/// Suffix of the per-block scales of a quantized weight.
pub const SCALES_SUFFIX: &str = ".scales";

/// The scales tensor of quantized weight `weight` (`NAME` → `NAME.scales`).
pub fn scales_name(weight: &str) -> String {
    format!("{weight}{SCALES_SUFFIX}")
}

/// The bundle's short model name: the last path part of an HF id (or of a source
/// folder), lower-cased, every character other than an ASCII letter or digit turned
/// into `_` (`Qwen/Qwen3-VL-8B-Instruct` → `qwen3_vl_8b_instruct`).
///
/// Bundle folder names are therefore always `[a-z0-9_]`: a source folder named with
/// control characters, spaces or non-ASCII letters never puts them into a file name
/// (`My Model\n` → `my_model_`).
pub fn short_name(id_or_folder: &str) -> String {
    let last = id_or_folder
        .trim_end_matches(['/', '\\'])
        .rsplit(['/', '\\'])
        .next()
        .unwrap_or(id_or_folder);
    let short: String = last
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    if short.is_empty() {
        "model".into()
    } else {
        short
    }
}

/// Folder name of the language bundle: `<short>_decode_<mode>`.
pub fn language_dir(short: &str, mode: &str) -> String {
    format!("{short}_decode_{mode}")
}

/// Folder name of the vision bundle: `<short>_vision`.
pub fn vision_dir(short: &str) -> String {
    format!("{short}_vision")
}

/// The file name of shard `i` (0-based) of `n`, as Hugging Face names them.
pub fn shard_file(i: usize, n: usize) -> String {
    format!("model-{:05}-of-{:05}.safetensors", i + 1, n)
}

/// What a claim covers in its folder: the whole folder (`convert --out`), or one entry
/// of it (`synth --out PARENT/LEAF` claims `LEAF` in `PARENT`), so that claims on
/// different entries of one folder never exclude or clean up after each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope<'a> {
    /// The whole folder.
    Folder,
    /// One entry (a plain name, without `/`) of the folder.
    Entry(&'a str),
}

/// The lock file of a claim: `.q3vl-lock` for the whole folder, `.q3vl-lock-LEAF` for
/// its entry `LEAF`.
pub fn lock_file(scope: Scope) -> String {
    match scope {
        Scope::Folder => LOCK_FILE.into(),
        Scope::Entry(leaf) => format!("{LOCK_FILE}-{leaf}"),
    }
}

/// A run-unique staging folder name for a claim of `scope`: `.q3vl-tmp-ID` for the
/// whole folder, `.q3vl-tmp-LEAF~ID` for entry `LEAF`. ID is the process id (unique
/// among live processes), the clock's nanoseconds (unique across pid reuse) and a
/// per-process count (unique within the process), so no two stagings ever share one.
pub fn staging_dir(scope: Scope) -> String {
    static COUNT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let id = format!("{}-{nanos}-{n}", std::process::id());
    match scope {
        Scope::Folder => format!("{TMP_PREFIX}{id}"),
        Scope::Entry(leaf) => format!("{TMP_PREFIX}{leaf}{ENTRY_END}{id}"),
    }
}

/// Where item `name` is moved aside while a new `name` replaces it: `.q3vl-old-NAME`
/// under a whole-folder claim, `.q3vl-old-LEAF~` under a claim on entry `LEAF`.
pub fn old_dir(scope: Scope, name: &str) -> String {
    match scope {
        Scope::Folder => format!("{OLD_PREFIX}{name}"),
        Scope::Entry(_) => format!("{OLD_PREFIX}{name}{ENTRY_END}"),
    }
}

/// A hidden entry some claim left in a folder, recognised by its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leftover<'a> {
    /// A staging folder of a claim of this scope.
    Staging(Scope<'a>),
    /// Item `name` moved aside by a replace under a claim of this scope.
    Old(Scope<'a>, &'a str),
}

impl<'a> Leftover<'a> {
    /// Reads a folder entry's name; `None` when it is not a staging or old folder.
    pub fn parse(name: &'a str) -> Option<Leftover<'a>> {
        if let Some(rest) = name.strip_prefix(TMP_PREFIX) {
            return Some(Leftover::Staging(match rest.rsplit_once(ENTRY_END) {
                Some((leaf, _)) => Scope::Entry(leaf),
                None => Scope::Folder,
            }));
        }
        let rest = name.strip_prefix(OLD_PREFIX)?;
        Some(match rest.strip_suffix(ENTRY_END) {
            Some(leaf) => Leftover::Old(Scope::Entry(leaf), leaf),
            None => Leftover::Old(Scope::Folder, rest),
        })
    }

    /// The scope of the claim that left it.
    pub fn scope(self) -> Scope<'a> {
        match self {
            Leftover::Staging(s) | Leftover::Old(s, _) => s,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_follow_the_zoo() {
        assert_eq!(
            short_name("Qwen/Qwen3-VL-8B-Instruct"),
            "qwen3_vl_8b_instruct"
        );
        assert_eq!(short_name("/data/ckpt/Qwen3-VL-2B.v2/"), "qwen3_vl_2b_v2");
        assert_eq!(short_name("tiny"), "tiny");
        assert_eq!(short_name("My Model\n\u{1b}[31m"), "my_model___31m");
        assert_eq!(short_name("модель-1"), "_______1");
        assert_eq!(short_name("/"), "model");
        assert_eq!(
            language_dir("qwen3_vl_8b_instruct", "int8hu"),
            "qwen3_vl_8b_instruct_decode_int8hu"
        );
        assert_eq!(vision_dir("x"), "x_vision");
        assert_eq!(shard_file(0, 3), "model-00001-of-00003.safetensors");
        assert_eq!(old_dir(Scope::Folder, "x_vision"), ".q3vl-old-x_vision");
    }

    #[test]
    fn staging_names_differ_between_calls() {
        let (a, b) = (staging_dir(Scope::Folder), staging_dir(Scope::Folder));
        assert!(a.starts_with(TMP_PREFIX), "{a}");
        assert!(a.contains(&std::process::id().to_string()), "{a}");
        assert_ne!(a, b);
    }

    #[test]
    fn every_name_tells_its_claim() {
        let leaves = ["a", "a-b", "a~1-2-3", "a~", "~", "x_vision", "1-2-3"];
        for leaf in leaves {
            let entry = Scope::Entry(leaf);
            let tmp = staging_dir(entry);
            assert_eq!(
                Leftover::parse(&tmp),
                Some(Leftover::Staging(entry)),
                "{tmp}"
            );
            let old = old_dir(entry, leaf);
            assert_eq!(
                Leftover::parse(&old),
                Some(Leftover::Old(entry, leaf)),
                "{old}"
            );
        }
        let tmp = staging_dir(Scope::Folder);
        assert_eq!(Leftover::parse(&tmp).unwrap().scope(), Scope::Folder);
        assert_eq!(
            Leftover::parse(".q3vl-old-x_vision"),
            Some(Leftover::Old(Scope::Folder, "x_vision"))
        );
        // The fixed-name staging folder of older builds belongs to the whole folder.
        assert_eq!(
            Leftover::parse(".q3vl-tmp-b").unwrap().scope(),
            Scope::Folder
        );
        for other in [LOCK_FILE, ".q3vl-lock-a", "a", ".hidden"] {
            assert_eq!(Leftover::parse(other), None, "{other}");
        }
        assert_eq!(lock_file(Scope::Folder), ".q3vl-lock");
        assert_eq!(lock_file(Scope::Entry("a-b")), ".q3vl-lock-a-b");
    }
}
