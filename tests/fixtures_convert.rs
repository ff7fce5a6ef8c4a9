//! The committed fixtures (fixtures/{shapes,tied,odd}, HF layout, bf16) convert in every
//! mode, twice to the same bytes, into bundles that open and pass their checksums.

mod common;

use common::*;
use q3vl_bundle::{Bundles, Mode};
use std::path::Path;

#[test]
fn fixtures_convert_reproducibly_in_every_mode() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    let mut converted = 0;
    for name in ["shapes", "tied", "odd"] {
        let src = root.join(name);
        assert!(
            src.join("model.safetensors").is_file(),
            "fixtures/{name} is committed"
        );
        let cfg = q3vl_model::Qwen3VlConfig::from_dir(&src).unwrap();
        for mode in Mode::ALL {
            let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
            let mut extra = vec!["--mode", mode.as_str()];
            // Shapes whose in-features are not multiples of 32 must fail without the
            // fallback, naming the option.
            if q3vl_convert::plan::plan(&cfg, mode, false, true).is_err() {
                let o = run(&[
                    "convert",
                    "--src",
                    s(&src),
                    "--out",
                    s(a.path()),
                    "--mode",
                    mode.as_str(),
                ]);
                fails(&o, &["not a multiple of 32", "--fallback-f16"]);
                no_bundle_left(a.path());
                extra.push("--fallback-f16");
            }
            for out in [a.path(), b.path()] {
                let mut args = vec!["convert", "--src", s(&src), "--out", s(out)];
                args.extend_from_slice(&extra);
                ok(&args);
            }
            assert_eq!(
                tree(a.path()),
                tree(b.path()),
                "fixtures/{name} {mode}: runs differ"
            );
            let pair = Bundles::open(a.path()).unwrap();
            pair.language.verify_checksums().unwrap();
            pair.vision.verify_checksums().unwrap();
            assert_eq!(pair.language.config(), &cfg);
            assert_eq!(pair.language.metadata().mode, Some(mode));
            converted += 1;
        }
    }
    println!("{converted} fixture conversions checked");
}
