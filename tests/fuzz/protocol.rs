//! Fuzz target: the WebSocket protocol decoder, as the hub (`AgentMessage`, output frames), the
//! agent (`HubMessage`, stdin frames), the exec socket (`ClientMessage`, then
//! [`ExecSpec::validate`]) and `warmpool run` (`ServerMessage`) run it: `serde_json::from_str`
//! on the message types of [`warmpool::protocol`] and [`decode_output`]. Inputs: arbitrary text
//! and bytes, and valid messages of every type with fields dropped, retyped, huge, nested deep,
//! then printed and cut or spliced.

use std::fmt::Debug;
use std::path::{Component, Path};

use proptest::prelude::*;
use proptest::sample::Index;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};
use warmpool::protocol::{
    AgentMessage, ClientMessage, FrameError, HubMessage, OUTPUT_HEADER_BYTES, ServerMessage,
    Stream, decode_output, encode_output,
};

type Field = (&'static str, BoxedStrategy<Value>);

fn u64v() -> BoxedStrategy<Value> {
    prop_oneof![0u64..10, any::<u64>()]
        .prop_map(Value::from)
        .boxed()
}
fn u32v() -> BoxedStrategy<Value> {
    any::<u32>().prop_map(Value::from).boxed()
}
/// Mostly in range for a `u16`, sometimes not.
fn u16v() -> BoxedStrategy<Value> {
    prop_oneof![4 => any::<u16>().prop_map(Value::from), 1 => u32v()].boxed()
}
fn i32v() -> BoxedStrategy<Value> {
    any::<i32>().prop_map(Value::from).boxed()
}
fn boolv() -> BoxedStrategy<Value> {
    any::<bool>().prop_map(Value::from).boxed()
}
fn strv() -> BoxedStrategy<Value> {
    prop_oneof!["[a-z0-9-]{0,12}", any::<String>()]
        .prop_map(Value::from)
        .boxed()
}
fn strs() -> BoxedStrategy<Value> {
    prop::collection::vec(strv(), 0..4)
        .prop_map(Value::from)
        .boxed()
}
fn health() -> BoxedStrategy<Value> {
    (any::<u64>(), any::<u32>())
        .prop_map(|(w, l)| json!({"workspaceBytes": w, "leftoverProcesses": l}))
        .boxed()
}
fn tty() -> BoxedStrategy<Value> {
    (any::<u16>(), any::<u16>())
        .prop_map(|(r, c)| json!({"rows": r, "cols": c}))
        .boxed()
}
fn dur() -> BoxedStrategy<Value> {
    prop_oneof![
        prop::sample::select(&["5m", "1s", "250ms", "18446744073709551615", "soon"][..])
            .prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
    ]
    .boxed()
}

/// An object of `fields`, each present with probability 15/16.
fn obj(fields: Vec<Field>) -> BoxedStrategy<Value> {
    let n = fields.len();
    let (names, values): (Vec<_>, Vec<_>) = fields.into_iter().unzip();
    (
        values,
        prop::collection::vec(prop::bool::weighted(0.9375), n),
    )
        .prop_map(move |(vals, keep)| {
            let mut m = Map::new();
            for ((k, v), keep) in names.iter().zip(vals).zip(keep) {
                if keep {
                    m.insert(k.to_string(), v);
                }
            }
            Value::Object(m)
        })
        .boxed()
}

/// A message of the given `type` with the given fields.
fn msg(ty: &'static str, mut fields: Vec<Field>) -> BoxedStrategy<Value> {
    fields.insert(0, ("type", Just(Value::from(ty)).boxed()));
    obj(fields)
}

fn exec_spec() -> Vec<Field> {
    let env = prop::collection::btree_map("[A-Z_]{1,6}|.{0,4}", ".{0,6}", 0..3)
        .prop_map(|m| json!(m))
        .boxed();
    let cwd = prop::collection::vec(
        prop::sample::select(&["a", "..", ".", "", "/", "b/..", "é", "\u{0}"][..]),
        0..6,
    )
    .prop_map(|v| Value::from(v.join("/")))
    .boxed();
    vec![
        ("argv", strs()),
        ("script", strv()),
        ("env", env),
        ("cwd", cwd),
        ("timeoutMs", u64v()),
        ("stdin", boolv()),
        ("tty", tty()),
    ]
}

fn exit_status() -> Vec<Field> {
    vec![
        ("code", i32v()),
        ("signal", i32v()),
        ("timedOut", boolv()),
        ("cancelled", boolv()),
        ("error", strv()),
    ]
}

fn hook_result() -> BoxedStrategy<Value> {
    obj(vec![
        (
            "hook",
            prop::sample::select(&["cleanup", "health", "other"][..])
                .prop_map(Value::from)
                .boxed(),
        ),
        ("exitCode", i32v()),
        ("signal", i32v()),
        ("timedOut", boolv()),
        ("error", strv()),
        ("durationMs", u64v()),
        ("stdoutBytes", u64v()),
        ("stderrBytes", u64v()),
        ("stdout", strv()),
        ("stderr", strv()),
    ])
}

fn agent_message() -> BoxedStrategy<Value> {
    let exec_report = obj(vec![
        ("execId", u64v()),
        ("lease", strv()),
        ("running", boolv()),
        ("first", u64v()),
        ("next", u64v()),
    ]);
    prop_oneof![
        msg(
            "hello",
            vec![
                ("protocol", u32v()),
                ("agentId", strv()),
                ("pool", strv()),
                ("token", strv()),
                ("labels", strs()),
                ("lease", strv()),
                ("leaseToken", strv()),
                ("uses", u32v()),
                ("health", health()),
                (
                    "execs",
                    prop::collection::vec(exec_report, 0..3)
                        .prop_map(Value::from)
                        .boxed()
                ),
            ]
        ),
        msg("heartbeat", vec![("health", health())]),
        msg("exit", [vec![("execId", u64v())], exit_status()].concat()),
        msg(
            "attached",
            vec![
                ("execId", u64v()),
                ("offset", u64v()),
                ("dropped", u64v()),
                ("error", strv()),
            ]
        ),
        msg(
            "ready",
            vec![
                ("lease", strv()),
                ("health", health()),
                (
                    "hooks",
                    prop::collection::vec(hook_result(), 0..3)
                        .prop_map(Value::from)
                        .boxed()
                ),
            ]
        ),
    ]
    .boxed()
}

fn hub_message() -> BoxedStrategy<Value> {
    let hook = |extra: bool| {
        let mut f = vec![("command", strs()), ("timeout", dur())];
        if extra {
            f.push(("maxOutputBytes", u64v()));
        }
        obj(f)
    };
    let hooks = obj(vec![("cleanup", hook(false)), ("health", hook(true))]);
    prop_oneof![
        msg(
            "welcome",
            vec![
                ("protocol", u32v()),
                ("agentId", strv()),
                ("heartbeatIntervalMs", u64v()),
                ("maxFrameBytes", u64v()),
            ]
        ),
        msg("heartbeat", vec![]),
        msg("exec", [vec![("execId", u64v())], exec_spec()].concat()),
        msg("attach", vec![("execId", u64v()), ("offset", u64v())]),
        msg(
            "resize",
            vec![("execId", u64v()), ("rows", u16v()), ("cols", u16v())]
        ),
        msg("cancel", vec![("execId", u64v())]),
        msg("leased", vec![("lease", strv()), ("leaseToken", strv())]),
        msg("release", vec![("lease", strv()), ("hooks", hooks)]),
        msg("drain", vec![("reason", strv())]),
    ]
    .boxed()
}

fn client_message() -> BoxedStrategy<Value> {
    prop_oneof![
        msg("exec", exec_spec()),
        msg("attach", vec![("execId", u64v()), ("offset", u64v())]),
        msg("resize", vec![("rows", u16v()), ("cols", u16v())]),
        msg("cancel", vec![]),
    ]
    .boxed()
}

fn server_message() -> BoxedStrategy<Value> {
    prop_oneof![
        msg("started", vec![("execId", u64v()), ("agent", strv())]),
        msg(
            "attached",
            vec![
                ("execId", u64v()),
                ("agent", strv()),
                ("offset", u64v()),
                ("dropped", u64v()),
            ]
        ),
        msg("dropped", vec![("execId", u64v()), ("bytes", u64v())]),
        msg("exit", exit_status()),
        msg("error", vec![("code", strv()), ("message", strv())]),
    ]
    .boxed()
}

/// A JSON value of any type, or nested deeper than a decoder should recurse.
fn hostile() -> BoxedStrategy<Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        boolv(),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        prop::sample::select(&[-1.0, 0.5, 1e300, -0.0, 4294967296.0][..]).prop_map(Value::from),
        strv(),
        prop::sample::select(&["hello", "exec", "exit", "", "HELLO"][..]).prop_map(Value::from),
    ];
    prop_oneof![
        8 => leaf.prop_recursive(3, 16, 3, |inner| prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(Value::from),
            prop::collection::btree_map("[a-zA-Z]{1,9}", inner, 0..3)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]),
        1 => (1usize..300).prop_map(|n| (0..n).fold(Value::Null, |v, _| Value::Array(vec![v]))),
    ]
    .boxed()
}

