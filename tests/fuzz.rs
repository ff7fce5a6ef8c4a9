//! Mutation fuzzing of every reader of outside bytes (issue 18, §5): each reader gets
//! its own test that feeds it mutated copies of valid files (the fixtures, and a pair
//! converted from `fixtures/shapes`) and holds it to the project's rules: no panic, no
//! allocation a small input cannot justify, and every refusal one line naming the
//! file, tensor or option at fault. Some readers also keep a promise checked here
//! (no path outside the folder, no overlapping tensors, a stamp that notices changes).
//!
//! `cargo test --test fuzz -- --nocapture` prints the cases per reader. The count is
//! `Q3VL_FUZZ_CASES` per cheap reader (default [`harness::DEFAULT_CASES`]); a reader
//! whose case is costlier runs a stated fraction. `make fuzz` runs 100 times more.
//! A finding prints its seed; `Q3VL_FUZZ_REPLAY=reader:seed` reruns that case alone
//! and keeps its files. RELIABILITY.md records the runs and the findings.

#[path = "fuzz/bundle_readers.rs"]
mod bundle_readers;
#[path = "fuzz/engine_reader.rs"]
mod engine_reader;
#[path = "fuzz/harness.rs"]
mod harness;
#[path = "fuzz/model_readers.rs"]
mod model_readers;
#[path = "fuzz/mutate.rs"]
mod mutate;
#[path = "fuzz/regressions.rs"]
mod regressions;
#[path = "fuzz/seeds.rs"]
mod seeds;
#[path = "fuzz/verify_readers.rs"]
mod verify_readers;

use harness::fuzz;

#[global_allocator]
static ALLOCATOR: harness::CappedAllocator = harness::CappedAllocator;

#[test]
fn fuzz_config_json() {
    fuzz(
        "config_json",
        1,
        &["config.json"],
        model_readers::config_json,
    );
}

#[test]
fn fuzz_preprocessor_config_json() {
    fuzz(
        "preprocessor_config",
        1,
        &["preprocessor_config.json"],
        model_readers::preprocessor_config,
    );
}

#[test]
fn fuzz_generation_config_json() {
    fuzz(
        "generation_config",
        1,
        &["generation_config.json"],
        model_readers::generation_config,
    );
}

#[test]
fn fuzz_safetensors_checkpoint() {
    fuzz(
        "checkpoint",
        2,
        &["model.safetensors", "tensor "],
        model_readers::checkpoint,
    );
}

#[test]
fn fuzz_sharded_checkpoint() {
    // A shard the index names is named by its path in the folder (q3vl-fuzz-*/NAME).
    let names = [
        "model.safetensors.index.json",
        "-of-00002.safetensors",
        "tensor ",
        "q3vl-fuzz-",
    ];
    fuzz(
        "sharded_checkpoint",
        2,
        &names,
        model_readers::sharded_checkpoint,
    );
}

#[test]
fn fuzz_image() {
    fuzz("image", 1, &["image"], model_readers::image);
}

#[test]
fn fuzz_tokenizer_and_chat_template() {
    fuzz(
        "prompt",
        2,
        &["tokenizer", "chat template", "chat_template"],
        model_readers::prompt,
    );
}

#[test]
fn fuzz_metadata_json() {
    fuzz(
        "metadata_json",
        1,
        &["metadata.json"],
        bundle_readers::metadata_json,
    );
}

#[test]
fn fuzz_bundle_pair() {
    let names = [
        "metadata.json",
        "config.json",
        ".safetensors",
        "tensor ",
        bundle_readers::OUT,
    ];
    fuzz("bundle_pair", 4, &names, bundle_readers::bundle_pair);
}

#[test]
fn fuzz_stamp() {
    // A comparison names the stamped file it found changed, added or removed:
    // "NAME changed since it was verified".
    let names = [
        "verification.json",
        "metadata.json",
        "config.json",
        ".safetensors",
        "tokenizer",
        " since it was verified",
    ];
    fuzz("stamp", 4, &names, bundle_readers::stamp);
}

#[test]
fn fuzz_oracle_trace() {
    fuzz("trace", 2, &["trace "], verify_readers::trace);
}

#[test]
fn fuzz_gguf() {
    fuzz("gguf", 2, &[".gguf"], verify_readers::gguf);
}

#[test]
fn fuzz_gates_json() {
    fuzz("gates", 1, &["gates file"], verify_readers::gates);
}

#[test]
fn fuzz_convert() {
    let names = [".json", ".safetensors", ".jinja", "tensor "];
    fuzz("convert", 20, &names, verify_readers::convert);
}

#[test]
fn fuzz_engine_on_a_damaged_pair() {
    let names = [".json", ".safetensors", "tensor ", bundle_readers::OUT];
    fuzz("engine", 20, &names, engine_reader::engine);
}
