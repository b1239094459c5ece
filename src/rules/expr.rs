//! The alert expression language: parsed with nom when a profile loads, compiled into an
//! [`Expr`] whose fields and `$params` are resolved to slots, evaluated per reading.
//!
//! ```text
//! expr    := or
//! or      := and ("or" and)*
//! and     := not ("and" not)*
//! not     := "not" not | cmp
//! cmp     := sum (("==" | "!=" | "<" | "<=" | ">" | ">=") sum)?     -- does not chain
//! sum     := product (("+" | "-") product)*
//! product := unary (("*" | "/") unary)*
//! unary   := "-" unary | atom
//! atom    := number | string | "true" | "false" | $param | field | call | "(" expr ")"
//! call    := name "(" [expr ("," expr)*] ")"
//! ```
//!
//! Numbers are decimal (`0.8`, `1e3`); strings are `"…"` or `'…'` (`\"`, `\'`, `\\`
//! escapes); durations (`30s`, `15m`, `1h`, `1d`, `1h30m`) only as the window of
//! `delta`/`rate`. Functions: `delta(field, window)`, `rate(field, window)` (per second),
//! `distance_m(lat, lon, lat2, lon2)` (haversine, metres), `abs(x)`, `min(a, b, …)`,
//! `max(a, b, …)`, `local_hour()` (hour of the reading's time, 0–23, in the profile's
//! `utc_offset`) and `present(field)`.
//!
//! # Values and missing fields
//!
//! Values are numbers (integer and float fields alike), booleans and text. Types are checked
//! when the rule compiles where they are known (literals, operators, functions) and when it
//! runs for fields and params (whose types the codec and the registry decide): a mismatch
//! at run time is an [`EvalError`], never a guess (`leak == 1` is an error, not a
//! coercion).
//!
//! A field the reading does not carry is *unknown*, and unknown propagates: `x > 1` is
//! unknown when `x` is missing. `and`/`or`/`not` use three-valued (Kleene) logic, so the
//! known part can still decide: `false and unknown` is false, `true or unknown` is true.
//! `present(x)` tells whether a field is there. A `$param` the device lacks is not unknown
//! but an error ([`EvalError::MissingParam`]): the registry is wrong, not the reading.
//!
//! This module is pure: no clocks, no I/O. Errors carry the byte offset and the 1-based
//! column (in characters) inside the expression text.

use std::collections::BTreeSet;
use std::fmt;

use nbiot_codecs::{Name, Value};
use nom::branch::alt;
use nom::bytes::complete::{tag, take_while, take_while1};
use nom::character::complete::{char, digit1, multispace0};
use nom::combinator::{opt, recognize};
use nom::error::{ErrorKind, ParseError};
use nom::sequence::pair;
use nom::{IResult, Parser};

use crate::registry::ParamValue;

/// At most this many distinct fields and `$params` across the rules of one profile: the
/// per-reading slot tables live on the stack.
pub const MAX_FIELDS: usize = 64;
pub const MAX_PARAMS: usize = 16;

/// How deeply expressions may nest (parentheses, operators): a bound on the parser's and
/// the evaluator's recursion.
const MAX_DEPTH: usize = 64;

/// A static type: what an operand is known to be when the rule compiles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ty {
    Num,
    Bool,
    Text,
    /// A field or param: known only per reading.
    Any,
}

impl fmt::Display for Ty {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Ty::Num => "a number",
            Ty::Bool => "a boolean",
            Ty::Text => "text",
            Ty::Any => "a field",
        })
    }
}

/// A parse or compile error, with where it is in the expression.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("column {column}: {kind}")]
pub struct ExprError {
    /// Byte offset in the expression text.
    pub offset: usize,
    /// 1-based column, in characters.
    pub column: usize,
    pub kind: ExprErrorKind,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ExprErrorKind {
    #[error("expected {expected}, found {found}")]
    Expected {
        expected: &'static str,
        found: String,
    },
    #[error("unterminated string")]
    UnterminatedString,
    #[error("`{0}` is not a number")]
    BadNumber(String),
    #[error("`{0}` is not a duration (units s, m, h, d: e.g. 30s, 15m, 1h, 1h30m)")]
    BadDuration(String),
    #[error("a duration (`{0}`) is only allowed as the window of delta() or rate()")]
    DurationOutsideWindow(String),
    #[error("comparisons do not chain: write `a < b and b < c`")]
    ChainedComparison,
    #[error("the expression is nested too deeply or chains too many operators (more than {MAX_DEPTH} levels)")]
    TooDeep,
    #[error("unknown function `{0}` (known: delta, rate, distance_m, abs, min, max, local_hour, present)")]
    UnknownFunction(String),
    #[error("{function}() takes {expected}, found {found}")]
    Arity {
        function: &'static str,
        expected: &'static str,
        found: usize,
    },
    #[error("the first argument of {function}() must be a field name")]
    FieldArgument { function: &'static str },
    #[error("the window of {function}() must be a duration longer than zero, e.g. 1h or 15m")]
    Window { function: &'static str },
    #[error("field `{name}` is not produced by this profile's codec{}", suggestion.as_ref().map(|s| format!(" (did you mean `{s}`?)")).unwrap_or_default())]
    UnknownField {
        name: String,
        suggestion: Option<String>,
    },
    #[error("`{op}` needs {expected}, but this operand is {found}")]
    Type {
        op: &'static str,
        expected: Ty,
        found: Ty,
    },
    #[error("{left} and {right} cannot be compared")]
    Incomparable { left: Ty, right: Ty },
    #[error("the expression must be a condition (true or false), but it is {0}")]
    NotCondition(Ty),
    #[error("more than {max} different {what} in the rules of one profile")]
    TooMany { what: &'static str, max: usize },
    /// A problem in a summary template (see `template`).
    #[error("{0}")]
    Summary(String),
}

impl ExprError {
    fn at(text: &str, offset: usize, kind: ExprErrorKind) -> ExprError {
        let offset = offset.min(text.len());
        let column = text.get(..offset).map_or(offset, |s| s.chars().count()) + 1;
        ExprError {
            offset,
            column,
            kind,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Syntax tree
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BinOp {
    Or,
    And,
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    Add,
    Sub,
    Mul,
    Div,
}

impl BinOp {
    fn symbol(self) -> &'static str {
        match self {
            BinOp::Or => "or",
            BinOp::And => "and",
            BinOp::Eq => "==",
            BinOp::Ne => "!=",
            BinOp::Lt => "<",
            BinOp::Le => "<=",
            BinOp::Gt => ">",
            BinOp::Ge => ">=",
            BinOp::Add => "+",
            BinOp::Sub => "-",
            BinOp::Mul => "*",
            BinOp::Div => "/",
        }
    }
}

/// A parsed expression node; `at` is the byte offset where it starts.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Ast {
    pub at: usize,
    pub kind: AstKind,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum AstKind {
    Num(f64),
    Bool(bool),
    Str(String),
    /// A duration literal, in seconds, and its text.
    Dur(f64, String),
    Field(String),
    Param(String),
    Neg(Box<Ast>),
    Not(Box<Ast>),
    /// The operator and its offset.
    Bin(BinOp, usize, Box<Ast>, Box<Ast>),
    Call(String, Vec<Ast>),
}

// ---------------------------------------------------------------------------------------
// Parser (nom 8)
// ---------------------------------------------------------------------------------------

/// nom's error type for this parser: where it failed and, for failures that commit
/// (`nom::Err::Failure`), why.
#[derive(Debug)]
struct PErr<'a> {
    at: &'a str,
    kind: Option<ExprErrorKind>,
}

impl<'a> ParseError<&'a str> for PErr<'a> {
    fn from_error_kind(input: &'a str, _kind: ErrorKind) -> Self {
        PErr {
            at: input,
            kind: None,
        }
    }

    fn append(_input: &'a str, _kind: ErrorKind, other: Self) -> Self {
        other
    }
}

type PRes<'a, T> = IResult<&'a str, T, PErr<'a>>;

fn fail<'a, T>(at: &'a str, kind: ExprErrorKind) -> PRes<'a, T> {
    Err(nom::Err::Failure(PErr {
        at,
        kind: Some(kind),
    }))
}

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_'
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// What the input holds at `i`, for "expected X, found Y" messages.
fn found(i: &str) -> String {
    let i = i.trim_start();
    match i.chars().next() {
        None => "the end of the expression".to_owned(),
        Some(c) if is_ident_start(c) => {
            let word: String = i.chars().take_while(|c| is_ident_char(*c)).collect();
            format!("`{word}`")
        }
        Some(c) => format!("`{c}`"),
    }
}

struct Grammar<'a> {
    full: &'a str,
}

impl<'a> Grammar<'a> {
    fn pos(&self, i: &str) -> usize {
        self.full.len() - i.len()
    }

