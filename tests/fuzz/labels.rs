//! Fuzz target: the label-expression parser, [`Expr::parse`], as the lease API runs it on a
//! request's `selector`. Inputs: arbitrary text, soups of the grammar's tokens, deep nesting up
//! to and past the limits, and valid expressions printed then mutated.

use std::collections::BTreeSet;

use proptest::prelude::*;
use proptest::sample::Index;
use warmpool::labels::{self, Expr, MAX_DEPTH, MAX_EXPR_BYTES};

/// Characters that stress the tokenizer: operators' halves, quotes and escapes, line breaks,
/// control characters, Unicode whitespace and combining marks.
const NASTY: &[char] = &[
    '&', '|', '!', '<', '>', '-', '(', ')', '"', '\'', '\\', ' ', '\t', '\n', '\r', '\0', '\u{7f}',
    '\u{8}', '\u{c}', '\u{85}', '\u{a0}', '\u{200b}', '\u{2028}', '\u{301}', '\u{feff}', 'é', '語',
    '🦀', 'a', 'z', '0', '.', '_',
];

/// Pieces of the grammar, whole and broken.
const PIECES: &[&str] = &[
    "&&", "||", "!", "->", "<->", "(", ")", "&", "|", "<", ">", "-", "<-", "-<", "\"", "\\", "'",
    " ", "\n", "linux", "go", "a-b", "x->", "\"q u\"", "\"\\\"\"", "\"\\n\"", "\"\\x\"", "\"",
    "\u{0}", "é", "\u{301}", "a\u{301}", "\u{2028}", "-->", "<-->", "!!", "((", "))",
];

fn nasty_char() -> impl Strategy<Value = char> {
    prop_oneof![3 => prop::sample::select(NASTY), 1 => any::<char>()]
}

/// Arbitrary text: any characters, mostly the nasty ones.
fn text() -> impl Strategy<Value = String> {
    prop::collection::vec(nasty_char(), 0..200).prop_map(String::from_iter)
}

/// A soup of tokens and broken tokens.
fn soup() -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(PIECES), 0..60).prop_map(|v| v.concat())
}

/// Deep or long inputs around the limits: `n` copies of a piece, closed or not.
fn deep() -> impl Strategy<Value = String> {
    let open = prop::sample::select(&["(", "!", "a -> ", "!(", "a && ", "a <-> (", "\""][..]);
    (open, 0usize..6000, any::<bool>()).prop_map(|(open, n, close)| {
        let mut s = open.repeat(n);
        s.push('a');
        if close {
            s.push_str(&")".repeat(open.matches('(').count() * n));
        }
        s
    })
}

/// A label, from plain to hostile (quotes, escapes, control characters, `->`, empty).
fn atom() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-z][a-z0-9_.-]{0,8}",
        1 => prop::collection::vec(nasty_char(), 0..8).prop_map(String::from_iter),
        1 => any::<String>(),
    ]
}

/// A valid expression tree (printed, it stays inside the length and depth limits).
fn tree() -> impl Strategy<Value = Expr> {
    atom()
        .prop_map(Expr::Atom)
        .prop_recursive(6, 48, 2, |inner| {
            prop_oneof![
                inner.clone().prop_map(|e| Expr::Not(Box::new(e))),
                (inner.clone(), inner.clone()).prop_map(|(a, b)| Expr::And(a.into(), b.into())),
                (inner.clone(), inner.clone()).prop_map(|(a, b)| Expr::Or(a.into(), b.into())),
                (inner.clone(), inner.clone()).prop_map(|(a, b)| Expr::Implies(a.into(), b.into())),
                (inner.clone(), inner).prop_map(|(a, b)| Expr::Iff(a.into(), b.into())),
            ]
        })
}

/// One edit of a printed expression.
#[derive(Debug, Clone)]
enum Edit {
    Delete(Index, usize),
    Insert(Index, &'static str),
    Truncate(Index),
    Swap(Index, Index),
    Duplicate(Index, usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<Index>(), 1usize..4).prop_map(|(i, n)| Edit::Delete(i, n)),
        (any::<Index>(), prop::sample::select(PIECES)).prop_map(|(i, p)| Edit::Insert(i, p)),
        any::<Index>().prop_map(Edit::Truncate),
        (any::<Index>(), any::<Index>()).prop_map(|(a, b)| Edit::Swap(a, b)),
        (any::<Index>(), 1usize..12).prop_map(|(i, n)| Edit::Duplicate(i, n)),
    ]
}

