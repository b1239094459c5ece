//! Layout compiler: checks a [`LayoutSpec`] and turns it into the [`Program`] the executor
//! runs. Every name, type, expression and table is resolved here, once, with an error that
//! carries the span of the TOML value at fault.
//!
//! Two passes: [`scan`] walks the spec to learn which names later items refer to (so only
//! those get a variable slot) and how often each field name occurs (a name that can be
//! emitted twice into one reading is replaced rather than appended at decode time); then
//! [`Compiler`] builds the ops.

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::{Arc, Mutex, OnceLock};

use toml::Spanned;

use super::checksum::Algorithm;
use super::exec::{
    BitfieldOp, ChecksumOp, Cond, ConstOp, Conv, Count, DatePart, Emit, EnumTable, IdentityKind,
    IfOp, IntType, Interval, Key, Len, Op, Pos, Program, RepeatOp, Selector, Sentinel, SliceOp,
    Source, SwitchOp, Test, TimeKind, TimeOp, TlvOp, Unknown, ValueOp, VarRef, MAX_VARS,
};
use super::spec::{Entries, ItemSpec, Items, LayoutSpec, Scalar};
use super::LayoutError;
use crate::Name;

type Span = Range<usize>;

/// Deepest nesting of groups (switch cases, repeats, TLV types, ...).
pub const MAX_DEPTH: usize = 16;
/// Most items one layout may hold (all levels together).
pub const MAX_ITEMS: usize = 4096;
/// Longest `const` and biggest fixed byte count.
const MAX_CONST: usize = 64;
const MAX_FIXED_LEN: i64 = 65_535;
const MAX_NAME: usize = 64;

const TYPE_NAMES: &str = "u8, u16, u24, u32, u40, u48, u56, u64, i8, i16, i24, i32, i40, i48, \
                          i56, i64, f32, f64, bcd, ascii, bytes";
const HEADS: &str = "field, var, time, const, skip, skip_while, mark, checksum, bitfield, \
                     switch, if, repeat, tlv, length (or `items` alone for a group)";
/// Unit suffixes dropped when an `"error"` sentinel names its flag (`flow_temperature_c` →
/// `flow_temperature_error`).
const UNIT_SUFFIXES: &[&str] = &[
    "_c", "_f", "_k", "_pct", "_m", "_mm", "_cm", "_km", "_v", "_mv", "_a", "_ma", "_w", "_kw",
    "_wh", "_kwh", "_m3", "_l", "_m3h", "_lh", "_deg", "_dbm", "_db", "_s", "_ms", "_h", "_bpm",
    "_ugm3", "_ppm", "_hpa", "_pa", "_kpa", "_bar", "_lux", "_hz", "_kmh", "_mps",
];

pub(crate) fn compile(spec: &LayoutSpec) -> Result<Program, LayoutError> {
    let big = match &spec.endian {
        None => true,
        Some(e) => parse_endian(e)?,
    };
    let trailing_error = match &spec.trailing {
        None => true,
        Some(t) => parse_trailing(t)?,
    };
    let mut scan = Scan::default();
    scan.items(&spec.items.get_ref().list);
    let mut c = Compiler {
        big,
        referenced: scan.referenced,
        counts: scan.counts,
        names: HashMap::new(),
        next_slot: 0,
        interned: HashMap::new(),
        field_names: Vec::new(),
        items: 0,
    };
    if spec.items.get_ref().list.is_empty() {
        return Err(LayoutError::new(
            Some(spec.items.span()),
            "a layout needs at least one item",
        ));
    }
    let root = c.block(&spec.items, Ctx::default())?;
    Ok(Program {
        root,
        trailing_error,
        main_fields: c.field_names.len().min(32),
        field_names: c.field_names,
    })
}

fn err<T>(span: Span, message: impl Into<String>) -> Result<T, LayoutError> {
    Err(LayoutError::new(Some(span), message))
}

/// `&'static str` for a name used in [`crate::DecodeError`] (whose `what` is static), so a
/// truncated payload says "temperature_c at byte 12" rather than "field at byte 12".
///
/// Names are leaked once each and shared by every layout that uses them; the set is capped
/// so that compiling arbitrary sources (fuzzing, a long-running gateway reloading edited
/// profiles) cannot grow it without bound — past the cap, errors say "field".
fn intern(name: &str) -> &'static str {
    try_intern(name).unwrap_or("field")
}

/// The interned `&'static str` for `name`, or `None` once the interner is full.
///
/// Field names use it too: a [`Name::Static`] costs nothing to put in a reading, where
/// cloning a [`Name::Shared`] is an atomic increment (and its drop a decrement) per field —
/// a third of a small decode. Past the cap, field names fall back to `Name::Shared`.
fn try_intern(name: &str) -> Option<&'static str> {
    const CAP: usize = 4096;
    static SET: OnceLock<Mutex<HashSet<&'static str>>> = OnceLock::new();
    let set = SET.get_or_init(Default::default);
    let mut set = set.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(s) = set.get(name) {
        return Some(s);
    }
    if set.len() >= CAP {
        return None;
    }
    let s: &'static str = Box::leak(name.to_owned().into_boxed_str());
    set.insert(s);
    Some(s)
}

/// What a name stands for, as far as expressions care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NameKind {
    Number,
    Float,
    Text,
    Mark,
}

#[derive(Debug, Clone, Copy)]
struct NameInfo {
    slot: Option<u16>,
    kind: NameKind,
}

/// Where an item sits.
#[derive(Debug, Clone, Copy, Default)]
struct Ctx {
    depth: usize,
    /// Inside a TLV type: elements can repeat, so fields replace earlier values.
    in_tlv: bool,
    /// Inside a repeat without `reading = true`: fields would pile up in one reading.
    no_fields: bool,
    /// Inside a bitfield of this many bits.
    bitfield: Option<u32>,
}

impl Ctx {
    fn nested(self, span: &Span) -> Result<Ctx, LayoutError> {
        if self.depth + 1 > MAX_DEPTH {
            return err(
                span.clone(),
                format!("items nested too deeply (at most {MAX_DEPTH} levels)"),
            );
        }
        Ok(Ctx {
            depth: self.depth + 1,
            bitfield: None,
            ..self
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Value,
    Time,
    Const,
    Skip,
    SkipWhile,
    Mark,
    Checksum,
    Bitfield,
    Switch,
    If,
    Repeat,
    Tlv,
    Length,
    Group,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Value => "field",
            Kind::Time => "time",
            Kind::Const => "const",
            Kind::Skip => "skip",
            Kind::SkipWhile => "skip_while",
            Kind::Mark => "mark",
            Kind::Checksum => "checksum",
            Kind::Bitfield => "bitfield",
            Kind::Switch => "switch",
            Kind::If => "if",
            Kind::Repeat => "repeat",
            Kind::Tlv => "tlv",
            Kind::Length => "length",
            Kind::Group => "group",
        }
    }

    /// The keys an item of this kind accepts.
    fn keys(self) -> &'static [&'static str] {
        match self {
            Kind::Value => &[
                "field", "var", "type", "len", "endian", "at", "scale", "offset", "decimals",
                "enum", "bool", "invert", "sentinel", "present", "identity",
            ],
            Kind::Time => &[
                "time", "type", "endian", "at", "scale", "offset", "zone", "sentinel",
            ],
            Kind::Const => &["const", "name", "at"],
            Kind::Skip => &["skip", "endian", "at"],
            Kind::SkipWhile => &["skip_while", "at"],
            Kind::Mark => &["mark", "at"],
            Kind::Checksum => &["checksum", "from", "to", "endian", "at"],
            Kind::Bitfield => &["bitfield", "field", "var", "items", "endian", "at"],
            Kind::Switch => &["switch", "cases", "default", "peek", "endian", "at"],
            Kind::If => &["if", "items", "else", "at"],
            Kind::Repeat => &[
                "repeat", "items", "reading", "interval", "anchor", "endian", "at",
            ],
            Kind::Tlv => &["tlv", "len", "types", "unknown", "trailing", "endian", "at"],
            Kind::Length => &["length", "items", "trailing", "reading", "endian", "at"],
            Kind::Group => &["items", "reading", "at"],
        }
    }
}

/// Keys of a value item inside a bitfield.
const BIT_KEYS: &[&str] = &[
    "field", "var", "bit", "bits", "scale", "offset", "decimals", "enum", "bool", "invert",
    "sentinel", "present", "identity",
];

/// Pass 1: names referenced by expressions, and how often each emitted name occurs.
#[derive(Default)]
struct Scan {
    referenced: HashSet<String>,
    counts: HashMap<String, u32>,
}

impl Scan {
    fn items(&mut self, list: &[Spanned<ItemSpec>]) {
        for it in list {
            self.item(it.get_ref());
        }
    }

