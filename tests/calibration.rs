//! The calibrated bundle gates (issue 19): every correct bundle of a random
//! full-vocabulary model passes every gate, whatever the seed, and bundles damaged on
//! purpose (then resealed, so the checksums still hold) fail the gate meant for them.
//!
//! Random models are made at test time (`q3vl_convert::synth`) and traced by q3vl's
//! own fp32 reference (`common::self_trace`): CI has no Python. The seeds come from
//! `Q3VL_CALIBRATION_SEEDS` (comma-separated) or from the clock, and are printed so a
//! failure can be replayed.

mod common;

use common::{copy_dir, damage, ok, run, s, scratch, self_trace};
use q3vl_bundle::ShardPolicy;
use q3vl_convert::synth::{synth, tiny_config, SynthOptions};
use q3vl_convert::{Cancel, Quiet};
use q3vl_model::{layout, PreprocessorConfig};
use q3vl_verify::OracleTrace;
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The conversion modes every seed is converted to.
const MODES: [&str; 3] = ["int8hu", "int8lin", "fp16"];

/// How many seeds a run draws when `Q3VL_CALIBRATION_SEEDS` is not set.
const FRESH_SEEDS: usize = 3;

/// The seed of the random model the damage tests share (fixed: a damage test is a
/// statement about one bundle, not a sample).
const DAMAGE_SEED: u64 = 5;

/// A path inside the repository.
fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// A checkpoint with its traces (an image prompt and a text prompt).
struct Traced {
    ckpt: PathBuf,
    traces: Vec<PathBuf>,
}

