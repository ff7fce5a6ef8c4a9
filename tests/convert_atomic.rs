//! Conversion that cannot half-succeed: the output folder's lock, run-unique staging,
//! leftovers of killed runs, the pair bound by `companion_sha256` and repaired by a
//! plain re-run, `--force` only over q3vl bundles, and SIGTERM / SIGHUP cleaning up
//! like Ctrl-C. Sources are copies of `fixtures/shapes` (8 MB, converted in well under
//! a second).

mod common;

use common::*;
use q3vl_bundle::Bundles;
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};

const LANG: &str = "shapes_decode_int8hu";
const VISION: &str = "shapes_vision";
const LOCKED: &str = "another q3vl conversion is writing into this folder";

/// Two sources named `shapes` (so their bundles share names) with different bytes:
/// `a` is the fixture, `b` the fixture with one more key in `config.json`.
fn sources(d: &Path) -> (PathBuf, PathBuf) {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/shapes");
    let (a, b) = (d.join("a/shapes"), d.join("b/shapes"));
    copy_dir(&fixture, &a);
    copy_dir(&fixture, &b);
    let cfg = b.join("config.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&cfg).unwrap()).unwrap();
    v["_variant"] = "b".into();
    write_json(&cfg, &v);
    (a, b)
}

/// Starts `q3vl convert` that stops after its first tensor while `hold` exists.
fn held(src: &Path, out: &Path, hold: &Path, extra: &[&str]) -> Child {
    held_run(&convert_args(src, out, extra), hold, libc::SIG_DFL)
}

/// Starts `q3vl ARGS` with the hold hook on `hold` and SIGHUP's disposition set to
/// `hup` (SIG_IGN is what `nohup` does; SIG_DFL makes the tests independent of how
/// they were started).
fn held_run(args: &[&str], hold: &Path, hup: libc::sighandler_t) -> Child {
    use std::os::unix::process::CommandExt;
    let mut cmd = q3vl();
    cmd.args(args)
        .env("Q3VL_TEST_HOLD_FILE", hold)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: signal() is async-signal-safe, as pre_exec requires.
    unsafe {
        cmd.pre_exec(move || {
            libc::signal(libc::SIGHUP, hup);
            Ok(())
        });
    }
    cmd.spawn().unwrap()
}

/// Lets a [`held`] run go on (it holds again at the vision bundle's first tensor) and
/// waits for its end.
fn release(hold: &Path, mut child: Child) -> Output {
    while child.try_wait().unwrap().is_none() {
        let _ = std::fs::remove_file(hold);
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    child.wait_with_output().unwrap()
}

/// Sends `sig` to a child.
fn signal(child: &Child, sig: i32) {
    // SAFETY: sending a signal to our own child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
}

/// Asserts `out` holds exactly one complete pair whose checksums verify and nothing
/// else (no staging or old folder); returns its files.
fn one_good_pair(out: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let pair = Bundles::open(out).unwrap_or_else(|e| panic!("{e}"));
    pair.language.verify_checksums().unwrap();
    pair.vision.verify_checksums().unwrap();
    let names = names_but_locks(out);
    assert_eq!(names, [LANG, VISION], "leftovers in {}", out.display());
    tree(out)
}

#[test]
fn a_second_conversion_into_a_held_folder_fails_at_once() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = sources(d.path());
    let out = d.path().join("out");
    let hold = d.path().join("hold");
    let mut first = held(&a, &out, &hold, &[]);
    assert!(
        wait_for(&hold, &mut first),
        "the first run reached a tensor"
    );
    let staged = staging_dirs(&out);
    assert_eq!(staged.len(), 1);
    for extra in [&[][..], &["--force"]] {
        fails(&convert(&b, &out, extra), &[LOCKED, s(&out)]);
    }
    assert_eq!(
        staging_dirs(&out),
        staged,
        "the live run's staging folder stays"
    );
    let o = release(&hold, first);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let files = one_good_pair(&out);
    let want = {
        let ref_out = d.path().join("ref");
        ok(&["convert", "--src", s(&a), "--out", s(&ref_out)]);
        tree(&ref_out)
    };
    assert_eq!(files, want, "the first run's bundles, untouched");
}

#[test]
fn sigterm_and_sighup_clean_up_like_ctrl_c() {
    let d = tempfile::tempdir().unwrap();
    let (a, _) = sources(d.path());
    for (name, sig) in [("term", libc::SIGTERM), ("hup", libc::SIGHUP)] {
        let out = d.path().join(name);
        let hold = d.path().join(format!("hold-{name}"));
        let mut child = held(&a, &out, &hold, &[]);
        assert!(wait_for(&hold, &mut child), "{name}: reached a tensor");
        assert_eq!(staging_dirs(&out).len(), 1, "{name}: mid-conversion");
        signal(&child, sig);
        let o = child.wait_with_output().unwrap();
        fails(&o, &["interrupted"]);
        no_bundle_left(&out);
        assert!(staging_dirs(&out).is_empty(), "{name}");
    }
}

#[test]
fn nohup_keeps_a_conversion_alive() {
    let d = tempfile::tempdir().unwrap();
    let (a, _) = sources(d.path());
    let out = d.path().join("out");
    let hold = d.path().join("hold");
    let args = ["convert", "--src", s(&a), "--out", s(&out)];
    // Started the way `nohup` starts it: SIGHUP ignored.
    let mut child = held_run(&args, &hold, libc::SIG_IGN);
    assert!(wait_for(&hold, &mut child), "reached a tensor");
    signal(&child, libc::SIGHUP);
    let o = release(&hold, child);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    one_good_pair(&out);
}

#[test]
fn readers_and_a_conversion_exclude_each_other() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = sources(d.path());
    let out = converted(d.path(), &a, "out");
    let hold = d.path().join("hold");
    let mut child = held(&b, &out, &hold, &["--force"]);
    assert!(wait_for(&hold, &mut child), "reached a tensor");
    // While the conversion holds the folder, no reader loads the pair it replaces,
    // whether given the output folder or the language bundle's.
    let trace = a.join("traces/text.safetensors");
    for bundle in [out.clone(), out.join(LANG)] {
        let o = run(&["run", "--bundle", s(&bundle), "--prompt", "hi"]);
        let line = fails(&o, &[LOCKED]);
        assert!(line.contains(&format!("{}: ", out.display())), "{line}");
        let report = d.path().join("report");
        let o = run(&[
            "verify",
            "--bundle",
            s(&bundle),
            "--trace",
            s(&trace),
            "--report",
            s(&report),
        ]);
        fails(&o, &[LOCKED, s(&out)]);
    }
    let o = release(&hold, child);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let files = one_good_pair(&out);
    assert_eq!(files, tree(&converted(d.path(), &b, "ref-b")));
    ok(&[
        "run",
        "--bundle",
        s(&out),
        "--prompt",
        "hi",
        "--max-new-tokens",
        "1",
    ]);
}