    fn words(&mut self, s: &str) {
        for w in s.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if w.starts_with(|c: char| c.is_ascii_lowercase()) {
                self.referenced.insert(w.to_owned());
            }
        }
    }

    fn scalar(&mut self, s: &Option<Spanned<Scalar>>) {
        if let Some(Scalar::Str(s)) = s.as_ref().map(Spanned::get_ref) {
            self.words(s);
        }
    }

    fn count(&mut self, name: &str) {
        *self.counts.entry(name.to_owned()).or_default() += 1;
    }

    fn item(&mut self, it: &ItemSpec) {
        for s in [
            &it.len,
            &it.skip,
            &it.length,
            &it.repeat,
            &it.interval,
            &it.from,
            &it.to,
        ] {
            self.scalar(s);
        }
        for s in [&it.switch, &it.cond].into_iter().flatten() {
            self.words(s.get_ref());
        }
        if let Some(f) = &it.field {
            self.count(f.get_ref());
            if let Some(s) = &it.sentinel {
                for (_, action) in &s.get_ref().0 {
                    match action.get_ref().as_str() {
                        "absent" => {}
                        "error" => self.count(&error_flag(f.get_ref())),
                        other => self.count(other),
                    }
                }
            }
        }
        if let Some(p) = &it.present {
            self.count(p.get_ref());
        }
        for items in [&it.items, &it.default, &it.otherwise]
            .into_iter()
            .flatten()
        {
            self.items(&items.get_ref().list);
        }
        for table in [&it.cases, &it.types].into_iter().flatten() {
            for (_, items) in &table.get_ref().0 {
                self.items(&items.get_ref().list);
            }
        }
    }
}

/// `flow_temperature_c` → `flow_temperature_error`.
fn error_flag(field: &str) -> String {
    let base = UNIT_SUFFIXES
        .iter()
        .find_map(|s| field.strip_suffix(s).filter(|b| !b.is_empty()))
        .unwrap_or(field);
    format!("{base}_error")
}

struct Compiler {
    big: bool,
    referenced: HashSet<String>,
    counts: HashMap<String, u32>,
    names: HashMap<String, NameInfo>,
    next_slot: u16,
    /// Field names of this layout, one [`Name`] each (so equal names share a pointer).
    interned: HashMap<String, Name>,
    field_names: Vec<Name>,
    items: usize,
}

fn parse_endian(e: &Spanned<String>) -> Result<bool, LayoutError> {
    match e.get_ref().as_str() {
        "big" => Ok(true),
        "little" => Ok(false),
        other => err(
            e.span(),
            format!("unknown byte order `{other}` (expected \"big\" or \"little\")"),
        ),
    }
}

fn parse_trailing(t: &Spanned<String>) -> Result<bool, LayoutError> {
    match t.get_ref().as_str() {
        "error" => Ok(true),
        "ignore" => Ok(false),
        other => err(
            t.span(),
            format!("unknown `trailing` policy `{other}` (expected \"error\" or \"ignore\")"),
        ),
    }
}

/// A type name of the language.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TypeName {
    Int { width: u8, signed: bool },
    F32,
    F64,
    Bcd,
    Ascii,
    Bytes,
}

fn parse_type_name(s: &str) -> Option<TypeName> {
    Some(match s {
        "f32" => TypeName::F32,
        "f64" => TypeName::F64,
        "bcd" => TypeName::Bcd,
        "ascii" => TypeName::Ascii,
        "bytes" => TypeName::Bytes,
        _ => {
            let (signed, bits) = match s.split_at_checked(1)? {
                ("u", b) => (false, b),
                ("i", b) => (true, b),
                _ => return None,
            };
            let width = match bits {
                "8" => 1,
                "16" => 2,
                "24" => 3,
                "32" => 4,
                "40" => 5,
                "48" => 6,
                "56" => 7,
                "64" => 8,
                _ => return None,
            };
            TypeName::Int { width, signed }
        }
    })
}

fn is_reserved(name: &str) -> bool {
    parse_type_name(name).is_some() || matches!(name, "rest" | "until_end" | "default")
}

fn check_name(s: &Spanned<String>, what: &str) -> Result<(), LayoutError> {
    let n = s.get_ref();
    let ok = n.len() <= MAX_NAME
        && n.starts_with(|c: char| c.is_ascii_lowercase())
        && n.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !ok {
        return err(
            s.span(),
            format!(
                "{what} `{n}` must be snake_case: lower-case letters, digits and `_`, starting \
                 with a letter, at most {MAX_NAME} characters"
            ),
        );
    }
    if is_reserved(n) {
        return err(
            s.span(),
            format!("`{n}` is a reserved word; pick another {what}"),
        );
    }
    Ok(())
}

fn check_label(s: &Spanned<String>) -> Result<(), LayoutError> {
    let n = s.get_ref();
    let ok = !n.is_empty()
        && n.len() <= MAX_NAME
        && n.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if ok {
        Ok(())
    } else {
        err(
            s.span(),
            format!("label `{n}` must be snake_case (lower-case letters, digits and `_`)"),
        )
    }
}

/// Parses `0x1F`, `31` or `-5`.
fn parse_number(s: &str) -> Option<(i128, bool)> {
    let s = s.trim();
    if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        if h.is_empty() || h.len() > 16 {
            return None;
        }
        return u64::from_str_radix(h, 16)
            .ok()
            .map(|v| (i128::from(v), true));
    }
    let digits = s.strip_prefix('-').unwrap_or(s);
    if digits.is_empty() || digits.len() > 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse::<i128>().ok().map(|v| (v, false))
}

/// The raw values a code may take, for checking and normalising case, enum and sentinel keys.
#[derive(Debug, Clone, Copy)]
enum Domain {
    /// An integer of `bits` bits; hex literals of signed types are bit patterns.
    Int { bits: u32, signed: bool },
    /// Any 64-bit value (variables).
    Any,
}

impl Domain {
    fn of(t: IntType) -> Domain {
        Domain::Int {
            bits: 8 * u32::from(t.width),
            signed: t.signed,
        }
    }

    fn unsigned(bits: u32) -> Domain {
        Domain::Int {
            bits,
            signed: false,
        }
    }

    fn normalise(self, v: i128, hex: bool) -> Result<i128, String> {
        match self {
            Domain::Any => {
                if hex && v > i128::from(i64::MAX) {
                    Ok(v - (1i128 << 64))
                } else if i64::try_from(v).is_ok() {
                    Ok(v)
                } else {
                    Err("out of the 64-bit range".into())
                }
            }
            Domain::Int { bits, signed } => {
                let span = 1i128 << bits;
                if signed && hex {
                    if !(0..span).contains(&v) {
                        return Err(format!("does not fit in {bits} bits"));
                    }
                    Ok(if v >= span / 2 { v - span } else { v })
                } else if signed {
                    if !(-span / 2..span / 2).contains(&v) {
                        return Err(format!("is out of range for a signed {bits}-bit value"));
                    }
                    Ok(v)
                } else {
                    if !(0..span).contains(&v) {
                        return Err(format!("is out of range for an unsigned {bits}-bit value"));
                    }
                    Ok(v)
                }
            }
        }
    }
}

/// Parses a code key: `0x01`, `7`, `-1`, ranges `10-20`, lists `1,2,0x10-0x1F`.
fn parse_codes(key: &Spanned<String>, domain: Domain) -> Result<Vec<(i128, i128)>, LayoutError> {
    let text = key.get_ref();
    let bad = |why: String| {
        err::<Vec<(i128, i128)>>(
            key.span(),
            format!(
                "bad code `{text}`: {why} (write codes as 7, 0x07, -1, ranges 0x10-0x1F, or lists 1,2,5)"
            ),
        )
    };
    let mut out = Vec::new();
    for part in text.split(',') {
        let part = part.trim();
        // A leading '-' is a sign; a later '-' separates a range.
        let split = part
            .char_indices()
            .skip(1)
            .find(|&(_, c)| c == '-')
            .map(|(i, _)| i);
        let (lo_s, hi_s) = match split {
            Some(i) => (part.get(..i).unwrap_or(""), part.get(i + 1..)),
            None => (part, None),
        };
        let Some((lo, lo_hex)) = parse_number(lo_s) else {
            return bad(format!("`{lo_s}` is not a number"));
        };
        let lo = match domain.normalise(lo, lo_hex) {
            Ok(v) => v,
            Err(e) => return bad(format!("{lo_s} {e}")),
        };
        let hi = match hi_s {
            None => lo,
            Some(h) => {
                let Some((hi, hi_hex)) = parse_number(h) else {
                    return bad(format!("`{h}` is not a number"));
                };
                match domain.normalise(hi, hi_hex) {
                    Ok(v) => v,
                    Err(e) => return bad(format!("{h} {e}")),
                }
            }
        };
        if hi < lo {
            return bad("the range is empty (write the low end first)".into());
        }
        out.push((lo, hi));
    }
    Ok(out)
}

/// Checks that no two keys of a table share a code.
fn check_overlaps(ranges: &[(i128, i128, Span)]) -> Result<(), LayoutError> {
    let mut sorted: Vec<&(i128, i128, Span)> = ranges.iter().collect();
    sorted.sort_by_key(|r| (r.0, r.2.start));
    for w in sorted.windows(2) {
        if let [a, b] = w {
            if b.0 <= a.1 {
                let (later, earlier) = if a.2.start > b.2.start {
                    (a, b)
                } else {
                    (b, a)
                };
                return err(
                    later.2.clone(),
                    format!(
                        "code {} is already covered by the key at byte {} of the source",
                        later.0.max(earlier.0),
                        earlier.2.start
                    ),
                );
            }
        }
    }
    Ok(())
}

