//! Label expressions in Jenkins syntax: parsing, matching and printing.
//!
//! Owns the grammar of selectors such as `linux && (go || rust)`. Operators, from tightest to
//! loosest binding: `!`, `&&`, `||`, `->` (implies), `<->` (iff); parentheses group; an atom is
//! any run of characters other than whitespace and `& | ! < > ( ) " '`, or a double-quoted string
//! with backslash escapes (`"my label"`). A `-` is part of an atom unless it starts `->`, so
//! `docker-agent` is one atom. An empty expression matches every agent, as an empty label does in
//! Jenkins. This module is pure: no I/O, no knowledge of pools or agents beyond a label set.

use std::collections::BTreeSet;
use std::fmt;

/// Errors from parsing a label expression.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The expression is not well formed.
    #[error("invalid label expression {expr:?}: {message} at character {offset}")]
    Syntax {
        /// The expression as given.
        expr: String,
        /// Character offset of the problem.
        offset: usize,
        /// What is wrong.
        message: String,
    },
}

/// Result alias for this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Longest expression accepted, in bytes.
pub const MAX_EXPR_BYTES: usize = 4096;
/// Deepest nesting of `!` and parentheses accepted.
pub const MAX_DEPTH: usize = 64;

/// A parsed label expression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expr {
    /// The empty expression: matches any label set.
    Any,
    /// A single label.
    Atom(String),
    /// `!e`
    Not(Box<Expr>),
    /// `a && b`
    And(Box<Expr>, Box<Expr>),
    /// `a || b`
    Or(Box<Expr>, Box<Expr>),
    /// `a -> b`
    Implies(Box<Expr>, Box<Expr>),
    /// `a <-> b`
    Iff(Box<Expr>, Box<Expr>),
}

impl Expr {
    /// Parses an expression in Jenkins label syntax.
    ///
    /// ```
    /// use std::collections::BTreeSet;
    /// use warmpool::labels::Expr;
    ///
    /// let agent: BTreeSet<String> = ["linux", "go"].iter().map(|s| s.to_string()).collect();
    /// assert!(Expr::parse("linux && (go || rust)").unwrap().matches(&agent));
    /// assert!(!Expr::parse("linux && !go").unwrap().matches(&agent));
    /// assert!(Expr::parse("linux &&").is_err());
    /// ```
    pub fn parse(input: &str) -> Result<Expr> {
        if input.len() > MAX_EXPR_BYTES {
            return Err(Error::Syntax {
                expr: input.chars().take(40).collect::<String>() + "...",
                offset: MAX_EXPR_BYTES,
                message: format!("expression longer than {MAX_EXPR_BYTES} bytes"),
            });
        }
        let tokens = tokenize(input)?;
        if tokens.is_empty() {
            return Ok(Expr::Any);
        }
        let mut p = Parser {
            input,
            tokens,
            pos: 0,
            depth: 0,
        };
        let e = p.iff()?;
        if let Some((tok, off)) = p.tokens.get(p.pos) {
            return Err(p.err(*off, format!("unexpected {}", tok.describe())));
        }
        Ok(e)
    }

    /// Evaluates the expression against a set of labels.
    pub fn matches(&self, labels: &BTreeSet<String>) -> bool {
        self.eval(&|atom| labels.contains(atom))
    }

    /// Evaluates the expression with a membership predicate.
    pub fn eval(&self, has: &dyn Fn(&str) -> bool) -> bool {
        match self {
            Expr::Any => true,
            Expr::Atom(a) => has(a),
            Expr::Not(e) => !e.eval(has),
            Expr::And(a, b) => a.eval(has) && b.eval(has),
            Expr::Or(a, b) => a.eval(has) || b.eval(has),
            Expr::Implies(a, b) => !a.eval(has) || b.eval(has),
            Expr::Iff(a, b) => a.eval(has) == b.eval(has),
        }
    }

    /// The atoms the expression mentions.
    pub fn atoms(&self) -> BTreeSet<&str> {
        let mut out = BTreeSet::new();
        self.collect_atoms(&mut out);
        out
    }

    fn collect_atoms<'a>(&'a self, out: &mut BTreeSet<&'a str>) {
        match self {
            Expr::Any => {}
            Expr::Atom(a) => {
                out.insert(a);
            }
            Expr::Not(e) => e.collect_atoms(out),
            Expr::And(a, b) | Expr::Or(a, b) | Expr::Implies(a, b) | Expr::Iff(a, b) => {
                a.collect_atoms(out);
                b.collect_atoms(out);
            }
        }
    }
}

