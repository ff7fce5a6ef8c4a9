//! `q3vl chat` under a pseudo-terminal, as a person types at it: a prompt per turn,
//! streamed answers equal to `q3vl run`'s, `/image` attaching an image, a bad command
//! or a missing file answered on one line without ending the conversation, `/reset`,
//! and `/exit`.

mod common;

use common::server::run_text;
use common::{converted_mode, s};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A child on a pseudo-terminal and everything it printed so far.
struct Pty {
    child: Child,
    master: File,
    seen: Arc<Mutex<String>>,
}

impl Pty {
    fn spawn(args: &[&str]) -> Pty {
        let (mut master, mut slave) = (0, 0);
        // SAFETY: openpty writes two descriptors; the null arguments are allowed.
        let rc = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        assert_eq!(rc, 0, "openpty");
        // SAFETY: both descriptors are fresh and owned here.
        let (master, slave) = unsafe { (File::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
        let io = |fd: &OwnedFd| Stdio::from(fd.try_clone().unwrap());
        let child = common::q3vl()
            .args(args)
            .stdin(io(&slave))
            .stdout(io(&slave))
            .stderr(io(&slave))
            .spawn()
            .unwrap();
        drop(slave);
        let seen = Arc::new(Mutex::new(String::new()));
        let (mut r, log) = (master.try_clone().unwrap(), seen.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // Ends with EIO once the child closed the terminal.
            while let Ok(n @ 1..) = r.read(&mut buf) {
                log.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Pty {
            child,
            master,
            seen,
        }
    }

    /// Waits until the output after byte `from` holds `what`; returns the end of it.
    fn expect(&self, from: usize, what: &str) -> usize {
        let t0 = Instant::now();
        loop {
            let seen = self.seen.lock().unwrap().clone();
            if let Some(at) = seen.get(from..).and_then(|s| s.find(what)) {
                return from + at + what.len();
            }
            assert!(
                t0.elapsed() < Duration::from_secs(120),
                "no {what:?} in:\n{seen}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Types a line once the prompt shows; returns where its answer starts.
    fn say(&mut self, from: usize, line: &str) -> usize {
        let at = self.expect(from, "> ");
        self.master
            .write_all(format!("{line}\r").as_bytes())
            .unwrap();
        self.expect(at, "\n")
    }
}

#[test]
fn a_conversation_in_a_terminal() {
    let out = converted_mode("shapes", "int8hu", true);
    let img = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/shapes/images/demo_2.png");
    let text_answer = run_text(&out, "Which colour comes after blue?", &[], 16);
    let image_answer = run_text(&out, "What is in the image?", &[&img], 16);
    let mut pty = Pty::spawn(&["chat", "--bundle", s(&out), "--max-new-tokens", "16"]);
    let at = pty.say(0, "Which colour comes after blue?");
    let at = pty.expect(at, &text_answer);
    let at = pty.say(at, "/bogus");
    let at = pty.expect(at, "unknown command /bogus");
    let at = pty.say(at, "/image /no/such.png");
    let at = pty.expect(at, "/no/such.png");
    let at = pty.say(at, "/reset");
    let at = pty.say(at, &format!("/image {}", img.display()));
    let at = pty.expect(at, "196 tokens");
    let at = pty.say(at, "What is in the image?");
    let at = pty.expect(at, &image_answer);
    pty.say(at, "/exit");
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = pty.child.try_wait().unwrap() {
            break st;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "chat did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{}", pty.seen.lock().unwrap());
    assert!(!pty.seen.lock().unwrap().contains("panicked"));
}
