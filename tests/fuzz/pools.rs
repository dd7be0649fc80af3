//! Fuzz target: the pools-file parser, [`spec::parse_pools`], as `serve --pools` runs it (and
//! then configures each pool's provisioning pace from what it returned). Inputs: arbitrary
//! text, YAML alias bombs, and valid pools files with fields dropped, retyped, set to huge or
//! odd values, nested deep, then printed and cut or spliced.

use proptest::prelude::*;
use proptest::sample::Index;
use serde_json::{Map, Value};
use warmpool::engine::Pacer;
use warmpool::pacer::GovernorPacer;
use warmpool::spec::{self, PoolDef};

/// Keys a pool mapping may have, plus one it may not.
const KEYS: &[&str] = &[
    "name",
    "labels",
    "minIdle",
    "maxTotal",
    "maxUses",
    "idleTtl",
    "maxAge",
    "connectTimeout",
    "provisioning",
    "health",
    "hooks",
    "external",
    "agentCommand",
    "jenkins",
    "colour",
];

/// Nested fields, as paths from the pool mapping.
const NESTED: &[&[&str]] = &[
    &["provisioning", "perSecond"],
    &["provisioning", "burst"],
    &["provisioning", "maxConcurrent"],
    &["health", "maxWorkspaceBytes"],
    &["health", "maxLeftoverProcesses"],
    &["hooks", "cleanup"],
    &["hooks", "cleanup", "command"],
    &["hooks", "cleanup", "timeout"],
    &["hooks", "health", "timeout"],
    &["hooks", "health", "maxOutputBytes"],
    &["jenkins", "url"],
    &["jenkins", "labels"],
    &["jenkins", "pollInterval"],
    &["jenkins", "maxPollInterval"],
    &["jenkins", "requestsPerSecond"],
];

type Mapping = Map<String, Value>;

fn s(v: &str) -> Value {
    Value::String(v.into())
}

fn key(k: &str) -> String {
    k.into()
}

/// A duration as a pools file may write it, from ordinary to absurd.
fn duration() -> impl Strategy<Value = Value> {
    prop_oneof![
        12 => prop::sample::select(&["30s", "10m", "1h30m", "250ms", "2h", "1d", "1ns", "100y"][..]).prop_map(s),
        6 => (1u64..1_000_000).prop_map(Value::from),
        1 => prop::sample::select(&[
            "18446744073709551615", "18446744073709551615s", "584942417355y", "100000000y",
            "9999999999h", "1y", "0s", "0", "-5s", "1.5", "soon", "", "10m 10m 10m",
        ][..]).prop_map(s),
        1 => prop::sample::select(&[u64::MAX, u64::MAX / 2, 1 << 40][..]).prop_map(Value::from),
    ]
}

fn label() -> impl Strategy<Value = String> {
    prop_oneof![8 => "[a-z][a-z0-9_.-]{0,8}", 1 => any::<String>()]
}

fn command() -> impl Strategy<Value = Value> {
    prop::collection::vec(prop_oneof!["[a-z]{1,6}", any::<String>()], 1..4)
        .prop_map(|v| Value::Array(v.into_iter().map(Value::String).collect()))
}

fn hooks() -> impl Strategy<Value = Value> {
    let hook = |extra: bool| {
        (
            command(),
            prop::option::of(duration()),
            prop::option::of(any::<u64>()),
        )
            .prop_map(move |(c, t, m)| {
                let mut h = Mapping::new();
                h.insert(key("command"), c);
                if let Some(t) = t {
                    h.insert(key("timeout"), t);
                }
                if let (true, Some(m)) = (extra, m) {
                    h.insert(key("maxOutputBytes"), Value::from(m));
                }
                Value::Object(h)
            })
    };
    (prop::option::of(hook(false)), prop::option::of(hook(true))).prop_map(|(c, h)| {
        let mut m = Mapping::new();
        if let Some(c) = c {
            m.insert(key("cleanup"), c);
        }
        if let Some(h) = h {
            m.insert(key("health"), h);
        }
        Value::Object(m)
    })
}