    fn ws(i: &'a str) -> &'a str {
        // `multispace0` cannot fail on &str (it stops at the first other character).
        multispace0::<_, PErr<'a>>(i).map_or(i, |(rest, _)| rest)
    }

    /// A keyword (`and`, `or`, `not`, `true`, `false`) as a whole word.
    fn keyword(i: &'a str, word: &'static str) -> PRes<'a, &'a str> {
        let (rest, w) = tag(word)(i)?;
        if rest.chars().next().is_some_and(is_ident_char) {
            return Err(nom::Err::Error(PErr { at: i, kind: None }));
        }
        Ok((rest, w))
    }

    /// One level deeper: a left-associative chain (`a + b + c`) builds a tree as deep as
    /// it is long, so each operator counts like a parenthesis.
    fn deeper(at: &'a str, depth: usize) -> Result<usize, nom::Err<PErr<'a>>> {
        if depth >= MAX_DEPTH {
            return Err(nom::Err::Failure(PErr {
                at,
                kind: Some(ExprErrorKind::TooDeep),
            }));
        }
        Ok(depth + 1)
    }

    fn expr(&self, i: &'a str, depth: usize) -> PRes<'a, Ast> {
        if depth > MAX_DEPTH {
            return fail(i, ExprErrorKind::TooDeep);
        }
        self.or(i, depth + 1)
    }

    fn or(&self, i: &'a str, depth: usize) -> PRes<'a, Ast> {
        let (mut i, mut lhs) = self.and(i, depth)?;
        let mut depth = depth;
        loop {
            let j = Self::ws(i);
            match Self::keyword(j, "or") {
                Ok((rest, _)) => {
                    depth = Self::deeper(j, depth)?;
                    let (rest, rhs) = self.and(rest, depth)?;
                    lhs = bin(BinOp::Or, self.pos(j), lhs, rhs);
                    i = rest;
                }
                Err(_) => return Ok((i, lhs)),
            }
        }
    }

    fn and(&self, i: &'a str, depth: usize) -> PRes<'a, Ast> {
        let (mut i, mut lhs) = self.not(i, depth)?;
        let mut depth = depth;
        loop {
            let j = Self::ws(i);
            match Self::keyword(j, "and") {
                Ok((rest, _)) => {
                    depth = Self::deeper(j, depth)?;
                    let (rest, rhs) = self.not(rest, depth)?;
                    lhs = bin(BinOp::And, self.pos(j), lhs, rhs);
                    i = rest;
                }
                Err(_) => return Ok((i, lhs)),
            }
        }
    }

    fn not(&self, i: &'a str, depth: usize) -> PRes<'a, Ast> {
        let j = Self::ws(i);
        if let Ok((rest, _)) = Self::keyword(j, "not") {
            if depth > MAX_DEPTH {
                return fail(j, ExprErrorKind::TooDeep);
            }
            let (rest, inner) = self.not(rest, depth + 1)?;
            return Ok((
                rest,
                Ast {
                    at: self.pos(j),
                    kind: AstKind::Not(Box::new(inner)),
                },
            ));
        }
        self.cmp(j, depth)
    }

    fn cmp_op(i: &'a str) -> PRes<'a, BinOp> {
        let (rest, op) = alt((
            tag("=="),
            tag("!="),
            tag("<="),
            tag(">="),
            tag("<"),
            tag(">"),
        ))
        .parse(i)?;
        let op = match op {
            "==" => BinOp::Eq,
            "!=" => BinOp::Ne,
            "<=" => BinOp::Le,
            ">=" => BinOp::Ge,
            "<" => BinOp::Lt,
            _ => BinOp::Gt,
        };
        Ok((rest, op))
    }

    fn cmp(&self, i: &'a str, depth: usize) -> PRes<'a, Ast> {
        let (i, lhs) = self.sum(i, depth)?;
        let j = Self::ws(i);
        let Ok((rest, op)) = Self::cmp_op(j) else {
            if j.starts_with('=') && !j.starts_with("==") {
                return fail(
                    j,
                    ExprErrorKind::Expected {
                        expected: "`==` to compare",
                        found: "`=`".to_owned(),
                    },
                );
            }
            return Ok((i, lhs));
        };
        let (rest, rhs) = self.sum(rest, depth)?;
        let k = Self::ws(rest);
        if Self::cmp_op(k).is_ok() {
            return fail(k, ExprErrorKind::ChainedComparison);
        }
        Ok((rest, bin(op, self.pos(j), lhs, rhs)))
    }

    fn sum(&self, i: &'a str, depth: usize) -> PRes<'a, Ast> {
        let (mut i, mut lhs) = self.product(i, depth)?;
        let mut depth = depth;
        loop {
            let j = Self::ws(i);
            let op = match j.chars().next() {
                Some('+') => BinOp::Add,
                Some('-') => BinOp::Sub,
                _ => return Ok((i, lhs)),
            };
            depth = Self::deeper(j, depth)?;
            let (rest, rhs) = self.product(&j[1..], depth)?;
            lhs = bin(op, self.pos(j), lhs, rhs);
            i = rest;
        }
    }

    fn product(&self, i: &'a str, depth: usize) -> PRes<'a, Ast> {
        let (mut i, mut lhs) = self.unary(i, depth)?;
        let mut depth = depth;
        loop {
            let j = Self::ws(i);
            let op = match j.chars().next() {
                Some('*') => BinOp::Mul,
                Some('/') => BinOp::Div,
                _ => return Ok((i, lhs)),
            };
            depth = Self::deeper(j, depth)?;
            let (rest, rhs) = self.unary(&j[1..], depth)?;
            lhs = bin(op, self.pos(j), lhs, rhs);
            i = rest;
        }
    }

    fn unary(&self, i: &'a str, depth: usize) -> PRes<'a, Ast> {
        let j = Self::ws(i);
        if let Some(rest) = j.strip_prefix('-') {
            if depth > MAX_DEPTH {
                return fail(j, ExprErrorKind::TooDeep);
            }
            let (rest, inner) = self.unary(rest, depth + 1)?;
            return Ok((
                rest,
                Ast {
                    at: self.pos(j),
                    kind: AstKind::Neg(Box::new(inner)),
                },
            ));
        }
        self.atom(j, depth)
    }

    fn atom(&self, i: &'a str, depth: usize) -> PRes<'a, Ast> {
        let at = self.pos(i);
        let node = |kind| Ast { at, kind };
        let Some(c) = i.chars().next() else {
            return fail(
                i,
                ExprErrorKind::Expected {
                    expected: "a value, field, $param or function",
                    found: found(i),
                },
            );
        };
        match c {
            '(' => {
                let (rest, inner) = self.expr(&i[1..], depth + 1)?;
                let rest = Self::ws(rest);
                match char::<_, PErr<'a>>(')')(rest) {
                    Ok((rest, _)) => Ok((rest, inner)),
                    Err(_) => fail(
                        rest,
                        ExprErrorKind::Expected {
                            expected: "`)`",
                            found: found(rest),
                        },
                    ),
                }
            }
            '"' | '\'' => {
                let (rest, s) = Self::string(i)?;
                Ok((rest, node(AstKind::Str(s))))
            }
            '$' => {
                let after = &i[1..];
                match take_while1::<_, _, PErr<'a>>(is_ident_char)(after) {
                    Ok((rest, name)) if name.starts_with(is_ident_start) => {
                        Ok((rest, node(AstKind::Param(name.to_owned()))))
                    }
                    _ => fail(
                        after,
                        ExprErrorKind::Expected {
                            expected: "a parameter name after `$`",
                            found: found(after),
                        },
                    ),
                }
            }
            c if c.is_ascii_digit() || c == '.' => self.number(i),
            c if is_ident_start(c) => {
                let (rest, name) = take_while1(is_ident_char)(i)?;
                match name {
                    "true" => return Ok((rest, node(AstKind::Bool(true)))),
                    "false" => return Ok((rest, node(AstKind::Bool(false)))),
                    "and" | "or" | "not" => {
                        return fail(
                            i,
                            ExprErrorKind::Expected {
                                expected: "a value, field, $param or function",
                                found: format!("`{name}`"),
                            },
                        )
                    }
                    _ => {}
                }
                let after = Self::ws(rest);
                if let Some(args) = after.strip_prefix('(') {
                    let (rest, args) = self.args(args, depth)?;
                    return Ok((rest, node(AstKind::Call(name.to_owned(), args))));
                }
                Ok((rest, node(AstKind::Field(name.to_owned()))))
            }
            _ => fail(
                i,
                ExprErrorKind::Expected {
                    expected: "a value, field, $param or function",
                    found: found(i),
                },
            ),
        }
    }

    /// Arguments after the `(`, up to and including the `)`.
    fn args(&self, i: &'a str, depth: usize) -> PRes<'a, Vec<Ast>> {
        let mut args = Vec::new();
        let j = Self::ws(i);
        if let Some(rest) = j.strip_prefix(')') {
            return Ok((rest, args));
        }
        let mut i = i;
        loop {
            let (rest, arg) = self.expr(i, depth + 1)?;
            args.push(arg);
            let rest = Self::ws(rest);
            match rest.chars().next() {
                Some(',') => i = &rest[1..],
                Some(')') => return Ok((&rest[1..], args)),
                _ => {
                    return fail(
                        rest,
                        ExprErrorKind::Expected {
                            expected: "`,` or `)`",
                            found: found(rest),
                        },
                    )
                }
            }
        }
    }

    /// A decimal number, or — digits directly followed by a unit — a duration.
    fn number(&self, i: &'a str) -> PRes<'a, Ast> {
        let at = self.pos(i);
        let exponent = recognize(pair(
            alt((char('e'), char('E'))),
            pair(opt(alt((char('+'), char('-')))), digit1),
        ));
        let (rest, text) = recognize((
            take_while(|c: char| c.is_ascii_digit()),
            opt(pair(char('.'), digit1)),
            opt(exponent),
        ))
        .parse(i)?;
        if rest.starts_with(is_ident_start) && !text.contains(['.', 'e', 'E']) {
            return self.duration(i);
        }
        if rest.starts_with(|c: char| is_ident_char(c) || c == '.') {
            let (_, word) =
                take_while::<_, _, PErr<'a>>(|c: char| is_ident_char(c) || c == '.')(i)?;
            return fail(i, ExprErrorKind::BadNumber(word.to_owned()));
        }
        match text.parse::<f64>() {
            Ok(n) if n.is_finite() && !text.is_empty() => Ok((
                rest,
                Ast {
                    at,
                    kind: AstKind::Num(n),
                },
            )),
            _ => {
                let (_, word) =
                    take_while::<_, _, PErr<'a>>(|c: char| is_ident_char(c) || c == '.')(i)?;
                fail(i, ExprErrorKind::BadNumber(word.to_owned()))
            }
        }
    }

    /// `1h`, `30m`, `1h30m`, `90s`, `2d`.
    fn duration(&self, i: &'a str) -> PRes<'a, Ast> {
        let at = self.pos(i);
        let (rest, text) = take_while1(|c: char| is_ident_char(c) || c == '.')(i)?;
        let mut seconds = 0.0;
        let mut s = text;
        while !s.is_empty() {
            let digits = s.bytes().take_while(u8::is_ascii_digit).count();
            let unit_len = s[digits..]
                .bytes()
                .take_while(u8::is_ascii_alphabetic)
                .count();
            let (n, unit) = (&s[..digits], &s[digits..digits + unit_len]);
            let factor = match unit {
                "s" => 1.0,
                "m" => 60.0,
                "h" => 3600.0,
                "d" => 86_400.0,
                _ => return fail(i, ExprErrorKind::BadDuration(text.to_owned())),
            };
            let Ok(n) = n.parse::<u32>() else {
                return fail(i, ExprErrorKind::BadDuration(text.to_owned()));
            };
            seconds += f64::from(n) * factor;
            s = &s[digits + unit_len..];
        }
        Ok((
            rest,
            Ast {
                at,
                kind: AstKind::Dur(seconds, text.to_owned()),
            },
        ))
    }

    fn string(i: &'a str) -> PRes<'a, String> {
        let mut chars = i.char_indices();
        let Some((_, quote)) = chars.next() else {
            return fail(i, ExprErrorKind::UnterminatedString);
        };
        let mut out = String::new();
        let mut escaped = false;
        for (idx, c) in chars {
            if escaped {
                out.push(c);
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == quote {
                return Ok((&i[idx + c.len_utf8()..], out));
            } else {
                out.push(c);
            }
        }
        fail(i, ExprErrorKind::UnterminatedString)
    }
}

fn bin(op: BinOp, at: usize, lhs: Ast, rhs: Ast) -> Ast {
    Ast {
        at: lhs.at,
        kind: AstKind::Bin(op, at, Box::new(lhs), Box::new(rhs)),
    }
}

/// Parses an expression into its syntax tree.
pub(crate) fn parse(text: &str) -> Result<Ast, ExprError> {
    let p = Grammar { full: text };
    let to_error = |e: PErr<'_>| {
        let offset = p.pos(e.at);
        let kind = e.kind.unwrap_or_else(|| ExprErrorKind::Expected {
            expected: "a value, field, $param or function",
            found: found(e.at),
        });
        ExprError::at(text, offset, kind)
    };
    match p.expr(text, 0) {
        Ok((rest, ast)) => {
            let rest = Grammar::ws(rest);
            if rest.is_empty() {
                Ok(ast)
            } else {
                Err(ExprError::at(
                    text,
                    p.pos(rest),
                    ExprErrorKind::Expected {
                        expected: "an operator or the end of the expression",
                        found: found(rest),
                    },
                ))
            }
        }
        Err(nom::Err::Error(e) | nom::Err::Failure(e)) => Err(to_error(e)),
        // Only streaming parsers return Incomplete; these are all `complete`.
        Err(nom::Err::Incomplete(_)) => Err(ExprError::at(
            text,
            text.len(),
            ExprErrorKind::Expected {
                expected: "more input",
                found: found(""),
            },
        )),
    }
}

// ---------------------------------------------------------------------------------------
// Compiled form
// ---------------------------------------------------------------------------------------

/// Slot of a field in a profile's field table.
pub type FieldSlot = u16;
/// Slot of a `$param` in a profile's param table.
pub type ParamSlot = u16;

/// A compiled node: fields and params are slots, functions are resolved, literals folded.
#[derive(Debug, Clone, PartialEq)]
enum Node {
    Num(f64),
    Bool(bool),
    Text(Box<str>),
    Field(FieldSlot),
    Param(ParamSlot),
    Neg(Box<Node>),
    Not(Box<Node>),
    Arith(BinOp, Box<Node>, Box<Node>),
    Cmp(BinOp, Box<Node>, Box<Node>),
    And(Box<Node>, Box<Node>),
    Or(Box<Node>, Box<Node>),
    /// `delta`/`rate`: the field, its history slot, the window in seconds.
    Change {
        field: FieldSlot,
        history: u16,
        window_s: i64,
        rate: bool,
    },
    Distance(Box<[Node; 4]>),
    Abs(Box<Node>),
    Min(Box<[Node]>),
    Max(Box<[Node]>),
    LocalHour,
    Present(FieldSlot),
}

/// A compiled expression (one `expr` or `clear` of a rule).
#[derive(Debug, Clone, PartialEq)]
pub struct Expr {
    root: Node,
}

/// The names a profile's rules refer to, each given a slot once; shared by every
/// expression and summary of the profile so a reading is resolved once for all its rules.
#[derive(Debug, Clone, Default)]
pub struct Symbols {
    /// Field names by slot.
    pub fields: Vec<Box<str>>,
    /// `$param` names (without `$`) by slot.
    pub params: Vec<Box<str>>,
    /// Fields `delta`/`rate` need a history of: (field slot, longest window in seconds).
    pub history: Vec<(FieldSlot, i64)>,
}

impl Symbols {
    pub(crate) fn field(&mut self, name: &str) -> Option<FieldSlot> {
        if let Some(i) = self.fields.iter().position(|f| &**f == name) {
            return FieldSlot::try_from(i).ok();
        }
        if self.fields.len() >= MAX_FIELDS {
            return None;
        }
        self.fields.push(name.into());
        FieldSlot::try_from(self.fields.len() - 1).ok()
    }

    pub(crate) fn param(&mut self, name: &str) -> Option<ParamSlot> {
        if let Some(i) = self.params.iter().position(|f| &**f == name) {
            return ParamSlot::try_from(i).ok();
        }
        if self.params.len() >= MAX_PARAMS {
            return None;
        }
        self.params.push(name.into());
        ParamSlot::try_from(self.params.len() - 1).ok()
    }

    fn history(&mut self, field: FieldSlot, window_s: i64) -> u16 {
        if let Some(i) = self.history.iter().position(|(f, _)| *f == field) {
            if let Some(h) = self.history.get_mut(i) {
                h.1 = h.1.max(window_s);
            }
            return u16::try_from(i).unwrap_or(u16::MAX);
        }
        self.history.push((field, window_s));
        u16::try_from(self.history.len() - 1).unwrap_or(u16::MAX)
    }
}

/// Compiles expressions against a profile's [`Symbols`], checking field names against
/// what the codec produces when `known` is given.
pub struct Compiler<'s> {
    pub symbols: &'s mut Symbols,
    pub known: Option<&'s BTreeSet<String>>,
}

impl Compiler<'_> {
    /// Parses and compiles a condition (`expr` or `clear`).
    pub fn condition(&mut self, text: &str) -> Result<Expr, ExprError> {
        let ast = parse(text)?;
        let (root, ty) = self.node(text, &ast)?;
        if matches!(ty, Ty::Num | Ty::Text) {
            return Err(ExprError::at(text, ast.at, ExprErrorKind::NotCondition(ty)));
        }
        Ok(Expr { root })
    }

    /// Checks a field name (for summaries and the like) and gives its slot.
    pub fn field_slot(
        &mut self,
        text: &str,
        at: usize,
        name: &str,
    ) -> Result<FieldSlot, ExprError> {
        if let Some(known) = self.known {
            if !known.contains(name) {
                let suggestion = known
                    .iter()
                    .map(|k| (edit_distance(k, name), k))
                    .filter(|(d, _)| *d <= 3)
                    .min()
                    .map(|(_, k)| k.clone());
                return Err(ExprError::at(
                    text,
                    at,
                    ExprErrorKind::UnknownField {
                        name: name.to_owned(),
                        suggestion,
                    },
                ));
            }
        }
        self.symbols.field(name).ok_or_else(|| {
            ExprError::at(
                text,
                at,
                ExprErrorKind::TooMany {
                    what: "fields",
                    max: MAX_FIELDS,
                },
            )
        })
    }

    pub fn param_slot(
        &mut self,
        text: &str,
        at: usize,
        name: &str,
    ) -> Result<ParamSlot, ExprError> {
        self.symbols.param(name).ok_or_else(|| {
            ExprError::at(
                text,
                at,
                ExprErrorKind::TooMany {
                    what: "$params",
                    max: MAX_PARAMS,
                },
            )
        })
    }

    fn node(&mut self, text: &str, ast: &Ast) -> Result<(Node, Ty), ExprError> {
        let err = |at: usize, kind| ExprError::at(text, at, kind);
        Ok(match &ast.kind {
            AstKind::Num(n) => (Node::Num(*n), Ty::Num),
            AstKind::Bool(b) => (Node::Bool(*b), Ty::Bool),
            AstKind::Str(s) => (Node::Text(s.as_str().into()), Ty::Text),
            AstKind::Dur(_, t) => {
                return Err(err(ast.at, ExprErrorKind::DurationOutsideWindow(t.clone())))
            }
            AstKind::Field(name) => (Node::Field(self.field_slot(text, ast.at, name)?), Ty::Any),
            AstKind::Param(name) => (
                Node::Param(self.param_slot(text, ast.at + 1, name)?),
                Ty::Any,
            ),
            AstKind::Neg(inner) => {
                let (n, ty) = self.node(text, inner)?;
                expect(text, "-", inner.at, ty, Ty::Num)?;
                match n {
                    Node::Num(v) => (Node::Num(-v), Ty::Num),
                    n => (Node::Neg(Box::new(n)), Ty::Num),
                }
            }
            AstKind::Not(inner) => {
                let (n, ty) = self.node(text, inner)?;
                expect(text, "not", inner.at, ty, Ty::Bool)?;
                (Node::Not(Box::new(n)), Ty::Bool)
            }
            AstKind::Bin(op, op_at, l, r) => {
                let (ln, lt) = self.node(text, l)?;
                let (rn, rt) = self.node(text, r)?;
                let (lb, rb) = (Box::new(ln), Box::new(rn));
                match op {
                    BinOp::And | BinOp::Or => {
                        expect(text, op.symbol(), l.at, lt, Ty::Bool)?;
                        expect(text, op.symbol(), r.at, rt, Ty::Bool)?;
                        let n = if *op == BinOp::And {
                            Node::And(lb, rb)
                        } else {
                            Node::Or(lb, rb)
                        };
                        (n, Ty::Bool)
                    }
                    BinOp::Eq | BinOp::Ne => {
                        if lt != Ty::Any && rt != Ty::Any && lt != rt {
                            return Err(err(
                                *op_at,
                                ExprErrorKind::Incomparable {
                                    left: lt,
                                    right: rt,
                                },
                            ));
                        }
                        (Node::Cmp(*op, lb, rb), Ty::Bool)
                    }
                    BinOp::Lt | BinOp::Le | BinOp::Gt | BinOp::Ge => {
                        expect(text, op.symbol(), l.at, lt, Ty::Num)?;
                        expect(text, op.symbol(), r.at, rt, Ty::Num)?;
                        (Node::Cmp(*op, lb, rb), Ty::Bool)
                    }
                    BinOp::Add | BinOp::Sub | BinOp::Mul | BinOp::Div => {
                        expect(text, op.symbol(), l.at, lt, Ty::Num)?;
                        expect(text, op.symbol(), r.at, rt, Ty::Num)?;
                        match (&*lb, &*rb) {
                            (Node::Num(a), Node::Num(b)) => {
                                (Node::Num(arith(*op, *a, *b)), Ty::Num)
                            }
                            _ => (Node::Arith(*op, lb, rb), Ty::Num),
                        }
                    }
                }
            }
            AstKind::Call(name, args) => self.call(text, ast.at, name, args)?,
        })
    }

    fn numbers(
        &mut self,
        text: &str,
        function: &'static str,
        args: &[Ast],
    ) -> Result<Vec<Node>, ExprError> {
        args.iter()
            .map(|a| {
                let (n, ty) = self.node(text, a)?;
                expect(text, function, a.at, ty, Ty::Num)?;
                Ok(n)
            })
            .collect()
    }

    fn call(
        &mut self,
        text: &str,
        at: usize,
        name: &str,
        args: &[Ast],
    ) -> Result<(Node, Ty), ExprError> {
        let err = |at: usize, kind| ExprError::at(text, at, kind);
        let arity = |function: &'static str, expected: &'static str| {
            err(
                at,
                ExprErrorKind::Arity {
                    function,
                    expected,
                    found: args.len(),
                },
            )
        };
        Ok(match name {
            "delta" | "rate" => {
                let function = if name == "delta" { "delta" } else { "rate" };
                let [field, window] = args else {
                    return Err(arity(function, "2 arguments (field, window)"));
                };
                let AstKind::Field(fname) = &field.kind else {
                    return Err(err(field.at, ExprErrorKind::FieldArgument { function }));
                };
                let slot = self.field_slot(text, field.at, fname)?;
                let window_s = match window.kind {
                    AstKind::Dur(s, _) if s >= 1.0 => s as i64,
                    _ => return Err(err(window.at, ExprErrorKind::Window { function })),
                };
                let history = self.symbols.history(slot, window_s);
                (
                    Node::Change {
                        field: slot,
                        history,
                        window_s,
                        rate: function == "rate",
                    },
                    Ty::Num,
                )
            }
            "present" => {
                let [field] = args else {
                    return Err(arity("present", "1 argument (a field)"));
                };
                let AstKind::Field(fname) = &field.kind else {
                    return Err(err(
                        field.at,
                        ExprErrorKind::FieldArgument {
                            function: "present",
                        },
                    ));
                };
                (
                    Node::Present(self.field_slot(text, field.at, fname)?),
                    Ty::Bool,
                )
            }
            "distance_m" => {
                let nodes = self.numbers(text, "distance_m", args)?;
                let nodes: Box<[Node; 4]> = nodes
                    .into_boxed_slice()
                    .try_into()
                    .map_err(|_| arity("distance_m", "4 arguments (lat, lon, lat2, lon2)"))?;
                (Node::Distance(nodes), Ty::Num)
            }
            "abs" => {
                let mut nodes = self.numbers(text, "abs", args)?;
                let (Some(n), true) = (nodes.pop(), args.len() == 1) else {
                    return Err(arity("abs", "1 argument"));
                };
                (Node::Abs(Box::new(n)), Ty::Num)
            }
            "min" | "max" => {
                let function = if name == "min" { "min" } else { "max" };
                if args.len() < 2 {
                    return Err(arity(function, "2 or more arguments"));
                }
                let nodes = self.numbers(text, function, args)?.into_boxed_slice();
                if function == "min" {
                    (Node::Min(nodes), Ty::Num)
                } else {
                    (Node::Max(nodes), Ty::Num)
                }
            }
            "local_hour" => {
                if !args.is_empty() {
                    return Err(arity("local_hour", "no arguments"));
                }
                (Node::LocalHour, Ty::Num)
            }
            _ => return Err(err(at, ExprErrorKind::UnknownFunction(name.to_owned()))),
        })
    }
}

fn expect(
    text: &str,
    op: &'static str,
    at: usize,
    found: Ty,
    expected: Ty,
) -> Result<(), ExprError> {
    if found == Ty::Any || found == expected {
        Ok(())
    } else {
        Err(ExprError::at(
            text,
            at,
            ExprErrorKind::Type {
                op,
                expected,
                found,
            },
        ))
    }
}

fn arith(op: BinOp, a: f64, b: f64) -> f64 {
    match op {
        BinOp::Add => a + b,
        BinOp::Sub => a - b,
        BinOp::Mul => a * b,
        _ => a / b,
    }
}

/// Levenshtein distance, for "did you mean" suggestions.
pub(crate) fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let (Some(&diag), Some(&up), Some(&left)) = (prev.get(j), prev.get(j + 1), cur.get(j))
            else {
                continue;
            };
            if let Some(c) = cur.get_mut(j + 1) {
                *c = (diag + usize::from(ca != *cb)).min(up + 1).min(left + 1);
            }
        }
        prev = cur;
    }
    prev.last().copied().unwrap_or(0)
}

// ---------------------------------------------------------------------------------------
// Evaluation
// ---------------------------------------------------------------------------------------

/// A run-time value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum V<'a> {
    Num(f64),
    Bool(bool),
    Text(&'a str),
}

impl V<'_> {
    fn ty(&self) -> Ty {
        match self {
            V::Num(_) => Ty::Num,
            V::Bool(_) => Ty::Bool,
            V::Text(_) => Ty::Text,
        }
    }
}

/// Why a rule could not be evaluated on a reading (not "unknown": an error to count).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EvalError {
    #[error("the device has no parameter for slot {0}")]
    MissingParam(ParamSlot),
    #[error("expected {expected}, found {found}")]
    Type { expected: Ty, found: Ty },
}

impl EvalError {
    /// The `reason` label of `nbiot_alert_rule_errors_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            EvalError::MissingParam(_) => "missing_param",
            EvalError::Type { .. } => "type",
        }
    }
}

/// How many samples one field's history keeps at most (see [`FieldHistory::push`]).
pub const HISTORY_CAP: usize = 64;

/// A device's recent values of one field, oldest first, for `delta`/`rate`: (rule time in
/// seconds, value).
///
/// It keeps every sample newer than the longest window plus the newest one at or before
/// it (the baseline `delta` compares with). Samples closer together than window / 62 are
/// thinned (a new sample replaces the previous one instead of being added), so a device
/// that reports every few seconds still needs at most [`HISTORY_CAP`] samples; the
/// baseline is then at most window / 62 older than it would be unthinned.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FieldHistory {
    samples: std::collections::VecDeque<(i64, f64)>,
}

impl FieldHistory {
    /// The newest sample at or before `t`.
    pub fn at_or_before(&self, t: i64) -> Option<(i64, f64)> {
        let n = self.samples.partition_point(|(ts, _)| *ts <= t);
        n.checked_sub(1).and_then(|i| self.samples.get(i).copied())
    }

    /// Adds the sample and forgets what the longest window `window_s` no longer needs. A
    /// sample older than the newest is put in its place (a register the device stored
    /// earlier, a backlog sent out of order); the series stays in time order.
    pub fn push(&mut self, t: i64, v: f64, window_s: i64) {
        if self.samples.back().is_some_and(|(last, _)| t < *last) {
            let at = self.samples.partition_point(|(ts, _)| *ts <= t);
            self.samples.insert(at, (t, v));
            self.prune(window_s);
            return;
        }
        let min_gap = window_s / (HISTORY_CAP as i64 - 2);
        let n = self.samples.len();
        let thin = n >= 2
            && matches!(
                (self.samples.get(n - 2), self.samples.get(n - 1)),
                (Some((a, _)), Some((b, _))) if b - a < min_gap
            );
        if thin {
            if let Some(last) = self.samples.back_mut() {
                *last = (t, v);
            }
        } else {
            self.samples.push_back((t, v));
        }
        self.prune(window_s);
    }

    /// Keeps the samples newer than the window before the newest, plus one at or before it.
    fn prune(&mut self, window_s: i64) {
        let Some(&(newest, _)) = self.samples.back() else {
            return;
        };
        let cutoff = newest.saturating_sub(window_s);
        while self.samples.get(1).is_some_and(|(ts, _)| *ts <= cutoff) {
            self.samples.pop_front();
        }
        while self.samples.len() > HISTORY_CAP {
            self.samples.pop_front();
        }
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// The samples, oldest first.
    pub fn samples(&self) -> impl ExactSizeIterator<Item = (i64, f64)> + '_ {
        self.samples.iter().copied()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }
}

/// What an expression is evaluated against: one reading of one device.
pub struct Env<'a> {
    /// The reading's fields.
    pub fields: &'a [(Name, Value)],
    /// Field slot → index into `fields` (`NONE` when absent).
    pub slots: &'a [u16],
    /// Param slot → the device's value.
    pub params: &'a [Option<&'a ParamValue>],
    /// History slot → the device's samples before this reading (empty: none kept yet).
    pub history: &'a [FieldHistory],
    /// The rule clock: the reading's time, seconds since the Unix epoch.
    pub time_s: i64,
    /// The profile's `utc_offset`, for `local_hour()`.
    pub utc_offset_s: i64,
}

/// `Env::slots` value of a field the reading does not carry.
pub const NONE: u16 = u16::MAX;

type R<'a> = Result<Option<V<'a>>, EvalError>;

impl<'a> Env<'a> {
    fn field(&self, slot: FieldSlot) -> Option<V<'a>> {
        let idx = *self.slots.get(usize::from(slot))?;
        let (_, v) = self.fields.get(usize::from(idx))?;
        Some(match v {
            Value::Int(i) => V::Num(*i as f64),
            Value::Float(f) => V::Num(*f),
            Value::Bool(b) => V::Bool(*b),
            Value::Text(t) => V::Text(t.as_str()),
        })
    }