/// Parses a hex byte string (`"68"`, `"FE FE 68"`, `"0x6816"`).
fn parse_hex_bytes(s: &Spanned<String>, max: usize) -> Result<Box<[u8]>, LayoutError> {
    let text = s.get_ref();
    let body = text.trim();
    let body = body.strip_prefix("0x").unwrap_or(body);
    let digits: Vec<u8> = body.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    let nibble = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    if digits.is_empty() || digits.len() % 2 != 0 || digits.iter().any(|&c| nibble(c).is_none()) {
        return err(
            s.span(),
            format!("`{text}` is not hex bytes (write e.g. \"68\" or \"FE FE 68\")"),
        );
    }
    let bytes: Vec<u8> = digits
        .chunks(2)
        .map(|p| match p {
            [h, l] => nibble(*h).unwrap_or(0) << 4 | nibble(*l).unwrap_or(0),
            _ => 0,
        })
        .collect();
    if bytes.len() > max {
        return err(s.span(), format!("at most {max} bytes here"));
    }
    Ok(bytes.into_boxed_slice())
}

fn decimals_of(x: f64) -> Option<i32> {
    let s = format!("{x}");
    let d = s.split_once('.').map_or(0, |(_, frac)| frac.len());
    i32::try_from(d).ok().filter(|&d| d <= 12)
}

/// Splits `name+3` / `name - 2` / `name` into the name and the adjustment.
fn split_adjust(s: &str) -> Option<(&str, i64)> {
    let s = s.trim();
    match s
        .char_indices()
        .skip(1)
        .find(|&(_, c)| c == '+' || c == '-')
    {
        None => Some((s, 0)),
        Some((i, c)) => {
            let name = s.get(..i)?.trim();
            let n: i64 = s.get(i + 1..)?.trim().parse().ok()?;
            if !(0..=MAX_FIXED_LEN).contains(&n) {
                return None;
            }
            Some((name, if c == '-' { -n } else { n }))
        }
    }
}

impl Compiler {
    fn endian(&self, e: &Option<Spanned<String>>) -> Result<bool, LayoutError> {
        match e {
            None => Ok(!self.big),
            Some(e) => parse_endian(e).map(|big| !big),
        }
    }

    /// Interns a field name (one [`Name`] per distinct name) and records it as producible.
    fn field_name(&mut self, name: &str) -> Name {
        if let Some(n) = self.interned.get(name) {
            return n.clone();
        }
        let n = match try_intern(name) {
            Some(s) => Name::Static(s),
            None => Name::Shared(Arc::from(name)),
        };
        self.interned.insert(name.to_owned(), n.clone());
        self.field_names.push(n.clone());
        n
    }

    /// Records a definition; returns its slot when later items refer to it.
    fn define(
        &mut self,
        name: &Spanned<String>,
        kind: NameKind,
    ) -> Result<Option<u16>, LayoutError> {
        let n = name.get_ref();
        if let Some(info) = self.names.get_mut(n) {
            info.kind = kind;
            return Ok(info.slot);
        }
        let slot =
            if self.referenced.contains(n) && kind != NameKind::Text && kind != NameKind::Float {
                if usize::from(self.next_slot) >= MAX_VARS {
                    return err(
                        name.span(),
                        format!("too many names used in expressions (at most {MAX_VARS})"),
                    );
                }
                self.next_slot += 1;
                Some(self.next_slot - 1)
            } else {
                None
            };
        self.names.insert(n.clone(), NameInfo { slot, kind });
        Ok(slot)
    }

    /// Resolves a name used in an expression to a numeric variable.
    fn number_ref(&self, name: &str, span: &Span) -> Result<VarRef, LayoutError> {
        match self.names.get(name) {
            Some(NameInfo {
                slot: Some(slot),
                kind: NameKind::Number,
            }) => Ok(VarRef {
                slot: *slot,
                what: intern(name),
            }),
            Some(NameInfo { kind: NameKind::Mark, .. }) => err(
                span.clone(),
                format!("`{name}` is a mark (a position), not a number read from the payload"),
            ),
            Some(NameInfo {
                kind: NameKind::Text | NameKind::Float,
                ..
            }) => err(
                span.clone(),
                format!("`{name}` is not an integer; only integer, BCD and bit values can be used here"),
            ),
            _ => err(
                span.clone(),
                format!(
                    "unknown name `{name}`: define it earlier with {{ var = \"{name}\", type = \"u8\" }} \
                     (or a `field`)"
                ),
            ),
        }
    }

    fn mark_ref(&self, name: &str, span: &Span) -> Result<VarRef, LayoutError> {
        match self.names.get(name) {
            Some(NameInfo {
                slot: Some(slot),
                kind: NameKind::Mark,
            }) => Ok(VarRef {
                slot: *slot,
                what: intern(name),
            }),
            _ => err(
                span.clone(),
                format!(
                    "`{name}` is not a mark: name a position earlier with {{ mark = \"{name}\" }} \
                     or {{ const = \"68\", name = \"{name}\" }}"
                ),
            ),
        }
    }

    fn int_type(
        &self,
        s: &Spanned<String>,
        little: bool,
        what: &str,
    ) -> Result<IntType, LayoutError> {
        match parse_type_name(s.get_ref()) {
            Some(TypeName::Int { width, signed }) => Ok(IntType {
                width,
                signed,
                little,
            }),
            _ => err(
                s.span(),
                format!(
                    "{what} must be an integer type (u8, u16, u24, u32, u64, i8 ... i64), not `{}`",
                    s.get_ref()
                ),
            ),
        }
    }

    /// A byte count: `4`, `"n"`, `"n-2"`, `"rest"`, `"rest-2"`, or a prefix type `"u8"`.
    fn len(&self, s: &Spanned<Scalar>, little: bool) -> Result<Len, LayoutError> {
        let span = s.span();
        match s.get_ref() {
            Scalar::Int(n) => {
                if !(0..=MAX_FIXED_LEN).contains(n) {
                    return err(
                        span,
                        format!("length {n} is out of range (0 to {MAX_FIXED_LEN})"),
                    );
                }
                Ok(Len::Fixed(*n as usize))
            }
            Scalar::Str(text) => {
                let t = text.trim();
                if let Some(ty) = parse_type_name(t) {
                    return match ty {
                        TypeName::Int {
                            width,
                            signed: false,
                        } => Ok(Len::Prefix(IntType {
                            width,
                            signed: false,
                            little,
                        })),
                        _ => err(
                            span,
                            format!("a length prefix must be an unsigned integer type, not `{t}`"),
                        ),
                    };
                }
                let bad = || {
                    err::<Len>(
                        span.clone(),
                        format!(
                            "bad length `{text}` (write a number, a name read earlier such as \"n\" \
                             or \"n-2\", \"rest\" or \"rest-2\", or a prefix type such as \"u8\")"
                        ),
                    )
                };
                let Some((name, adjust)) = split_adjust(t) else {
                    return bad();
                };
                if name == "rest" {
                    return if adjust <= 0 {
                        Ok(Len::Rest(adjust.unsigned_abs() as usize))
                    } else {
                        bad()
                    };
                }
                if !name.starts_with(|c: char| c.is_ascii_lowercase()) {
                    return bad();
                }
                Ok(Len::Var(self.number_ref(name, &span)?, adjust))
            }
        }
    }

    fn block(&mut self, items: &Spanned<Items>, ctx: Ctx) -> Result<Box<[Op]>, LayoutError> {
        let list = items.get_ref();
        let mut ops = Vec::with_capacity(list.list.len());
        for it in &list.list {
            let span = if list.single { items.span() } else { it.span() };
            self.item(it.get_ref(), span, ctx, &mut ops)?;
        }
        Ok(ops.into_boxed_slice())
    }

