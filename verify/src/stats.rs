//! Statistics of next-token distributions over every scored position: the KL
//! divergence of ours from the oracle's, top-1 agreement, the logit noise, and the
//! logits cosine where the oracle kept its full rows. Everything in f64.
//!
//! With the oracle's full row the KL divergence is exact. With its top-k and its
//! log-sum-exp (trace v2) the oracle's probabilities of its top-k tokens are exact,
//! and the rest of the vocabulary is lumped into one "tail" outcome on both sides:
//! that KL is a lower bound of the true one (merging outcomes never increases a KL
//! divergence), equal to it when the oracle's tail mass is zero. The tail mass is
//! reported beside it.

use serde::Serialize;

/// What the oracle recorded for one position.
pub struct OracleRow<'a> {
    /// Its top-k token ids, best first.
    pub top_ids: &'a [i64],
    /// Their logits.
    pub top_values: &'a [f32],
    /// Log-sum-exp of the whole row (None: a v1 trace without full logits).
    pub lse: Option<f64>,
    /// The whole row, when the trace has it.
    pub full: Option<&'a [f32]>,
}

/// How our distribution at one position compares with the oracle's.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct PositionStat {
    /// KL(oracle ‖ ours) in nats (None when the trace cannot give it).
    pub kld: Option<f64>,
    /// The oracle's probability mass outside its top-k (0 with a full row).
    pub tail_mass: f64,
    /// Whether our top-1 is the oracle's.
    pub agree: bool,
    /// Oracle top-1 minus top-2 logit.
    pub margin: f64,
    /// Our logit error on the oracle's top-k tokens, their common shift removed
    /// (softmax ignores it): the RMS of `(ours − oracle) − mean`.
    pub noise: f64,
    /// Cosine of the two full rows (None without the oracle's full row).
    pub logits_cos: Option<f64>,
}

/// The RMS of `d` about its mean (0 for an empty slice): a logit error without the
/// common shift, which softmax ignores.
pub fn rms_about_mean(d: &[f64]) -> f64 {
    let n = d.len().max(1) as f64;
    let mean = d.iter().sum::<f64>() / n;
    (d.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n).sqrt()
}

/// log Σ exp(x), in f64.
pub fn log_sum_exp(row: &[f32]) -> f64 {
    let m = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
    if !m.is_finite() {
        return m;
    }
    m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln()
}

/// Compares our full logits row with the oracle's record of the same position.
pub fn position(ours: &[f32], oracle: &OracleRow<'_>) -> PositionStat {
    let (top1, _) = crate::tokens::top2(ours);
    let v = oracle.top_values;
    let margin = v[0] as f64 - v.get(1).map_or(f64::NEG_INFINITY, |&x| x as f64);
    let ids: Vec<usize> = oracle.top_ids.iter().map(|&i| i as usize).collect();
    let in_range = ids.iter().all(|&i| i < ours.len());
    let noise = if in_range {
        let d: Vec<f64> = ids
            .iter()
            .zip(v)
            .map(|(&i, &o)| ours[i] as f64 - o as f64)
            .collect();
        rms_about_mean(&d)
    } else {
        f64::NAN
    };
    let lse_q = log_sum_exp(ours);
    let (kld, tail_mass, logits_cos) = match (oracle.full, oracle.lse) {
        (Some(full), _) if full.len() == ours.len() => (
            Some(kld_full(full, ours, lse_q)),
            0.0,
            Some(crate::compare::cosine(ours, full)),
        ),
        (_, Some(lse_p)) if in_range => {
            let (k, tail) = kld_top_k(&ids, v, lse_p, ours, lse_q);
            (Some(k), tail, None)
        }
        _ => (None, f64::NAN, None),
    };
    PositionStat {
        kld,
        tail_mass,
        agree: oracle.top_ids.first() == Some(&(top1 as i64)),
        margin,
        noise,
        logits_cos,
    }
}

/// Exact KL(p ‖ q) from two full rows.
fn kld_full(p_row: &[f32], q_row: &[f32], lse_q: f64) -> f64 {
    let lse_p = log_sum_exp(p_row);
    p_row
        .iter()
        .zip(q_row)
        .map(|(&zp, &zq)| {
            let lp = zp as f64 - lse_p;
            lp.exp() * (lp - (zq as f64 - lse_q))
        })
        .sum::<f64>()
        .at_least_zero()
}