    fn param(&self, slot: ParamSlot) -> Result<V<'a>, EvalError> {
        match self.params.get(usize::from(slot)).copied().flatten() {
            Some(ParamValue::Number(n)) => Ok(V::Num(*n)),
            Some(ParamValue::Bool(b)) => Ok(V::Bool(*b)),
            Some(ParamValue::Text(t)) => Ok(V::Text(t)),
            None => Err(EvalError::MissingParam(slot)),
        }
    }
}

fn num(v: Option<V<'_>>) -> Result<Option<f64>, EvalError> {
    match v {
        None => Ok(None),
        Some(V::Num(n)) => Ok(Some(n)),
        Some(other) => Err(EvalError::Type {
            expected: Ty::Num,
            found: other.ty(),
        }),
    }
}

fn boolean(v: Option<V<'_>>) -> Result<Option<bool>, EvalError> {
    match v {
        None => Ok(None),
        Some(V::Bool(b)) => Ok(Some(b)),
        Some(other) => Err(EvalError::Type {
            expected: Ty::Bool,
            found: other.ty(),
        }),
    }
}

/// Great-circle distance in metres (haversine, mean Earth radius).
pub fn haversine_m(lat1: f64, lon1: f64, lat2: f64, lon2: f64) -> f64 {
    const R: f64 = 6_371_008.8;
    let (p1, p2) = (lat1.to_radians(), lat2.to_radians());
    let dp = (lat2 - lat1).to_radians();
    let dl = (lon2 - lon1).to_radians();
    let a = (dp / 2.0).sin().powi(2) + p1.cos() * p2.cos() * (dl / 2.0).sin().powi(2);
    2.0 * R * a.sqrt().min(1.0).asin()
}