/// The seeds of this run: `Q3VL_CALIBRATION_SEEDS`, else derived from the clock.
fn seeds() -> Vec<u64> {
    if let Ok(v) = std::env::var("Q3VL_CALIBRATION_SEEDS") {
        return v
            .split(',')
            .map(|x| {
                x.trim()
                    .parse()
                    .expect("Q3VL_CALIBRATION_SEEDS: u64,u64,...")
            })
            .collect();
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    // Consecutive seeds: both parities, so both tied and untied heads, every run.
    let base = nanos % 1_000_000_000;
    (base..base + FRESH_SEEDS as u64).collect()
}

/// Synth's random values give nearly flat logits; every other pair of seeds scales the
/// final norm so the logits spread like a trained model's (most positions firm).
fn logit_scale(seed: u64) -> f32 {
    match (seed / 2) % 2 {
        0 => 1.0,
        _ => 20.0,
    }
}

/// A random tiny model with the real vocabulary (151 936), tied when `seed` is odd,
/// written under `dir` and traced by the fp32 reference.
fn random_model(dir: &Path, seed: u64) -> Traced {
    let mut config = tiny_config();
    config.tie_word_embeddings = seed % 2 == 1;
    let ckpt = dir.join(format!("rand{seed}"));
    let opts = SynthOptions {
        out: ckpt.clone(),
        config,
        seed,
        tokenizer_dir: None,
        force: true,
        shard: ShardPolicy::default(),
        // A small floor, so the 128×64 test image keeps its size (32 patches, 8 image
        // tokens): the image trace stays fast and `image.pixels` is gated.
        preprocessor: PreprocessorConfig {
            min_pixels: 4096,
            ..PreprocessorConfig::default()
        },
        logit_scale: logit_scale(seed),
    };
    synth(&opts, &Quiet, &Cancel::new()).unwrap();
    let t = dir.join("traces");
    let image = repo("fixtures/odd/traces/image.png");
    let requests = [
        (
            "image",
            self_trace::TraceRequest {
                prompt: "What is in the image?",
                image: Some(&image),
                full_logits: false,
            },
        ),
        // The text trace keeps the full logits: the random model's nearly flat logits
        // put almost all probability in the top-k's tail, where only they give the exact
        // KL; the image trace has the top-k and log-sum-exp alone.
        (
            "text",
            self_trace::TraceRequest {
                prompt: "Which colour comes after blue?",
                image: None,
                full_logits: true,
            },
        ),
    ];
    let traces = requests
        .iter()
        .map(|(name, req)| self_trace::write(&ckpt, &t.join(format!("{name}.safetensors")), req))
        .collect();
    Traced { ckpt, traces }
}

fn convert(ckpt: &Path, out: &Path, mode: &str) {
    ok(&["convert", "--src", s(ckpt), "--out", s(out), "--mode", mode]);
}

/// What one `q3vl verify --json` run said.
struct Verdict {
    code: Option<i32>,
    report: Value,
}

impl Verdict {
    /// Every gate of every trace: (trace file name, gate).
    fn gates(&self) -> Vec<(String, &Value)> {
        let mut out = Vec::new();
        for t in self.report["traces"].as_array().unwrap() {
            let name = Path::new(t["trace"].as_str().unwrap())
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned();
            let profile = t["profile"].as_str().unwrap_or("");
            for g in t["gates"].as_array().unwrap() {
                out.push((format!("{profile} {name}"), g));
            }
        }
        out
    }

    /// The names of the gates that failed on any trace.
    fn failed(&self) -> BTreeSet<String> {
        self.gates()
            .into_iter()
            .filter(|(_, g)| g["passed"] != true)
            .map(|(_, g)| g["name"].as_str().unwrap().to_string())
            .collect()
    }

    /// One line per gate: where, name, pass/FAIL/skip (the report's own verdict), value,
    /// threshold, detail.
    fn table(&self) -> String {
        self.gates()
            .into_iter()
            .map(|(t, g)| {
                let verdict = g["verdict"].as_str().unwrap_or("?");
                format!(
                    "  {t:<28} {:<18} {verdict} {} ({}; {})\n",
                    g["name"].as_str().unwrap_or(""),
                    g["value"].as_str().unwrap_or(""),
                    g["threshold"].as_str().unwrap_or(""),
                    g["detail"].as_str().unwrap_or("")
                )
            })
            .collect()
    }

    /// The gated ladder rows of every trace, `name cos/update cos`, one line a trace:
    /// what a failure message needs to show how far a stage moved.
    fn rows(&self) -> String {
        let mut out = String::new();
        for t in self.report["traces"].as_array().unwrap() {
            let cells: Vec<String> = t["rows"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|r| r["gated"] == true)
                .map(|r| {
                    let cos = r["cos"].as_f64().unwrap_or(f64::NAN);
                    match r["update_cos"].as_f64() {
                        Some(u) => format!("{} {cos:.7}/{u:.7}", r["name"].as_str().unwrap()),
                        None => format!("{} {cos:.7}", r["name"].as_str().unwrap()),
                    }
                })
                .collect();
            out += &format!("  rows: {}\n", cells.join(", "));
        }
        out
    }

    /// Where the damage was found: every failing `text.local` layer (`text.local.{i}`)
    /// and every failing vision ladder row (by its name), over all traces. Text ladder
    /// rows are left out: an error there carries into every later layer.
    fn located(&self) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for t in self.report["traces"].as_array().unwrap() {
            for r in t["local"].as_array().into_iter().flatten() {
                if r["passed"] != true {
                    out.insert(format!("text.local.{}", r["layer"]));
                }
            }
            for r in t["rows"].as_array().unwrap() {
                if r["stage"] == "vision" && r["passed"] != true {
                    out.insert(r["name"].as_str().unwrap().to_string());
                }
            }
        }
        out
    }
}

/// `q3vl verify WHAT --trace ... --json`, with the report under `rep`.
fn verify(what: &[&str], traces: &[PathBuf], rep: &Path) -> Verdict {
    let mut args: Vec<&str> = vec!["verify"];
    args.extend_from_slice(what);
    for t in traces {
        args.extend(["--trace", s(t)]);
    }
    args.extend(["--report", s(rep), "--json"]);
    let o = run(&args);
    let stdout = String::from_utf8_lossy(&o.stdout);
    let report = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "q3vl {args:?} (exit {:?}) printed no report ({e}):\n{}",
            o.status.code(),
            String::from_utf8_lossy(&o.stderr)
        )
    });
    Verdict {
        code: o.status.code(),
        report,
    }
}