fn jenkins() -> impl Strategy<Value = Value> {
    // Jenkins label strings split on whitespace: list items may hold some, or be empty.
    let label = prop_oneof![
        4 => label(),
        1 => prop::sample::select(&["", " ", "a b", "\tc", "d\n"][..]).prop_map(String::from),
    ];
    (
        prop::collection::vec(label, 1..4),
        any::<bool>(),
        prop::option::of(duration()),
        prop::option::of(duration()),
    )
        .prop_map(|(labels, as_list, poll, max_poll)| {
            let mut m = Mapping::new();
            m.insert(key("url"), s("http://127.0.0.1:8080/"));
            let labels = if as_list {
                Value::Array(labels.into_iter().map(Value::String).collect())
            } else {
                Value::String(labels.join(" "))
            };
            m.insert(key("labels"), labels);
            if let Some(p) = poll {
                m.insert(key("pollInterval"), p);
            }
            if let Some(p) = max_poll {
                m.insert(key("maxPollInterval"), p);
            }
            Value::Object(m)
        })
}

/// One pool, valid or close to it: a name and any subset of the other fields.
fn pool() -> impl Strategy<Value = Mapping> {
    let fields = (
        prop::collection::vec(label(), 0..4),
        (0u32..3, 3u32..20, 0u32..5),
        (duration(), duration(), duration()),
        (
            prop_oneof![
                Just(0.001f64),
                0.001f64..1e4,
                Just(1e9),
                Just(1e12),
                Just(f64::MAX)
            ],
            1u32..50,
            1u32..20,
        ),
        (any::<u64>(), any::<u32>()),
        hooks(),
        command(),
        jenkins(),
    );
    ("[a-z][a-z0-9-]{0,8}[a-z0-9]", fields, any::<u16>()).prop_map(|(name, f, keep)| {
        let (
            labels,
            (min, max, uses),
            (idle, age, connect),
            (per, burst, conc),
            health,
            hooks,
            cmd,
            jenkins,
        ) = f;
        let mut m = Mapping::new();
        m.insert(key("name"), s(&name));
        let on = |bit: u32| keep >> bit & 1 == 1;
        let mut put = |bit, k: &str, v: Value| {
            if on(bit) {
                m.insert(key(k), v);
            }
        };
        put(
            0,
            "labels",
            Value::Array(labels.into_iter().map(Value::String).collect()),
        );
        put(1, "minIdle", min.into());
        put(1, "maxTotal", max.into());
        put(2, "maxUses", uses.into());
        put(3, "idleTtl", idle);
        put(4, "maxAge", age);
        put(5, "connectTimeout", connect);
        let mut p = Mapping::new();
        p.insert(key("perSecond"), per.into());
        p.insert(key("burst"), burst.into());
        p.insert(key("maxConcurrent"), conc.into());
        put(6, "provisioning", Value::Object(p));
        let mut h = Mapping::new();
        h.insert(key("maxWorkspaceBytes"), health.0.into());
        h.insert(key("maxLeftoverProcesses"), health.1.into());
        put(7, "health", Value::Object(h));
        put(8, "hooks", hooks);
        // At most one of external, agentCommand and jenkins, as a valid file has.
        match keep >> 9 & 3 {
            1 => put(9, "external", true.into()),
            2 => put(10, "agentCommand", cmd),
            3 => put(11, "jenkins", jenkins),
            _ => {}
        }
        m
    })
}

/// A value of the wrong type, or of the right type and a hostile size or content.
fn hostile() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        prop::sample::select(&[-0.0, 1e308, -1e308, 0.5, f64::NAN, f64::INFINITY, 1e-320][..])
            .prop_map(Value::from),
        any::<String>().prop_map(Value::String),
        prop::sample::select(&["", "10m", "-1", "~", "null", "yes", "0x10", "1e400", "[a"][..])
            .prop_map(s),
    ];
    let tree = leaf.prop_recursive(4, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec((prop::sample::select(KEYS), inner), 0..4).prop_map(|kv| {
                Value::Object(kv.into_iter().map(|(k, v)| (key(k), v)).collect())
            }),
        ]
    });
    prop_oneof![
        8 => tree,
        // Nesting deeper than any parser should recurse.
        1 => (1usize..400).prop_map(|n| (0..n).fold(Value::Null, |v, _| Value::Array(vec![v]))),
    ]
}

