//! Tests of pool specs: durations, pools-file loading, one message per bad field.

use super::*;

#[test]
fn durations() {
    assert_eq!(Dur::parse("30s").unwrap(), Dur::secs(30));
    assert_eq!(Dur::parse("10m").unwrap(), Dur::secs(600));
    assert_eq!(Dur::parse("1h30m").unwrap(), Dur::secs(5400));
    assert_eq!(Dur::parse("250ms").unwrap().0, Duration::from_millis(250));
    assert_eq!(Dur::parse("45").unwrap(), Dur::secs(45));
    assert!(Dur::parse("soon").unwrap_err().contains("\"soon\""));
    assert_eq!(Dur::secs(600).to_string(), "10m");
}

#[test]
fn loads_a_full_file() {
    let yaml = r#"
pools:
  - name: go
    labels: [linux, go]
    minIdle: 3
    maxTotal: 8
    maxUses: 5
    idleTtl: 5m
    maxAge: 2h
    connectTimeout: 30s
    provisioning: {perSecond: 2, burst: 4, maxConcurrent: 3}
    health: {maxWorkspaceBytes: 1000, maxLeftoverProcesses: 1}
  - name: tiny
"#;
    let defs = parse_pools(yaml, "pools.yaml").unwrap();
    assert_eq!(defs.len(), 2);
    let go = &defs[0].spec;
    assert_eq!(go.min_idle, 3);
    assert_eq!(go.idle_ttl, Dur::secs(300));
    assert_eq!(go.provisioning.max_concurrent, 3);
    assert_eq!(go.health.max_leftover_processes, 1);
    assert_eq!(defs[1].spec, PoolSpec::default());
}

#[test]
fn one_message_per_bad_field() {
    let yaml = r#"
pools:
  - name: Bad_Name
    labels: ["has space"]
    minIdle: many
    maxTotal: 0
    idleTtl: soon
    provisioning: {perSecond: 2, burts: 4}
    colour: blue
"#;
    let err = parse_pools(yaml, "pools.yaml").unwrap_err().to_string();
    for want in [
        "pools[0].name: \"Bad_Name\" is not a valid pool name",
        "pools[0].minIdle:",
        "pools[0].idleTtl:",
        "\"soon\" is not a duration",
        "pools[0].provisioning.burts: unknown field (did you mean `burst`?)",
        "pools[0].colour: unknown field",
    ] {
        assert!(err.contains(want), "missing {want:?} in:\n{err}");
    }
    // Semantic checks run once types are right.
    let yaml = "pools:\n  - name: p\n    minIdle: 5\n    maxTotal: 2\n    labels: [\"a b\"]\n    connectTimeout: 0s\n    provisioning: {perSecond: 0, burst: 0, maxConcurrent: 0}\n";
    let err = parse_pools(yaml, "f").unwrap_err().to_string();
    for want in [
        "minIdle: 5 is above maxTotal 2",
        "labels[0]",
        "connectTimeout: must be longer than 0s",
        "perSecond",
        "burst",
        "maxConcurrent",
    ] {
        assert!(err.contains(want), "missing {want:?} in:\n{err}");
    }
}

#[test]
fn rejects_duplicates_and_shape_errors() {
    let err = parse_pools("pools:\n  - name: a\n  - name: a\n", "f").unwrap_err();
    assert!(err.to_string().contains("defined twice"));
    assert!(
        parse_pools("[1,2]", "f")
            .unwrap_err()
            .to_string()
            .contains("mapping")
    );
    assert!(
        parse_pools("pools: []", "f")
            .unwrap_err()
            .to_string()
            .contains("empty")
    );
    assert!(
        parse_pools("pools: [", "f")
            .unwrap_err()
            .to_string()
            .contains("not valid YAML")
    );
}

/// Found by the fuzz pass (tests/fuzz/pools.rs): this file loaded, and the engine panicked
/// ("overflow when adding durations") adding the hooks' timeouts to its cleanup deadline.
#[test]
fn absurd_durations_are_refused() {
    let yaml = "pools:\n- name: a0-0\n  hooks:\n    cleanup:\n      command:\n      - a\n    health:\n      command:\n      - a\n      timeout: 18446744073709551615\n  external: true\n";
    let err = parse_pools(yaml, "f").unwrap_err().to_string();
    assert!(err.contains("pools[0].hooks.health.timeout:"), "{err}");
    assert!(err.contains("longer than 100 years"), "{err}");
    for (field, value) in [
        ("idleTtl", "18446744073709551615"),
        ("maxAge", "500y"),
        ("connectTimeout", "101y"),
    ] {
        let yaml = format!("pools:\n- name: p\n  {field}: {value}\n");
        let err = parse_pools(&yaml, "f").unwrap_err().to_string();
        assert!(err.contains(&format!("pools[0].{field}:")), "{err}");
        assert!(err.contains("longer than 100 years"), "{err}");
    }
    assert_eq!(Dur::parse("100y").unwrap(), Dur::MAX);
    assert!(Dur::parse("3155760001").is_err());
}

/// Found by the fuzz pass: a duration of the wrong type was refused with serde's
/// "data did not match any variant of untagged enum Raw", which says nothing of what to write.
#[test]
fn wrong_typed_durations_say_what_a_duration_is() {
    for value in ["-5", "1.5", "[a]", "true", "{a: 1}", "~"] {
        let yaml = format!("pools:\n- name: p\n  idleTtl: {value}\n");
        let err = parse_pools(&yaml, "f").unwrap_err().to_string();
        assert!(
            err.contains("pools[0].idleTtl:") && err.contains("a duration like 30s"),
            "{value}: {err}"
        );
        assert!(!err.contains("untagged"), "{value}: {err}");
    }
}

#[test]
fn builtin_default_is_valid() {
    let d = PoolSpec::builtin_default();
    assert!(d.validate("").is_empty());
    assert_eq!(d.min_idle, 2);
    assert!(d.labels.contains(&std::env::consts::ARCH.to_string()));
}

/// A valid-looking spec with a billion agents would make one reconcile pass allocate that many:
/// sizes and provisioning rates have upper bounds, each named.
#[test]
fn absurd_sizes_and_rates_are_refused() {
    let yaml = "pools:\n- name: p\n  minIdle: 1000000000\n  maxTotal: 1000000000\n  provisioning:\n    perSecond: 1e9\n    burst: 1000000000\n    maxConcurrent: 1000000000\n";
    let err = parse_pools(yaml, "f").unwrap_err().to_string();
    for field in [
        "pools[0].maxTotal: 1000000000 is above the limit of 100000",
        "pools[0].provisioning.perSecond: 1000000000 is above the limit of 1000",
        "pools[0].provisioning.burst: 1000000000 is above the limit of 1000",
        "pools[0].provisioning.maxConcurrent: 1000000000 is above the limit of 1000",
    ] {
        assert!(err.contains(field), "{field}: {err}");
    }
    let ok = "pools:\n- name: p\n  minIdle: 0\n  maxTotal: 100000\n  provisioning:\n    perSecond: 1000\n    burst: 1000\n    maxConcurrent: 1000\n";
    parse_pools(ok, "f").expect("the limits themselves are allowed");
}