    fn kind(&self, it: &ItemSpec, span: &Span) -> Result<Kind, LayoutError> {
        let heads: Vec<(Kind, Span)> = [
            (Kind::Time, it.time.as_ref().map(Spanned::span)),
            (Kind::Const, it.constant.as_ref().map(Spanned::span)),
            (Kind::Skip, it.skip.as_ref().map(Spanned::span)),
            (Kind::SkipWhile, it.skip_while.as_ref().map(Spanned::span)),
            (Kind::Mark, it.mark.as_ref().map(Spanned::span)),
            (Kind::Checksum, it.checksum.as_ref().map(Spanned::span)),
            (Kind::Bitfield, it.bitfield.as_ref().map(Spanned::span)),
            (Kind::Switch, it.switch.as_ref().map(Spanned::span)),
            (Kind::If, it.cond.as_ref().map(Spanned::span)),
            (Kind::Repeat, it.repeat.as_ref().map(Spanned::span)),
            (Kind::Tlv, it.tlv.as_ref().map(Spanned::span)),
            (Kind::Length, it.length.as_ref().map(Spanned::span)),
        ]
        .into_iter()
        .filter_map(|(k, s)| s.map(|s| (k, s)))
        .collect();
        if let (Some(_), Some(v)) = (&it.field, &it.var) {
            return err(
                v.span(),
                "`field` and `var` cannot be combined: a `field` is emitted and can also be used \
                 in expressions; a `var` is only used in expressions",
            );
        }
        let named = it.field.as_ref().or(it.var.as_ref());
        match heads.as_slice() {
            [(a, _), (b, s), ..] => err(
                s.clone(),
                format!(
                    "an item is one thing: `{}` and `{}` cannot be combined; split them into two items",
                    a.name(),
                    b.name()
                ),
            ),
            [(Kind::Bitfield, _)] => Ok(Kind::Bitfield),
            [(Kind::Time, _)] if named.is_some() => err(
                named.map(Spanned::span).unwrap_or(span.clone()),
                "a `time` item sets the reading's time and is not a field: remove `field`/`var`",
            ),
            [(k, _)] => match named {
                Some(n) => err(
                    n.span(),
                    format!(
                        "`{}` cannot be combined with `{}`; split them into two items",
                        if it.field.is_some() { "field" } else { "var" },
                        k.name()
                    ),
                ),
                None => Ok(*k),
            },
            [] if named.is_some() => Ok(Kind::Value),
            [] if it.items.is_some() => Ok(Kind::Group),
            [] => err(span.clone(), format!("this item needs one of: {HEADS}")),
        }
    }

    fn check_keys(&self, it: &ItemSpec, allowed: &[&str], what: &str) -> Result<(), LayoutError> {
        for (key, span) in it.present_keys() {
            if !allowed.contains(&key) {
                return err(
                    span,
                    format!(
                        "`{key}` does not apply to {what} (it takes: {})",
                        allowed.join(", ")
                    ),
                );
            }
        }
        Ok(())
    }

    fn item(
        &mut self,
        it: &ItemSpec,
        span: Span,
        ctx: Ctx,
        ops: &mut Vec<Op>,
    ) -> Result<(), LayoutError> {
        self.items += 1;
        if self.items > MAX_ITEMS {
            return err(span, format!("a layout may hold at most {MAX_ITEMS} items"));
        }
        let kind = self.kind(it, &span)?;
        if ctx.bitfield.is_some() {
            if kind != Kind::Value {
                return err(
                    span,
                    "a bitfield holds only `field`/`var` items with `bit` or `bits`",
                );
            }
            self.check_keys(it, BIT_KEYS, "an item inside a bitfield")?;
        } else {
            let article = if matches!(kind, Kind::If) { "an" } else { "a" };
            self.check_keys(
                it,
                kind.keys(),
                &format!("{article} `{}` item", kind.name()),
            )?;
        }
        if let Some(at) = &it.at {
            let n = *at.get_ref();
            if !(0..=MAX_FIXED_LEN).contains(&n) {
                return err(at.span(), format!("`at` must be 0 to {MAX_FIXED_LEN}"));
            }
            ops.push(Op::Seek(n as usize, "at"));
        }
        let op = match kind {
            Kind::Value => Op::Value(Box::new(self.value(it, &span, ctx)?)),
            Kind::Time => Op::Time(Box::new(self.time(it, &span)?)),
            Kind::Const => {
                let Some(k) = &it.constant else {
                    return err(span, "missing `const`");
                };
                let bytes = parse_hex_bytes(k, MAX_CONST)?;
                let (what, mark) = match &it.name {
                    Some(n) => {
                        check_name(n, "name")?;
                        (intern(n.get_ref()), self.define(n, NameKind::Mark)?)
                    }
                    None => ("constant", None),
                };
                Op::Const(Box::new(ConstOp { bytes, what, mark }))
            }
            Kind::Skip => {
                let Some(s) = &it.skip else {
                    return err(span, "missing `skip`");
                };
                Op::Skip(self.len(s, self.endian(&it.endian)?)?, "skip")
            }
            Kind::SkipWhile => {
                let Some(s) = &it.skip_while else {
                    return err(span, "missing `skip_while`");
                };
                Op::SkipWhile(parse_hex_bytes(s, 8)?)
            }
            Kind::Mark => {
                let Some(m) = &it.mark else {
                    return err(span, "missing `mark`");
                };
                check_name(m, "mark name")?;
                Op::Mark(self.define(m, NameKind::Mark)?)
            }
            Kind::Checksum => Op::Checksum(Box::new(self.checksum(it, &span)?)),
            Kind::Bitfield => Op::Bitfield(Box::new(self.bitfield(it, &span, ctx)?)),
            Kind::Switch => Op::Switch(Box::new(self.switch(it, &span, ctx)?)),
            Kind::If => Op::If(Box::new(self.cond(it, &span, ctx)?)),
            Kind::Repeat => Op::Repeat(Box::new(self.repeat(it, &span, ctx)?)),
            Kind::Tlv => Op::Tlv(Box::new(self.tlv(it, &span, ctx)?)),
            Kind::Length => {
                let Some(l) = &it.length else {
                    return err(span, "missing `length`");
                };
                let len = self.len(l, self.endian(&it.endian)?)?;
                let reading = it.reading.as_ref().is_some_and(|r| *r.get_ref());
                let body = self.body(it, &span, ctx, reading)?;
                Op::Slice(Box::new(SliceOp {
                    len,
                    what: "length",
                    trailing_error: it.trailing.as_ref().map_or(Ok(true), parse_trailing)?,
                    reading,
                    body,
                }))
            }
            Kind::Group => {
                let reading = it.reading.as_ref().is_some_and(|r| *r.get_ref());
                let body = self.body(it, &span, ctx, reading)?;
                Op::Group { reading, body }
            }
        };
        ops.push(op);
        Ok(())
    }

    /// The `items` of a group-like item (required).
    fn body(
        &mut self,
        it: &ItemSpec,
        span: &Span,
        ctx: Ctx,
        reading: bool,
    ) -> Result<Box<[Op]>, LayoutError> {
        let Some(items) = &it.items else {
            return err(span.clone(), "this item needs `items = [ ... ]`");
        };
        let mut inner = ctx.nested(span)?;
        if reading {
            inner.no_fields = false;
        }
        self.block(items, inner)
    }