impl Node {
    fn eval<'a>(&'a self, env: &Env<'a>) -> R<'a> {
        Ok(match self {
            Node::Num(n) => Some(V::Num(*n)),
            Node::Bool(b) => Some(V::Bool(*b)),
            Node::Text(t) => Some(V::Text(t)),
            Node::Field(s) => env.field(*s),
            Node::Param(s) => Some(env.param(*s)?),
            Node::Neg(n) => num(n.eval(env)?)?.map(|v| V::Num(-v)),
            Node::Arith(op, l, r) => {
                let (l, r) = (num(l.eval(env)?)?, num(r.eval(env)?)?);
                match (l, r) {
                    (Some(a), Some(b)) => {
                        let v = arith(*op, a, b);
                        // Division by zero is unknown, not infinity.
                        v.is_finite().then_some(V::Num(v))
                    }
                    _ => None,
                }
            }
            Node::Cmp(..) | Node::And(..) | Node::Or(..) | Node::Not(_) | Node::Present(_) => {
                self.cond(env)?.0.map(V::Bool)
            }
            Node::Change {
                field,
                history,
                window_s,
                rate,
            } => {
                let Some(now) = num(env.field(*field))? else {
                    return Ok(None);
                };
                let Some(h) = env.history.get(usize::from(*history)) else {
                    return Ok(None);
                };
                let Some((t0, v0)) = h.at_or_before(env.time_s - window_s) else {
                    return Ok(None);
                };
                let d = now - v0;
                if *rate {
                    let dt = env.time_s - t0;
                    (dt > 0).then(|| V::Num(d / dt as f64))
                } else {
                    Some(V::Num(d))
                }
            }
            Node::Distance(args) => {
                let [a, b, c, d] = &**args;
                match (
                    num(a.eval(env)?)?,
                    num(b.eval(env)?)?,
                    num(c.eval(env)?)?,
                    num(d.eval(env)?)?,
                ) {
                    (Some(a), Some(b), Some(c), Some(d)) => Some(V::Num(haversine_m(a, b, c, d))),
                    _ => None,
                }
            }
            Node::Abs(n) => num(n.eval(env)?)?.map(|v| V::Num(v.abs())),
            Node::Min(ns) | Node::Max(ns) => {
                let max = matches!(self, Node::Max(_));
                let mut acc: Option<f64> = None;
                for n in ns.iter() {
                    let Some(v) = num(n.eval(env)?)? else {
                        return Ok(None);
                    };
                    acc = Some(match acc {
                        None => v,
                        Some(a) if max => a.max(v),
                        Some(a) => a.min(v),
                    });
                }
                acc.map(V::Num)
            }
            Node::LocalHour => {
                let local = env.time_s + env.utc_offset_s;
                Some(V::Num(local.rem_euclid(86_400).div_euclid(3600) as f64))
            }
        })
    }