/// A change to a valid document.
#[derive(Debug, Clone)]
enum Mutation {
    Drop(Index, Index),
    Set(Index, &'static str, Value),
    SetNested(Index, &'static [&'static str], Value),
    DropNested(Index, &'static [&'static str]),
    ReplacePool(Index, Value),
    Duplicate(Index),
    Root(Value),
    Pools(Value),
    TopLevel(String, Value),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        2 => (any::<Index>(), any::<Index>()).prop_map(|(p, k)| Mutation::Drop(p, k)),
        4 => (any::<Index>(), prop::sample::select(KEYS), hostile())
            .prop_map(|(p, k, v)| Mutation::Set(p, k, v)),
        4 => (any::<Index>(), prop::sample::select(NESTED), hostile())
            .prop_map(|(p, k, v)| Mutation::SetNested(p, k, v)),
        1 => (any::<Index>(), prop::sample::select(NESTED))
            .prop_map(|(p, k)| Mutation::DropNested(p, k)),
        1 => (any::<Index>(), hostile()).prop_map(|(p, v)| Mutation::ReplacePool(p, v)),
        1 => any::<Index>().prop_map(Mutation::Duplicate),
        1 => hostile().prop_map(Mutation::Root),
        1 => hostile().prop_map(Mutation::Pools),
        1 => (".{0,8}", hostile()).prop_map(|(k, v)| Mutation::TopLevel(k, v)),
    ]
}

fn mutate(pools: &mut Vec<Value>, root: &mut Mapping, m: &Mutation) {
    let pool = |pools: &mut Vec<Value>, i: &Index| -> Option<usize> {
        (!pools.is_empty()).then(|| i.index(pools.len()))
    };
    match m {
        Mutation::Drop(p, k) => {
            if let Some(i) = pool(pools, p)
                && let Value::Object(map) = &mut pools[i]
                && !map.is_empty()
            {
                let key = map
                    .keys()
                    .nth(k.index(map.len()))
                    .cloned()
                    .expect("in range");
                map.remove(&key);
            }
        }
        Mutation::Set(p, k, v) => {
            if let Some(i) = pool(pools, p)
                && let Value::Object(map) = &mut pools[i]
            {
                map.insert(key(k), v.clone());
            }
        }
        Mutation::SetNested(p, path, _) | Mutation::DropNested(p, path) => {
            let Some(i) = pool(pools, p) else { return };
            let mut at = &mut pools[i];
            for k in &path[..path.len() - 1] {
                let Value::Object(map) = at else { return };
                at = map
                    .entry(key(k))
                    .or_insert_with(|| Value::Object(Mapping::new()));
            }
            let Value::Object(map) = at else { return };
            let last = key(path[path.len() - 1]);
            match m {
                Mutation::SetNested(_, _, v) => {
                    map.insert(last, v.clone());
                }
                _ => {
                    map.remove(&last);
                }
            }
        }
        Mutation::ReplacePool(p, v) => {
            if let Some(i) = pool(pools, p) {
                pools[i] = v.clone();
            }
        }
        Mutation::Duplicate(p) => {
            if let Some(i) = pool(pools, p) {
                let copy = pools[i].clone();
                pools.push(copy);
            }
        }
        Mutation::Root(_) | Mutation::Pools(_) => {}
        Mutation::TopLevel(k, v) => {
            root.insert(key(k), v.clone());
        }
    }
}

/// Builds the document: `pools:` with the pools, mutated.
fn document(pools: Vec<Mapping>, muts: &[Mutation]) -> String {
    let mut list: Vec<Value> = pools
        .into_iter()
        .enumerate()
        .map(|(i, mut m)| {
            // Distinct names unless a mutation duplicates or renames them.
            if let Some(Value::String(n)) = m.get_mut("name") {
                n.push_str(&format!("-{i}"));
            }
            Value::Object(m)
        })
        .collect();
    let mut root = Mapping::new();
    for m in muts {
        mutate(&mut list, &mut root, m);
    }
    let mut pools_value = Value::Array(list);
    let mut doc = None;
    for m in muts {
        match m {
            Mutation::Root(v) => doc = Some(v.clone()),
            Mutation::Pools(v) => pools_value = v.clone(),
            _ => {}
        }
    }
    root.insert(key("pools"), pools_value);
    let doc = doc.unwrap_or(Value::Object(root));
    serde_saphyr::to_string(&doc).unwrap_or_default()
}