#[test]
fn fresh_seeds_pass_every_gate() {
    let seeds = seeds();
    let list: Vec<String> = seeds.iter().map(u64::to_string).collect();
    eprintln!(
        "calibration seeds {} (replay: Q3VL_CALIBRATION_SEEDS={})",
        list.join(" "),
        list.join(",")
    );
    let mut failures = Vec::new();
    for &seed in &seeds {
        let dir = scratch(&format!("fresh-{seed}"));
        let m = random_model(&dir, seed);
        let mut check = |what: String, v: Verdict| {
            eprintln!(
                "seed {seed} {what}: exit {:?}\n{}{}",
                v.code,
                v.table(),
                v.rows()
            );
            if v.code != Some(0) || !v.failed().is_empty() {
                failures.push(format!("seed {seed} {what}: failed {:?}", v.failed()));
            }
        };
        let v = verify(&["--src", s(&m.ckpt)], &m.traces, &dir.join("rep-fp32"));
        check("fp32 ladder".into(), v);
        for mode in MODES {
            let out = dir.join(mode);
            convert(&m.ckpt, &out, mode);
            let v = verify(
                &["--bundle", s(&out)],
                &m.traces,
                &dir.join(format!("rep-{mode}")),
            );
            check(format!("--bundle {mode}"), v);
            // Nothing large is left behind: each bundle is 30 to 40 MB.
            std::fs::remove_dir_all(&out).unwrap();
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
    assert!(
        failures.is_empty(),
        "seeds {} (Q3VL_CALIBRATION_SEEDS={}):\n{}",
        list.join(" "),
        list.join(","),
        failures.join("\n")
    );
}

/// A damage target: a converted int8hu output folder and the traces to verify it with.
struct Target {
    what: &'static str,
    out: PathBuf,
    traces: Vec<PathBuf>,
}

/// The trained toy fixture `shapes`, converted once (int8hu), with its HF traces.
fn shapes() -> Target {
    let t = repo("fixtures/shapes/traces");
    Target {
        what: "shapes",
        out: common::converted_fixture("shapes"),
        traces: vec![t.join("image.safetensors"), t.join("text.safetensors")],
    }
}

/// A random full-vocabulary model (seed [`DAMAGE_SEED`]), traced and converted once
/// (int8hu) per test binary.
fn random() -> Target {
    static MADE: OnceLock<(PathBuf, Vec<PathBuf>)> = OnceLock::new();
    let (out, traces) = MADE.get_or_init(|| {
        let dir = scratch("damage-random");
        let m = random_model(&dir, DAMAGE_SEED);
        let out = dir.join("int8hu");
        convert(&m.ckpt, &out, "int8hu");
        std::fs::remove_dir_all(&m.ckpt).unwrap();
        (out, m.traces)
    });
    Target {
        what: "random",
        out: out.clone(),
        traces: traces.clone(),
    }
}

/// What a damage must trip on one target.
struct Expect {
    /// The target.
    target: Target,
    /// Gates that must fail (on some trace; others may fail too).
    gates: &'static [&'static str],
    /// Exactly where it must be found ([`Verdict::located`]).
    at: &'static [&'static str],
}

/// Copies the target's bundles, damages the copy with `harm` and verifies it: None
/// when the run failed (exit 1) as `e` expects, else what went wrong.
fn caught(case: &str, harm: &dyn Fn(&Path), e: &Expect) -> Option<String> {
    let t = &e.target;
    let dir = scratch(&format!("{case}-{}", t.what));
    let out = dir.join("out");
    copy_dir(&t.out, &out);
    harm(&out);
    let v = verify(&["--bundle", s(&out)], &t.traces, &dir.join("rep"));
    let (failed, at) = (v.failed(), v.located());
    eprintln!(
        "{case} on {}: exit {:?}, failed {failed:?} at {at:?}\n{}{}",
        t.what,
        v.code,
        v.table(),
        v.rows()
    );
    std::fs::remove_dir_all(&dir).unwrap();
    let missed: Vec<&str> = e
        .gates
        .iter()
        .copied()
        .filter(|g| !failed.contains(*g))
        .collect();
    let want: BTreeSet<String> = e.at.iter().map(|x| x.to_string()).collect();
    (v.code != Some(1) || !missed.is_empty() || at != want).then(|| {
        format!(
            "{case} on {}: exit {:?}; {missed:?} passed (failed: {failed:?}); found at {at:?}, expected {want:?}",
            t.what, v.code
        )
    })
}

