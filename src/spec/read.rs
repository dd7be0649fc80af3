//! Reads a parsed YAML document into a serde type and reports every bad field, not only the first.
//!
//! serde stops at the first error. [`read`] deserializes through its own deserializer over a
//! [`Tree`] (the document as parsed, keys in file order), which knows the full path of every node
//! (`pools[0].provisioning.burst`); on an error it records one message for that field, removes
//! the field from the tree and reads again, until the rest reads. The type's own serde model
//! (field names, defaults, `deny_unknown_fields`, custom visitors like `Dur`'s) is the only
//! model: nothing here knows a field name. Pure; no I/O.

use std::fmt;

use serde::de::{self, DeserializeOwned, DeserializeSeed, Unexpected, Visitor};
use serde::{Deserialize, Deserializer};

/// A parsed YAML document: what a pools file holds, before it is read into a type.
#[derive(Debug, Clone, PartialEq)]
pub enum Tree {
    /// `~`, `null` or nothing.
    Null,
    /// `true` / `false`.
    Bool(bool),
    /// A whole number that fits an `u64`.
    UInt(u64),
    /// A negative whole number.
    Int(i64),
    /// Any other number.
    Float(f64),
    /// A string.
    Str(String),
    /// A list.
    Seq(Vec<Tree>),
    /// A mapping, in file order (keys are scalars, written as text).
    Map(Vec<(String, Tree)>),
}

impl<'de> Deserialize<'de> for Tree {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Tree, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Tree;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a YAML value")
            }
            fn visit_unit<E>(self) -> Result<Tree, E> {
                Ok(Tree::Null)
            }
            fn visit_none<E>(self) -> Result<Tree, E> {
                Ok(Tree::Null)
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Tree, D::Error> {
                Tree::deserialize(d)
            }
            fn visit_bool<E>(self, b: bool) -> Result<Tree, E> {
                Ok(Tree::Bool(b))
            }
            fn visit_u64<E>(self, n: u64) -> Result<Tree, E> {
                Ok(Tree::UInt(n))
            }
            fn visit_i64<E>(self, n: i64) -> Result<Tree, E> {
                Ok(u64::try_from(n).map_or(Tree::Int(n), Tree::UInt))
            }
            fn visit_f64<E>(self, n: f64) -> Result<Tree, E> {
                Ok(Tree::Float(n))
            }
            fn visit_str<E>(self, s: &str) -> Result<Tree, E> {
                Ok(Tree::Str(s.into()))
            }
            fn visit_string<E>(self, s: String) -> Result<Tree, E> {
                Ok(Tree::Str(s))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut a: A) -> Result<Tree, A::Error> {
                let mut v = Vec::new();
                while let Some(x) = a.next_element()? {
                    v.push(x);
                }
                Ok(Tree::Seq(v))
            }
            fn visit_map<A: de::MapAccess<'de>>(self, mut a: A) -> Result<Tree, A::Error> {
                let mut v = Vec::new();
                while let Some(k) = a.next_key::<Tree>()? {
                    let key = match k {
                        Tree::Str(s) => s,
                        Tree::Bool(b) => b.to_string(),
                        Tree::UInt(n) => n.to_string(),
                        Tree::Int(n) => n.to_string(),
                        Tree::Float(n) => n.to_string(),
                        Tree::Null => "null".into(),
                        Tree::Seq(_) | Tree::Map(_) => {
                            return Err(de::Error::custom(
                                "a mapping key must be a scalar, not a list or a mapping",
                            ));
                        }
                    };
                    v.push((key, a.next_value()?));
                }
                Ok(Tree::Map(v))
            }
        }
        d.deserialize_any(V)
    }
}

impl Tree {
    /// Removes and returns the value of `key`, when this is a mapping that has it.
    pub fn remove(&mut self, key: &str) -> Option<Tree> {
        let Tree::Map(m) = self else { return None };
        let i = m.iter().position(|(k, _)| k == key)?;
        Some(m.remove(i).1)
    }
}

/// One step of a path: a mapping key or a list index.
#[derive(Debug, Clone, PartialEq)]
enum Seg {
    Key(String),
    Index(usize),
}