    fn value(&mut self, it: &ItemSpec, span: &Span, ctx: Ctx) -> Result<ValueOp, LayoutError> {
        let (name, is_field) = match (&it.field, &it.var) {
            (Some(f), _) => (f, true),
            (None, Some(v)) => (v, false),
            (None, None) => return err(span.clone(), "missing `field` or `var`"),
        };
        check_name(name, if is_field { "field name" } else { "var name" })?;
        if is_field && ctx.no_fields {
            return err(
                name.span(),
                "fields inside a `repeat` need `reading = true` on the repeat (each repetition \
                 becomes its own reading); use `var` for values that only steer decoding",
            );
        }
        let what = intern(name.get_ref());
        let little = self.endian(&it.endian)?;

        // Where the value comes from, and what kind of value it is.
        let (src, ty) = match ctx.bitfield {
            Some(width) => (self.bits(it, span, width)?, None),
            None => {
                let Some(t) = &it.ty else {
                    return err(
                        name.span(),
                        format!("`{}` needs a `type` (one of {TYPE_NAMES})", name.get_ref()),
                    );
                };
                let Some(ty) = parse_type_name(t.get_ref()) else {
                    return err(
                        t.span(),
                        format!(
                            "unknown type `{}` (expected one of {TYPE_NAMES})",
                            t.get_ref()
                        ),
                    );
                };
                let sized = matches!(ty, TypeName::Bcd | TypeName::Ascii | TypeName::Bytes);
                if let (false, Some(l)) = (sized, &it.len) {
                    return err(
                        l.span(),
                        format!(
                            "`len` applies to bcd, ascii and bytes; `{}` has a fixed size",
                            t.get_ref()
                        ),
                    );
                }
                // BCD and byte strings keep their written order unless `endian` says
                // otherwise: the layout's default byte order is about numbers.
                let explicit_little = match &it.endian {
                    Some(e) => !parse_endian(e)?,
                    None => false,
                };
                let len = |c: &Self| -> Result<Len, LayoutError> {
                    match &it.len {
                        Some(l) => c.len(l, little),
                        None => err(
                            t.span(),
                            format!("type `{}` needs `len` (a byte count, a name, \"rest\" or a prefix type)", t.get_ref()),
                        ),
                    }
                };
                let src = match ty {
                    TypeName::Int { width, signed } => Source::Int(IntType {
                        width,
                        signed,
                        little,
                    }),
                    TypeName::F32 => Source::F32 { little },
                    TypeName::F64 => Source::F64 { little },
                    TypeName::Bcd => {
                        let len = len(self)?;
                        if let Len::Fixed(n) = len {
                            if !(1..=9).contains(&n) {
                                return err(
                                    t.span(),
                                    "a bcd number is 1 to 9 bytes (18 digits); read longer digit strings as `bytes`",
                                );
                            }
                        }
                        Source::Bcd {
                            len,
                            little: explicit_little,
                        }
                    }
                    TypeName::Ascii => {
                        if let Some(e) = &it.endian {
                            return err(e.span(), "`endian` has no meaning for ascii text");
                        }
                        Source::Ascii { len: len(self)? }
                    }
                    TypeName::Bytes => Source::Bytes {
                        len: len(self)?,
                        little: explicit_little,
                    },
                };
                (src, Some((ty, t.span())))
            }
        };

        let numeric = !matches!(ty, Some((TypeName::Ascii | TypeName::Bytes, _)));
        let float = matches!(ty, Some((TypeName::F32 | TypeName::F64, _)));
        let kind = match ty {
            Some((TypeName::Ascii | TypeName::Bytes, _)) => NameKind::Text,
            Some((TypeName::F32 | TypeName::F64, _)) => NameKind::Float,
            _ => NameKind::Number,
        };
        let slot = self.define(name, kind)?;
        let identity = match &it.identity {
            None => None,
            Some(i) => Some(match i.get_ref().as_str() {
                "device_id" => IdentityKind::DeviceId,
                "sequence" if numeric && !float => IdentityKind::Sequence,
                "sequence" => {
                    return err(i.span(), "`identity = \"sequence\"` needs an integer value")
                }
                other => {
                    return err(
                        i.span(),
                        format!(
                            "unknown identity `{other}` (expected \"device_id\" or \"sequence\")"
                        ),
                    )
                }
            }),
        };

        let transforms: [(&str, Option<Span>); 8] = [
            ("scale", it.scale.as_ref().map(Spanned::span)),
            ("offset", it.offset.as_ref().map(Spanned::span)),
            ("decimals", it.decimals.as_ref().map(Spanned::span)),
            ("enum", it.enumeration.as_ref().map(Spanned::span)),
            ("bool", it.boolean.as_ref().map(Spanned::span)),
            ("invert", it.invert.as_ref().map(Spanned::span)),
            ("sentinel", it.sentinel.as_ref().map(Spanned::span)),
            ("present", it.present.as_ref().map(Spanned::span)),
        ];
        let present_keys: Vec<(&str, Span)> = transforms
            .into_iter()
            .filter_map(|(k, s)| s.map(|s| (k, s)))
            .collect();
        if !is_field {
            if let Some((k, s)) = present_keys.first() {
                return err(
                    s.clone(),
                    format!(
                        "`{k}` has no effect on a `var` (vars hold the raw value and are not \
                         emitted); use `field` to emit a converted value"
                    ),
                );
            }
            return Ok(ValueOp {
                what,
                src,
                slot,
                identity,
                emit: None,
            });
        }
        if !numeric {
            if let Some((k, s)) = present_keys.first() {
                return err(
                    s.clone(),
                    format!("`{k}` needs a number; this value is text"),
                );
            }
        }
        let dedupe = ctx.in_tlv || self.counts.get(name.get_ref()).copied().unwrap_or(0) > 1;
        let field = self.field_name(name.get_ref());
        let is_bit = it.bit.is_some();
        let conv = self.conv(it, numeric, float, is_bit)?;
        let domain = match &src {
            Source::Int(t) => Some(Domain::of(*t)),
            Source::Bits { mask, .. } => Some(Domain::unsigned(64 - mask.leading_zeros())),
            Source::Bcd { .. } => Some(Domain::unsigned(64)),
            _ => None,
        };
        let is_bcd = matches!(src, Source::Bcd { .. });
        let sentinels = match &it.sentinel {
            None => Box::default(),
            Some(s) => self.sentinels(s, name.get_ref(), domain, is_bcd)?,
        };
        let present = match &it.present {
            None => None,
            Some(p) => {
                check_name(p, "flag name")?;
                if sentinels.is_empty() {
                    return err(
                        p.span(),
                        "`present` needs a `sentinel` (it says whether a real value was read)",
                    );
                }
                Some(self.field_name(p.get_ref()))
            }
        };
        Ok(ValueOp {
            what,
            src,
            slot,
            identity,
            emit: Some(Emit {
                name: field,
                conv,
                sentinels,
                present,
                dedupe,
            }),
        })
    }

    /// `bit = 3` or `bits = "4-6"` inside a bitfield of `width` bits.
    fn bits(&self, it: &ItemSpec, span: &Span, width: u32) -> Result<Source, LayoutError> {
        match (&it.bit, &it.bits) {
            (Some(b), None) => {
                let n = *b.get_ref();
                if !(0..i64::from(width)).contains(&n) {
                    return err(
                        b.span(),
                        format!(
                            "bit {n} is outside this {width}-bit field (0 to {})",
                            width - 1
                        ),
                    );
                }
                Ok(Source::Bits {
                    shift: n as u8,
                    mask: 1,
                })
            }
            (None, Some(r)) => {
                let text = r.get_ref();
                let parsed = text.split_once('-').and_then(|(a, b)| {
                    Some((a.trim().parse::<u32>().ok()?, b.trim().parse::<u32>().ok()?))
                });
                let Some((a, b)) = parsed else {
                    return err(
                        r.span(),
                        format!(
                            "bad bit range `{text}` (write it inclusive, low-high, e.g. \"4-6\")"
                        ),
                    );
                };
                let (lo, hi) = (a.min(b), a.max(b));
                if hi >= width {
                    return err(
                        r.span(),
                        format!("bits {lo}-{hi} reach outside this {width}-bit field"),
                    );
                }
                let n = hi - lo + 1;
                let mask = if n >= 64 { u64::MAX } else { (1u64 << n) - 1 };
                Ok(Source::Bits {
                    shift: lo as u8,
                    mask,
                })
            }
            (Some(_), Some(r)) => err(r.span(), "use either `bit` or `bits`, not both"),
            (None, None) => err(
                span.clone(),
                "an item inside a bitfield needs `bit = N` (one flag) or `bits = \"lo-hi\"`",
            ),
        }
    }

    fn conv(
        &mut self,
        it: &ItemSpec,
        numeric: bool,
        float: bool,
        is_bit: bool,
    ) -> Result<Conv, LayoutError> {
        if !numeric {
            return Ok(Conv::Text);
        }
        let scaled = it.scale.is_some() || it.offset.is_some() || it.decimals.is_some();
        if let Some(e) = &it.enumeration {
            if float {
                return err(e.span(), "`enum` needs an integer value");
            }
            if let Some(k) = [
                ("scale", &it.scale.as_ref().map(Spanned::span)),
                ("offset", &it.offset.as_ref().map(Spanned::span)),
                ("decimals", &it.decimals.as_ref().map(Spanned::span)),
                ("bool", &it.boolean.as_ref().map(Spanned::span)),
                ("invert", &it.invert.as_ref().map(Spanned::span)),
            ]
            .into_iter()
            .find_map(|(k, s)| s.clone().map(|s| (k, s)))
            {
                return err(
                    k.1,
                    format!(
                        "`{}` cannot be combined with `enum` (enum labels the raw code)",
                        k.0
                    ),
                );
            }
            return self.enumeration(e);
        }
        let boolean = match &it.boolean {
            Some(b) => {
                if float {
                    return err(b.span(), "`bool` needs an integer value");
                }
                *b.get_ref()
            }
            None => is_bit && !scaled,
        };
        if boolean {
            if let Some(s) = it
                .scale
                .as_ref()
                .map(Spanned::span)
                .or(it.offset.as_ref().map(Spanned::span))
            {
                return err(s, "`scale`/`offset` cannot be combined with `bool`");
            }
            return Ok(Conv::Bool {
                invert: it.invert.as_ref().is_some_and(|i| *i.get_ref()),
            });
        }
        if let Some(i) = &it.invert {
            return err(
                i.span(),
                "`invert` applies to flags (`bool = true` or `bit = N`)",
            );
        }
        if !scaled && !float {
            return Ok(Conv::Int);
        }
        let scale = match &it.scale {
            Some(s) => {
                let v = *s.get_ref();
                if !v.is_finite() || v == 0.0 {
                    return err(s.span(), "`scale` must be a finite, non-zero number");
                }
                v
            }
            None => 1.0,
        };
        let offset = match &it.offset {
            Some(o) => {
                let v = *o.get_ref();
                if !v.is_finite() {
                    return err(o.span(), "`offset` must be a finite number");
                }
                v
            }
            None => 0.0,
        };
        let round = match &it.decimals {
            Some(d) => {
                let n = *d.get_ref();
                if !(0..=12).contains(&n) {
                    return err(d.span(), "`decimals` must be 0 to 12");
                }
                Some(10f64.powi(n as i32))
            }
            // An integer times `scale` plus `offset` has no more decimals than they have:
            // round to that, so 267 × 0.1 prints as 26.7. A float read has no such bound.
            None if !float => match (decimals_of(scale), decimals_of(offset)) {
                (Some(a), Some(b)) => Some(10f64.powi(a.max(b))),
                _ => None,
            },
            None => None,
        };
        Ok(Conv::Float {
            scale,
            offset,
            round,
        })
    }