    /// A condition: its truth (None = unknown) and the value that decided it (the left
    /// side of the deciding comparison, 1/0 for a boolean), for the alert's `value`.
    fn cond<'a>(&'a self, env: &Env<'a>) -> Result<(Option<bool>, Option<f64>), EvalError> {
        Ok(match self {
            Node::Cmp(op, l, r) => {
                let lv = l.eval(env)?;
                let witness = match lv {
                    Some(V::Num(n)) => Some(n),
                    Some(V::Bool(b)) => Some(f64::from(u8::from(b))),
                    _ => None,
                };
                (compare(*op, lv, r.eval(env)?)?, witness)
            }
            Node::And(l, r) => {
                let (lt, lw) = l.cond(env)?;
                if lt == Some(false) {
                    return Ok((Some(false), lw));
                }
                let (rt, rw) = r.cond(env)?;
                match (lt, rt) {
                    (_, Some(false)) => (Some(false), rw),
                    (Some(true), Some(true)) => (Some(true), rw.or(lw)),
                    _ => (None, None),
                }
            }
            Node::Or(l, r) => {
                let (lt, lw) = l.cond(env)?;
                if lt == Some(true) {
                    return Ok((Some(true), lw));
                }
                let (rt, rw) = r.cond(env)?;
                match (lt, rt) {
                    (_, Some(true)) => (Some(true), rw),
                    (Some(false), Some(false)) => (Some(false), rw.or(lw)),
                    _ => (None, None),
                }
            }
            Node::Not(n) => {
                let (t, w) = n.cond(env)?;
                (t.map(|b| !b), w)
            }
            Node::Present(s) => (Some(env.field(*s).is_some()), None),
            other => {
                let b = boolean(other.eval(env)?)?;
                (b, b.map(|b| f64::from(u8::from(b))))
            }
        })
    }
}