/// KL(p ‖ q) over the oracle's top-k tokens plus one lumped tail outcome, and the
/// oracle's tail mass.
fn kld_top_k(ids: &[usize], values: &[f32], lse_p: f64, q_row: &[f32], lse_q: f64) -> (f64, f64) {
    let mut in_top = vec![false; q_row.len()];
    let mut kl = 0.0;
    let mut p_top = 0.0;
    for (&i, &zp) in ids.iter().zip(values) {
        in_top[i] = true;
        let lp = zp as f64 - lse_p;
        let lq = q_row[i] as f64 - lse_q;
        p_top += lp.exp();
        kl += lp.exp() * (lp - lq);
    }
    // Our tail summed directly: 1 − Σ top-k would lose it to cancellation.
    let q_tail: f64 = q_row
        .iter()
        .zip(&in_top)
        .filter(|(_, &t)| !t)
        .map(|(&z, _)| (z as f64 - lse_q).exp())
        .sum();
    let p_tail = (1.0 - p_top).max(0.0);
    if p_tail > 0.0 {
        kl += p_tail * (p_tail / q_tail.max(f64::MIN_POSITIVE)).ln();
    }
    (kl.at_least_zero(), p_tail)
}

/// Rounding can leave a KL a hair below 0; NaN must stay NaN (`f64::max` would turn
/// it into 0, and a NaN logit would pass).
trait NonNeg {
    fn at_least_zero(self) -> f64;
}

impl NonNeg for f64 {
    fn at_least_zero(self) -> f64 {
        if self.is_nan() {
            self
        } else {
            self.max(0.0)
        }
    }
}

/// The statistics of a set of positions.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LogitStats {
    /// Positions scored.
    pub positions: usize,
    /// Mean KL(oracle ‖ ours) (None when the trace cannot give it).
    pub kld_mean: Option<f64>,
    /// Its 99th percentile (nearest rank).
    pub kld_p99: Option<f64>,
    /// Its largest value.
    pub kld_max: Option<f64>,
    /// Where the largest is (index into the scored positions).
    pub kld_max_at: usize,
    /// Largest oracle tail mass (the lumped-tail KL's looseness).
    pub tail_mass_max: f64,
    /// Positions whose top-1 agrees.
    pub agree: usize,
    /// `agree / positions`.
    pub agreement: f64,
    /// Median of the per-position logit noise.
    pub noise: f64,
    /// Smallest logits cosine (None without full oracle rows).
    pub min_logits_cos: Option<f64>,
}

/// Summarises per-position statistics.
pub fn summarise(stats: &[PositionStat]) -> LogitStats {
    let n = stats.len();
    let klds: Option<Vec<f64>> = stats.iter().map(|s| s.kld).collect();
    let (kld_mean, kld_p99, kld_max, kld_max_at) = match klds.filter(|k| !k.is_empty()) {
        Some(k) => {
            let at = worst(&k, |x, w| x > w);
            let mean = k.iter().sum::<f64>() / k.len() as f64;
            (Some(mean), Some(percentile(&k, 0.99)), Some(k[at]), at)
        }
        None => (None, None, None, 0),
    };
    let agree = stats.iter().filter(|s| s.agree).count();
    let cos: Option<Vec<f64>> = stats.iter().map(|s| s.logits_cos).collect();
    LogitStats {
        positions: n,
        kld_mean,
        kld_p99,
        kld_max,
        kld_max_at,
        tail_mass_max: stats.iter().map(|s| s.tail_mass).fold(0.0, f64::max),
        agree,
        agreement: if n == 0 { 1.0 } else { agree as f64 / n as f64 },
        noise: median(&stats.iter().map(|s| s.noise).collect::<Vec<_>>()),
        min_logits_cos: cos
            .filter(|c| !c.is_empty())
            .map(|c| c[worst(&c, |x, w| x < w)]),
    }
}

/// Index of the worst value by `worse`; the first NaN is worst of all (it fails
/// every gate, so it must be the one shown).
fn worst(xs: &[f64], worse: impl Fn(f64, f64) -> bool) -> usize {
    let mut at = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x.is_nan() {
            return i;
        }
        if worse(x, xs[at]) {
            at = i;
        }
    }
    at
}

/// The nearest-rank percentile `q` (0..=1) of `xs`; NaN sorts last, so a NaN shows.
pub fn percentile(xs: &[f64], q: f64) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    let mut s = xs.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let rank = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len());
    s[rank - 1]
}

