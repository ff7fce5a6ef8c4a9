//! Reports: a terminal table per trace with one summary line, and `report.json`.

use crate::engine_gate::EngineMatch;
use crate::gates::{GateResult, Gates};
use crate::ladder::TraceReport;
use serde::Serialize;
use std::fmt::Write as _;

/// A gate that did not run.
#[derive(Debug, Clone, Serialize)]
pub struct NotRun {
    /// The gate's name.
    pub gate: String,
    /// Why it did not run.
    pub why: String,
}

/// A whole verification run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// `q3vl-verify-report/1`.
    pub format: &'static str,
    /// The tool's version string.
    pub tool: String,
    /// What was verified (checkpoint or bundle folder).
    pub subject: String,
    /// The thresholds used.
    pub gates: Gates,
    /// One entry per trace.
    pub traces: Vec<TraceReport>,
    /// Gates the user chose not to run, with why (e.g. `engine.reference`
    /// under `--no-engine-gate`): reported as not run, never as passed.
    pub not_run: Vec<NotRun>,
}

impl Report {
    /// Whether every gate of every trace passed.
    pub fn passed(&self) -> bool {
        self.traces.iter().all(TraceReport::passed)
    }

    /// `trace:gate` names that passed and failed.
    pub fn gate_names(&self) -> (Vec<String>, Vec<String>) {
        let (mut ok, mut bad) = (vec![], vec![]);
        let mixed = self
            .traces
            .iter()
            .any(|t| t.profile != self.traces[0].profile);
        for t in &self.traces {
            let stem = t
                .trace
                .file_stem()
                .map(|s| s.to_string_lossy().to_string())
                .unwrap_or_default();
            let prefix = if mixed {
                format!("{:?}/", t.profile).to_lowercase()
            } else {
                String::new()
            };
            for g in &t.gates {
                let n = format!("{prefix}{stem}:{}", g.name);
                if g.passed {
                    ok.push(n)
                } else {
                    bad.push(n)
                }
            }
        }
        (ok, bad)
    }

    /// The last stdout line: which gates passed and failed.
    pub fn summary_line(&self) -> String {
        let (ok, bad) = self.gate_names();
        let not_run = if self.not_run.is_empty() {
            String::new()
        } else {
            let n: Vec<String> = self
                .not_run
                .iter()
                .map(|n| format!("{} ({})", n.gate, n.why))
                .collect();
            format!("; not run: {}", n.join(", "))
        };
        let skipped: Vec<String> = self
            .traces
            .iter()
            .flat_map(|t| &t.gates)
            .filter(|g| g.skipped.is_some())
            .map(|g| g.name.clone())
            .collect();
        let n_skipped = skipped.len();
        let skipped = match n_skipped {
            0 => String::new(),
            n => format!(
                "; {n} skipped, with nothing firm to count ({}): the statistics gates cover those positions",
                skipped.join(", ")
            ),
        };
        if bad.is_empty() {
            format!(
                "PASS: all {} gates passed{skipped}{not_run}",
                ok.len() - n_skipped
            )
        } else {
            format!(
                "FAIL: {} of {} gates failed: {}{skipped}{not_run}",
                bad.len(),
                ok.len() + bad.len(),
                bad.join(", ")
            )
        }
    }

    /// The terminal rendering: one table per trace, then the gates.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        for t in &self.traces {
            trace_text(&mut s, t);
        }
        s.push_str(&self.summary_line());
        s.push('\n');
        s
    }

    /// `report.json`.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("report serialises")
    }
}

/// One trace's table, notes and gates, then an empty line.
fn trace_text(s: &mut String, t: &TraceReport) {
    let _ = writeln!(
        s,
        "trace {} ({} tokens{}), {:?} profile",
        t.trace.display(),
        t.tokens,
        t.image
            .as_deref()
            .map(|i| format!(", image {i}"))
            .unwrap_or_default(),
        t.profile
    );
    rows_text(s, t);
    let st = &t.stats;
    let opt = |x: Option<f64>| x.map_or("unknown".to_string(), |v| format!("{v:.3e}"));
    let _ = writeln!(
        s,
        "  next-token statistics over {} positions: KL mean {}, p99 {}, max {}; top-1 agreement {:.2}%; logit noise σ {:.4}{}; firm margin {:.3}",
        st.positions,
        opt(st.kld_mean),
        opt(st.kld_p99),
        opt(st.kld_max),
        st.agreement * 100.0,
        st.noise,
        t.noise_budget
            .as_ref()
            .map(|b| format!(" (allowed {:.4})", b.sigma))
            .unwrap_or_default(),
        t.firm_margin
    );
    if let Some((m, true)) = t.pixels {
        let _ = writeln!(s, "  note image.pixels: max |ours − oracle| = {m:.3e} after a bicubic resize (reported, not gated)");
    }
    if let Some(e) = &t.engine {
        engine_note(s, e);
    }
    for g in &t.gates {
        s.push_str(&gate_line("  ", g));
    }
    s.push('\n');
}

/// The stage table.
fn rows_text(s: &mut String, t: &TraceReport) {
    let _ = writeln!(
        s,
        "  {:<22} {:>12} {:>12} {:>6} {:>12} {:>10}",
        "stage", "cos", "worst tok", "@pos", "update cos", "max abs"
    );
    for r in &t.rows {
        let mark = match (r.gated, r.passed) {
            (false, _) => "  ·",
            (true, true) => " ok",
            (true, false) => "FAIL",
        };
        let _ = writeln!(
            s,
            "  {:<22} {:>12.9} {:>12.9} {:>6} {:>12} {:>10.3e}  {}",
            r.name,
            r.cos,
            r.min_token_cos,
            r.min_token_pos,
            r.update_cos
                .map(|u| format!("{u:.9}"))
                .unwrap_or_else(|| "-".into()),
            r.max_abs,
            mark
        );
    }
}

/// The engine ≡ reference figures, as a note line.
fn engine_note(s: &mut String, e: &EngineMatch) {
    let _ = writeln!(
        s,
        "  note engine vs reference: {} steps, logits cos min {:.9} at step {}, teacher-forced top-1 agrees at {}/{} firm steps; prompt logits cos min {:.9} at position {}; tokens {}",
        e.steps,
        e.min_logits_cos,
        e.min_logits_cos_step,
        e.forced.agree,
        e.forced.firm,
        e.min_prompt_logits_cos,
        e.min_prompt_logits_cos_position,
        if e.engine_tokens == e.reference_tokens {
            "all equal".to_string()
        } else {
            format!("engine {:?}, reference {:?}", e.engine_tokens, e.reference_tokens)
        }
    );
}

/// One gate as a terminal line.
fn gate_line(indent: &str, g: &GateResult) -> String {
    format!(
        "{indent}gate {:<16} {:<4} {:>14}  [{}]  {}\n",
        g.name,
        g.verdict(),
        g.value,
        g.threshold,
        g.detail
    )
}
