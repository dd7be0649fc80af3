//! Fuzz pass over the three parsers that read untrusted input: the WebSocket protocol decoder
//! (`fuzz::protocol`), the label-expression parser (`fuzz::labels`) and the pools-file parser
//! (`fuzz::pools`). Each property calls the function the service itself runs on that input.
//!
//! Bounded in time. A plain `cargo test` runs a quick pass of [`QUICK_CASES`] cases per
//! property; `WARMPOOL_FUZZ_SECONDS=N cargo test --test fuzz` runs every property for N seconds
//! instead (batches of fresh random cases until the time is up; `.ci/run` does this). A failure
//! prints the shrunk, minimal failing input, and proptest saves its seed next to the module
//! (`tests/fuzz/<module>.proptest-regressions`): commit that file so the case is replayed first
//! on every later run.

mod fuzz {
    pub mod labels;
    pub mod pools;
    pub mod protocol;
}

use std::fmt::Debug;
use std::time::{Duration, Instant};

use proptest::strategy::Strategy;
use proptest::test_runner::{
    Config, FileFailurePersistence, TestCaseResult, TestError, TestRunner,
};

/// Cases per property in the quick pass (a plain `cargo test`).
pub const QUICK_CASES: u32 = 256;
/// Cases per batch in a timed pass; the time is checked between batches.
const BATCH_CASES: u32 = 256;

/// How long each property runs: `WARMPOOL_FUZZ_SECONDS`, or None for the quick pass.
fn budget() -> Option<Duration> {
    let v = std::env::var("WARMPOOL_FUZZ_SECONDS").ok()?;
    let secs: f64 = v
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("WARMPOOL_FUZZ_SECONDS={v:?} is not a number of seconds"));
    (secs > 0.0).then(|| Duration::from_secs_f64(secs))
}

/// Runs one property: the quick pass, or batches until `WARMPOOL_FUZZ_SECONDS` is spent.
/// `source` is the caller's `file!()`: failures are saved beside it and replayed first.
pub fn check<S>(
    name: &str,
    source: &'static str,
    strategy: S,
    test: impl Fn(S::Value) -> TestCaseResult,
) where
    S: Strategy,
    S::Value: Debug,
{
    let budget = budget();
    let config = |cases| Config {
        cases,
        source_file: Some(source),
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        // A generated case may be rejected by a filter; never give up for that.
        max_global_rejects: u32::MAX,
        ..Config::default()
    };
    let started = Instant::now();
    let mut cases = 0u64;
    loop {
        let batch = if budget.is_some() {
            BATCH_CASES
        } else {
            QUICK_CASES
        };
        let mut runner = TestRunner::new(config(batch));
        match runner.run(&strategy, &test) {
            Ok(()) => {}
            Err(TestError::Fail(why, input)) => {
                panic!("fuzz property {name} failed: {why}\nminimal failing input: {input:#?}")
            }
            Err(TestError::Abort(why)) => panic!("fuzz property {name} aborted: {why}"),
        }
        cases += u64::from(batch);
        match budget {
            Some(b) if started.elapsed() < b => continue,
            _ => break,
        }
    }
    eprintln!(
        "fuzz {name}: {cases} cases in {:.1}s",
        started.elapsed().as_secs_f64()
    );
}