#[test]
fn two_synths_into_sibling_folders_run_together() {
    let d = tempfile::tempdir().unwrap();
    let hold = d.path().join("hold");
    let (x, y) = (d.path().join("x"), d.path().join("y"));
    let synth = |out| ["synth", "--size", "tiny", "--tied", "true", "--out", s(out)];
    let mut first = held_run(&synth(&x), &hold, libc::SIG_DFL);
    assert!(wait_for(&hold, &mut first), "the first synth is writing");
    // The second one neither waits for the first nor touches its staging folder.
    let staged = staging_dirs(d.path());
    assert_eq!(staged.len(), 1, "{staged:?}");
    ok(&synth(&y));
    assert_eq!(staging_dirs(d.path()), staged);
    // A second synth into the same folder fails at once, naming it.
    let line = fails(&run(&synth(&x)), &["another q3vl synth"]);
    assert!(line.contains(&format!("{}: ", x.display())), "{line}");
    let o = release(&hold, first);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(tree(&x), tree(&y), "both complete (same seed, same bytes)");
    assert!(x.join("model.safetensors").is_file());
    assert!(staging_dirs(d.path()).is_empty());
    // An entry's lock file goes with its synth: a shared parent (/tmp) keeps none.
    let mut left = std::fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect::<Vec<_>>();
    left.sort();
    assert_eq!(left, ["x", "y"]);
}

#[test]
fn a_bundle_given_through_a_link_or_dot_opens_its_real_pair() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("out");
    ok(&["convert", "--src", s(&fixture_src()), "--out", s(&out)]);
    let link = d.path().join("link");
    std::os::unix::fs::symlink(out.join(LANG), &link).unwrap();
    let args = ["run", "--prompt", "hi", "--max-new-tokens", "1", "--bundle"];
    let o = q3vl().args(args).arg(&link).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        !d.path().join(".q3vl-lock").exists(),
        "the real folder is locked"
    );
    let o = q3vl()
        .args(args)
        .arg(".")
        .current_dir(out.join(LANG))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn a_bundle_folder_is_refused_as_out() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("out");
    ok(&["convert", "--src", s(&fixture_src()), "--out", s(&out)]);
    let before = tree(&out.join(LANG));
    let o = convert(&fixture_src(), &out.join(LANG), &[]);
    fails(&o, &[LANG, "is a bundle folder", "metadata.json"]);
    assert_eq!(tree(&out.join(LANG)), before, "no lock file in the bundle");
}

/// The committed shapes fixture.
fn fixture_src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/shapes")
}