fn apply(s: &str, edits: &[Edit]) -> String {
    let mut c: Vec<char> = s.chars().collect();
    for e in edits {
        let at = |i: &Index, len: usize| if len == 0 { 0 } else { i.index(len + 1) };
        match e {
            Edit::Delete(i, n) => {
                let a = at(i, c.len()).min(c.len());
                let b = (a + n).min(c.len());
                c.drain(a..b);
            }
            Edit::Insert(i, p) => {
                let a = at(i, c.len());
                c.splice(a..a, p.chars());
            }
            Edit::Truncate(i) => c.truncate(at(i, c.len())),
            Edit::Swap(a, b) if !c.is_empty() => {
                let (a, b) = (a.index(c.len()), b.index(c.len()));
                c.swap(a, b);
            }
            Edit::Duplicate(i, n) if !c.is_empty() => {
                let a = i.index(c.len());
                let b = (a + n).min(c.len());
                let dup: Vec<char> = c[a..b].to_vec();
                c.splice(b..b, dup);
            }
            _ => {}
        }
    }
    c.into_iter().collect()
}

/// An input for the parser: arbitrary, a token soup, deep, or a valid expression mutated.
fn input() -> impl Strategy<Value = String> {
    prop_oneof![
        2 => text(),
        3 => soup(),
        1 => deep(),
        3 => (tree(), prop::collection::vec(edit(), 1..4)).prop_map(|(e, ed)| apply(&e.to_string(), &ed)),
    ]
}

/// The properties every parse must have: a rejection is a syntax error that quotes the input
/// and points inside it; an accepted expression prints to text that parses back to the same
/// tree, which matches the same label sets.
fn check_parse(input: &str, sets: &[u64]) -> Result<(), TestCaseError> {
    match Expr::parse(input) {
        Err(e) => {
            let shown = e.to_string();
            let labels::Error::Syntax {
                expr,
                offset,
                message,
            } = &e;
            prop_assert!(!message.is_empty(), "empty message for {input:?}");
            prop_assert!(shown.contains(message.as_str()));
            prop_assert!(shown.starts_with("invalid label expression"));
            if input.len() <= MAX_EXPR_BYTES {
                prop_assert_eq!(expr, input);
                prop_assert!(
                    *offset <= input.chars().count(),
                    "offset {} past the end of {:?}",
                    offset,
                    input
                );
            } else {
                prop_assert!(message.contains("longer than"), "{shown}");
            }
        }
        Ok(e) => {
            let printed = e.to_string();
            let again = Expr::parse(&printed);
            prop_assert!(
                again.as_ref() == Ok(&e),
                "{input:?} parses to {e:?}, printed {printed:?}, which parses to {again:?}"
            );
            let atoms: Vec<&str> = e.atoms().into_iter().collect();
            for mask in sets {
                let set: BTreeSet<String> = atoms
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| mask >> (i % 64) & 1 == 1)
                    .map(|(_, a)| a.to_string())
                    .collect();
                let reparsed = again.as_ref().expect("checked above");
                prop_assert_eq!(e.matches(&set), reparsed.matches(&set));
            }
        }
    }
    Ok(())
}

#[test]
fn labels_arbitrary_and_mutated_inputs() {
    let sets = prop::collection::vec(any::<u64>(), 4);
    crate::check("labels: inputs", file!(), (input(), sets), |(s, sets)| {
        check_parse(&s, &sets)
    });
}

#[test]
fn labels_valid_trees_round_trip() {
    let sets = prop::collection::vec(any::<u64>(), 4);
    crate::check("labels: trees", file!(), (tree(), sets), |(e, sets)| {
        let printed = e.to_string();
        prop_assert!(printed.len() <= MAX_EXPR_BYTES);
        let parsed = Expr::parse(&printed);
        prop_assert!(
            parsed.as_ref() == Ok(&e),
            "{e:?} printed as {printed:?} parses to {parsed:?}"
        );
        check_parse(&printed, &sets)
    });
}

#[test]
fn labels_nesting_is_bounded() {
    let kind = prop::sample::select(&["(", "!", "a -> ", "!("][..]);
    crate::check(
        "labels: nesting",
        file!(),
        (kind, 0usize..3000),
        |(open, n)| {
            let closes = open.matches('(').count() * n;
            let s = open.repeat(n) + "a" + &")".repeat(closes);
            // Every piece above opens one level (`!(` two).
            let depth = n * open.matches(['(', '!', '>']).count();
            match Expr::parse(&s) {
                Ok(e) => {
                    prop_assert!(depth <= MAX_DEPTH, "depth {depth} accepted");
                    check_parse(&s, &[0, u64::MAX])?;
                    drop(e);
                }
                Err(e) => {
                    let m = e.to_string();
                    prop_assert!(depth > MAX_DEPTH, "depth {depth} refused: {m}");
                    prop_assert!(
                        m.contains("nested deeper") || m.contains("longer than"),
                        "{m}"
                    );
                }
            }
            Ok(())
        },
    );
}
