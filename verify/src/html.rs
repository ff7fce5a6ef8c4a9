//! `report.html`: one self-contained page (inline SVG, no network) that a person
//! reads at a glance — per-stage 1 − cos on a log axis for the ViT and the decoder
//! (the fp32 ladder and the bundle's side by side when both ran), the worst tokens,
//! and the decode gates as token strips.

use crate::engine_gate::EngineMatch;
use crate::ladder::{Profile, Stage, StageRow, TraceReport};
use crate::report::Report;
use std::fmt::Write as _;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// 1 − cos, floored so an exact match still has a place on a log axis.
fn gap(cos: f64) -> f64 {
    (1.0 - cos).max(1e-12)
}

const W: f64 = 760.0;
const H: f64 = 240.0;
const PAD: f64 = 48.0;

/// One plotted run: label, colour, the stages, and the gate threshold drawn for it.
type Series<'a> = (&'a str, &'a str, Vec<&'a StageRow>, Option<f64>);

/// One log-scale line plot of 1 − cos per stage; one series per profile.
fn plot(title: &str, series: &[Series<'_>]) -> String {
    let n = series.iter().map(|s| s.2.len()).max().unwrap_or(0);
    let short = |r: &StageRow| -> String {
        match (r.name.as_str(), r.index) {
            ("vision.merger", _) => "m".into(),
            (n, Some(k)) if n.starts_with("vision.deepstack") => format!("ds{k}"),
            (_, Some(i)) => i.to_string(),
            (n, None) => n.rsplit('.').next().unwrap_or(n).to_string(),
        }
    };
    if n == 0 {
        return String::new();
    }
    let (lo, hi) = (-12.0f64, 0.0f64);
    let x = |i: usize| PAD + (W - 2.0 * PAD) * (i as f64 + 0.5) / n as f64;
    let y = |v: f64| PAD / 2.0 + (H - PAD) * (hi - v.log10().clamp(lo, hi)) / (hi - lo);
    let mut s = String::new();
    let _ = write!(s, "<figure><figcaption>{}</figcaption><svg viewBox=\"0 0 {W} {H}\" width=\"{W}\" height=\"{H}\" role=\"img\">", esc(title));
    for e in (lo as i32..=hi as i32).step_by(2) {
        let yy = y(10f64.powi(e));
        let _ = write!(s, "<line x1=\"{PAD}\" x2=\"{}\" y1=\"{yy}\" y2=\"{yy}\" class=\"grid\"/><text x=\"4\" y=\"{}\" class=\"axis\">1e{e}</text>", W - PAD, yy + 4.0);
    }
    for (name, color, _, threshold) in series {
        if let Some(t) = threshold {
            let yy = y(gap(*t));
            let _ = write!(s, "<line x1=\"{PAD}\" x2=\"{}\" y1=\"{yy}\" y2=\"{yy}\" class=\"gate\" stroke=\"{color}\"/><text x=\"{}\" y=\"{}\" class=\"axis\">{} gate</text>", W - PAD, W - PAD + 4.0, yy + 4.0, esc(name.split(' ').next().unwrap_or("")));
        }
    }
    for (name, color, rows, _) in series {
        let pts: Vec<String> = rows
            .iter()
            .enumerate()
            .map(|(i, r)| format!("{:.1},{:.1}", x(i), y(gap(r.cos))))
            .collect();
        let _ = write!(s, "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"><title>{}</title></polyline>", pts.join(" "), esc(name));
        for (i, r) in rows.iter().enumerate() {
            let cls = if r.passed { "" } else { " fail" };
            let _ = write!(
                s,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"4\" fill=\"{color}\" class=\"pt{cls}\"><title>{} {}: cos {:.9}, worst token {} at {}</title></circle>",
                x(i), y(gap(r.cos)), esc(name), esc(&r.name), r.cos, r.min_token_cos, r.min_token_pos
            );
        }
    }
    if let Some((_, _, rows, _)) = series.first() {
        for (i, r) in rows.iter().enumerate() {
            let _ = write!(
                s,
                "<text x=\"{:.1}\" y=\"{}\" class=\"axis\" text-anchor=\"middle\">{}</text>",
                x(i),
                H - 6.0,
                esc(&short(r))
            );
        }
    }
    let mut lx = PAD;
    for (name, color, _, _) in series {
        let _ = write!(s, "<rect x=\"{lx}\" y=\"2\" width=\"10\" height=\"10\" fill=\"{color}\"/><text x=\"{}\" y=\"11\" class=\"axis\">{}</text>", lx + 14.0, esc(name));
        lx += 160.0;
    }
    s.push_str("</svg></figure>");
    s
}

/// KL(oracle ‖ ours) at every scored position on a log axis, one line per run (the
/// fp32 reference beside the bundle when both ran), with the bundle's KL allowance.
fn kl_plot(
    runs: &[&TraceReport],
    color: impl Fn(Profile) -> &'static str,
    kld_factor: f64,
) -> String {
    let n = runs.iter().map(|t| t.positions.len()).max().unwrap_or(0);
    if n == 0
        || runs
            .iter()
            .all(|t| t.positions.iter().all(|p| p.kld.is_none()))
    {
        return String::new();
    }
    let (lo, hi) = (-14.0f64, 0.0f64);
    let x = |i: usize| PAD + (W - 2.0 * PAD) * (i as f64 + 0.5) / n as f64;
    let y = |v: f64| PAD / 2.0 + (H - PAD) * (hi - v.max(1e-14).log10().clamp(lo, hi)) / (hi - lo);
    let mut s = String::new();
    let _ = write!(s, "<figure><figcaption>KL(oracle ‖ ours) per scored position (prompt, then the seeded decode)</figcaption><svg viewBox=\"0 0 {W} {H}\" width=\"{W}\" height=\"{H}\" role=\"img\">");
    for e in (lo as i32..=hi as i32).step_by(2) {
        let yy = y(10f64.powi(e));
        let _ = write!(s, "<line x1=\"{PAD}\" x2=\"{}\" y1=\"{yy}\" y2=\"{yy}\" class=\"grid\"/><text x=\"4\" y=\"{}\" class=\"axis\">1e{e}</text>", W - PAD, yy + 4.0);
    }
    let mut lx = PAD;
    for t in runs {
        let c = color(t.profile);
        if let Some(b) = &t.noise_budget {
            let yy = y(kld_factor * 0.5 * b.mean_var);
            let _ = write!(s, "<line x1=\"{PAD}\" x2=\"{}\" y1=\"{yy}\" y2=\"{yy}\" class=\"gate\" stroke=\"{c}\"><title>mean KL allowance</title></line>", W - PAD);
        }
        let pts: Vec<String> = t
            .positions
            .iter()
            .enumerate()
            .filter_map(|(i, p)| p.kld.map(|k| format!("{:.1},{:.1}", x(i), y(k))))
            .collect();
        let label = format!("{:?}", t.profile).to_lowercase();
        let _ = write!(s, "<polyline fill=\"none\" stroke=\"{c}\" stroke-width=\"1.5\" points=\"{}\"><title>{label}</title></polyline>", pts.join(" "));
        let _ = write!(s, "<rect x=\"{lx}\" y=\"2\" width=\"10\" height=\"10\" fill=\"{c}\"/><text x=\"{}\" y=\"11\" class=\"axis\">{label}</text>", lx + 14.0);
        lx += 160.0;
    }
    s.push_str("</svg></figure>");
    s
}

/// Two token sequences as one strip of steps: `ours` against `theirs` (whose top-2
/// margins decide which steps are ambiguous), steps from `limit` on shown as not
/// counted; `cos` (when given) is the per-step logits cosine.
struct Strip<'a> {
    title: &'a str,
    names: [&'a str; 2],
    ours: &'a [u32],
    theirs: &'a [u32],
    margins: &'a [f64],
    cos: &'a [f64],
    limit: usize,
}

fn strip(st: &Strip<'_>, firm: f64) -> String {
    let Strip {
        title,
        names: [a, b],
        ours,
        theirs: oracle,
        margins,
        cos,
        limit,
    } = *st;
    let mut s = format!(
        "<div class=\"strip\"><span class=\"lbl\">{}</span>",
        esc(title)
    );
    for (i, o) in oracle.iter().enumerate() {
        let u = ours.get(i).copied();
        let amb = margins.get(i).is_some_and(|&m| m < firm);
        let cls = if i >= limit || u.is_none() {
            "out"
        } else if amb {
            "amb"
        } else if u == Some(*o) {
            "ok"
        } else {
            "bad"
        };
        let _ = write!(
            s,
            "<span class=\"tok {cls}\" title=\"step {i}: {a} {}, {b} {o}, margin {:.3}{}\">{i}</span>",
            u.map(|u| u.to_string()).unwrap_or("-".into()),
            margins.get(i).copied().unwrap_or(f64::NAN),
            cos.get(i)
                .map(|c| format!(", logits cos {c:.9}"))
                .unwrap_or_default()
        );
    }
    s.push_str("</div>");
    s
}

fn table(t: &TraceReport) -> String {
    let mut s = String::from("<table><tr><th>stage</th><th>cos</th><th>worst token cos</th><th>@</th><th>update cos</th><th>max abs</th><th></th></tr>");
    for r in &t.rows {
        let mark = match (r.gated, r.passed) {
            (false, _) => "·",
            (true, true) => "ok",
            (true, false) => "FAIL",
        };
        let _ = write!(
            s,
            "<tr class=\"{}\"><td>{}</td><td>{:.9}</td><td>{:.9}</td><td>{}</td><td>{}</td><td>{:.3e}</td><td>{mark}</td></tr>",
            if r.passed { "" } else { "fail" },
            esc(&r.name), r.cos, r.min_token_cos, r.min_token_pos,
            r.update_cos.map(|u| format!("{u:.9}")).unwrap_or("-".into()), r.max_abs
        );
    }
    s.push_str("</table><table><tr><th>gate</th><th></th><th>value</th><th>threshold</th><th>detail</th></tr>");
    for g in &t.gates {
        let _ = write!(
            s,
            "<tr class=\"{}\"><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            if g.passed { "" } else { "fail" },
            esc(&g.name),
            g.verdict(),
            esc(&g.value),
            esc(&g.threshold),
            esc(&g.detail)
        );
    }
    s.push_str("</table>");
    s
}

/// The statistics of every run of one trace, side by side (the fp32 reference on the
/// source beside the bundle when both ran).
fn stats_table(runs: &[&TraceReport]) -> String {
    let mut s = String::from("<table><tr><th>next-token statistics</th>");
    for t in runs {
        let _ = write!(
            s,
            "<th>{:?}{}</th>",
            t.profile,
            t.mode
                .as_deref()
                .map(|m| format!(" ({m})"))
                .unwrap_or_default()
        );
    }
    s.push_str("</tr>");
    type Cell = fn(&TraceReport) -> String;
    let lines: [(&str, Cell); 9] = [
        ("positions scored (prompt + seeded decode)", |t| {
            t.stats.positions.to_string()
        }),
        ("KL(oracle ‖ ours) mean", |t| opt_e(t.stats.kld_mean)),
        ("KL 99th percentile", |t| opt_e(t.stats.kld_p99)),
        ("KL max", |t| opt_e(t.stats.kld_max)),
        ("oracle tail mass outside top-k (max)", |t| {
            format!("{:.3e}", t.stats.tail_mass_max)
        }),
        ("top-1 agreement", |t| {
            format!(
                "{}/{} ({:.2}%)",
                t.stats.agree,
                t.stats.positions,
                t.stats.agreement * 100.0
            )
        }),
        ("logit noise σ (median)", |t| {
            format!("{:.5}", t.stats.noise)
        }),
        ("allowed σ (quantization)", |t| {
            t.noise_budget
                .as_ref()
                .map_or("-".into(), |b| format!("{:.5}", b.sigma))
        }),
        ("firm margin used", |t| format!("{:.3}", t.firm_margin)),
    ];
    for (name, cell) in lines {
        let _ = write!(s, "<tr><td>{name}</td>");
        for t in runs {
            let _ = write!(s, "<td>{}</td>", esc(&cell(t)));
        }
        s.push_str("</tr>");
    }
    s.push_str("</table>");
    s
}

fn opt_e(x: Option<f64>) -> String {
    x.map_or("-".to_string(), |v| format!("{v:.3e}"))
}

/// The colour of a profile's series.
fn color(p: Profile) -> &'static str {
    match p {
        Profile::Fp32 => "#1f77b4",
        Profile::Bundle => "#d62728",
        Profile::Gguf => "#2ca02c",
    }
}

impl Report {
    /// The self-contained HTML page.
    pub fn to_html(&self) -> String {
        let mut body = String::new();
        let _ = write!(
            body,
            "<h1>q3vl verify</h1><p class=\"{}\"><b>{}</b></p><p>{} · subject <code>{}</code> · gates v{}</p>",
            if self.passed() { "pass" } else { "fail" },
            esc(&self.summary_line()), esc(&self.tool), esc(&self.subject), self.gates.version
        );
        // Traces that ran under both profiles are plotted together.
        let mut names: Vec<&std::path::Path> =
            self.traces.iter().map(|t| t.trace.as_path()).collect();
        names.dedup();
        for name in names {
            let runs: Vec<&TraceReport> = self.traces.iter().filter(|t| t.trace == name).collect();
            body.push_str(&self.trace_section(&runs));
        }
        format!(
            "<!doctype html><html><head><meta charset=\"utf-8\"><title>q3vl verify</title><style>{CSS}</style></head><body>{body}</body></html>\n"
        )
    }

    /// One trace's section: its statistics and plots, then each run's strips and tables.
    fn trace_section(&self, runs: &[&TraceReport]) -> String {
        let mut body = String::new();
        let _ = write!(
            body,
            "<section><h2>{}</h2><p>prompt: <q>{}</q> · {} tokens{}</p>",
            esc(&runs[0].trace.display().to_string()),
            esc(&runs[0].prompt),
            runs[0].tokens,
            runs[0]
                .image
                .as_deref()
                .map(|i| format!(" · image {}", esc(i)))
                .unwrap_or_default()
        );
        body.push_str(&stats_table(runs));
        body.push_str(&kl_plot(runs, color, self.gates.bundle.kld_factor));
        for stage in [Stage::Vision, Stage::Text] {
            body.push_str(&self.ladder_plot(runs, stage));
        }
        for t in runs {
            body.push_str(&self.run_section(t));
        }
        body.push_str("</section>");
        body
    }

    /// 1 − cos per block or layer of one part of the model, a series per run.
    fn ladder_plot(&self, runs: &[&TraceReport], stage: Stage) -> String {
        let series: Vec<Series<'_>> = runs
            .iter()
            .map(|t| {
                let label = if t.profile == Profile::Fp32 {
                    "fp32 ladder"
                } else {
                    "bundle"
                };
                let rows: Vec<&StageRow> = t
                    .rows
                    .iter()
                    .filter(|r| {
                        r.stage == stage && (r.index.is_some() || r.name == "vision.merger")
                    })
                    .collect();
                let mode = match stage {
                    Stage::Vision => t.vision_mode.as_deref().or(t.mode.as_deref()),
                    _ => t.mode.as_deref(),
                };
                let mode = self.gates.bundle.mode(mode).ok();
                let thr = match (t.profile, stage, mode) {
                    (Profile::Fp32, _, _) => Some(self.gates.fp32.stage_cos),
                    (_, Stage::Text, Some((_, m))) => {
                        Some(m.layer_cos(rows.len().saturating_sub(1)))
                    }
                    (_, _, Some((_, m))) => Some(m.vision_cos),
                    (_, _, None) => None,
                };
                (label, color(t.profile), rows, thr)
            })
            .collect();
        let title = if stage == Stage::Vision {
            "ViT blocks, merger (m) and DeepStack (ds): 1 − cos (bundle gates the merger and DeepStack only)"
        } else {
            "decoder layers: 1 − cos"
        };
        plot(title, &series)
    }

    /// One run of a trace: its greedy decode (and engine) strips, then its tables.
    fn run_section(&self, t: &TraceReport) -> String {
        let limit = match t.profile {
            Profile::Fp32 => t.oracle_tokens.len(),
            Profile::Bundle | Profile::Gguf => self.gates.bundle.free_decode_steps,
        };
        let title = format!("{:?} greedy decode", t.profile);
        let mut body = strip(
            &Strip {
                title: &title,
                names: ["ours", "oracle"],
                ours: &t.decode_tokens,
                theirs: &t.oracle_tokens,
                margins: &t.decode_margins,
                cos: &[],
                limit,
            },
            t.firm_margin,
        );
        if let Some(e) = &t.engine {
            body.push_str(&self.engine_strip(e));
        }
        let _ = write!(body, "<h3>{:?} profile</h3>", t.profile);
        body.push_str(&table(t));
        body
    }

    /// The engine ≡ reference strip and figures.
    fn engine_strip(&self, e: &EngineMatch) -> String {
        // Every step counts: the reference is forced along the engine's tokens.
        let mut body = strip(
            &Strip {
                title: "engine ≡ reference",
                names: ["engine", "reference"],
                ours: &e.engine_tokens,
                theirs: &e.reference_tokens,
                margins: &e.reference_margins,
                cos: &e.logits_cos,
                limit: e.steps,
            },
            self.gates.firm_margin,
        );
        let _ = write!(
            body,
            "<p>engine vs reference logits: min cos {:.9} at step {} (each step's in its tooltip); teacher-forced, {}/{} firm steps agree. Prompt: top-1 agrees at {}/{} firm positions, min logits cos {:.9} at position {}</p>",
            e.min_logits_cos,
            e.min_logits_cos_step,
            e.forced.agree,
            e.forced.firm,
            e.prompt.agree,
            e.prompt.firm,
            e.min_prompt_logits_cos,
            e.min_prompt_logits_cos_position
        );
        body
    }
}

const CSS: &str = "body{font:14px system-ui,sans-serif;margin:24px;color:#222}h1{margin:0 0 8px}\
.pass{color:#1a7f37}.fail{color:#c62828}table{border-collapse:collapse;margin:8px 0 16px}\
td,th{padding:2px 8px;border-bottom:1px solid #eee;text-align:right;font-variant-numeric:tabular-nums}\
td:first-child,th:first-child{text-align:left}tr.fail td{background:#fdecea}\
svg{background:#fafafa;border:1px solid #ddd}.grid{stroke:#e4e4e4}.gate{stroke-dasharray:4 3}\
.axis{font-size:10px;fill:#555}.pt.fail{stroke:#000;stroke-width:2}figure{margin:8px 0}figcaption{font-weight:600}\
.strip{margin:6px 0}.lbl{display:inline-block;width:200px}.tok{display:inline-block;width:22px;text-align:center;\
margin:1px;border-radius:3px;font-size:10px;color:#fff}.tok.ok{background:#2e7d32}.tok.bad{background:#c62828}\
.tok.amb{background:#9e9e9e}.tok.out{background:#cfd8dc;color:#555}";
