//! `q3vl`: fetch, convert, inspect, verify, run, benchmark and export Qwen3-VL int8 bundles.
//!
//! Each subcommand lives in its own module and only calls the library crates.
//! Exit codes (`docs/cli.md`): 0 success, 1 a verification gate failed, 2 bad usage
//! or bad input, with one line on stderr naming the culprit, 101 an internal error
//! (a caught panic: a bug, never bad input).

use clap::{Parser, Subcommand};
use std::process::ExitCode;

mod bench;
mod chat;
mod common;
mod convert;
mod export;
mod fetch;
mod inspect;
mod run;
mod serve;
mod synth;
mod verify;

/// The exit codes, as `q3vl --help` lists them (README.md says the same).
const EXIT_CODES: &str = "Exit codes: 0 success; 1 a verification gate failed; 2 bad usage or bad input (one line on stderr naming the file, tensor or option); 101 an internal error, a bug in q3vl (one line on stderr; please report it).";

/// What a subcommand reports back to `main` when it did not fail outright.
pub enum Outcome {
    /// Everything passed.
    Success,
    /// The work ran but a gate failed (exit 1).
    GateFailed,
}

#[derive(Parser)]
#[command(
    name = "q3vl",
    version = common::VERSION,
    about = "Qwen3-VL → int8 bundles, verified layer by layer against the HF oracle",
    long_about = None,
    after_help = EXIT_CODES
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Download a checkpoint from the Hugging Face hub into the standard cache.
    Fetch(fetch::FetchArgs),
    /// Convert a checkpoint into the language and vision bundles.
    Convert(convert::ConvertArgs),
    /// Show a bundle's metadata, tensors and checksum status.
    Inspect(inspect::InspectArgs),
    /// Write a random-weight checkpoint of a real shape.
    Synth(synth::SynthArgs),
    /// Generate an answer with the runtime engine.
    Run(run::RunArgs),
    /// Serve the OpenAI chat-completions API (continuous batching, conversations).
    Serve(serve::ServeArgs),
    /// Hold a conversation in the terminal (streamed answers, /image, /reset).
    Chat(chat::ChatArgs),
    /// Measure vision, prefill and decode speed against the memory-bandwidth bound.
    Bench(bench::BenchArgs),
    /// Compare the reference (on a checkpoint or a bundle) with HF oracle traces.
    Verify(verify::VerifyArgs),
    /// Export a verified bundle pair to another runtime's format.
    Export(export::ExportArgs),
}

fn run(cli: Cli) -> anyhow::Result<Outcome> {
    // Test hook: the one way to reach the panic path on purpose (tests/hostile_input.rs).
    // Debug builds only (the tests'), so the shipped release binary has no such hook.
    #[cfg(debug_assertions)]
    if std::env::var_os("Q3VL_TEST_PANIC").is_some() {
        panic!("Q3VL_TEST_PANIC is set\n(a second line that must not print as one)");
    }
    match cli.command {
        Command::Fetch(a) => fetch::run(a),
        Command::Convert(a) => convert::run(a),
        Command::Inspect(a) => inspect::run(a),
        Command::Synth(a) => synth::run(a),
        Command::Verify(a) => verify::run(a),
        Command::Run(a) => run::run(a),
        Command::Serve(a) => serve::run(a),
        Command::Chat(a) => chat::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Export(a) => export::run(a),
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) if e.use_stderr() => {
            // One line naming the option, like every other bad input (clap's usage
            // block and tips follow only under --help).
            eprintln!("{}", common::clap_error_line(&e));
            return ExitCode::from(2);
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    common::install_panic_hook();
    // Checked before any work: every kernel reads it when it first runs.
    if let Err(e) = q3vl_engine::kernels::path::requested_path() {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    if let Err(e) = q3vl_engine::kernels::matvec::requested_prefetch() {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    match std::panic::catch_unwind(|| run(cli)) {
        Ok(Ok(Outcome::Success)) => ExitCode::SUCCESS,
        Ok(Ok(Outcome::GateFailed)) => ExitCode::from(1),
        Ok(Err(e)) => {
            eprintln!("error: {}", common::one_line(&e));
            ExitCode::from(2)
        }
        // The hook printed the one line; a bug is not bad input.
        Err(_) => ExitCode::from(common::EXIT_BUG),
    }
}