/// `base` followed by `path`: `pools[0]` + `provisioning`, `burst` = `pools[0].provisioning.burst`.
fn show(base: &str, path: &[Seg]) -> String {
    let mut s = base.to_string();
    for seg in path {
        match seg {
            Seg::Key(k) if s.is_empty() => s.push_str(k),
            Seg::Key(k) => {
                s.push('.');
                s.push_str(k);
            }
            Seg::Index(i) => s.push_str(&format!("[{i}]")),
        }
    }
    s
}

/// A problem serde raised, with the path of the node it concerns once known.
#[derive(Debug)]
struct Problem {
    path: Option<Vec<Seg>>,
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    Unknown {
        field: String,
        expected: &'static [&'static str],
    },
    Missing(&'static str),
    Message(String),
}

impl Problem {
    fn new(kind: Kind) -> Problem {
        Problem { path: None, kind }
    }

    /// Sets the path unless a deeper node already did.
    fn at(mut self, path: &[Seg]) -> Problem {
        if self.path.is_none() {
            self.path = Some(path.to_vec());
        }
        self
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Unknown { field, .. } => write!(f, "unknown field {field}"),
            Kind::Missing(field) => write!(f, "missing field {field}"),
            Kind::Message(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for Problem {}

/// What a person reads for serde's `unexpected`: the value as written.
fn unexpected(u: Unexpected<'_>) -> String {
    match u {
        Unexpected::Unit => "null".into(),
        Unexpected::Seq => "a list".into(),
        Unexpected::Map => "a mapping".into(),
        other => other.to_string(),
    }
}

/// What a person reads for serde's `expected` (`u32` is "a whole number from 0 to 4294967295").
fn expected(e: &dyn de::Expected) -> String {
    let e = e.to_string();
    let whole = |max: u64| format!("a whole number from 0 to {max}");
    match e.as_str() {
        "u8" => whole(u8::MAX.into()),
        "u16" => whole(u16::MAX.into()),
        "u32" => whole(u32::MAX.into()),
        "u64" | "usize" => whole(u64::MAX),
        "i8" | "i16" | "i32" | "i64" | "isize" => "a whole number".into(),
        "f32" | "f64" => "a number".into(),
        "a sequence" => "a list".into(),
        "a map" => "a mapping".into(),
        s if s.starts_with("struct ") => "a mapping".into(),
        _ => e,
    }
}

impl de::Error for Problem {
    fn custom<T: fmt::Display>(msg: T) -> Problem {
        Problem::new(Kind::Message(msg.to_string()))
    }

    fn invalid_type(u: Unexpected<'_>, e: &dyn de::Expected) -> Problem {
        let want = expected(e);
        Problem::new(Kind::Message(if want == "a mapping" {
            format!("must be a mapping, got {}", unexpected(u))
        } else {
            format!("invalid type: {}, expected {want}", unexpected(u))
        }))
    }

    fn invalid_value(u: Unexpected<'_>, e: &dyn de::Expected) -> Problem {
        Problem::new(Kind::Message(format!(
            "invalid value: {}, expected {}",
            unexpected(u),
            expected(e)
        )))
    }

    fn unknown_field(field: &str, expected: &'static [&'static str]) -> Problem {
        Problem::new(Kind::Unknown {
            field: field.into(),
            expected,
        })
    }

    fn missing_field(field: &'static str) -> Problem {
        Problem::new(Kind::Missing(field))
    }
}

fn child(path: &[Seg], seg: Seg) -> Vec<Seg> {
    let mut p = path.to_vec();
    p.push(seg);
    p
}

/// The deserializer: one node of the tree and its path.
struct Node<'a> {
    tree: &'a Tree,
    path: Vec<Seg>,
}

impl<'de> Deserializer<'de> for Node<'_> {
    type Error = Problem;