    fn enumeration(&mut self, e: &Spanned<Entries<Spanned<String>>>) -> Result<Conv, LayoutError> {
        let mut entries = Vec::new();
        let mut spans = Vec::new();
        let mut default = None;
        for (key, label) in &e.get_ref().0 {
            check_label(label)?;
            let arc: Arc<str> = Arc::from(label.get_ref().as_str());
            if key.get_ref() == "default" {
                default = Some(arc);
                continue;
            }
            for (lo, hi) in parse_codes(key, Domain::Any)? {
                entries.push((lo, hi, Arc::clone(&arc)));
                spans.push((lo, hi, key.span()));
            }
        }
        if entries.is_empty() {
            return err(
                e.span(),
                "an `enum` needs at least one code, e.g. { 0 = \"closed\", 1 = \"open\" }",
            );
        }
        check_overlaps(&spans)?;
        Ok(Conv::Enum(Box::new(EnumTable {
            entries: entries.into_boxed_slice(),
            default,
        })))
    }

    fn sentinels(
        &mut self,
        s: &Spanned<Entries<Spanned<String>>>,
        field: &str,
        domain: Option<Domain>,
        bcd: bool,
    ) -> Result<Box<[Sentinel]>, LayoutError> {
        let mut out = Vec::new();
        let mut spans = Vec::new();
        for (key, action) in &s.get_ref().0 {
            let flag = match action.get_ref().as_str() {
                "absent" => None,
                "error" => Some(self.field_name(&error_flag(field))),
                _ => {
                    check_name(action, "flag name")?;
                    Some(self.field_name(action.get_ref()))
                }
            };
            match domain {
                Some(d) => {
                    if bcd && !key.get_ref().trim().starts_with("0x") {
                        return err(
                            key.span(),
                            "BCD sentinels are byte patterns: write them in hex, e.g. \"0xFFFFFFFF\"",
                        );
                    }
                    for (lo, hi) in parse_codes(key, d)? {
                        out.push(Sentinel {
                            key: Key::Range(lo, hi),
                            flag: flag.clone(),
                        });
                        spans.push((lo, hi, key.span()));
                    }
                }
                None => {
                    let k = key.get_ref().trim();
                    let parsed = if k.eq_ignore_ascii_case("nan") {
                        Some(Key::NaN)
                    } else {
                        k.parse::<f64>()
                            .ok()
                            .filter(|v| v.is_finite())
                            .map(Key::Float)
                    };
                    let Some(parsed) = parsed else {
                        return err(
                            key.span(),
                            format!("bad float sentinel `{k}` (write e.g. \"-100.0\" or \"nan\")"),
                        );
                    };
                    out.push(Sentinel { key: parsed, flag });
                }
            }
        }
        check_overlaps(&spans)?;
        if out.is_empty() {
            return err(s.span(), "an empty `sentinel` table");
        }
        Ok(out.into_boxed_slice())
    }

    fn time(&mut self, it: &ItemSpec, span: &Span) -> Result<TimeOp, LayoutError> {
        let Some(t) = &it.time else {
            return err(span.clone(), "missing `time`");
        };
        let text = t.get_ref().as_str();
        let zone_local = match &it.zone {
            None => None,
            Some(z) => Some(match z.get_ref().as_str() {
                "utc" => false,
                "local" => true,
                other => {
                    return err(
                        z.span(),
                        format!("unknown zone `{other}` (expected \"utc\" or \"local\")"),
                    )
                }
            }),
        };
        let (kind, local, domain) = if let Some((enc, pat)) = text.split_once(':') {
            let bcd = match enc {
                "bcd" => true,
                "bin" => false,
                _ => {
                    return err(
                        t.span(),
                        format!(
                            "unknown time encoding `{enc}` (expected \"bcd:...\" or \"bin:...\")"
                        ),
                    )
                }
            };
            for (k, s) in [
                ("type", it.ty.as_ref().map(Spanned::span)),
                ("endian", it.endian.as_ref().map(Spanned::span)),
                ("scale", it.scale.as_ref().map(Spanned::span)),
                ("offset", it.offset.as_ref().map(Spanned::span)),
            ] {
                if let Some(s) = s {
                    return err(
                        s,
                        format!("`{k}` does not apply to a date-time pattern (one byte per part)"),
                    );
                }
            }
            let parts = parse_date_pattern(pat).map_err(|m| LayoutError::new(Some(t.span()), m))?;
            let width = parts.len() as u32;
            (
                TimeKind::Pattern { bcd, parts },
                zone_local.unwrap_or(true),
                Domain::unsigned(8 * width),
            )
        } else {
            let (ago, ms) = match text {
                "unix" => (false, false),
                "unix_ms" => (false, true),
                "ago" => (true, false),
                other => {
                    return err(
                        t.span(),
                        format!(
                            "unknown time kind `{other}` (expected \"unix\", \"unix_ms\", \"ago\", \
                             or a date-time pattern such as \"bcd:YYMMDDhhmmss\")"
                        ),
                    )
                }
            };
            if ago {
                if let Some(z) = &it.zone {
                    return err(
                        z.span(),
                        "`zone` does not apply to \"ago\" (it counts back from the receive time)",
                    );
                }
            }
            let little = self.endian(&it.endian)?;
            let int = match &it.ty {
                Some(ty) => self.int_type(ty, little, "a time's `type`")?,
                None => IntType {
                    width: if ms { 8 } else { 4 },
                    signed: false,
                    little,
                },
            };
            let (mut mul, mut div) = (1i64, if ms { 1000i64 } else { 1 });
            if let Some(s) = &it.scale {
                let v = *s.get_ref();
                if ms {
                    return err(
                        s.span(),
                        "`unix_ms` already scales by 0.001; use `unix` with `scale`",
                    );
                }
                if v >= 1.0 && v.fract() == 0.0 && v <= 1e9 {
                    mul = v as i64;
                } else if v > 0.0
                    && v < 1.0
                    && (1.0 / v - (1.0 / v).round()).abs() < 1e-9
                    && 1.0 / v <= 1e9
                {
                    div = (1.0 / v).round() as i64;
                } else {
                    return err(
                        s.span(),
                        "a time `scale` must be a whole number of seconds (60) or 1/n (0.001)",
                    );
                }
            }
            let offset = match &it.offset {
                None => 0,
                Some(o) => {
                    let v = *o.get_ref();
                    if v.fract() != 0.0 || v.abs() > 1e12 {
                        return err(o.span(), "a time `offset` is a whole number of seconds (e.g. 946684800 for a 2000-01-01 epoch)");
                    }
                    v as i64
                }
            };
            (
                TimeKind::Seconds {
                    int,
                    mul,
                    div,
                    offset,
                    ago,
                },
                zone_local.unwrap_or(false),
                Domain::of(int),
            )
        };
        let mut absent = Vec::new();
        if let Some(s) = &it.sentinel {
            for (key, action) in &s.get_ref().0 {
                if action.get_ref() != "absent" {
                    return err(action.span(), "a time sentinel can only be \"absent\" (the reading then has no device time)");
                }
                for (lo, hi) in parse_codes(key, domain)? {
                    absent.push(Key::Range(lo, hi));
                }
            }
        }
        Ok(TimeOp {
            what: "time",
            kind,
            local,
            absent: absent.into_boxed_slice(),
        })
    }

    fn checksum(&mut self, it: &ItemSpec, span: &Span) -> Result<ChecksumOp, LayoutError> {
        let Some(name) = &it.checksum else {
            return err(span.clone(), "missing `checksum`");
        };
        let alg = Algorithm::from_name(name.get_ref())
            .map_err(|m| LayoutError::new(Some(name.span()), m))?;
        let little = match &it.endian {
            Some(e) => !parse_endian(e)?,
            None if alg.little_endian_by_convention() => true,
            None => !self.big,
        };
        let pos = |c: &Self, s: &Spanned<Scalar>| -> Result<Pos, LayoutError> {
            match s.get_ref() {
                Scalar::Int(n) if (0..=MAX_FIXED_LEN).contains(n) => Ok(Pos::Offset(*n as usize)),
                Scalar::Int(n) => err(s.span(), format!("offset {n} is out of range")),
                Scalar::Str(m) => Ok(Pos::Mark(c.mark_ref(m.trim(), &s.span())?)),
            }
        };
        let from = match &it.from {
            Some(f) => pos(self, f)?,
            None => Pos::Offset(0),
        };
        let to = match &it.to {
            Some(t) => Some(pos(self, t)?),
            None => None,
        };
        Ok(ChecksumOp {
            alg,
            little,
            from,
            to,
        })
    }