fn compare(op: BinOp, lv: Option<V<'_>>, rv: Option<V<'_>>) -> Result<Option<bool>, EvalError> {
    let (Some(a), Some(b)) = (lv, rv) else {
        return Ok(None);
    };
    let ord = match (a, b) {
        (V::Num(x), V::Num(y)) => x.partial_cmp(&y),
        (V::Bool(x), V::Bool(y)) if matches!(op, BinOp::Eq | BinOp::Ne) => Some(x.cmp(&y)),
        (V::Text(x), V::Text(y)) if matches!(op, BinOp::Eq | BinOp::Ne) => Some(x.cmp(y)),
        (a, b) => {
            let expected = if matches!(op, BinOp::Eq | BinOp::Ne) {
                a.ty()
            } else {
                Ty::Num
            };
            let found = if a.ty() == expected { b.ty() } else { a.ty() };
            return Err(EvalError::Type { expected, found });
        }
    };
    let Some(ord) = ord else {
        return Ok(None);
    };
    use std::cmp::Ordering::*;
    Ok(Some(match op {
        BinOp::Eq => ord == Equal,
        BinOp::Ne => ord != Equal,
        BinOp::Lt => ord == Less,
        BinOp::Le => ord != Greater,
        BinOp::Gt => ord == Greater,
        _ => ord != Less,
    }))
}