    fn deserialize_any<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Problem> {
        let path = &self.path;
        match self.tree {
            Tree::Null => v.visit_unit(),
            Tree::Bool(b) => v.visit_bool(*b),
            Tree::UInt(n) => v.visit_u64(*n),
            Tree::Int(n) => v.visit_i64(*n),
            Tree::Float(n) => v.visit_f64(*n),
            Tree::Str(s) => v.visit_str(s),
            Tree::Seq(items) => v.visit_seq(SeqAccess {
                items: items.iter().enumerate(),
                path,
            }),
            Tree::Map(entries) => v.visit_map(MapAccess {
                entries: entries.iter(),
                path,
                value: None,
            }),
        }
        .map_err(|e| e.at(path))
    }

    fn deserialize_option<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Problem> {
        match self.tree {
            Tree::Null => v.visit_none().map_err(|e: Problem| e.at(&self.path)),
            _ => {
                let path = self.path.clone();
                v.visit_some(self).map_err(|e| e.at(&path))
            }
        }
    }

    /// `provisioning:` with nothing after it is an empty mapping: every field at its default.
    /// A list is not read as a struct's fields in order (serde's derive would): a mapping only.
    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, Problem> {
        match self.tree {
            Tree::Seq(_) => Err(de::Error::invalid_type(Unexpected::Seq, &"a map")),
            _ => self.deserialize_map(v),
        }
    }