/// Asserts that `harm` is caught as expected on every target (all are tried before
/// anything is asserted, so one failure shows them all).
fn assert_caught(case: &str, harm: &dyn Fn(&Path), expect: &[Expect]) {
    let misses: Vec<String> = expect
        .iter()
        .filter_map(|e| caught(case, harm, e))
        .collect();
    assert!(misses.is_empty(), "{}", misses.join("\n"));
}

/// The control of every damage test: the undamaged bundles pass every gate.
#[test]
fn undamaged_targets_pass_every_gate() {
    for t in [shapes(), random()] {
        let rep = scratch(&format!("undamaged-{}", t.what));
        let v = verify(&["--bundle", s(&t.out)], &t.traces, &rep);
        eprintln!(
            "undamaged {}: exit {:?}\n{}{}",
            t.what,
            v.code,
            v.table(),
            v.rows()
        );
        assert_eq!(v.code, Some(0), "{}: failed {:?}", t.what, v.failed());
    }
}

/// Layer 1 exists in both targets (shapes has 4 decoder layers, tiny 2).
const LAYER: usize = 1;

/// Where a damage to layer [`LAYER`] must be found.
const AT_LAYER: &[&str] = &["text.local.1"];

fn layer_weight(leaf: &str) -> String {
    layout::text_layer(LAYER, leaf)
}

/// The same expectation on both targets.
fn on_both(gates: &'static [&'static str], at: &'static [&'static str]) -> [Expect; 2] {
    [shapes(), random()].map(|target| Expect { target, gates, at })
}

/// (a) Every linear of layer 1 with its scales × 1.5: that layer's own gate, and the
/// accumulated ladder.
#[test]
fn one_layer_with_scales_times_1_5_fails_text_local_and_the_ladder() {
    let harm = |out: &Path| damage::scale_layer(out, LAYER, 1.5);
    assert_caught(
        "layer-x1.5",
        &harm,
        &on_both(&["text.local", "text.ladder"], AT_LAYER),
    );
}

/// (a) The same at × 1.05: about 2.5 times what `text.local` allows.
#[test]
fn one_layer_with_scales_times_1_05_fails_text_local() {
    let harm = |out: &Path| damage::scale_layer(out, LAYER, 1.05);
    assert_caught("layer-x1.05", &harm, &on_both(&["text.local"], AT_LAYER));
}

/// (b) Two output rows of layer 1's `down_proj` exchanged (values and scales).
#[test]
fn two_swapped_rows_fail_text_local() {
    let w = layer_weight("mlp.down_proj.weight");
    let harm = |out: &Path| damage::swap_rows(out, &w, 3, 17);
    assert_caught("swapped-rows", &harm, &on_both(&["text.local"], AT_LAYER));
}

/// (c) The largest-scale block of layer 1's `o_proj` zeroed. (A block of the wide MLP
/// projections of these tiny models can move a layer less than int8 rounding does: no
/// gate could separate that from a correct bundle; in `o_proj` it is a larger share.)
#[test]
fn one_zeroed_block_fails_text_local() {
    let w = layer_weight("self_attn.o_proj.weight");
    let harm = |out: &Path| {
        let (row, block) = damage::largest_block(out, &w);
        damage::zero_block(out, &w, row, block);
    };
    assert_caught("zeroed-block", &harm, &on_both(&["text.local"], AT_LAYER));
}

/// (d) The LM head's scales × 1.02: every logit × 1.02, every layer untouched.
#[test]
fn head_scales_times_1_02_fail_head_local() {
    let harm = |out: &Path| damage::scale_head(out, 1.02);
    assert_caught("head-x1.02", &harm, &on_both(&["head.local"], &[]));
}

/// (f) The final norm × 1.02: every logit × 1.02 like (d), but before the head, where
/// the head's own check on the oracle's normed state cannot see it.
#[test]
fn final_norm_times_1_02_fails_norm_local() {
    let harm = |out: &Path| damage::scale_final_norm(out, 1.02);
    assert_caught("norm-x1.02", &harm, &on_both(&["norm.local"], &[]));
}

/// (e) DeepStack mergers 0 and 1 exchanged in the vision bundle: found at those two.
#[test]
fn swapped_deepstack_mergers_fail_the_vision_ladder() {
    let harm = |out: &Path| damage::swap_deepstack(out, 0, 1);
    let at = &["vision.deepstack.0", "vision.deepstack.1"];
    assert_caught("swapped-deepstack", &harm, &on_both(&["vision.ladder"], at));
}