/// Keys the messages use, to retype or add.
const KEYS: &[&str] = &[
    "type",
    "protocol",
    "agentId",
    "pool",
    "token",
    "labels",
    "lease",
    "leaseToken",
    "uses",
    "health",
    "execs",
    "execId",
    "code",
    "signal",
    "offset",
    "dropped",
    "error",
    "hooks",
    "argv",
    "script",
    "env",
    "cwd",
    "timeoutMs",
    "stdin",
    "tty",
    "rows",
    "cols",
    "agent",
    "bytes",
];

/// Pieces spliced into the printed text: huge numbers, escapes, duplicate keys, broken JSON.
const SPLICES: &[&str] = &[
    "18446744073709551616",
    "-1",
    "1e400",
    "-0",
    "0.5",
    "\"\\ud800\"",
    "\\u0000",
    "\\ud83e",
    ",\"type\":\"exec\"",
    ",\"execId\":1",
    ",\"type\":\"hello\"",
    "{",
    "}",
    "[",
    "]",
    ",",
    ":",
    "\"",
    "null",
    "é",
    "\u{0}",
    "\u{feff}",
];

#[derive(Debug, Clone)]
enum Mutation {
    Drop(Index),
    Set(&'static str, Value),
    Splice(Index, usize, &'static str),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        any::<Index>().prop_map(Mutation::Drop),
        (prop::sample::select(KEYS), hostile()).prop_map(|(k, v)| Mutation::Set(k, v)),
        (any::<Index>(), 0usize..6, prop::sample::select(SPLICES))
            .prop_map(|(i, n, p)| Mutation::Splice(i, n, p)),
    ]
}

fn mutated(v: Value, muts: &[Mutation]) -> String {
    let mut v = v;
    for m in muts {
        if let (Value::Object(o), Mutation::Drop(i)) = (&mut v, m)
            && !o.is_empty()
        {
            let k = o.keys().nth(i.index(o.len())).cloned().expect("in range");
            o.remove(&k);
        }
        if let (Value::Object(o), Mutation::Set(k, x)) = (&mut v, m) {
            o.insert(k.to_string(), x.clone());
        }
    }
    let mut text: Vec<char> = v.to_string().chars().collect();
    for m in muts {
        if let Mutation::Splice(i, cut, piece) = m {
            let a = i.index(text.len() + 1);
            let b = (a + cut).min(text.len());
            text.splice(a..b, piece.chars());
        }
    }
    text.into_iter().collect()
}

/// A text frame: a valid message of any type, mutated; or arbitrary text.
fn text() -> impl Strategy<Value = String> {
    let any_msg = prop_oneof![
        agent_message(),
        hub_message(),
        client_message(),
        server_message()
    ];
    prop_oneof![
        // A third of the messages stay valid (but for a missing field), to reach the checks on
        // what decodes.
        8 => (any_msg, prop_oneof![1 => Just(vec![]), 2 => prop::collection::vec(mutation(), 1..4)])
            .prop_map(|(v, m)| mutated(v, &m)),
        1 => ".{0,100}",
        1 => prop::collection::vec(prop::sample::select(SPLICES), 0..30).prop_map(|v| v.concat()),
    ]
}

/// Decodes `text` as `T`: a rejection has a message; what decodes re-encodes to JSON that
/// decodes to the same message.
fn decodes<T>(text: &str) -> Result<Option<T>, TestCaseError>
where
    T: DeserializeOwned + Serialize + PartialEq + Debug,
{
    match serde_json::from_str::<T>(text) {
        Err(e) => {
            prop_assert!(!e.to_string().is_empty());
            Ok(None)
        }
        Ok(m) => {
            let printed = serde_json::to_string(&m).expect("a decoded message encodes");
            let again = serde_json::from_str::<T>(&printed);
            prop_assert!(
                again.as_ref().ok() == Some(&m),
                "{text} decodes to {m:?}, which encodes to {printed}, which decodes to {again:?}"
            );
            Ok(Some(m))
        }
    }
}

/// True when `cwd` joined to a workspace stays inside it, resolving `..` lexically.
fn stays_inside(cwd: &str) -> bool {
    let mut depth = 0i64;
    for c in Path::new(cwd).components() {
        match c {
            Component::Normal(_) => depth += 1,
            Component::ParentDir => depth -= 1,
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => return false,
        }
        if depth < 0 {
            return false;
        }
    }
    true
}

#[test]
fn protocol_text_frames() {
    crate::check("protocol: text frames", file!(), text(), |t| {
        decodes::<AgentMessage>(&t)?;
        decodes::<HubMessage>(&t)?;
        decodes::<ServerMessage>(&t)?;
        if let Some(ClientMessage::Exec(spec)) = decodes::<ClientMessage>(&t)? {
            match spec.validate() {
                Err(why) => prop_assert!(!why.is_empty()),
                Ok(()) => {
                    prop_assert!(spec.argv.is_some() != spec.script.is_some());
                    if let Some(cwd) = &spec.cwd {
                        prop_assert!(stays_inside(cwd), "cwd {cwd:?} accepted");
                    }
                }
            }
        }
        Ok(())
    });
}

#[test]
fn protocol_binary_frames() {
    let frame = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..40),
        (
            0u8..4,
            any::<u64>(),
            prop::collection::vec(any::<u8>(), 0..40)
        )
            .prop_map(|(s, id, d)| {
                let mut f = vec![s];
                f.extend_from_slice(&id.to_be_bytes());
                f.extend(d);
                f
            }),
    ];
    crate::check("protocol: binary frames", file!(), frame, |f| {
        match decode_output(&f) {
            Ok((stream, id, data)) => {
                prop_assert_eq!(encode_output(stream, id, data), f.clone());
                prop_assert!(matches!(
                    stream,
                    Stream::Stdin | Stream::Stdout | Stream::Stderr
                ));
            }
            Err(e) => {
                prop_assert!(!e.to_string().is_empty());
                match e {
                    FrameError::Short(n) => {
                        prop_assert!(n == f.len() && n < OUTPUT_HEADER_BYTES)
                    }
                    FrameError::UnknownStream(b) => prop_assert!(b == f[0] && b > 2),
                }
            }
        }
        Ok(())
    });
}