    fn bitfield(
        &mut self,
        it: &ItemSpec,
        span: &Span,
        ctx: Ctx,
    ) -> Result<BitfieldOp, LayoutError> {
        let Some(t) = &it.bitfield else {
            return err(span.clone(), "missing `bitfield`");
        };
        let little = self.endian(&it.endian)?;
        let int = self.int_type(t, little, "a bitfield")?;
        if int.signed {
            return err(
                t.span(),
                "a bitfield is an unsigned type (u8, u16, u24, u32 or u64)",
            );
        }
        let width = 8 * u32::from(int.width);
        let mut values = Vec::new();
        let named = it
            .field
            .as_ref()
            .map(|f| (f, true))
            .or(it.var.as_ref().map(|v| (v, false)));
        if let Some((n, is_field)) = named {
            check_name(n, if is_field { "field name" } else { "var name" })?;
            if is_field && ctx.no_fields {
                return err(
                    n.span(),
                    "fields inside a `repeat` need `reading = true` on the repeat",
                );
            }
            let slot = self.define(n, NameKind::Number)?;
            let emit = if is_field {
                let dedupe = ctx.in_tlv || self.counts.get(n.get_ref()).copied().unwrap_or(0) > 1;
                Some(Emit {
                    name: self.field_name(n.get_ref()),
                    conv: Conv::Int,
                    sentinels: Box::default(),
                    present: None,
                    dedupe,
                })
            } else {
                None
            };
            values.push(ValueOp {
                what: intern(n.get_ref()),
                src: Source::Bits {
                    shift: 0,
                    mask: if width >= 64 {
                        u64::MAX
                    } else {
                        (1u64 << width) - 1
                    },
                },
                slot,
                identity: None,
                emit,
            });
        }
        let Some(items) = &it.items else {
            return err(
                span.clone(),
                "a bitfield needs `items = [ { field = \"...\", bit = 0 }, ... ]`",
            );
        };
        let mut inner = ctx.nested(span)?;
        inner.bitfield = Some(width);
        for op in self.block(items, inner)?.into_vec() {
            match op {
                Op::Value(v) => values.push(*v),
                _ => return err(items.span(), "a bitfield holds only `field`/`var` items"),
            }
        }
        Ok(BitfieldOp {
            int,
            what: named.map_or("bitfield", |(n, _)| intern(n.get_ref())),
            values: values.into_boxed_slice(),
        })
    }

    fn switch(&mut self, it: &ItemSpec, span: &Span, ctx: Ctx) -> Result<SwitchOp, LayoutError> {
        let Some(sel) = &it.switch else {
            return err(span.clone(), "missing `switch`");
        };
        let text = sel.get_ref().trim();
        let little = self.endian(&it.endian)?;
        let peek = it.peek.as_ref().is_some_and(|p| *p.get_ref());
        let (selector, domain, what) = if parse_type_name(text).is_some() {
            let int = self.int_type(sel, little, "a switch on a type")?;
            (
                if peek {
                    Selector::Peek(int)
                } else {
                    Selector::Read(int)
                },
                Domain::of(int),
                "message type",
            )
        } else {
            if let Some(p) = &it.peek {
                return err(p.span(), "`peek` applies to a switch on a type (\"u8\"), which then reads without consuming");
            }
            if text == "rest" {
                (Selector::Rest, Domain::unsigned(32), "length")
            } else {
                let v = self.number_ref(text, &sel.span())?;
                (Selector::Var(v), Domain::Any, v.what)
            }
        };
        let Some(cases) = &it.cases else {
            return err(
                span.clone(),
                "a switch needs `cases = { 0x01 = [ ... ], ... }`",
            );
        };
        let inner = ctx.nested(span)?;
        let (table, bodies) = self.code_table(cases, domain, inner)?;
        let default = match &it.default {
            Some(d) => Some(self.block(d, inner)?),
            None => None,
        };
        Ok(SwitchOp {
            what,
            sel: selector,
            cases: table,
            bodies,
            default,
        })
    }

    /// `{ code = [items], ... }` → (ranges → body index, bodies).
    #[allow(clippy::type_complexity)]
    fn code_table(
        &mut self,
        table: &Spanned<Entries<Spanned<Items>>>,
        domain: Domain,
        ctx: Ctx,
    ) -> Result<(Box<[(i128, i128, usize)]>, Box<[Box<[Op]>]>), LayoutError> {
        let mut ranges = Vec::new();
        let mut spans = Vec::new();
        let mut bodies = Vec::new();
        for (key, items) in &table.get_ref().0 {
            let codes = parse_codes(key, domain)?;
            let index = bodies.len();
            bodies.push(self.block(items, ctx)?);
            for (lo, hi) in codes {
                ranges.push((lo, hi, index));
                spans.push((lo, hi, key.span()));
            }
        }
        if bodies.is_empty() {
            return err(table.span(), "this table needs at least one code");
        }
        check_overlaps(&spans)?;
        Ok((ranges.into_boxed_slice(), bodies.into_boxed_slice()))
    }

    fn cond(&mut self, it: &ItemSpec, span: &Span, ctx: Ctx) -> Result<IfOp, LayoutError> {
        let Some(c) = &it.cond else {
            return err(span.clone(), "missing `if`");
        };
        let cond = self.parse_cond(c)?;
        let then = self.body(it, span, ctx, false)?;
        let otherwise = match &it.otherwise {
            Some(e) => self.block(e, ctx.nested(span)?)?,
            None => Box::default(),
        };
        Ok(IfOp {
            cond,
            then,
            otherwise,
        })
    }

    /// `name`, `!name`, `name & 0x08`, `name == 3` (also !=, <, <=, >, >=).
    fn parse_cond(&self, c: &Spanned<String>) -> Result<Cond, LayoutError> {
        let text = c.get_ref().trim();
        let (negate, rest) = match text.strip_prefix('!') {
            Some(r) => (true, r.trim()),
            None => (false, text),
        };
        let bad = || {
            err::<Cond>(
                c.span(),
                format!(
                    "bad condition `{text}` (write \"name\", \"!name\", \"name & 0x08\" or \
                     \"name == 3\" with ==, !=, <, <=, >, >=)"
                ),
            )
        };
        let end = rest
            .find(|ch: char| !(ch.is_ascii_alphanumeric() || ch == '_'))
            .unwrap_or(rest.len());
        let (name, tail) = rest.split_at(end);
        if name.is_empty() {
            return bad();
        }
        let var = self.number_ref(name, &c.span())?;
        let tail = tail.trim();
        if tail.is_empty() {
            return Ok(Cond {
                var,
                test: Test::NonZero,
                negate,
            });
        }
        type MakeTest = fn(i64) -> Test;
        let ops: [(&str, MakeTest); 7] = [
            ("==", Test::Eq),
            ("!=", Test::Ne),
            ("<=", Test::Le),
            (">=", Test::Ge),
            ("<", Test::Lt),
            (">", Test::Gt),
            ("&", Test::Mask),
        ];
        for (op, make) in ops {
            if let Some(num) = tail.strip_prefix(op) {
                let Some((v, hex)) = parse_number(num) else {
                    return bad();
                };
                let Ok(v) = Domain::Any.normalise(v, hex) else {
                    return bad();
                };
                return Ok(Cond {
                    var,
                    test: make(v as i64),
                    negate,
                });
            }
        }
        bad()
    }

    fn repeat(&mut self, it: &ItemSpec, span: &Span, ctx: Ctx) -> Result<RepeatOp, LayoutError> {
        let Some(r) = &it.repeat else {
            return err(span.clone(), "missing `repeat`");
        };
        let little = self.endian(&it.endian)?;
        let count = match r.get_ref() {
            Scalar::Int(n) if (0..=MAX_REPEAT_LITERAL).contains(n) => Count::Fixed(*n as usize),
            Scalar::Int(n) => {
                return err(r.span(), format!("repeat count {n} is out of range (0 to {MAX_REPEAT_LITERAL})"))
            }
            Scalar::Str(s) if s.trim() == "until_end" => Count::UntilEnd,
            Scalar::Str(s) => match self.len(r, little) {
                Ok(Len::Var(v, adj)) => Count::Var(v, adj),
                Ok(Len::Prefix(t)) => Count::Prefix(t),
                Ok(_) => {
                    return err(
                        r.span(),
                        format!("bad repeat `{s}` (write a number, a name read earlier, a count type such as \"u8\", or \"until_end\")"),
                    )
                }
                Err(e) => return Err(e),
            },
        };
        let reading = it.reading.as_ref().is_some_and(|r| *r.get_ref());
        let interval = match &it.interval {
            None => None,
            Some(i) => {
                if !reading {
                    return err(
                        i.span(),
                        "`interval` spaces the times of readings: it needs `reading = true`",
                    );
                }
                Some(match i.get_ref() {
                    Scalar::Int(n) => Interval::Fixed(*n),
                    Scalar::Str(name) => Interval::Var(self.number_ref(name.trim(), &i.span())?),
                })
            }
        };
        let anchor_last = match &it.anchor {
            None => false,
            Some(a) => {
                if interval.is_none() {
                    return err(a.span(), "`anchor` applies with `interval`");
                }
                match a.get_ref().as_str() {
                    "first" => false,
                    "last" => true,
                    other => {
                        return err(
                            a.span(),
                            format!("unknown anchor `{other}` (expected \"first\" or \"last\")"),
                        )
                    }
                }
            }
        };
        let mut inner = ctx.nested(span)?;
        inner.no_fields = !reading;
        let Some(items) = &it.items else {
            return err(span.clone(), "a repeat needs `items = [ ... ]`");
        };
        let body = self.block(items, inner)?;
        let min_size = min_size(&body);
        if matches!(count, Count::UntilEnd) && min_size == 0 {
            return err(
                r.span(),
                "`until_end` needs items that consume at least one byte per repetition",
            );
        }
        Ok(RepeatOp {
            count,
            reading,
            interval,
            anchor_last,
            min_size,
            body,
        })
    }

