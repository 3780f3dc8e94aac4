//! Rough lookup cost of the path matcher on a bookstore-sized table.
//! Run: `cargo run --release -p portico-config --example matcher_bench`

use portico_config::PathMatcherBuilder;
use std::time::Instant;

fn main() {
    let mut b = PathMatcherBuilder::new();
    let mut n = 0;
    for r in 0..20 {
        for (m, t) in [
            ("GET", "/v1/res{r}"),
            ("POST", "/v1/res{r}"),
            ("GET", "/v1/res{r}/{id}"),
            ("DELETE", "/v1/res{r}/{id}"),
            ("GET", "/v1/res{r}/{id}/children/{child}"),
            ("POST", "/v1/res{r}/{id}:merge"),
        ] {
            let t = t.replace("{r}", &r.to_string());
            b.register(m, &t, n).expect("valid template");
            n += 1;
        }
    }
    b.register("*", "/**", n).expect("valid template");
    let m = b.build();
    let targets = [
        ("GET", "/v1/res7"),
        ("GET", "/v1/res13/abc123/children/x9?key=K"),
        ("POST", "/v1/res3/abc:merge"),
        ("PATCH", "/unknown/path/falls/through"),
    ];
    for (method, target) in targets {
        let iters = 2_000_000u32;
        let start = Instant::now();
        let mut hits = 0u32;
        for _ in 0..iters {
            if std::hint::black_box(&m)
                .lookup(std::hint::black_box(method), std::hint::black_box(target))
                .is_some()
            {
                hits += 1;
            }
        }
        let ns = start.elapsed().as_nanos() as f64 / f64::from(iters);
        println!("{method:6} {target:40} {ns:7.1} ns/lookup (hits {hits})");
    }
    println!("{} rules registered", n + 1);
}
