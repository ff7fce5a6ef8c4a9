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
/// Prefix of the hidden folder a bundle is staged in; such a folder is never a bundle.
pub const TMP_PREFIX: &str = ".q3vl-tmp-";
/// Prefix of the hidden folder an old bundle is moved to while `--force` replaces it.
pub const OLD_PREFIX: &str = ".q3vl-old-";
/// Suffix of the per-block scales of a quantized weight.
pub const SCALES_SUFFIX: &str = ".scales";

/// The scales tensor of quantized weight `weight` (`NAME` → `NAME.scales`).
pub fn scales_name(weight: &str) -> String {
    format!("{weight}{SCALES_SUFFIX}")
}

/// The bundle's short model name: the last path part of an HF id (or of a source
/// folder), lower-cased, with `.` and `-` turned into `_`
/// (`Qwen/Qwen3-VL-8B-Instruct` → `qwen3_vl_8b_instruct`).
pub fn short_name(id_or_folder: &str) -> String {
    let last = id_or_folder
        .trim_end_matches(['/', '\\'])
        .rsplit(['/', '\\'])
        .next()
        .unwrap_or(id_or_folder);
    last.to_lowercase().replace(['.', '-'], "_")
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

/// The staging folder name of bundle `name`.
pub fn tmp_dir(name: &str) -> String {
    format!("{TMP_PREFIX}{name}")
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
        assert_eq!(
            language_dir("qwen3_vl_8b_instruct", "int8hu"),
            "qwen3_vl_8b_instruct_decode_int8hu"
        );
        assert_eq!(vision_dir("x"), "x_vision");
        assert_eq!(shard_file(0, 3), "model-00001-of-00003.safetensors");
    }
}
