//! `make bench-q8`: the int8 × int8 (W8A8, Q8_0-style) product and the dequantized
//! f32 GEMM beside the engine's own prefill linear, on random data of the 8B prefill
//! shape (or the `ROWSxCOLSxTOKENS` shapes given as arguments), on every core.
//! Run with `cargo bench -p q3vl-engine --features q8-bench --bench q8 [-- SHAPE...]`.

use q3vl_engine::bench::q8::q8_comparison;

fn main() {
    let shapes: Vec<(usize, usize, usize)> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--")) // cargo bench passes --bench
        .map(|a| {
            let d: Vec<usize> = a
                .split('x')
                .map(|n| n.parse().expect("a shape is ROWSxCOLSxTOKENS"))
                .collect();
            let [r, c, t] = d[..] else {
                panic!("a shape is ROWSxCOLSxTOKENS, got {a}")
            };
            (r, c, t)
        })
        .collect();
    println!("threads {}", rayon::current_num_threads());
    for (name, r) in q8_comparison(&shapes, 7) {
        let per_cpu = r
            .g_per_cpu_s
            .map_or_else(|| "n/a".to_string(), |v| format!("{v:.1}"));
        let unit = if name.starts_with("w8a8") {
            "GOPS int8"
        } else {
            "GFLOP/s"
        };
        println!(
            "kernel {name:<40} {:.1} {unit} ({:.1} ms; {per_cpu} per CPU-s)",
            r.g_per_s, r.ms
        );
    }
}