/// True when `label` can be written as a bare atom (no quoting needed).
pub fn is_bare_atom(label: &str) -> bool {
    !label.is_empty()
        && !label.contains("->")
        && label.chars().all(|c| !c.is_whitespace() && !is_special(c))
}

fn is_special(c: char) -> bool {
    matches!(c, '&' | '|' | '!' | '<' | '>' | '(' | ')' | '"' | '\'')
}

/// Prints the expression so that [`Expr::parse`] reads it back to the same tree: parentheses
/// only where precedence or associativity need them (so printing never nests deeper than the
/// parsed text did), labels quoted when they are not bare atoms, with only the escapes the
/// parser reads.
impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expr::Any => Ok(()),
            Expr::Atom(a) if is_bare_atom(a) => write!(f, "{a}"),
            Expr::Atom(a) => write_quoted(f, a),
            Expr::Not(e) => write!(f, "!{}", Operand(e, e.binding() < Binding::Not)),
            Expr::And(a, b) | Expr::Or(a, b) | Expr::Implies(a, b) | Expr::Iff(a, b) => {
                let (op, me) = (self.operator(), self.binding());
                // `->` groups to the right, the others to the left: the operand on the other
                // side needs parentheses when it has the same operator.
                let right_assoc = me == Binding::Implies;
                let left = a.binding() < me || (right_assoc && a.binding() == me);
                let right = b.binding() < me || (!right_assoc && b.binding() == me);
                write!(f, "{} {op} {}", Operand(a, left), Operand(b, right))
            }
        }
    }
}

/// How tightly an expression's top operator binds, loosest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Binding {
    Iff,
    Implies,
    Or,
    And,
    Not,
    Atom,
}

impl Expr {
    fn binding(&self) -> Binding {
        match self {
            Expr::Iff(..) => Binding::Iff,
            Expr::Implies(..) => Binding::Implies,
            Expr::Or(..) => Binding::Or,
            Expr::And(..) => Binding::And,
            Expr::Not(_) => Binding::Not,
            Expr::Atom(_) | Expr::Any => Binding::Atom,
        }
    }

    fn operator(&self) -> &'static str {
        match self {
            Expr::Iff(..) => "<->",
            Expr::Implies(..) => "->",
            Expr::Or(..) => "||",
            Expr::And(..) => "&&",
            Expr::Not(_) => "!",
            Expr::Atom(_) | Expr::Any => "",
        }
    }
}

/// A label in double quotes, escaping `"`, `\` and the control characters the parser has
/// escapes for (a raw line break is refused inside quotes); everything else as it is.
fn write_quoted(f: &mut fmt::Formatter<'_>, label: &str) -> fmt::Result {
    f.write_str("\"")?;
    for c in label.chars() {
        match c {
            '"' => f.write_str("\\\"")?,
            '\\' => f.write_str("\\\\")?,
            '\n' => f.write_str("\\n")?,
            '\r' => f.write_str("\\r")?,
            '\t' => f.write_str("\\t")?,
            '\u{8}' => f.write_str("\\b")?,
            '\u{c}' => f.write_str("\\f")?,
            c => write!(f, "{c}")?,
        }
    }
    f.write_str("\"")
}

/// An operand, in parentheses when `paren`.
struct Operand<'a>(&'a Expr, bool);

impl fmt::Display for Operand<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.1 {
            write!(f, "({})", self.0)
        } else {
            write!(f, "{}", self.0)
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    And,
    Or,
    Not,
    Implies,
    Iff,
    LParen,
    RParen,
    Atom(String),
}

impl Tok {
    fn describe(&self) -> String {
        match self {
            Tok::And => "'&&'".into(),
            Tok::Or => "'||'".into(),
            Tok::Not => "'!'".into(),
            Tok::Implies => "'->'".into(),
            Tok::Iff => "'<->'".into(),
            Tok::LParen => "'('".into(),
            Tok::RParen => "')'".into(),
            Tok::Atom(a) => format!("label {a:?}"),
        }
    }
}