/// Cuts or splices the text of a document.
fn splice(text: &str, at: Index, cut: usize, insert: &str) -> String {
    let mut c: Vec<char> = text.chars().collect();
    let a = at.index(c.len() + 1);
    let b = (a + cut).min(c.len());
    c.splice(a..b, insert.chars());
    c.into_iter().collect()
}

/// An alias bomb: each level a list of `width` references to the one before.
fn alias_bomb(levels: usize, width: usize) -> String {
    let mut t = String::from("a0: &a0 [x]\n");
    for l in 1..=levels {
        let refs = vec![format!("*a{}", l - 1); width].join(", ");
        t.push_str(&format!("a{l}: &a{l} [{refs}]\n"));
    }
    t.push_str(&format!("pools:\n  - name: p\n    labels: *a{levels}\n"));
    t
}

fn input() -> impl Strategy<Value = String> {
    let valid = || prop::collection::vec(pool(), 1..4);
    // A third of the documents stay valid, to reach the checks on what loads.
    let muts = prop_oneof![1 => Just(vec![]), 2 => prop::collection::vec(mutation(), 1..4)];
    prop_oneof![
        6 => (valid(), muts).prop_map(|(p, m)| document(p, &m)),
        2 => (valid(), prop::collection::vec(mutation(), 0..2), any::<Index>(), 0usize..8,
            prop::sample::select(&["", ":", "- ", "&a ", "*a", "!!binary ", "\t", "{", "[", "'", "\"", "\n  ", "? ", "<<: ", "!t ", "é", "\u{0}"][..]))
            .prop_map(|(p, m, at, cut, ins)| splice(&document(p, &m), at, cut, ins)),
        1 => ".{0,200}",
        1 => (1usize..12, 1usize..12).prop_map(|(l, w)| alias_bomb(l, w)),
    ]
}

/// Where a problem message may point: a field of the file, or the file as a whole.
fn names_a_place(problem: &str) -> bool {
    problem.starts_with("pools")
        || problem.contains(": unknown field")
        || problem == "the file must be a mapping with a `pools` list"
}

#[test]
fn pools_files() {
    crate::check("pools: files", file!(), input(), |text| {
        match spec::parse_pools(&text, "fuzz.yaml") {
            Err(spec::Error::Invalid {
                source_name,
                problems,
            }) => {
                prop_assert_eq!(source_name, "fuzz.yaml");
                prop_assert!(!problems.is_empty());
                for p in &problems {
                    prop_assert!(
                        names_a_place(p),
                        "problem names no field: {p:?}\nin:\n{text}"
                    );
                }
            }
            Err(e) => {
                let m = e.to_string();
                prop_assert!(
                    m.contains("fuzz.yaml") && m.len() > "fuzz.yaml".len() + 30,
                    "{m}"
                );
            }
            Ok(defs) => check_valid(&defs)?,
        }
        Ok(())
    });
}

/// A file that loaded: every pool re-validates, the pools print back to a file that loads to
/// the same pools, and the service can configure every pool's provisioning pace.
fn check_valid(defs: &[PoolDef]) -> Result<(), TestCaseError> {
    prop_assert!(!defs.is_empty());
    let mut pacer = GovernorPacer::default();
    for d in defs {
        prop_assert_eq!(spec::validate_name(&d.name), None);
        prop_assert_eq!(d.spec.validate(""), Vec::<String>::new());
        pacer.configure(&d.name, &d.spec);
        let _ = d.spec.hooks.budget();
    }
    let mut root = Mapping::new();
    root.insert(
        key("pools"),
        serde_json::to_value(defs).expect("pools serialise"),
    );
    let printed = serde_saphyr::to_string(&root).expect("pools print");
    match spec::parse_pools(&printed, "printed.yaml") {
        Ok(again) => prop_assert_eq!(again, defs, "printed as:\n{}", printed),
        Err(e) => prop_assert!(
            false,
            "{defs:?}\nprinted as:\n{printed}\ndoes not load: {e}"
        ),
    }
    Ok(())
}
