//! The compiled parser: a tree of pre-resolved ops and the loop that runs it over a payload.
//!
//! Everything a decode needs was settled when the layout compiled: byte widths and orders,
//! variable slots (an index into a fixed array, no name lookups), case tables, field names
//! interned once per process (`Name::Static`, so putting one in a reading is a copy, not an
//! atomic increment; never formatted), scale factors and rounding.
//! The executor walks the ops with a cursor over the payload; positions are absolute, so
//! errors carry the payload offset without fix-ups.
//!
//! Bounds, so any input is safe: every read checks the bytes left in the current block
//! before slicing (no allocation is ever sized by a length field); repeat counts are checked
//! against the bytes left; loop iterations over the whole decode are capped at [`MAX_STEPS`],
//! readings at [`MAX_READINGS`] and fields per reading at [`MAX_FIELDS`]; nesting depth was
//! bounded at compile time.

use std::sync::Arc;

use crate::layout::checksum::Algorithm;
use crate::parse::bcd_to_u64;
use crate::{hex, DecodeError, DeviceTime, Identity, Name, Reading, Text, Value};

/// Variables (numbers read earlier and used by later items) a layout may reference.
pub const MAX_VARS: usize = 64;
/// Readings one payload may produce (history records, TLV readings).
pub const MAX_READINGS: usize = 1024;
/// Fields one reading may hold.
pub const MAX_FIELDS: usize = 256;
/// Repetitions plus TLV elements over one decode, all loops together.
pub const MAX_STEPS: u32 = 65_536;

/// A compiled layout.
#[derive(Debug)]
pub(crate) struct Program {
    pub root: Box<[Op]>,
    pub trailing_error: bool,
    /// Capacity to reserve for the first reading's fields.
    pub main_fields: usize,
    /// Every field name the layout can emit, in layout order, each once.
    pub field_names: Vec<Name>,
}

/// An unsigned or signed integer of 1 to 8 bytes in a fixed byte order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct IntType {
    pub width: u8,
    pub signed: bool,
    pub little: bool,
}

/// A byte count: a literal, a variable plus an adjustment, what is left of the block minus
/// some bytes, or a length prefix read from the payload.
#[derive(Debug, Clone)]
pub(crate) enum Len {
    Fixed(usize),
    Var(VarRef, i64),
    Rest(usize),
    Prefix(IntType),
}

/// A reference to a variable slot, with its name for errors.
#[derive(Debug, Clone, Copy)]
pub(crate) struct VarRef {
    pub slot: u16,
    pub what: &'static str,
}