fn tokenize(input: &str) -> Result<Vec<(Tok, usize)>> {
    let chars: Vec<char> = input.chars().collect();
    let err = |offset: usize, message: String| Error::Syntax {
        expr: input.to_string(),
        offset,
        message,
    };
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        match c {
            c if c.is_whitespace() => i += 1,
            '&' if next == Some('&') => {
                out.push((Tok::And, i));
                i += 2;
            }
            '|' if next == Some('|') => {
                out.push((Tok::Or, i));
                i += 2;
            }
            '-' if next == Some('>') => {
                out.push((Tok::Implies, i));
                i += 2;
            }
            '<' if next == Some('-') && chars.get(i + 2) == Some(&'>') => {
                out.push((Tok::Iff, i));
                i += 3;
            }
            '!' => {
                out.push((Tok::Not, i));
                i += 1;
            }
            '(' => {
                out.push((Tok::LParen, i));
                i += 1;
            }
            ')' => {
                out.push((Tok::RParen, i));
                i += 1;
            }
            '"' => {
                let start = i;
                i += 1;
                let mut s = String::new();
                loop {
                    match chars.get(i) {
                        None => return Err(err(start, "unterminated quoted label".into())),
                        Some('"') => {
                            i += 1;
                            break;
                        }
                        Some('\\') => {
                            let esc = chars.get(i + 1).copied();
                            s.push(match esc {
                                Some('n') => '\n',
                                Some('t') => '\t',
                                Some('r') => '\r',
                                Some('b') => '\u{8}',
                                Some('f') => '\u{c}',
                                Some(c @ ('"' | '\'' | '\\')) => c,
                                _ => return Err(err(i, "invalid escape in quoted label".into())),
                            });
                            i += 2;
                        }
                        Some('\n' | '\r') => {
                            return Err(err(i, "line break in quoted label".into()));
                        }
                        Some(&c) => {
                            s.push(c);
                            i += 1;
                        }
                    }
                }
                out.push((Tok::Atom(s), start));
            }
            '&' | '|' | '<' | '>' | '\'' => {
                return Err(err(i, format!("unexpected character {c:?}")));
            }
            _ => {
                let start = i;
                let mut s = String::new();
                while let Some(&c) = chars.get(i) {
                    if c.is_whitespace()
                        || is_special(c)
                        || (c == '-' && chars.get(i + 1) == Some(&'>'))
                    {
                        break;
                    }
                    s.push(c);
                    i += 1;
                }
                out.push((Tok::Atom(s), start));
            }
        }
    }
    Ok(out)
}

struct Parser<'a> {
    input: &'a str,
    tokens: Vec<(Tok, usize)>,
    pos: usize,
    depth: usize,
}