impl Expr {
    /// Evaluates the condition: Some(true/false), or None when unknown (a field missing),
    /// with the value that decided it.
    pub fn eval<'a>(&'a self, env: &Env<'a>) -> Result<(Option<bool>, Option<f64>), EvalError> {
        self.root.cond(env)
    }

    /// Whether the expression reads `$param` slot `slot` (for error messages).
    pub fn uses_param(&self, slot: ParamSlot) -> bool {
        fn walk(n: &Node, slot: ParamSlot) -> bool {
            match n {
                Node::Param(s) => *s == slot,
                Node::Neg(a) | Node::Not(a) | Node::Abs(a) => walk(a, slot),
                Node::Arith(_, a, b) | Node::Cmp(_, a, b) | Node::And(a, b) | Node::Or(a, b) => {
                    walk(a, slot) || walk(b, slot)
                }
                Node::Distance(ns) => ns.iter().any(|n| walk(n, slot)),
                Node::Min(ns) | Node::Max(ns) => ns.iter().any(|n| walk(n, slot)),
                _ => false,
            }
        }
        walk(&self.root, slot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> (usize, String) {
        let mut symbols = Symbols::default();
        let known: BTreeSet<String> = [
            "volume_m3",
            "leak",
            "battery_pct",
            "button_event",
            "latitude_deg",
            "longitude_deg",
        ]
        .into_iter()
        .map(String::from)
        .collect();
        let mut c = Compiler {
            symbols: &mut symbols,
            known: Some(&known),
        };
        let e = c.condition(text).expect_err(text);
        (e.column, e.kind.to_string())
    }

    #[test]
    fn parse_errors_point_at_the_column() {
        let cases: &[(&str, usize, &str)] = &[
            ("battery_pct < ", 15, "expected a value, field, $param or function, found the end of the expression"),
            ("battery_pct <> 3", 14, "expected a value, field, $param or function, found `>`"),
            ("battery_pct = 3", 13, "expected `==` to compare, found `=`"),
            ("(leak or leak", 14, "expected `)`, found the end of the expression"),
            ("leak leak", 6, "expected an operator or the end of the expression, found `leak`"),
            ("1 < battery_pct < 3", 17, "comparisons do not chain: write `a < b and b < c`"),
            ("button_event == \"sos", 17, "unterminated string"),
            ("delta(volume_m3, 1x) > 0", 18, "`1x` is not a duration (units s, m, h, d: e.g. 30s, 15m, 1h, 1h30m)"),
            ("battery_pct > 1h", 15, "a duration (`1h`) is only allowed as the window of delta() or rate()"),
            ("delta(volume_m3 * 2, 1h) > 0", 7, "the first argument of delta() must be a field name"),
            ("delta(volume_m3, 5) > 0", 18, "the window of delta() must be a duration longer than zero, e.g. 1h or 15m"),
            ("delta(volume_m3) > 0", 1, "delta() takes 2 arguments (field, window), found 1"),
            ("sqrt(volume_m3) > 0", 1, "unknown function `sqrt` (known: delta, rate, distance_m, abs, min, max, local_hour, present)"),
            ("volume_m4 > 1", 1, "field `volume_m4` is not produced by this profile's codec (did you mean `volume_m3`?)"),
            ("leak and battery_pcx < 3", 10, "field `battery_pcx` is not produced by this profile's codec (did you mean `battery_pct`?)"),
            ("battery_pct + 1", 1, "the expression must be a condition (true or false), but it is a number"),
            ("leak and 3", 10, "`and` needs a boolean, but this operand is a number"),
            ("\"a\" < 3", 1, "`<` needs a number, but this operand is text"),
            ("true == 3", 6, "a boolean and a number cannot be compared"),
            ("$ > 1", 2, "expected a parameter name after `$`, found `>`"),
            ("leak and", 9, "expected a value, field, $param or function, found the end of the expression"),
            ("1.2.3 > 0", 1, "`1.2.3` is not a number"),
            ("é > 1", 1, "expected a value, field, $param or function, found `é`"),
            ("leak and ü", 10, "expected a value, field, $param or function, found `ü`"),
        ];
        for (text, column, message) in cases {
            assert_eq!(err(text), (*column, (*message).to_owned()), "{text}");
        }
    }

    const TOO_DEEP: &str =
        "the expression is nested too deeply or chains too many operators (more than 64 levels)";

    #[test]
    fn deep_nesting_is_refused_not_overflowed() {
        let deep = format!("{}leak{}", "(".repeat(500), ")".repeat(500));
        assert_eq!(err(&deep).1, TOO_DEEP);
        let nots = format!("{}leak", "not ".repeat(500));
        assert_eq!(err(&nots).1, TOO_DEEP);
        let negs = format!("{}1 > 0", "-".repeat(500));
        assert_eq!(err(&negs).1, TOO_DEEP);
        let chain = format!("leak{}", " or leak".repeat(500));
        assert_eq!(err(&chain).1, TOO_DEEP);
        let sum = format!("1{} > 0", " + 1".repeat(500));
        assert_eq!(err(&sum).1, TOO_DEEP);
    }

    /// Evaluates `text` over `fields` with `$p = 10`, `$name = "x"`.
    fn eval(
        text: &str,
        fields: &[(Name, Value)],
    ) -> Result<(Option<bool>, Option<f64>), EvalError> {
        let mut symbols = Symbols::default();
        let expr = Compiler {
            symbols: &mut symbols,
            known: None,
        }
        .condition(text)
        .expect(text);
        let slots: Vec<u16> = symbols
            .fields
            .iter()
            .map(|f| {
                fields
                    .iter()
                    .position(|(n, _)| n.as_str() == &**f)
                    .map_or(NONE, |i| i as u16)
            })
            .collect();
        let p = ParamValue::Number(10.0);
        let name = ParamValue::Text("x".into());
        let params: Vec<Option<&ParamValue>> = symbols
            .params
            .iter()
            .map(|n| match &**n {
                "p" => Some(&p),
                "name" => Some(&name),
                _ => None,
            })
            .collect();
        let history: Vec<FieldHistory> = symbols
            .history
            .iter()
            .map(|_| FieldHistory::default())
            .collect();
        let env = Env {
            fields,
            slots: &slots,
            params: &params,
            history: &history,
            time_s: 1_700_000_000,
            utc_offset_s: 8 * 3600,
        };
        expr.eval(&env)
    }

    #[test]
    fn evaluates_with_three_valued_logic() {
        let f = |n: &'static str, v: Value| (Name::Static(n), v);
        let fields = [
            f("a", Value::Int(5)),
            f("b", Value::Float(2.5)),
            f("on", Value::Bool(true)),
            f("off", Value::Bool(false)),
            f("t", Value::Text("x".into())),
        ];
        let cases: &[(&str, Option<bool>, Option<f64>)] = &[
            ("a > 4", Some(true), Some(5.0)),
            ("a * 2 - b >= 7.5", Some(true), Some(7.5)),
            ("-a < -4", Some(true), Some(-5.0)),
            ("a / 0 > 1", None, None),
            ("a == 5 and b != 2.5", Some(false), Some(2.5)),
            ("on", Some(true), Some(1.0)),
            ("not off", Some(true), Some(0.0)),
            ("missing > 1", None, None),
            ("missing > 1 and off", Some(false), Some(0.0)),
            ("missing > 1 or on", Some(true), Some(1.0)),
            ("missing > 1 or off", None, None),
            ("off and missing > 1", Some(false), Some(0.0)),
            ("not (missing > 1)", None, None),
            ("present(missing) or present(a)", Some(true), None),
            ("t == 'x' and t != \"y\"", Some(true), None),
            ("t == $name", Some(true), None),
            ("a > $p / 4", Some(true), Some(5.0)),
            (
                "abs(-a) == 5 and min(a, b, 9) == 2.5 and max(a, b) == 5",
                Some(true),
                Some(5.0),
            ),
            // 1_700_000_000 is 22:13:20 UTC: 06:13 at +08:00.
            ("local_hour() == 6", Some(true), Some(6.0)),
            ("delta(a, 1h) > 0", None, None),
            (
                "distance_m(0, 0, 0, 1) > 111000 and distance_m(0, 0, 0, 1) < 111400",
                Some(true),
                Some(111_195.08),
            ),
        ];
        for (text, truth, witness) in cases {
            let (t, w) = eval(text, &fields).expect(text);
            assert_eq!(t, *truth, "{text}");
            match (w, witness) {
                (Some(w), Some(x)) => assert!((w - x).abs() < 0.01, "{text}: {w}"),
                (w, x) => assert_eq!(w, *x, "{text}"),
            }
        }
        assert_eq!(eval("a > $nope", &fields), Err(EvalError::MissingParam(0)));
        assert_eq!(
            eval("t > 1", &fields),
            Err(EvalError::Type {
                expected: Ty::Num,
                found: Ty::Text
            })
        );
        assert_eq!(
            eval("on == 1", &fields),
            Err(EvalError::Type {
                expected: Ty::Bool,
                found: Ty::Num
            })
        );
        assert_eq!(
            eval("a", &fields),
            Err(EvalError::Type {
                expected: Ty::Bool,
                found: Ty::Num
            })
        );
        // Short-circuit: the missing param is not needed when the left side decides.
        assert_eq!(
            eval("off and a > $nope", &fields),
            Ok((Some(false), Some(0.0)))
        );
    }

    /// Random token soup and random characters: the parser and the evaluator answer every
    /// input with a result, never a panic (a stable stand-in for a fuzz target).
    #[test]
    fn never_panics_on_any_input() {
        const PIECES: &[&str] = &[
            "a",
            "b",
            "on",
            "t",
            "$p",
            "$name",
            "$",
            "1",
            "0",
            "1.5",
            "1e3",
            "1h",
            "0s",
            "'x'",
            "\"",
            "(",
            ")",
            ",",
            "+",
            "-",
            "*",
            "/",
            "==",
            "!=",
            "<",
            "<=",
            ">",
            ">=",
            "=",
            "and",
            "or",
            "not",
            "true",
            "false",
            "delta(",
            "rate(",
            "distance_m(",
            "abs(",
            "min(",
            "max(",
            "local_hour(",
            "present(",
            "é",
            " ",
            "{",
            "\\",
            ".",
            "_",
        ];
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let f = |n: &'static str, v: Value| (Name::Static(n), v);
        let fields = [
            f("a", Value::Int(5)),
            f("b", Value::Float(2.5)),
            f("on", Value::Bool(true)),
            f("t", Value::Text("x".into())),
        ];
        for _ in 0..20_000 {
            let len = next() % 12;
            let mut text = String::new();
            for _ in 0..len {
                let r = next();
                if r % 10 == 0 {
                    text.push(char::from_u32((r >> 8) as u32 % 0x3000).unwrap_or('?'));
                } else {
                    text.push_str(PIECES[(r >> 8) as usize % PIECES.len()]);
                }
            }
            let mut symbols = Symbols::default();
            let compiled = Compiler {
                symbols: &mut symbols,
                known: None,
            }
            .condition(&text);
            if compiled.is_ok() {
                let _ = eval(&text, &fields);
            }
        }
    }

    #[test]
    fn history_keeps_the_window_and_one_baseline_within_its_cap() {
        let mut h = FieldHistory::default();
        // Hourly samples, 1 h window: the newest, and the one an hour before (the baseline).
        for i in 0..10 {
            h.push(i * 3600, i as f64, 3600);
        }
        assert_eq!(
            h.samples().collect::<Vec<_>>(),
            [(8 * 3600, 8.0), (9 * 3600, 9.0)]
        );
        assert_eq!(h.at_or_before(9 * 3600 - 3600), Some((8 * 3600, 8.0)));
        assert_eq!(h.at_or_before(8 * 3600 - 1), None);
        // A sample every second over a day's window: thinned to at most the cap, the span
        // still reaching back a window.
        let mut h = FieldHistory::default();
        for t in 0..200_000 {
            h.push(t, t as f64, 86_400);
        }
        assert!(h.len() <= HISTORY_CAP, "{}", h.len());
        let first = h.samples().next().unwrap().0;
        assert!(
            first <= 199_999 - 86_400 && first > 199_999 - 86_400 - 86_400 / 62 - 1,
            "{first}"
        );
        // An older sample goes in its place, and what the window no longer needs goes.
        let mut h = FieldHistory::default();
        h.push(100, 1.0, 60);
        h.push(200, 3.0, 60);
        h.push(150, 2.0, 60);
        // 100 stays: it is the baseline of 200 (the newest at or before 200 - 60).
        assert_eq!(
            h.samples().collect::<Vec<_>>(),
            [(100, 1.0), (150, 2.0), (200, 3.0)]
        );
        h.push(10, 0.0, 60);
        assert_eq!(
            h.samples().collect::<Vec<_>>(),
            [(100, 1.0), (150, 2.0), (200, 3.0)]
        );
        h.push(260, 4.0, 60);
        assert_eq!(h.samples().collect::<Vec<_>>(), [(200, 3.0), (260, 4.0)]);
    }

    #[test]
    fn haversine_matches_known_distances() {
        // Paris – London, about 343.5 km.
        let d = haversine_m(48.8566, 2.3522, 51.5074, -0.1278);
        assert!((d - 343_556.0).abs() < 500.0, "{d}");
        assert_eq!(haversine_m(10.0, 20.0, 10.0, 20.0), 0.0);
    }
}
