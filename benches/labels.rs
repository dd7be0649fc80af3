//! Label expressions: parse, match against one label set and against 100 label sets, and the
//! engine's match of one lease against 10,000 idle agents in 100 label sets (`find_agent`,
//! with the selector's pools cached and uncached).

use std::collections::BTreeSet;
use std::hint::black_box;
use std::time::Instant;

use criterion::{Criterion, criterion_group, criterion_main};
use warmpool::labels::Expr;

mod common;

const SELECTOR: &str = "linux && (tool-42 || tool-43) && !windows && team-2";

fn labels(c: &mut Criterion) {
    c.bench_function("parse selector", |b| {
        b.iter(|| Expr::parse(black_box(SELECTOR)).unwrap())
    });
    let sets: Vec<BTreeSet<String>> = (0..common::SETS)
        .map(|s| common::labels_of(s).into_iter().collect())
        .collect();
    let expr = Expr::parse(SELECTOR).unwrap();
    c.bench_function("match one label set", |b| {
        b.iter(|| black_box(&expr).matches(black_box(&sets[42])))
    });
    c.bench_function("match 100 label sets (naive scan)", |b| {
        b.iter(|| sets.iter().filter(|s| expr.matches(s)).count())
    });

    let now = Instant::now();
    let mut e = common::engine_10k(now);
    let req = common::request(SELECTOR);
    assert!(e.find_agent(&req, now).is_some());
    c.bench_function(
        "match one lease against 10,000 agents (pools cached)",
        |b| b.iter(|| e.find_agent(black_box(&req), now)),
    );
    let mut n = 0u64;
    c.bench_function(
        "match one lease against 10,000 agents (new selector)",
        |b| {
            b.iter(|| {
                n += 1;
                // A selector text never seen before: the 100 label sets are matched again.
                let mut r = req.clone();
                r.selector_text = format!("{SELECTOR} && !x{n}");
                e.find_agent(&r, now)
            })
        },
    );
}

criterion_group!(benches, labels);
criterion_main!(benches);