impl Parser<'_> {
    fn err(&self, offset: usize, message: String) -> Error {
        Error::Syntax {
            expr: self.input.to_string(),
            offset,
            message,
        }
    }

    fn peek(&self) -> Option<&Tok> {
        self.tokens.get(self.pos).map(|(t, _)| t)
    }

    fn eat(&mut self, t: &Tok) -> bool {
        if self.peek() == Some(t) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn iff(&mut self) -> Result<Expr> {
        let mut left = self.implies()?;
        while self.eat(&Tok::Iff) {
            let right = self.implies()?;
            left = Expr::Iff(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn implies(&mut self) -> Result<Expr> {
        let left = self.or()?;
        if self.eat(&Tok::Implies) {
            // Right-associative, as in logic: a -> b -> c == a -> (b -> c).
            self.enter()?;
            let right = self.implies()?;
            self.depth -= 1;
            return Ok(Expr::Implies(Box::new(left), Box::new(right)));
        }
        Ok(left)
    }

    fn or(&mut self) -> Result<Expr> {
        let mut left = self.and()?;
        while self.eat(&Tok::Or) {
            let right = self.and()?;
            left = Expr::Or(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Expr> {
        let mut left = self.unary()?;
        while self.eat(&Tok::And) {
            let right = self.unary()?;
            left = Expr::And(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn enter(&mut self) -> Result<()> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            let at = self.tokens.get(self.pos).map(|(_, o)| *o).unwrap_or(0);
            return Err(self.err(at, format!("nested deeper than {MAX_DEPTH} levels")));
        }
        Ok(())
    }

    fn unary(&mut self) -> Result<Expr> {
        if self.eat(&Tok::Not) {
            self.enter()?;
            let e = self.unary()?;
            self.depth -= 1;
            return Ok(Expr::Not(Box::new(e)));
        }
        self.primary()
    }

    fn primary(&mut self) -> Result<Expr> {
        let Some((tok, off)) = self.tokens.get(self.pos).cloned() else {
            return Err(self.err(
                self.input.chars().count(),
                "expression ends where a label or '(' was expected".into(),
            ));
        };
        self.pos += 1;
        match tok {
            Tok::Atom(a) => Ok(Expr::Atom(a)),
            Tok::LParen => {
                self.enter()?;
                let e = self.iff()?;
                self.depth -= 1;
                if !self.eat(&Tok::RParen) {
                    let at = self
                        .tokens
                        .get(self.pos)
                        .map(|(_, o)| *o)
                        .unwrap_or(self.input.chars().count());
                    return Err(
                        self.err(at, format!("missing ')' to close '(' at character {off}"))
                    );
                }
                Ok(e)
            }
            other => Err(self.err(
                off,
                format!("expected a label or '(' but found {}", other.describe()),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn set(labels: &[&str]) -> BTreeSet<String> {
        labels.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn precedence_follows_jenkins() {
        let same = |a: &str, b: &str| assert_eq!(Expr::parse(a), Expr::parse(b), "{a} vs {b}");
        same("a || b && c", "a || (b && c)");
        same("!a && b", "(!a) && b");
        same("a -> b || c", "a -> (b || c)");
        same("a <-> b -> c", "a <-> (b -> c)");
        same("a -> b -> c", "a -> (b -> c)");
        same("a && b && c", "(a && b) && c");
        same("a <-> b <-> c", "(a <-> b) <-> c");
        // Printing keeps only the parentheses the grouping needs.
        for (input, printed) in [
            ("a || (b && c)", "a || b && c"),
            ("(a || b) && c", "(a || b) && c"),
            ("(!a) && !(b)", "!a && !b"),
            ("!(a && b)", "!(a && b)"),
            ("a -> (b -> c)", "a -> b -> c"),
            ("(a -> b) -> c", "(a -> b) -> c"),
            ("(a && b) && c", "a && b && c"),
            ("a && (b && c)", "a && (b && c)"),
            ("a <-> (b <-> c)", "a <-> (b <-> c)"),
            ("\"my label\" && x", "\"my label\" && x"),
        ] {
            assert_eq!(Expr::parse(input).unwrap().to_string(), printed, "{input}");
        }
    }

    #[test]
    fn matching() {
        let l = set(&["linux", "x86_64", "go"]);
        assert!(Expr::parse("linux && (go || rust)").unwrap().matches(&l));
        assert!(!Expr::parse("linux && rust").unwrap().matches(&l));
        assert!(Expr::parse("!windows").unwrap().matches(&l));
        assert!(Expr::parse("windows -> msvc").unwrap().matches(&l));
        assert!(!Expr::parse("linux -> rust").unwrap().matches(&l));
        assert!(Expr::parse("rust <-> windows").unwrap().matches(&l));
        assert!(!Expr::parse("go <-> windows").unwrap().matches(&l));
        assert!(Expr::parse("").unwrap().matches(&l));
        assert!(Expr::parse("   ").unwrap().matches(&BTreeSet::new()));
    }

    #[test]
    fn atoms_with_dashes_dots_and_quotes() {
        let l = set(&["docker-agent", "jdk-17.0", "my label"]);
        assert!(Expr::parse("docker-agent&&jdk-17.0").unwrap().matches(&l));
        assert!(
            Expr::parse("\"my label\" && docker-agent")
                .unwrap()
                .matches(&l)
        );
        assert_eq!(
            Expr::parse("a->b").unwrap(),
            Expr::Implies(
                Box::new(Expr::Atom("a".into())),
                Box::new(Expr::Atom("b".into()))
            )
        );
        assert_eq!(Expr::parse(r#""q\"x""#).unwrap(), Expr::Atom("q\"x".into()));
    }

    #[test]
    fn syntax_errors_are_clear() {
        for (bad, want) in [
            ("linux &&", "expression ends"),
            ("(linux", "missing ')'"),
            ("linux)", "unexpected ')'"),
            ("a & b", "unexpected character '&'"),
            ("\"open", "unterminated"),
            ("&& a", "expected a label"),
            ("a b", "unexpected label \"b\""),
        ] {
            let e = Expr::parse(bad).unwrap_err().to_string();
            assert!(e.contains(want), "{bad:?}: {e}");
            assert!(e.contains(&format!("{bad:?}")), "{e} names the expression");
        }
    }

    #[test]
    fn hostile_inputs_are_bounded() {
        let deep = "!".repeat(100_000) + "a";
        assert!(
            Expr::parse(&deep)
                .unwrap_err()
                .to_string()
                .contains("longer than")
        );
        let deep = "(".repeat(65) + "a" + &")".repeat(65);
        assert!(
            Expr::parse(&deep)
                .unwrap_err()
                .to_string()
                .contains("nested deeper")
        );
        let ok = "(".repeat(60) + "a" + &")".repeat(60);
        assert!(Expr::parse(&ok).is_ok());
        let chain = vec!["a"; 300].join(" -> ");
        assert!(
            Expr::parse(&chain)
                .unwrap_err()
                .to_string()
                .contains("nested deeper")
        );
        // Long flat chains are fine (iterative, not recursive).
        let flat = vec!["a"; 800].join(" && ");
        assert!(Expr::parse(&flat).is_ok());
    }

    /// Found by the fuzz pass (tests/fuzz/labels.rs): a quoted label holding a character
    /// Rust's `Debug` escapes (`\0`, a combining mark) was printed with an escape the parser
    /// does not read, so the printed expression did not parse.
    #[test]
    fn display_quotes_labels_the_parser_reads_back() {
        for label in [
            "&\0",
            "a\u{301}",
            "x\u{7f}y",
            "t\tn\nr\r\"q\"\\",
            "a->b",
            "",
        ] {
            let e = Expr::And(
                Box::new(Expr::Atom(label.into())),
                Box::new(Expr::Atom("b".into())),
            );
            let printed = e.to_string();
            assert_eq!(
                Expr::parse(&printed),
                Ok(e),
                "{label:?} printed as {printed:?}"
            );
        }
    }

    /// Found by the fuzz pass: printing put parentheses around every operand, so an expression
    /// the parser accepted (33 `!`, a chain of 100 `&&`) printed deeper than the nesting limit
    /// and did not parse back.
    #[test]
    fn display_of_deep_and_long_expressions_parses_back() {
        let inputs = [
            "!".repeat(33) + "a",
            "!".repeat(MAX_DEPTH) + "a",
            vec!["a"; 100].join(" && "),
            vec!["a"; 100].join(" || "),
            vec!["a"; 100].join(" <-> "),
            vec!["a"; MAX_DEPTH + 1].join(" -> "),
            "(".repeat(MAX_DEPTH) + "a" + &")".repeat(MAX_DEPTH),
        ];
        for input in inputs {
            let e = Expr::parse(&input).unwrap();
            let printed = e.to_string();
            assert_eq!(
                Expr::parse(&printed),
                Ok(e),
                "{input:?} printed as {printed:?}"
            );
        }
    }

    fn arb_expr() -> impl Strategy<Value = Expr> {
        let leaf = prop_oneof![
            "[a-z][a-z0-9_.-]{0,6}"
                .prop_filter("no ->", |s| !s.contains("->") && !s.ends_with('-'))
                .prop_map(Expr::Atom),
            "[a-z ]{1,6}".prop_map(Expr::Atom),
        ];
        leaf.prop_recursive(4, 24, 2, |inner| {
            prop_oneof![
                inner.clone().prop_map(|e| Expr::Not(Box::new(e))),
                (inner.clone(), inner.clone())
                    .prop_map(|(a, b)| Expr::And(Box::new(a), Box::new(b))),
                (inner.clone(), inner.clone())
                    .prop_map(|(a, b)| Expr::Or(Box::new(a), Box::new(b))),
                (inner.clone(), inner.clone())
                    .prop_map(|(a, b)| Expr::Implies(Box::new(a), Box::new(b))),
                (inner.clone(), inner).prop_map(|(a, b)| Expr::Iff(Box::new(a), Box::new(b))),
            ]
        })
    }

    proptest! {
        #[test]
        fn display_round_trips(e in arb_expr()) {
            let printed = e.to_string();
            let reparsed = Expr::parse(&printed).unwrap();
            prop_assert_eq!(reparsed, e);
        }

        #[test]
        fn parser_never_panics(s in "[a-z!&|()<>\" -]{0,24}") {
            let _ = Expr::parse(&s);
        }
    }
}