/// The median (the lower middle of an even count); NaN if any value is NaN.
pub fn median(xs: &[f64]) -> f64 {
    if xs.iter().any(|x| x.is_nan()) {
        return f64::NAN;
    }
    percentile(xs, 0.5)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row<'a>(
        ids: &'a [i64],
        vals: &'a [f32],
        lse: Option<f64>,
        full: Option<&'a [f32]>,
    ) -> OracleRow<'a> {
        OracleRow {
            top_ids: ids,
            top_values: vals,
            lse,
            full,
        }
    }

    #[test]
    fn identical_rows_have_zero_divergence_and_noise() {
        let z = [3.0f32, 1.0, 0.5, -2.0];
        let s = position(&z, &row(&[0, 1], &[3.0, 1.0], None, Some(&z)));
        assert!(s.kld.unwrap().abs() < 1e-15 && s.noise == 0.0 && s.agree);
        assert!((s.logits_cos.unwrap() - 1.0).abs() < 1e-12);
        assert_eq!(s.margin, 2.0);
    }

    #[test]
    fn the_exact_kl_matches_a_hand_computation() {
        let p = [0.0f32, 1.0];
        let q = [1.0f32, 0.0];
        // p = softmax(p), q = softmax(q): KL = Σ p (log p − log q) = (p1 − p0)·1.
        let e = 1f64.exp();
        let (p0, p1) = (1.0 / (1.0 + e), e / (1.0 + e));
        let want = p0 * ((p0).ln() - (p1).ln()) + p1 * ((p1).ln() - (p0).ln());
        let s = position(&q, &row(&[1, 0], &[1.0, 0.0], None, Some(&p)));
        assert!((s.kld.unwrap() - want).abs() < 1e-12, "{:?} {want}", s.kld);
        assert!(!s.agree);
    }

    #[test]
    fn the_top_k_kl_equals_the_exact_one_when_k_covers_the_row_and_bounds_it_below() {
        let p: Vec<f32> = (0..50).map(|i| ((i * 37 % 11) as f32) * 0.7).collect();
        let q: Vec<f32> = p
            .iter()
            .enumerate()
            .map(|(i, x)| x + ((i % 5) as f32 - 2.0) * 0.1)
            .collect();
        let exact = position(&q, &row(&[0, 1], &[p[0], p[1]], None, Some(&p)))
            .kld
            .unwrap();
        let mut order: Vec<usize> = (0..50).collect();
        order.sort_by(|&a, &b| p[b].total_cmp(&p[a]));
        let lse = log_sum_exp(&p);
        for k in [2, 10, 50] {
            let ids: Vec<i64> = order[..k].iter().map(|&i| i as i64).collect();
            let vals: Vec<f32> = order[..k].iter().map(|&i| p[i]).collect();
            let s = position(&q, &row(&ids, &vals, Some(lse), None));
            let kl = s.kld.unwrap();
            assert!(kl <= exact + 1e-12, "k={k}: {kl} > {exact}");
            if k == 50 {
                assert!((kl - exact).abs() < 1e-12 && s.tail_mass < 1e-12);
            } else {
                assert!(s.tail_mass > 0.0);
            }
        }
    }

    #[test]
    fn a_common_shift_is_not_noise() {
        let o = [5.0f32, 4.0, 3.0];
        let ours = [6.0f32, 5.0, 4.0];
        let s = position(&ours, &row(&[0, 1, 2], &o, Some(log_sum_exp(&o)), None));
        assert!(s.noise.abs() < 1e-12 && s.kld.unwrap().abs() < 1e-12);
        let ours = [5.5f32, 4.0, 2.5];
        assert!(
            (position(&ours, &row(&[0, 1, 2], &o, None, None)).noise - (1f64 / 6.0).sqrt()).abs()
                < 1e-9
        );
    }

    #[test]
    fn a_nan_logit_outside_the_top_k_makes_the_kl_nan() {
        let o = [5.0f32, 4.0];
        let ours = [5.0f32, 4.0, f32::NAN];
        let s = position(&ours, &row(&[0, 1], &o, Some(6.0), None));
        assert!(s.kld.unwrap().is_nan());
        assert!(summarise(&[s]).kld_mean.unwrap().is_nan());
    }

    #[test]
    fn without_lse_or_full_rows_the_kl_is_unknown() {
        let s = position(&[1.0, 0.0], &row(&[0, 1], &[1.0, 0.0], None, None));
        assert!(s.kld.is_none());
        let sum = summarise(&[s]);
        assert!(sum.kld_mean.is_none() && sum.agreement == 1.0);
    }

    #[test]
    fn summaries_take_mean_percentile_and_median() {
        let mk = |k: f64, agree: bool, noise: f64| PositionStat {
            kld: Some(k),
            tail_mass: 0.0,
            agree,
            margin: 1.0,
            noise,
            logits_cos: None,
        };
        let s: Vec<_> = (0..100)
            .map(|i| mk(i as f64, i % 4 != 0, i as f64))
            .collect();
        let sum = summarise(&s);
        assert_eq!(sum.kld_mean, Some(49.5));
        assert_eq!(sum.kld_p99, Some(98.0));
        assert_eq!((sum.kld_max, sum.kld_max_at), (Some(99.0), 99));
        assert_eq!((sum.agree, sum.agreement), (75, 0.75));
        assert_eq!(sum.noise, 49.0);
        assert!(median(&[1.0, f64::NAN]).is_nan());
    }
}