#[test]
fn a_legacy_pair_needs_force() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = sources(d.path());
    let out = converted(d.path(), &a, "out");
    // A pair written before `companion_sha256` existed.
    let meta = out.join(LANG).join("metadata.json");
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&meta).unwrap()).unwrap();
    m.as_object_mut().unwrap().remove("companion_sha256");
    write_json(&meta, &m);
    let o = run(&["run", "--bundle", s(&out), "--prompt", "hi"]);
    fails(&o, &["companion_sha256", "--force"]);
    let before = tree(&out);
    fails(
        &convert(&b, &out, &[]),
        &[LANG, "already exists", "--force"],
    );
    fails(
        &convert(&b, &out, &["--mode", "fp16"]),
        &[VISION, "already exists", "--force"],
    );
    assert_eq!(tree(&out), before, "a plain convert replaced nothing");
    ok(&["convert", "--src", s(&b), "--out", s(&out), "--force"]);
    one_good_pair(&out);
}

#[test]
fn a_damaged_metadata_is_named_not_taken_for_no_bundle() {
    let d = tempfile::tempdir().unwrap();
    let (a, _) = sources(d.path());
    let out = converted(d.path(), &a, "out");
    let meta = out.join(LANG).join("metadata.json");
    let good = std::fs::read_to_string(&meta).unwrap();
    for (from, to) in [
        ("\"q3vl-bundle\"", "\"q3vl-bundlX\""),
        ("\"format_version\": 1", "\"format_version\": 9"),
    ] {
        std::fs::write(&meta, good.replace(from, to)).unwrap();
        let o = run(&["run", "--bundle", s(&out), "--prompt", "hi"]);
        let line = fails(&o, &[s(&meta)]);
        assert!(!line.contains("holds no language bundle"), "{line}");
        // Nor does convert take the bundle for absent.
        fails(&convert(&a, &out, &[]), &[s(&out.join(LANG))]);
    }
}

#[test]
fn a_killed_run_leaves_nothing_after_the_next_run() {
    let d = tempfile::tempdir().unwrap();
    let (a, _) = sources(d.path());
    let out = d.path().join("out");
    let hold = d.path().join("hold");
    let mut child = held(&a, &out, &hold, &[]);
    assert!(wait_for(&hold, &mut child));
    signal(&child, libc::SIGKILL);
    child.wait().unwrap();
    assert_eq!(staging_dirs(&out).len(), 1, "kill -9 cannot clean up");
    assert!(Bundles::open(&out).is_err());
    ok(&["convert", "--src", s(&a), "--out", s(&out)]);
    one_good_pair(&out);
}

/// Converts `src` into a fresh folder under `d` and returns it.
fn converted(d: &Path, src: &Path, name: &str) -> PathBuf {
    let out = d.join(name);
    ok(&["convert", "--src", s(src), "--out", s(&out)]);
    out
}

#[test]
fn a_pair_no_conversion_completed_is_refused_and_a_plain_rerun_repairs_it() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = sources(d.path());
    let good = tree(&converted(d.path(), &a, "good"));
    let other = converted(d.path(), &b, "other");
    // A --force over b's pair killed between its two commits: b's new vision bundle
    // is in place, the language bundle is still a's... or the other way round.
    let mixed = converted(d.path(), &a, "mixed");
    std::fs::remove_dir_all(mixed.join(VISION)).unwrap();
    copy_dir(&other.join(VISION), &mixed.join(VISION));
    let o = run(&["run", "--bundle", s(&mixed), "--prompt", "hi"]);
    fails(
        &o,
        &[VISION, "metadata.json", "not the vision bundle", "convert"],
    );
    ok(&["convert", "--src", s(&a), "--out", s(&mixed)]);
    assert_eq!(one_good_pair(&mixed), good, "repaired without --force");

    // Killed between the commits with no vision bundle there (the language bundle first).
    let lonely = converted(d.path(), &a, "lonely");
    std::fs::remove_dir_all(lonely.join(VISION)).unwrap();
    let o = run(&["run", "--bundle", s(&lonely), "--prompt", "hi"]);
    fails(&o, &[VISION, "missing", "convert"]);
    ok(&["convert", "--src", s(&a), "--out", s(&lonely)]);
    assert_eq!(one_good_pair(&lonely), good);

    // Killed after the vision bundle of another source came, before any language bundle.
    let half = converted(d.path(), &b, "half");
    std::fs::remove_dir_all(half.join(LANG)).unwrap();
    ok(&["convert", "--src", s(&a), "--out", s(&half)]);
    assert_eq!(one_good_pair(&half), good);
}