    fn tlv(&mut self, it: &ItemSpec, span: &Span, ctx: Ctx) -> Result<TlvOp, LayoutError> {
        let Some(t) = &it.tlv else {
            return err(span.clone(), "missing `tlv`");
        };
        let type_width = match t.get_ref().as_str() {
            "u8" => 1,
            "u16" => 2,
            other => {
                return err(
                    t.span(),
                    format!("a TLV type code is \"u8\" or \"u16\" (read as written, high byte first), not `{other}`"),
                )
            }
        };
        let little = self.endian(&it.endian)?;
        let len = match &it.len {
            None => None,
            Some(l) => match l.get_ref() {
                Scalar::Str(s) if matches!(s.as_str(), "u8" | "u16") => Some(IntType {
                    width: if s == "u8" { 1 } else { 2 },
                    signed: false,
                    little,
                }),
                _ => {
                    return err(
                        l.span(),
                        "a TLV `len` is the width of each element's length: \"u8\" or \"u16\" (omit it when types have fixed layouts)",
                    )
                }
            },
        };
        let unknown = match &it.unknown {
            None => Unknown::Error,
            Some(u) => match u.get_ref().as_str() {
                "error" => Unknown::Error,
                "stop" => Unknown::Stop,
                "skip" if len.is_some() => Unknown::Skip,
                "skip" => return err(u.span(), "`unknown = \"skip\"` needs `len` (without a length an unknown element cannot be stepped over)"),
                other => return err(u.span(), format!("unknown policy `{other}` (expected \"error\", \"stop\" or \"skip\")")),
            },
        };
        if len.is_none() {
            if let Some(tr) = &it.trailing {
                return err(tr.span(), "`trailing` applies to TLV elements with a `len`");
            }
        }
        let trailing_error = it.trailing.as_ref().map_or(Ok(true), parse_trailing)?;
        let Some(types) = &it.types else {
            return err(
                span.clone(),
                "a tlv needs `types = { 0x01 = [ ... ], ... }`",
            );
        };
        let mut inner = ctx.nested(span)?;
        inner.in_tlv = true;
        let (table, bodies) =
            self.code_table(types, Domain::unsigned(8 * u32::from(type_width)), inner)?;
        Ok(TlvOp {
            type_width,
            len,
            unknown,
            trailing_error,
            types: table,
            bodies,
        })
    }
}

/// Highest literal repeat count.
const MAX_REPEAT_LITERAL: i64 = 65_535;

fn parse_date_pattern(p: &str) -> Result<Box<[DatePart]>, String> {
    let help = "a date-time pattern is two letters per byte: YY year, CC century, MM month, DD \
                day, hh hour, mm minute, ss second (e.g. \"bcd:ssmmhhDDMMYYCC\")";
    if p.is_empty() || p.len() % 2 != 0 || p.len() > 16 {
        return Err(format!("bad pattern `{p}`: {help}"));
    }
    let mut parts = Vec::new();
    for i in (0..p.len()).step_by(2) {
        let tok = p.get(i..i + 2).unwrap_or("");
        let part = match tok {
            "YY" => DatePart::Year,
            "CC" => DatePart::Century,
            "MM" => DatePart::Month,
            "DD" => DatePart::Day,
            "hh" => DatePart::Hour,
            "mm" => DatePart::Minute,
            "ss" => DatePart::Second,
            _ => return Err(format!("bad pattern part `{tok}` in `{p}`: {help}")),
        };
        if parts.contains(&part) {
            return Err(format!("`{tok}` appears twice in `{p}`"));
        }
        parts.push(part);
    }
    for (need, tok) in [
        (DatePart::Year, "YY"),
        (DatePart::Month, "MM"),
        (DatePart::Day, "DD"),
    ] {
        if !parts.contains(&need) {
            return Err(format!("pattern `{p}` has no `{tok}`: {help}"));
        }
    }
    Ok(parts.into_boxed_slice())
}

/// Fewest bytes `ops` can consume.
fn min_size(ops: &[Op]) -> usize {
    ops.iter().map(op_min_size).fold(0, usize::saturating_add)
}

fn len_min(len: &Len) -> usize {
    match len {
        Len::Fixed(n) => *n,
        Len::Prefix(t) => usize::from(t.width),
        Len::Var(..) | Len::Rest(_) => 0,
    }
}

fn op_min_size(op: &Op) -> usize {
    match op {
        Op::Seek(..) | Op::SkipWhile(_) | Op::Mark(_) | Op::Tlv(_) => 0,
        Op::Value(v) => match &v.src {
            Source::Int(t) => usize::from(t.width),
            Source::F32 { .. } => 4,
            Source::F64 { .. } => 8,
            Source::Bcd { len, .. } | Source::Ascii { len } | Source::Bytes { len, .. } => {
                len_min(len)
            }
            Source::Bits { .. } => 0,
        },
        Op::Bitfield(b) => usize::from(b.int.width),
        Op::Time(t) => match &t.kind {
            TimeKind::Seconds { int, .. } => usize::from(int.width),
            TimeKind::Pattern { parts, .. } => parts.len(),
        },
        Op::Const(k) => k.bytes.len(),
        Op::Skip(len, _) => len_min(len),
        Op::Checksum(k) => k.alg.width(),
        Op::Slice(s) => len_min(&s.len),
        Op::Switch(s) => {
            let own = match s.sel {
                Selector::Read(t) => usize::from(t.width),
                _ => 0,
            };
            let cases = s
                .bodies
                .iter()
                .map(|b| min_size(b))
                .chain(s.default.as_deref().map(min_size))
                .min()
                .unwrap_or(0);
            own.saturating_add(cases)
        }
        Op::If(i) => min_size(&i.then).min(min_size(&i.otherwise)),
        Op::Repeat(r) => match r.count {
            Count::Fixed(n) => n.saturating_mul(r.min_size),
            Count::Prefix(t) => usize::from(t.width),
            Count::Var(..) | Count::UntilEnd => 0,
        },
        Op::Group { body, .. } => min_size(body),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spanned(s: &str) -> Spanned<String> {
        Spanned::new(0..s.len(), s.to_owned())
    }

    #[test]
    fn codes_lists_ranges_and_signs() {
        let d8 = Domain::unsigned(8);
        assert_eq!(parse_codes(&spanned("0x01"), d8).unwrap(), [(1, 1)]);
        assert_eq!(
            parse_codes(&spanned("1, 3-5,0x10-0x1F"), d8).unwrap(),
            [(1, 1), (3, 5), (16, 31)]
        );
        let i16 = Domain::Int {
            bits: 16,
            signed: true,
        };
        assert_eq!(parse_codes(&spanned("0xFFFF"), i16).unwrap(), [(-1, -1)]);
        assert_eq!(
            parse_codes(&spanned("-10000"), i16).unwrap(),
            [(-10000, -10000)]
        );
        assert!(parse_codes(&spanned("0x100"), d8).is_err());
        assert!(parse_codes(&spanned("5-3"), d8).is_err());
        assert!(parse_codes(&spanned("x"), d8).is_err());
        assert!(parse_codes(&spanned("-1"), d8).is_err());
    }

    #[test]
    fn error_flags_drop_the_unit() {
        assert_eq!(error_flag("flow_temperature_c"), "flow_temperature_error");
        assert_eq!(error_flag("heart_rate_bpm"), "heart_rate_error");
        assert_eq!(error_flag("steps"), "steps_error");
    }

    #[test]
    fn decimals_of_scales() {
        assert_eq!(decimals_of(0.1), Some(1));
        assert_eq!(decimals_of(0.000001), Some(6));
        assert_eq!(decimals_of(10.0), Some(0));
        assert_eq!(decimals_of(-40.0), Some(0));
        assert_eq!(decimals_of(0.0625), Some(4));
        assert_eq!(decimals_of(1e-20), None);
    }

    #[test]
    fn adjustments() {
        assert_eq!(split_adjust("n"), Some(("n", 0)));
        assert_eq!(split_adjust("n - 2"), Some(("n", -2)));
        assert_eq!(split_adjust("rest-2"), Some(("rest", -2)));
        assert_eq!(split_adjust("n+x"), None);
    }

    #[test]
    fn date_patterns() {
        assert_eq!(parse_date_pattern("YYMMDD").unwrap().len(), 3);
        assert!(parse_date_pattern("ssmmhhDDMMYYCC").is_ok());
        assert!(parse_date_pattern("YYMM").is_err());
        assert!(parse_date_pattern("YYYYMMDD").is_err());
        assert!(parse_date_pattern("YYMMDDx").is_err());
    }
}