/// The premise of the self traces: on a full-vocabulary random checkpoint that the HF
/// oracle traced (`fixtures/fullvocab/tied`), q3vl's reference writes the same trace
/// (every tap and top-k value to fp32 rounding, the log-sum-exp to 1e-6, the same ids
/// and metadata but for provenance).
#[test]
fn self_traces_match_the_hf_oracle_traces() {
    let fx = repo("fixtures/fullvocab/tied");
    let dir = scratch("self-vs-hf");
    let ck = dir.join("fv-tied");
    let file = |n: &str| fx.join(n);
    let seed = std::fs::read_to_string(file("SEED")).unwrap();
    let scale = std::fs::read_to_string(file("LOGIT_SCALE")).unwrap();
    ok(&[
        "synth",
        "--config",
        s(&file("synth.json")),
        "--preprocessor",
        s(&file("preprocessor.json")),
        "--seed",
        seed.trim(),
        "--logit-scale",
        scale.trim(),
        "--out",
        s(&ck),
    ]);
    for name in ["image", "dynamic", "text"] {
        let hf = OracleTrace::open(&fx.join(format!("traces/{name}.safetensors"))).unwrap();
        let image = hf.image_paths().into_iter().next();
        let req = self_trace::TraceRequest {
            prompt: hf.meta("prompt"),
            image: image.as_deref(),
            full_logits: false,
        };
        let path = self_trace::write(&ck, &dir.join(format!("t/{name}.safetensors")), &req);
        let ours = OracleTrace::open(&path).unwrap();
        same_trace(name, &ours, &hf);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Asserts two traces of one checkpoint and prompt agree (see the test above).
fn same_trace(name: &str, ours: &OracleTrace, hf: &OracleTrace) {
    let provenance = ["model", "oracle", "revision", "torch", "transformers"];
    assert_eq!(
        ours.meta.keys().collect::<Vec<_>>(),
        hf.meta.keys().collect::<Vec<_>>()
    );
    for (k, v) in &ours.meta {
        assert!(
            provenance.contains(&k.as_str()) || *v == hf.meta[k],
            "{name}: {k}"
        );
    }
    let floats: Vec<&str> = ours.float_names().collect();
    assert_eq!(floats, hf.float_names().collect::<Vec<_>>(), "{name}");
    for t in floats {
        let flat = |tr: &OracleTrace| tr.float(t).unwrap().flatten_all().unwrap();
        let d = (flat(ours) - flat(hf))
            .unwrap()
            .abs()
            .unwrap()
            .max(0)
            .unwrap();
        let d = d.to_scalar::<f32>().unwrap();
        assert!(d <= 1e-4, "{name} {t}: max |ours − HF| {d:e}");
    }
    for t in ["input_ids", "position_ids"] {
        assert_eq!(ours.int(t).unwrap(), hf.int(t).unwrap(), "{name} {t}");
    }
    for g in ["logits", "decode"] {
        let (a, b) = (ours.lse(g).unwrap().unwrap(), hf.lse(g).unwrap().unwrap());
        let d = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max);
        // fp32 logits of magnitude ~10 differ in reduction order by ~1e-6.
        assert!(d <= 1e-5, "{name} {g}.lse: max |ours − HF| {d:e}");
        // Top-k ids may swap only at near-ties.
        let (ia, _) = ours.top_k(g).unwrap();
        let (ib, _) = hf.top_k(g).unwrap();
        let n = ia.iter().flatten().count();
        let same = ia
            .iter()
            .flatten()
            .zip(ib.iter().flatten())
            .filter(|(x, y)| x == y)
            .count();
        assert!(same * 100 >= n * 99, "{name} {g}.top_ids: {same}/{n} equal");
    }
    // Greedy decode: equal up to the first near-tie of the oracle's choice.
    let (_, vals) = hf.top_k("decode").unwrap();
    let firm = vals.iter().take_while(|r| r[0] - r[1] >= 1e-4).count();
    let (a, b) = (ours.decode_tokens().unwrap(), hf.decode_tokens().unwrap());
    assert_eq!(a[..firm], b[..firm], "{name} decode.tokens");
}