#[test]
fn a_complete_pair_still_needs_force() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = sources(d.path());
    let out = converted(d.path(), &a, "out");
    let before = tree(&out);
    fails(
        &convert(&b, &out, &[]),
        &[LANG, "already exists", "--force"],
    );
    assert_eq!(tree(&out), before);
    // Another mode shares the complete pair's vision bundle, so another source's
    // vision bundle may not replace it without --force.
    fails(
        &convert(&b, &out, &["--mode", "fp16"]),
        &[VISION, "already exists", "--force"],
    );
    assert_eq!(tree(&out), before);
    ok(&["convert", "--src", s(&b), "--out", s(&out), "--force"]);
    one_good_pair(&out);
}

#[test]
fn leftovers_of_an_interrupted_force_are_gone_after_the_next_run() {
    let d = tempfile::tempdir().unwrap();
    let (a, _) = sources(d.path());
    let good = tree(&converted(d.path(), &a, "good"));
    for force in [false, true] {
        let out = converted(d.path(), &a, &format!("out-{force}"));
        // Killed after moving the old language bundle aside, before the new one came;
        // and after the new vision bundle came, before the old one was removed.
        std::fs::rename(out.join(LANG), out.join(format!(".q3vl-old-{LANG}"))).unwrap();
        copy_dir(&out.join(VISION), &out.join(format!(".q3vl-old-{VISION}")));
        // And the staging folder of a killed run.
        std::fs::create_dir_all(out.join(".q3vl-tmp-1-2-0/x")).unwrap();
        assert!(Bundles::open(&out).is_err());
        if force {
            ok(&["convert", "--src", s(&a), "--out", s(&out), "--force"]);
        } else {
            // The old language bundle is put back, which completes the pair again.
            fails(&convert(&a, &out, &[]), &[LANG, "already exists"]);
        }
        assert_eq!(one_good_pair(&out), good, "force: {force}");
    }
}

#[test]
fn force_replaces_only_q3vl_bundles() {
    let d = tempfile::tempdir().unwrap();
    let (a, _) = sources(d.path());
    for (name, kind) in [(LANG, "language"), (VISION, "vision")] {
        let out = d.path().join(format!("out-{kind}"));
        let mine = out.join(name);
        std::fs::create_dir_all(&mine).unwrap();
        std::fs::write(mine.join("notes.txt"), b"mine").unwrap();
        for extra in [&["--force"][..], &[]] {
            let line = fails(&convert(&a, &out, extra), &[s(&mine)]);
            assert!(
                line.contains(&format!("is not a q3vl {kind} bundle")),
                "{line}"
            );
            assert_eq!(std::fs::read(mine.join("notes.txt")).unwrap(), b"mine");
            assert_eq!(names_but_locks(&out).len(), 1, "nothing else was written");
        }
    }
    // A vision bundle where the language bundle should be is not replaced either.
    let out = converted(d.path(), &a, "swapped");
    std::fs::remove_dir_all(out.join(LANG)).unwrap();
    copy_dir(&out.join(VISION), &out.join(LANG));
    let line = fails(&convert(&a, &out, &["--force"]), &[LANG]);
    assert!(line.contains("is not a q3vl language bundle"), "{line}");
}

/// Runs `q3vl convert` twice at once on the two sources; each must succeed or fail
/// with one of `allowed`. Returns how many succeeded.
fn race(a: &Path, b: &Path, out: &Path, extra: &[&str], allowed: &[&str]) -> usize {
    let children: Vec<Child> = [a, b]
        .iter()
        .map(|src| {
            q3vl()
                .args(["convert", "--src", s(src), "--out", s(out)])
                .args(extra)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut wins = 0;
    for c in children {
        let o = c.wait_with_output().unwrap();
        if o.status.success() {
            wins += 1;
            continue;
        }
        let line = fails(&o, &[]);
        assert!(allowed.iter().any(|m| line.contains(m)), "{line}");
    }
    wins
}

#[test]
fn concurrent_conversions_never_corrupt_each_other() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = sources(d.path());
    let want_a = tree(&converted(d.path(), &a, "ref-a"));
    let want_b = tree(&converted(d.path(), &b, "ref-b"));
    for round in 0..5 {
        let out = d.path().join(format!("race{round}"));
        let wins = race(&a, &b, &out, &[], &[LOCKED, "already exists"]);
        assert!(wins >= 1, "round {round}: one of two plain runs succeeds");
        let files = one_good_pair(&out);
        assert!(
            files == want_a || files == want_b,
            "round {round}: a mixed pair"
        );
        let wins = race(&a, &b, &out, &["--force"], &[LOCKED]);
        assert!(wins >= 1, "round {round}: one of two --force runs succeeds");
        let files = one_good_pair(&out);
        assert!(
            files == want_a || files == want_b,
            "round {round}: a mixed pair"
        );
    }
}
