//! JUnit XML: one test case per gate, for CI systems.

use crate::report::Report;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

impl Report {
    /// The report as JUnit XML: a suite per trace, a case per gate.
    pub fn to_junit(&self) -> String {
        let mut suites = String::new();
        let (mut total, mut failures) = (0, 0);
        let mut suite = |name: &str, gates: &[crate::GateResult]| {
            let f = gates.iter().filter(|g| !g.passed).count();
            let sk = gates.iter().filter(|g| g.skipped.is_some()).count();
            total += gates.len();
            failures += f;
            suites.push_str(&format!(
                "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{f}\" skipped=\"{sk}\">\n",
                esc(name),
                gates.len()
            ));
            for g in gates {
                suites.push_str(&format!(
                    "    <testcase classname=\"{}\" name=\"{}\">",
                    esc(name),
                    esc(&g.name)
                ));
                if let Some(why) = &g.skipped {
                    suites.push_str(&format!("<skipped message=\"{}\"/>", esc(why)));
                } else if g.passed {
                    suites.push_str(&format!(
                        "<system-out>{} [{}] {}</system-out>",
                        esc(&g.value),
                        esc(&g.threshold),
                        esc(&g.detail)
                    ));
                } else {
                    suites.push_str(&format!(
                        "<failure message=\"{} [{}]\">{}</failure>",
                        esc(&g.value),
                        esc(&g.threshold),
                        esc(&g.detail)
                    ));
                }
                suites.push_str("</testcase>\n");
            }
            suites.push_str("  </testsuite>\n");
        };
        for t in &self.traces {
            let name = format!("{:?}:{}", t.profile, t.trace.display()).to_lowercase();
            suite(&name, &t.gates);
        }
        let mut skipped = String::new();
        if !self.not_run.is_empty() {
            skipped.push_str(&format!(
                "  <testsuite name=\"not run\" tests=\"{n}\" failures=\"0\" skipped=\"{n}\">\n",
                n = self.not_run.len()
            ));
            for n in &self.not_run {
                skipped.push_str(&format!(
                    "    <testcase classname=\"not run\" name=\"{}\"><skipped message=\"{}\"/></testcase>\n",
                    esc(&n.gate),
                    esc(&n.why)
                ));
            }
            skipped.push_str("  </testsuite>\n");
        }
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuites name=\"q3vl verify\" tests=\"{total}\" failures=\"{failures}\">\n{suites}{skipped}</testsuites>\n"
        )
    }
}