#[derive(Debug)]
pub(crate) enum Op {
    /// `at = n`: move to byte `n` of the current block.
    Seek(usize, &'static str),
    Value(Box<ValueOp>),
    Bitfield(Box<BitfieldOp>),
    Time(Box<TimeOp>),
    Const(Box<ConstOp>),
    Skip(Len, &'static str),
    SkipWhile(Box<[u8]>),
    Mark(Option<u16>),
    Checksum(Box<ChecksumOp>),
    Slice(Box<SliceOp>),
    Switch(Box<SwitchOp>),
    If(Box<IfOp>),
    Repeat(Box<RepeatOp>),
    Tlv(Box<TlvOp>),
    Group {
        reading: bool,
        body: Box<[Op]>,
    },
}

#[derive(Debug)]
pub(crate) struct ValueOp {
    pub what: &'static str,
    pub src: Source,
    pub slot: Option<u16>,
    pub identity: Option<IdentityKind>,
    pub emit: Option<Emit>,
}

#[derive(Debug)]
pub(crate) enum Source {
    Int(IntType),
    F32 {
        little: bool,
    },
    F64 {
        little: bool,
    },
    Bcd {
        len: Len,
        little: bool,
    },
    Ascii {
        len: Len,
    },
    Bytes {
        len: Len,
        little: bool,
    },
    /// Bits of the enclosing bitfield's value.
    Bits {
        shift: u8,
        mask: u64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IdentityKind {
    DeviceId,
    Sequence,
}

/// How a read value becomes a field.
#[derive(Debug)]
pub(crate) struct Emit {
    pub name: Name,
    pub conv: Conv,
    pub sentinels: Box<[Sentinel]>,
    /// Bool field set true when a value was read, false when a sentinel matched.
    pub present: Option<Name>,
    /// The name may already be in the reading (TLV streams, names used twice): replace
    /// rather than append.
    pub dedupe: bool,
}

#[derive(Debug)]
pub(crate) enum Conv {
    Int,
    Float {
        scale: f64,
        offset: f64,
        /// `10^decimals` to round to, when the result's decimals are known.
        round: Option<f64>,
    },
    Enum(Box<EnumTable>),
    Bool {
        invert: bool,
    },
    Text,
}

#[derive(Debug)]
pub(crate) struct EnumTable {
    pub entries: Box<[(i128, i128, Arc<str>)]>,
    pub default: Option<Arc<str>>,
}

/// A wire value that means "no value": the field is left out and, with `flag`, a Bool
/// field of that name is set true instead.
#[derive(Debug)]
pub(crate) struct Sentinel {
    pub key: Key,
    pub flag: Option<Name>,
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum Key {
    /// An inclusive range of raw integer values (or BCD/date byte patterns).
    Range(i128, i128),
    Float(f64),
    NaN,
}

#[derive(Debug)]
pub(crate) struct BitfieldOp {
    pub int: IntType,
    pub what: &'static str,
    /// The bitfield's own name (if any) first, then one op per bit or bit range.
    pub values: Box<[ValueOp]>,
}

#[derive(Debug)]
pub(crate) struct TimeOp {
    pub what: &'static str,
    pub kind: TimeKind,
    pub local: bool,
    /// Raw values (or byte patterns) that mean "no time".
    pub absent: Box<[Key]>,
}

#[derive(Debug)]
pub(crate) enum TimeKind {
    /// Seconds = raw * mul / div + offset; `ago` counts back from the receive time.
    Seconds {
        int: IntType,
        mul: i64,
        div: i64,
        offset: i64,
        ago: bool,
    },
    /// One byte per part, BCD or binary.
    Pattern { bcd: bool, parts: Box<[DatePart]> },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DatePart {
    Year,
    Century,
    Month,
    Day,
    Hour,
    Minute,
    Second,
}

#[derive(Debug)]
pub(crate) struct ConstOp {
    pub bytes: Box<[u8]>,
    pub what: &'static str,
    pub mark: Option<u16>,
}

#[derive(Debug)]
pub(crate) enum Pos {
    /// A byte offset in the current block.
    Offset(usize),
    /// A position recorded by a mark (absolute).
    Mark(VarRef),
}

#[derive(Debug)]
pub(crate) struct ChecksumOp {
    pub alg: Algorithm,
    pub little: bool,
    pub from: Pos,
    pub to: Option<Pos>,
}

#[derive(Debug)]
pub(crate) struct SliceOp {
    pub len: Len,
    pub what: &'static str,
    pub trailing_error: bool,
    pub reading: bool,
    pub body: Box<[Op]>,
}

#[derive(Debug)]
pub(crate) enum Selector {
    Var(VarRef),
    Rest,
    Read(IntType),
    Peek(IntType),
}

#[derive(Debug)]
pub(crate) struct SwitchOp {
    pub what: &'static str,
    pub sel: Selector,
    /// (low, high, index into `bodies`), inclusive ranges.
    pub cases: Box<[(i128, i128, usize)]>,
    pub bodies: Box<[Box<[Op]>]>,
    pub default: Option<Box<[Op]>>,
}

#[derive(Debug)]
pub(crate) struct IfOp {
    pub cond: Cond,
    pub then: Box<[Op]>,
    pub otherwise: Box<[Op]>,
}

#[derive(Debug)]
pub(crate) struct Cond {
    pub var: VarRef,
    pub test: Test,
    pub negate: bool,
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum Test {
    NonZero,
    Mask(i64),
    Eq(i64),
    Ne(i64),
    Lt(i64),
    Le(i64),
    Gt(i64),
    Ge(i64),
}

#[derive(Debug)]
pub(crate) enum Count {
    Fixed(usize),
    Var(VarRef, i64),
    Prefix(IntType),
    UntilEnd,
}

#[derive(Debug)]
pub(crate) enum Interval {
    Fixed(i64),
    Var(VarRef),
}

#[derive(Debug)]
pub(crate) struct RepeatOp {
    pub count: Count,
    pub reading: bool,
    pub interval: Option<Interval>,
    /// The interval counts from the last repetition (true) or the first (false).
    pub anchor_last: bool,
    /// Fewest bytes one repetition can consume (to reject impossible counts up front).
    pub min_size: usize,
    pub body: Box<[Op]>,
}

#[derive(Debug)]
pub(crate) enum Unknown {
    Error,
    Stop,
    Skip,
}

#[derive(Debug)]
pub(crate) struct TlvOp {
    /// 1 or 2: the type code is read as written (big-endian).
    pub type_width: u8,
    pub len: Option<IntType>,
    pub unknown: Unknown,
    pub trailing_error: bool,
    pub types: Box<[(i128, i128, usize)]>,
    pub bodies: Box<[Box<[Op]>]>,
}

/// The part of the payload the current block may read: `[start, end)`, next byte `pos`.
#[derive(Debug, Clone, Copy)]
struct Cur {
    start: usize,
    pos: usize,
    end: usize,
}

impl Cur {
    fn rest(&self) -> usize {
        self.end.saturating_sub(self.pos)
    }
}

/// Text as read from the wire, before conversion.
enum RawText<'a> {
    Ascii(&'a [u8]),
    /// Bytes printed as hex, last byte first when `true`.
    Bytes(&'a [u8], bool),
}

/// Runs `program` over `payload`.
pub(crate) fn run(
    program: &Program,
    measurement: &Name,
    payload: &[u8],
) -> Result<Vec<Reading>, DecodeError> {
    if payload.is_empty() {
        return Err(DecodeError::Empty);
    }
    // The first reading is built in its place in the output (see `Reading::push`).
    let mut out = Vec::with_capacity(1);
    crate::reading::push(
        &mut out,
        Reading::with_capacity(measurement.clone(), program.main_fields),
    );
    let mut m = Machine {
        data: payload,
        vars: [0; MAX_VARS],
        set: 0,
        out,
        cur: 0,
        steps: 0,
        identity: None,
        measurement,
    };
    let mut c = Cur {
        start: 0,
        pos: 0,
        end: payload.len(),
    };
    m.block(&program.root, &mut c)?;
    if program.trailing_error && c.pos < c.end {
        return Err(DecodeError::TrailingBytes {
            offset: c.pos,
            count: c.end - c.pos,
        });
    }
    let mut out = m.out;
    // Readings that got no field (a frame holding only history records leaves the first
    // one empty) are dropped, unless nothing has a field at all.
    if out.len() > 1 && out.iter().any(|r| !r.fields.is_empty()) {
        out.retain(|r| !r.fields.is_empty());
    }
    if let Some(id) = m.identity {
        if let Some((last, rest)) = out.split_last_mut() {
            for r in rest {
                r.identity = Some(id.clone());
            }
            last.identity = Some(id);
        }
    }
    Ok(out)
}

struct Machine<'a, 'm> {
    data: &'a [u8],
    vars: [i64; MAX_VARS],
    /// Bit `i` set once slot `i` holds a value read in this decode.
    set: u64,
    out: Vec<Reading>,
    /// Index of the reading fields go to.
    cur: usize,
    steps: u32,
    identity: Option<Identity>,
    measurement: &'m Name,
}

fn truncated(what: &'static str, offset: usize, needed: usize) -> DecodeError {
    DecodeError::Truncated {
        what,
        offset,
        needed,
    }
}

fn invalid(what: &'static str, offset: usize, reason: &'static str) -> DecodeError {
    DecodeError::InvalidValue {
        what,
        offset,
        reason,
    }
}

/// Reads an unsigned big- or little-endian integer of up to 8 bytes.
fn read_uint(b: &[u8], little: bool) -> u64 {
    if little {
        b.iter().rev().fold(0u64, |v, &x| v << 8 | u64::from(x))
    } else {
        b.iter().fold(0u64, |v, &x| v << 8 | u64::from(x))
    }
}

fn int_value(b: &[u8], t: IntType) -> i128 {
    let u = read_uint(b, t.little);
    if t.signed {
        let shift = 64 - 8 * u32::from(t.width);
        i128::from(((u << shift) as i64) >> shift)
    } else {
        i128::from(u)
    }
}

/// An f32 widened to the f64 with the fewest decimal digits that still reads back as the
/// same f32, so 22.4f32 becomes 22.4 rather than 22.399999618530273.
pub(crate) fn widen_f32(x: f32) -> f64 {
    let v = f64::from(x);
    if !v.is_finite() || v == 0.0 {
        return v;
    }
    let mag = v.abs().log10().floor() as i32;
    for digits in 6..=9 {
        let places = digits - 1 - mag;
        let r = if places >= 0 {
            let p = 10f64.powi(places);
            (v * p).round() / p
        } else {
            let p = 10f64.powi(-places);
            (v / p).round() * p
        };
        if r as f32 == x {
            return r;
        }
    }
    v
}

/// Rounds to the decimals `p = 10^decimals` stands for, when that is exact in f64.
fn round_to(v: f64, p: f64) -> f64 {
    let x = v * p;
    if x.abs() < 4.0e15 {
        x.round() / p
    } else {
        v
    }
}

impl Key {
    fn matches_int(&self, v: i128) -> bool {
        match *self {
            Key::Range(lo, hi) => lo <= v && v <= hi,
            Key::Float(_) | Key::NaN => false,
        }
    }

    fn matches_float(&self, v: f64) -> bool {
        match *self {
            Key::Float(k) => k == v,
            Key::NaN => v.is_nan(),
            Key::Range(..) => false,
        }
    }
}

fn lookup(table: &[(i128, i128, usize)], v: i128) -> Option<usize> {
    table
        .iter()
        .find(|(lo, hi, _)| *lo <= v && v <= *hi)
        .map(|&(_, _, i)| i)
}

fn shift_time(t: DeviceTime, by: i64) -> DeviceTime {
    match t {
        DeviceTime::Utc(s) => DeviceTime::Utc(s.saturating_add(by)),
        DeviceTime::Local(s) => DeviceTime::Local(s.saturating_add(by)),
        DeviceTime::Ago(a) => {
            let v = i64::from(a)
                .saturating_sub(by)
                .clamp(0, i64::from(u32::MAX));
            DeviceTime::Ago(u32::try_from(v).unwrap_or(u32::MAX))
        }
    }
}

impl<'a> Machine<'a, '_> {
    fn block(&mut self, ops: &[Op], c: &mut Cur) -> Result<(), DecodeError> {
        for op in ops {
            self.op(op, c)?;
        }
        Ok(())
    }

    fn take(&self, c: &mut Cur, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        let rest = c.rest();
        if n > rest {
            return Err(truncated(what, c.pos, n - rest));
        }
        let data: &'a [u8] = self.data;
        let b = data
            .get(c.pos..c.pos + n)
            .ok_or_else(|| truncated(what, c.pos, n))?;
        c.pos += n;
        Ok(b)
    }

    fn var(&self, v: VarRef, at: usize) -> Result<i64, DecodeError> {
        let bit = 1u64.checked_shl(u32::from(v.slot)).unwrap_or(0);
        match self.vars.get(usize::from(v.slot)) {
            Some(&x) if self.set & bit != 0 => Ok(x),
            _ => Err(invalid(
                v.what,
                at,
                "used before it was read (its item was not decoded)",
            )),
        }
    }

    fn set_var(&mut self, slot: u16, v: i128) {
        if let Some(s) = self.vars.get_mut(usize::from(slot)) {
            *s = i64::try_from(v).unwrap_or(if v < 0 { i64::MIN } else { i64::MAX });
            self.set |= 1u64.checked_shl(u32::from(slot)).unwrap_or(0);
        }
    }

    fn step(&mut self, what: &'static str, at: usize) -> Result<(), DecodeError> {
        self.steps += 1;
        if self.steps > MAX_STEPS {
            return Err(invalid(what, at, "too many repetitions for one payload"));
        }
        Ok(())
    }

    fn len(&mut self, len: &Len, c: &mut Cur, what: &'static str) -> Result<usize, DecodeError> {
        Ok(match *len {
            Len::Fixed(n) => n,
            Len::Prefix(t) => {
                let at = c.pos;
                let b = self.take(c, usize::from(t.width), what)?;
                usize::try_from(int_value(b, t))
                    .map_err(|_| invalid(what, at, "negative length"))?
            }
            Len::Var(v, adjust) => {
                let n = self.var(v, c.pos)?.saturating_add(adjust);
                usize::try_from(n).map_err(|_| invalid(what, c.pos, "negative length"))?
            }
            Len::Rest(minus) => {
                let rest = c.rest();
                rest.checked_sub(minus)
                    .ok_or_else(|| truncated(what, c.pos, minus - rest))?
            }
        })
    }

    /// The reading fields go to. `cur` always indexes one (it is set right after a push and
    /// readings are not removed during a decode); the error is unreachable.
    fn reading(&mut self, at: usize) -> Result<&mut Reading, DecodeError> {
        self.out
            .get_mut(self.cur)
            .ok_or_else(|| invalid("reading", at, "no current reading"))
    }

    #[inline(always)]
    fn push(&mut self, name: &Name, v: Value, dedupe: bool, at: usize) -> Result<(), DecodeError> {
        let r = self.reading(at)?;
        if dedupe {
            // Names are interned per layout: the same name is the same pointer.
            let same = |n: &Name| std::ptr::eq(n.as_str(), name.as_str());
            if let Some(slot) = r.fields.iter_mut().find(|(n, _)| same(n)) {
                slot.1 = v;
                return Ok(());
            }
        }
        if r.fields.len() >= MAX_FIELDS {
            return Err(invalid(
                "reading",
                at,
                "more than 256 fields in one reading",
            ));
        }
        r.push(name.clone(), v);
        Ok(())
    }

    /// Runs `f` with a new reading as the current one.
    fn in_new_reading(
        &mut self,
        at: usize,
        f: impl FnOnce(&mut Self) -> Result<(), DecodeError>,
    ) -> Result<usize, DecodeError> {
        if self.out.len() >= MAX_READINGS {
            return Err(invalid(
                "reading",
                at,
                "more than 1024 readings in one payload",
            ));
        }
        crate::reading::push(&mut self.out, Reading::new(self.measurement.clone()));
        let index = self.out.len() - 1;
        let saved = std::mem::replace(&mut self.cur, index);
        let res = f(self);
        self.cur = saved;
        res.map(|()| index)
    }

    fn op(&mut self, op: &Op, c: &mut Cur) -> Result<(), DecodeError> {
        match op {
            Op::Seek(n, what) => {
                let to = c.start.saturating_add(*n);
                if to > c.end {
                    return Err(truncated(what, c.end, to - c.end));
                }
                c.pos = to;
            }
            Op::Value(v) => {
                let at = c.pos;
                self.value(v, c, 0, at)?;
            }
            Op::Bitfield(b) => {
                let at = c.pos;
                let bytes = self.take(c, usize::from(b.int.width), b.what)?;
                let raw = read_uint(bytes, b.int.little);
                for v in b.values.iter() {
                    self.value(v, c, raw, at)?;
                }
            }
            Op::Time(t) => self.time(t, c)?,
            Op::Const(k) => {
                let at = c.pos;
                let got = self.take(c, k.bytes.len(), k.what)?;
                if let Some(i) = got.iter().zip(k.bytes.iter()).position(|(a, b)| a != b) {
                    return Err(DecodeError::BadConstant {
                        what: k.what,
                        offset: at + i,
                        expected: u32::from(k.bytes.get(i).copied().unwrap_or(0)),
                        found: u32::from(got.get(i).copied().unwrap_or(0)),
                    });
                }
                if let Some(slot) = k.mark {
                    self.set_var(slot, at as i128);
                }
            }
            Op::Skip(len, what) => {
                let n = self.len(len, c, what)?;
                self.take(c, n, what)?;
            }
            Op::SkipWhile(set) => {
                while c.pos < c.end && self.data.get(c.pos).is_some_and(|b| set.contains(b)) {
                    c.pos += 1;
                }
            }
            Op::Mark(slot) => {
                if let Some(slot) = *slot {
                    self.set_var(slot, c.pos as i128);
                }
            }
            Op::Checksum(k) => self.checksum(k, c)?,
            Op::Slice(s) => {
                let n = self.len(&s.len, c, s.what)?;
                let rest = c.rest();
                if n > rest {
                    return Err(truncated(s.what, c.pos, n - rest));
                }
                let mut sub = Cur {
                    start: c.pos,
                    pos: c.pos,
                    end: c.pos + n,
                };
                if s.reading {
                    self.in_new_reading(c.pos, |m| m.block(&s.body, &mut sub))?;
                } else {
                    self.block(&s.body, &mut sub)?;
                }
                if s.trailing_error && sub.pos < sub.end {
                    return Err(DecodeError::TrailingBytes {
                        offset: sub.pos,
                        count: sub.end - sub.pos,
                    });
                }
                c.pos = sub.end;
            }
            Op::Switch(s) => {
                let at = c.pos;
                let v = match s.sel {
                    Selector::Var(v) => i128::from(self.var(v, at)?),
                    Selector::Rest => c.rest() as i128,
                    Selector::Read(t) => int_value(self.take(c, usize::from(t.width), s.what)?, t),
                    Selector::Peek(t) => {
                        let mut peek = *c;
                        int_value(self.take(&mut peek, usize::from(t.width), s.what)?, t)
                    }
                };
                let body = match lookup(&s.cases, v) {
                    Some(i) => s.bodies.get(i),
                    None => s.default.as_ref(),
                };
                match body {
                    Some(ops) => self.block(ops, c)?,
                    None => {
                        return Err(DecodeError::UnknownType {
                            what: s.what,
                            code: v as u32,
                            offset: at,
                        })
                    }
                }
            }
            Op::If(i) => {
                let x = self.var(i.cond.var, c.pos)?;
                let hit = match i.cond.test {
                    Test::NonZero => x != 0,
                    Test::Mask(m) => x & m != 0,
                    Test::Eq(k) => x == k,
                    Test::Ne(k) => x != k,
                    Test::Lt(k) => x < k,
                    Test::Le(k) => x <= k,
                    Test::Gt(k) => x > k,
                    Test::Ge(k) => x >= k,
                };
                let ops = if hit != i.cond.negate {
                    &i.then
                } else {
                    &i.otherwise
                };
                self.block(ops, c)?;
            }
            Op::Repeat(r) => self.repeat(r, c)?,
            Op::Tlv(t) => self.tlv(t, c)?,
            Op::Group { reading, body } => {
                if *reading {
                    self.in_new_reading(c.pos, |m| m.block(body, c))?;
                } else {
                    self.block(body, c)?;
                }
            }
        }
        Ok(())
    }

    fn value(
        &mut self,
        op: &ValueOp,
        c: &mut Cur,
        bits: u64,
        at: usize,
    ) -> Result<(), DecodeError> {
        let what = op.what;
        let raw = match &op.src {
            Source::Int(t) => int_value(self.take(c, usize::from(t.width), what)?, *t),
            Source::Bits { shift, mask } => {
                i128::from(bits.checked_shr(u32::from(*shift)).unwrap_or(0) & mask)
            }
            Source::F32 { little } => {
                let b = self.take(c, 4, what)?;
                let x = f32::from_bits(read_uint(b, *little) as u32);
                return self.finish_float(op, widen_f32(x), at);
            }
            Source::F64 { little } => {
                let b = self.take(c, 8, what)?;
                return self.finish_float(op, f64::from_bits(read_uint(b, *little)), at);
            }
            Source::Ascii { len } => {
                let n = self.len(len, c, what)?;
                let b = self.take(c, n, what)?;
                return self.finish_text(op, RawText::Ascii(b), at);
            }
            Source::Bytes { len, little } => {
                let n = self.len(len, c, what)?;
                let b = self.take(c, n, what)?;
                return self.finish_text(op, RawText::Bytes(b, *little), at);
            }
            Source::Bcd { len, little } => {
                let n = self.len(len, c, what)?;
                let b = self.take(c, n, what)?;
                // Sentinels of BCD fields are byte patterns (0xFFFFFFFF): test them before
                // the digits are checked.
                if let Some(e) = &op.emit {
                    if n <= 8 {
                        let pattern = i128::from(read_uint(b, *little));
                        if let Some(s) = e.sentinels.iter().find(|s| s.key.matches_int(pattern)) {
                            return self.sentinel_hit(e, s, at);
                        }
                    }
                }
                let digits = if *little {
                    bcd_to_u64(b.iter().rev().copied())
                } else {
                    bcd_to_u64(b.iter().copied())
                }
                .ok_or_else(|| invalid(what, at, "not a BCD digit"))?;
                if let Some(IdentityKind::DeviceId) = op.identity {
                    self.identity_mut().device_id = Some(hex::encode_text_ordered(b, *little));
                }
                let v = i128::from(digits);
                if let Some(slot) = op.slot {
                    self.set_var(slot, v);
                }
                if let Some(IdentityKind::Sequence) = op.identity {
                    self.identity_mut().sequence = u32::try_from(v).ok();
                }
                return match &op.emit {
                    Some(e) => self.finish_int(e, what, v, at),
                    None => Ok(()),
                };
            }
        };
        if let Some(slot) = op.slot {
            self.set_var(slot, raw);
        }
        match op.identity {
            Some(IdentityKind::DeviceId) => {
                self.identity_mut().device_id = Some(Text::from(raw.to_string()))
            }
            Some(IdentityKind::Sequence) => self.identity_mut().sequence = u32::try_from(raw).ok(),
            None => {}
        }
        let Some(e) = &op.emit else { return Ok(()) };
        if let Some(s) = e.sentinels.iter().find(|s| s.key.matches_int(raw)) {
            return self.sentinel_hit(e, s, at);
        }
        self.finish_int(e, what, raw, at)
    }

    fn identity_mut(&mut self) -> &mut Identity {
        self.identity.get_or_insert_with(Identity::default)
    }

    fn sentinel_hit(&mut self, e: &Emit, s: &Sentinel, at: usize) -> Result<(), DecodeError> {
        if let Some(flag) = &s.flag {
            self.push(flag, Value::Bool(true), e.dedupe, at)?;
        }
        if let Some(p) = &e.present {
            self.push(p, Value::Bool(false), e.dedupe, at)?;
        }
        Ok(())
    }

    fn finish_int(
        &mut self,
        e: &Emit,
        what: &'static str,
        v: i128,
        at: usize,
    ) -> Result<(), DecodeError> {
        let value = match &e.conv {
            Conv::Int | Conv::Text => Value::Int(
                i64::try_from(v)
                    .map_err(|_| invalid(what, at, "value exceeds the signed 64-bit range"))?,
            ),
            Conv::Float {
                scale,
                offset,
                round,
            } => {
                // Through i64 when it fits (every value read from 8 bytes or fewer, but a
                // u64 past i64::MAX): an i128 conversion is a libcall.
                let v = i64::try_from(v).map_or_else(|_| v as f64, |v| v as f64);
                let x = v * scale + offset;
                Value::Float(match round {
                    Some(p) => round_to(x, *p),
                    None => x,
                })
            }
            Conv::Enum(t) => {
                let label = t
                    .entries
                    .iter()
                    .find(|(lo, hi, _)| *lo <= v && v <= *hi)
                    .map(|(_, _, l)| l)
                    .or(t.default.as_ref());
                Value::Text(match label {
                    // The profile's label, shared: no allocation per decode.
                    Some(l) => Text::from(Arc::clone(l)),
                    None => Text::from(v.to_string()),
                })
            }
            Conv::Bool { invert } => Value::Bool((v != 0) != *invert),
        };
        self.push(&e.name, value, e.dedupe, at)?;
        if let Some(p) = &e.present {
            self.push(p, Value::Bool(true), e.dedupe, at)?;
        }
        Ok(())
    }

    fn finish_float(&mut self, op: &ValueOp, x: f64, at: usize) -> Result<(), DecodeError> {
        let Some(e) = &op.emit else { return Ok(()) };
        if let Some(s) = e.sentinels.iter().find(|s| s.key.matches_float(x)) {
            return self.sentinel_hit(e, s, at);
        }
        let v = match &e.conv {
            Conv::Float {
                scale,
                offset,
                round,
            } => {
                let y = x * scale + offset;
                match round {
                    Some(p) => round_to(y, *p),
                    None => y,
                }
            }
            _ => x,
        };
        self.push(&e.name, Value::Float(v), e.dedupe, at)?;
        if let Some(p) = &e.present {
            self.push(p, Value::Bool(true), e.dedupe, at)?;
        }
        Ok(())
    }

    fn finish_text(
        &mut self,
        op: &ValueOp,
        raw: RawText<'a>,
        at: usize,
    ) -> Result<(), DecodeError> {
        let text = match raw {
            RawText::Ascii(b) => {
                // Devices pad fixed-size text with NUL, 0xFF or spaces.
                let end = b
                    .iter()
                    .rposition(|&x| !matches!(x, 0 | 0xFF | b' '))
                    .map_or(0, |i| i + 1);
                let body = b.get(..end).unwrap_or_default();
                if !body.iter().all(|x| (0x20..0x7F).contains(x)) {
                    return Err(invalid(op.what, at, "not printable ASCII"));
                }
                Text::from_ascii(body).unwrap_or_default()
            }
            RawText::Bytes(b, little) => hex::encode_text_ordered(b, little),
        };
        if let Some(IdentityKind::DeviceId) = op.identity {
            self.identity_mut().device_id = Some(text.clone());
        }
        if let Some(e) = &op.emit {
            self.push(&e.name, Value::Text(text), e.dedupe, at)?;
        }
        Ok(())
    }

    fn time(&mut self, t: &TimeOp, c: &mut Cur) -> Result<(), DecodeError> {
        let at = c.pos;
        let time = match &t.kind {
            TimeKind::Seconds {
                int,
                mul,
                div,
                offset,
                ago,
            } => {
                let raw = int_value(self.take(c, usize::from(int.width), t.what)?, *int);
                if t.absent.iter().any(|k| k.matches_int(raw)) {
                    return Ok(());
                }
                let secs = (raw * i128::from(*mul)).div_euclid(i128::from((*div).max(1)))
                    + i128::from(*offset);
                if *ago {
                    DeviceTime::Ago(
                        u32::try_from(secs)
                            .map_err(|_| invalid(t.what, at, "time out of range"))?,
                    )
                } else {
                    let s = i64::try_from(secs)
                        .map_err(|_| invalid(t.what, at, "time out of range"))?;
                    if t.local {
                        DeviceTime::Local(s)
                    } else {
                        DeviceTime::Utc(s)
                    }
                }
            }
            TimeKind::Pattern { bcd, parts } => {
                let b = self.take(c, parts.len(), t.what)?;
                let pattern = i128::from(read_uint(b, false));
                if t.absent.iter().any(|k| k.matches_int(pattern)) {
                    return Ok(());
                }
                let (mut year, mut century, mut month, mut day) = (0u32, None, 0u32, 0u32);
                let (mut hour, mut minute, mut second) = (0u32, 0u32, 0u32);
                for (i, (&byte, part)) in b.iter().zip(parts.iter()).enumerate() {
                    let v = if *bcd {
                        let (hi, lo) = (byte >> 4, byte & 0x0F);
                        if hi > 9 || lo > 9 {
                            return Err(invalid(t.what, at + i, "not a BCD digit"));
                        }
                        u32::from(hi * 10 + lo)
                    } else {
                        u32::from(byte)
                    };
                    match part {
                        DatePart::Year => year = v,
                        DatePart::Century => century = Some(v),
                        DatePart::Month => month = v,
                        DatePart::Day => day = v,
                        DatePart::Hour => hour = v,
                        DatePart::Minute => minute = v,
                        DatePart::Second => second = v,
                    }
                }
                let full_year = match century {
                    Some(cc) => i64::from(cc) * 100 + i64::from(year),
                    None => 2000 + i64::from(year),
                };
                let s = crate::time::from_civil(full_year, month, day, hour, minute, second)
                    .ok_or_else(|| invalid(t.what, at, "not a valid date and time"))?;
                if t.local {
                    DeviceTime::Local(s)
                } else {
                    DeviceTime::Utc(s)
                }
            }
        };
        self.reading(at)?.time = Some(time);
        Ok(())
    }

    fn checksum(&mut self, k: &ChecksumOp, c: &mut Cur) -> Result<(), DecodeError> {
        let here = c.pos;
        let pos = |m: &Self, p: &Pos| -> Result<usize, DecodeError> {
            match *p {
                Pos::Offset(n) => Ok(c.start.saturating_add(n)),
                Pos::Mark(v) => usize::try_from(m.var(v, here)?)
                    .map_err(|_| invalid("checksum", here, "span starts before the payload")),
            }
        };
        let from = pos(self, &k.from)?;
        let to = match &k.to {
            Some(p) => pos(self, p)?,
            None => here,
        };
        let span = self
            .data
            .get(from..to)
            .ok_or_else(|| invalid("checksum", here, "checksum span is outside the payload"))?;
        let computed = k.alg.compute(span);
        let b = self.take(c, k.alg.width(), "checksum")?;
        let stated = read_uint(b, k.little) as u32;
        if stated != computed {
            return Err(DecodeError::Checksum { stated, computed });
        }
        Ok(())
    }

    fn repeat(&mut self, r: &RepeatOp, c: &mut Cur) -> Result<(), DecodeError> {
        let at = c.pos;
        let count = match r.count {
            Count::Fixed(n) => Some(n),
            Count::Var(v, adjust) => Some(
                usize::try_from(self.var(v, at)?.saturating_add(adjust))
                    .map_err(|_| invalid(v.what, at, "negative repeat count"))?,
            ),
            Count::Prefix(t) => {
                let b = self.take(c, usize::from(t.width), "repeat count")?;
                Some(
                    usize::try_from(int_value(b, t))
                        .map_err(|_| invalid("repeat count", at, "negative repeat count"))?,
                )
            }
            Count::UntilEnd => None,
        };
        if let Some(n) = count {
            let need = n.saturating_mul(r.min_size);
            if need > c.rest() {
                return Err(truncated("repeat", c.pos, need - c.rest()));
            }
        }
        let base = self.reading(at)?.time;
        let mut made: Vec<usize> = Vec::new();
        let mut i = 0usize;
        loop {
            match count {
                Some(n) if i >= n => break,
                None if c.pos >= c.end => break,
                _ => {}
            }
            self.step("repeat", c.pos)?;
            let before = c.pos;
            if r.reading {
                let index = self.in_new_reading(c.pos, |m| m.block(&r.body, c))?;
                made.push(index);
            } else {
                self.block(&r.body, c)?;
            }
            if count.is_none() && c.pos <= before {
                return Err(invalid("repeat", c.pos, "a repetition consumed no bytes"));
            }
            i += 1;
        }
        if let Some(interval) = &r.interval {
            let step = match *interval {
                Interval::Fixed(s) => s,
                Interval::Var(v) => self.var(v, at)?,
            };
            self.space_times(&made, step, r.anchor_last, base);
        }
        Ok(())
    }

    /// Gives repetition `i` (of `made`) the time `base + i * step` (or counted from the last
    /// one), unless its own items set a time. Without a base time, the newest repetition is
    /// taken to be "now" (receive time) and the others are so many seconds ago.
    fn space_times(
        &mut self,
        made: &[usize],
        step: i64,
        anchor_last: bool,
        base: Option<DeviceTime>,
    ) {
        let n = made.len() as i64;
        let offset = |i: i64| -> i64 {
            let k = if anchor_last { i - (n - 1) } else { i };
            k.saturating_mul(step)
        };
        let newest = (0..n).map(offset).max().unwrap_or(0);
        for (i, &index) in made.iter().enumerate() {
            let o = offset(i as i64);
            let t = match base {
                Some(b) => shift_time(b, o),
                None => shift_time(DeviceTime::Ago(0), o.saturating_sub(newest)),
            };
            if let Some(r) = self.out.get_mut(index) {
                if r.time.is_none() {
                    r.time = Some(t);
                }
            }
        }
    }

    fn tlv(&mut self, t: &TlvOp, c: &mut Cur) -> Result<(), DecodeError> {
        while c.pos < c.end {
            let at = c.pos;
            self.step("tlv", at)?;
            let code_bytes = self.take(c, usize::from(t.type_width), "tlv type")?;
            let code = i128::from(read_uint(code_bytes, false));
            let end = match t.len {
                Some(lt) => {
                    let len_at = c.pos;
                    let b = self.take(c, usize::from(lt.width), "tlv length")?;
                    let n = usize::try_from(int_value(b, lt))
                        .map_err(|_| invalid("tlv length", len_at, "negative length"))?;
                    let rest = c.rest();
                    if n > rest {
                        return Err(truncated("tlv element", c.pos, n - rest));
                    }
                    Some(c.pos + n)
                }
                None => None,
            };
            let Some(body) = lookup(&t.types, code).and_then(|i| t.bodies.get(i)) else {
                match (&t.unknown, end) {
                    (Unknown::Skip, Some(e)) => {
                        c.pos = e;
                        continue;
                    }
                    (Unknown::Stop, _) => {
                        c.pos = c.end;
                        return Ok(());
                    }
                    _ => {
                        return Err(DecodeError::UnknownType {
                            what: "tlv type",
                            code: code as u32,
                            offset: at,
                        })
                    }
                }
            };
            match end {
                Some(e) => {
                    let mut sub = Cur {
                        start: c.pos,
                        pos: c.pos,
                        end: e,
                    };
                    self.block(body, &mut sub)?;
                    if t.trailing_error && sub.pos < e {
                        return Err(DecodeError::TrailingBytes {
                            offset: sub.pos,
                            count: e - sub.pos,
                        });
                    }
                    c.pos = e;
                }
                // Without a length the element's items say how long it is; the type code
                // itself guarantees progress.
                None => self.block(body, c)?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_in_both_orders() {
        let t = |width, signed, little| IntType {
            width,
            signed,
            little,
        };
        assert_eq!(int_value(&[0x01, 0x02], t(2, false, false)), 0x0102);
        assert_eq!(int_value(&[0x01, 0x02], t(2, false, true)), 0x0201);
        assert_eq!(int_value(&[0xFF, 0xFE], t(2, true, false)), -2);
        assert_eq!(int_value(&[0xFF, 0xFF, 0x7F], t(3, true, true)), 0x7FFFFF);
        assert_eq!(int_value(&[0x00, 0x00, 0x80], t(3, true, true)), -0x800000);
        assert_eq!(
            int_value(&[0xFF; 8], t(8, false, false)),
            i128::from(u64::MAX)
        );
        assert_eq!(int_value(&[0xFF; 8], t(8, true, false)), -1);
    }

    #[test]
    fn f32_widens_without_noise() {
        assert_eq!(widen_f32(22.4), 22.4);
        assert_eq!(widen_f32(-0.1), -0.1);
        assert_eq!(widen_f32(1.0e-7), 1.0e-7);
        assert_eq!(widen_f32(16_777_216.0), 16_777_216.0);
        assert_eq!(widen_f32(3.402_823_5e38), 3.402_823_5e38);
        assert!(widen_f32(f32::NAN).is_nan());
    }

    #[test]
    fn rounding_removes_scale_noise() {
        assert_eq!(round_to(267.0 * 0.1, 10.0), 26.7);
        assert_eq!(round_to(-1000.0 * 0.01 + 0.0, 100.0), -10.0);
        assert_eq!(round_to(3277.0 * 0.001, 1000.0), 3.277);
    }

    #[test]
    fn hex_text() {
        assert_eq!(
            hex::encode_text_ordered(&[0x72, 0x40, 0x0a], false),
            "72400a"
        );
        assert_eq!(
            hex::encode_text_ordered(&[0x72, 0x40, 0x0a], true),
            "0a4072"
        );
    }

    #[test]
    fn times_spaced_from_a_base_or_from_now() {
        let mut m = Machine {
            data: &[],
            vars: [0; MAX_VARS],
            set: 0,
            out: (0..4).map(|_| Reading::new("x")).collect(),
            cur: 0,
            steps: 0,
            identity: None,
            measurement: &Name::Static("x"),
        };
        m.space_times(&[1, 2, 3], 3600, false, Some(DeviceTime::Utc(1000)));
        let times: Vec<_> = m.out.iter().map(|r| r.time).collect();
        assert_eq!(
            times,
            [
                None,
                Some(DeviceTime::Utc(1000)),
                Some(DeviceTime::Utc(4600)),
                Some(DeviceTime::Utc(8200))
            ]
        );
        for r in &mut m.out {
            r.time = None;
        }
        m.space_times(&[1, 2, 3], 60, false, None);
        let times: Vec<_> = m.out.iter().map(|r| r.time).collect();
        assert_eq!(
            times,
            [
                None,
                Some(DeviceTime::Ago(120)),
                Some(DeviceTime::Ago(60)),
                Some(DeviceTime::Ago(0))
            ]
        );
        for r in &mut m.out {
            r.time = None;
        }
        m.space_times(&[1, 2, 3], 3600, true, Some(DeviceTime::Local(10_000)));
        let times: Vec<_> = m.out.iter().map(|r| r.time).collect();
        assert_eq!(
            times,
            [
                None,
                Some(DeviceTime::Local(2800)),
                Some(DeviceTime::Local(6400)),
                Some(DeviceTime::Local(10_000))
            ]
        );
    }
}