    fn deserialize_map<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Problem> {
        match self.tree {
            Tree::Null => v
                .visit_map(MapAccess {
                    entries: [].iter(),
                    path: &self.path,
                    value: None,
                })
                .map_err(|e| e.at(&self.path)),
            _ => self.deserialize_any(v),
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        v: V,
    ) -> Result<V::Value, Problem> {
        let path = self.path.clone();
        v.visit_newtype_struct(self).map_err(|e| e.at(&path))
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, Problem> {
        match self.tree {
            Tree::Str(s) => v
                .visit_enum(de::value::StrDeserializer::<Problem>::new(s))
                .map_err(|e| e.at(&self.path)),
            _ => self.deserialize_any(v),
        }
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        unit unit_struct seq tuple tuple_struct identifier ignored_any
    }
}

struct SeqAccess<'a, 'p> {
    items: std::iter::Enumerate<std::slice::Iter<'a, Tree>>,
    path: &'p [Seg],
}

impl<'de> de::SeqAccess<'de> for SeqAccess<'_, '_> {
    type Error = Problem;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, Problem> {
        let Some((i, tree)) = self.items.next() else {
            return Ok(None);
        };
        let path = child(self.path, Seg::Index(i));
        seed.deserialize(Node {
            tree,
            path: path.clone(),
        })
        .map(Some)
        .map_err(|e| e.at(&path))
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.items.len())
    }
}

struct MapAccess<'a, 'p> {
    entries: std::slice::Iter<'a, (String, Tree)>,
    path: &'p [Seg],
    value: Option<(&'a Tree, Vec<Seg>)>,
}

impl<'de> de::MapAccess<'de> for MapAccess<'_, '_> {
    type Error = Problem;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Problem> {
        let Some((key, tree)) = self.entries.next() else {
            return Ok(None);
        };
        let path = child(self.path, Seg::Key(key.clone()));
        // An unknown key is reported with its own path (`provisioning.burts`).
        let k = seed
            .deserialize(de::value::StrDeserializer::<Problem>::new(key))
            .map_err(|e| e.at(&path))?;
        self.value = Some((tree, path));
        Ok(Some(k))
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Problem> {
        let (tree, path) = self
            .value
            .take()
            .ok_or_else(|| de::Error::custom("a value was read before its key"))?;
        seed.deserialize(Node {
            tree,
            path: path.clone(),
        })
        .map_err(|e| e.at(&path))
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.entries.len())
    }
}

/// Messages one value may produce at most; past that its reading stops (a hostile file with
/// thousands of bad keys costs one read per message).
pub const MAX_PROBLEMS: usize = 50;

/// Reads `T` from `tree`, one message per bad field, each naming the field's full path below
/// `base` (`pools[0]` gives `pools[0].provisioning.burst`): the wrong value and what is expected,
/// an unknown field with the nearest known name, a missing required field.
pub fn read<T: DeserializeOwned>(mut tree: Tree, base: &str) -> Result<T, Vec<String>> {
    let mut problems = Vec::new();
    // Fields already reported: their removal must not be reported again as "missing".
    let mut reported: Vec<Vec<Seg>> = Vec::new();
    loop {
        let err = match T::deserialize(Node {
            tree: &tree,
            path: Vec::new(),
        }) {
            Ok(t) if problems.is_empty() => return Ok(t),
            Ok(_) => return Err(problems),
            Err(e) => e,
        };
        let path = err.path.unwrap_or_default();
        let (field, message) = match err.kind {
            Kind::Unknown { field: _, expected } => {
                let name = match path.last() {
                    Some(Seg::Key(k)) => k.as_str(),
                    _ => "",
                };
                (
                    path.clone(),
                    format!("unknown field{}", suggest(name, expected)),
                )
            }
            Kind::Missing(f) => (child(&path, Seg::Key(f.into())), "missing".into()),
            Kind::Message(m) => (path.clone(), m),
        };
        if !reported.contains(&field) {
            problems.push(format!("{}: {message}", show(base, &field)));
            reported.push(field);
        }
        // Drop the field (for a missing one: the mapping that lacks it; for a list item: the
        // list) and read the rest again.
        let mut cut = path;
        let Some(last_key) = cut.iter().rposition(|s| matches!(s, Seg::Key(_))) else {
            return Err(problems);
        };
        cut.truncate(last_key + 1);
        if problems.len() >= MAX_PROBLEMS || !remove(&mut tree, &cut) {
            return Err(problems);
        }
        reported.push(cut);
    }
}

/// Removes the node at `path` (which ends with a key) from `tree`.
fn remove(tree: &mut Tree, path: &[Seg]) -> bool {
    let Some((Seg::Key(key), parent)) = path.split_last() else {
        return false;
    };
    let mut at = tree;
    for seg in parent {
        at = match (at, seg) {
            (Tree::Map(m), Seg::Key(k)) => match m.iter_mut().find(|(name, _)| name == k) {
                Some((_, v)) => v,
                None => return false,
            },
            (Tree::Seq(s), Seg::Index(i)) => match s.get_mut(*i) {
                Some(v) => v,
                None => return false,
            },
            _ => return false,
        };
    }
    at.remove(key).is_some()
}

/// ` (did you mean `burst`?)` when a known field is a small edit away from `name`, else the
/// known fields.
fn suggest(name: &str, known: &[&str]) -> String {
    let best = known
        .iter()
        .map(|k| (edit_distance(&name.to_lowercase(), &k.to_lowercase()), *k))
        .min();
    match best {
        Some((d, k)) if d <= (k.len() / 3).max(1) => format!(" (did you mean `{k}`?)"),
        None => String::new(),
        Some(_) => format!(
            "; expected one of {}",
            known
                .iter()
                .map(|k| format!("`{k}`"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Edit distance counting a swap of two neighbours as one edit (names are short).
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    // d[i][j]: distance between a[..i] and b[..j].
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    d[0] = (0..=b.len()).collect();
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = best;
        }
    }
    d[a.len()][b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions_and_distances() {
        assert_eq!(edit_distance("burts", "burst"), 1);
        assert_eq!(edit_distance("pollIntervall", "pollInterval"), 1);
        assert_eq!(edit_distance("", "ab"), 2);
        assert_eq!(
            suggest("burts", &["perSecond", "burst"]),
            " (did you mean `burst`?)"
        );
        assert_eq!(suggest("colour", &["a", "b"]), "; expected one of `a`, `b`");
        assert_eq!(suggest("x", &[]), "");
    }

    #[test]
    fn a_list_item_of_the_wrong_type_is_reported_once_by_its_index() {
        let tree: Tree = serde_saphyr::from_str("labels: [a, [b], [c]]\nother: 1\n").unwrap();
        #[derive(Debug, Deserialize)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct S {
            labels: Vec<String>,
            other: String,
        }
        let p = read::<S>(tree, "p").unwrap_err();
        assert_eq!(
            p,
            [
                "p.labels[1]: invalid type: a list, expected a string",
                "p.other: invalid type: integer `1`, expected a string",
            ]
        );
    }
}
