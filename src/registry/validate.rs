//! What a valid device registration is: id, profile, labels, params and token rules, and
//! the errors that name the field at fault. Pure: no I/O.
//!
//! Decisions (documented for operators in the API docs):
//! - **Ids** are 1–64 characters of `A-Z a-z 0-9 . _ : -` (what a device can put in a CoAP
//!   path segment or an MQTT topic level without escaping). An id of exactly 15 digits is
//!   taken to be an IMEI and its Luhn check digit must be right: a mistyped IMEI is the most
//!   common registration error, and it would otherwise only show up as a silent device.
//!   Other 15-digit ids (an IMSI, say) can be registered with a prefix such as `imsi:`.
//! - **Labels** become InfluxDB tags and Alertmanager labels: keys `[a-z_][a-z0-9_]*` (at most
//!   64 characters), at most 32 of them, values 1–256 characters without control characters
//!   (empty tag values are dropped by line protocol, so they are refused here).
//! - **Params** feed alert rules (`$depth_m`): same key rules, at most 32, values are finite
//!   numbers, booleans or 1–256 character strings.
//! - **Tokens** are 8–128 characters of `A-Z a-z 0-9 . _ ~ -` (RFC 3986 unreserved, so they
//!   travel in `?t=` unescaped).

use std::fmt;

use serde::{Serialize, Serializer};

use super::ParamValue;

pub const ID_MAX: usize = 64;
pub const KEY_MAX: usize = 64;
pub const MAX_LABELS: usize = 32;
pub const MAX_PARAMS: usize = 32;
pub const VALUE_MAX: usize = 256;
pub const TOKEN_MIN: usize = 8;
pub const TOKEN_MAX: usize = 128;

/// Which part of a registration an error is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Field {
    Id,
    Profile,
    Labels,
    Label(String),
    Params,
    Param(String),
    Token,
    /// A JSON member or CSV column that is not part of a device.
    Other(String),
}

impl Field {
    /// The name in a JSON body: `labels.district`.
    pub fn json_path(&self) -> String {
        match self {
            Field::Id => "id".into(),
            Field::Profile => "profile".into(),
            Field::Labels => "labels".into(),
            Field::Label(k) => format!("labels.{k}"),
            Field::Params => "params".into(),
            Field::Param(k) => format!("params.{k}"),
            Field::Token => "token".into(),
            Field::Other(name) => name.clone(),
        }
    }

    /// The column in an import CSV: `label:district`.
    pub fn csv_column(&self) -> String {
        match self {
            Field::Id => "device".into(),
            Field::Profile => "profile".into(),
            Field::Labels => "label:*".into(),
            Field::Label(k) => format!("label:{k}"),
            Field::Params => "param:*".into(),
            Field::Param(k) => format!("param:{k}"),
            Field::Token => "token".into(),
            Field::Other(name) => name.clone(),
        }
    }
}

/// What is wrong with a field.
#[derive(Debug, Clone, PartialEq)]
pub enum Problem {
    Missing,
    Empty,
    TooLong { max: usize },
    BadIdChar { found: char },
    ImeiCheckDigit { expected: u8 },
    UnknownProfile { name: String },
    BadKey,
    TooMany { max: usize },
    ControlChar,
    WrongType { expected: &'static str },
    BadNumber { text: String },
    NotFinite,
    BadToken,
    UnknownField { expected: &'static str },
    // Import CSV only.
    DuplicateId { first_line: usize },
    ColumnCount { expected: usize, found: usize },
    DuplicateColumn { first: usize },
    Csv { reason: &'static str },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Missing => write!(f, "is required"),
            Problem::Empty => write!(f, "must not be empty"),
            Problem::TooLong { max } => write!(f, "is longer than {max} characters"),
            Problem::BadIdChar { found } => write!(
                f,
                "contains {found:?}; a device id uses only A-Z a-z 0-9 . _ : -"
            ),
            Problem::ImeiCheckDigit { expected } => write!(
                f,
                "looks like an IMEI (15 digits) but its check digit is wrong \
                 (the first 14 digits give {expected}); check for a typo"
            ),
            Problem::UnknownProfile { name } => write!(f, "unknown profile `{name}`"),
            Problem::BadKey => write!(
                f,
                "is not a valid name: use a lowercase letter or _ then a-z 0-9 _, \
                 at most {KEY_MAX} characters"
            ),
            Problem::TooMany { max } => write!(f, "has more than {max} entries"),
            Problem::ControlChar => write!(f, "contains a control character"),
            Problem::WrongType { expected } => write!(f, "must be {expected}"),
            Problem::BadNumber { text } => write!(
                f,
                "`{text}` starts like a number but is not one (use a plain decimal number \
                 such as 2.5)"
            ),
            Problem::NotFinite => write!(f, "must be a finite number"),
            Problem::BadToken => write!(
                f,
                "must be {TOKEN_MIN}-{TOKEN_MAX} characters of A-Z a-z 0-9 . _ ~ -"
            ),
            Problem::UnknownField { expected } => {
                write!(f, "is not a device field (expected {expected})")
            }
            Problem::DuplicateId { first_line } => {
                write!(f, "duplicate device id (first on line {first_line})")
            }
            Problem::ColumnCount { expected, found } => {
                write!(f, "has {found} columns, the header has {expected}")
            }
            Problem::DuplicateColumn { first } => {
                write!(f, "is a duplicate of column {first}")
            }
            Problem::Csv { reason } => write!(f, "{reason}"),
        }
    }
}

/// One problem with one field.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldError {
    pub field: Field,
    pub problem: Problem,
}

impl FieldError {
    pub fn new(field: Field, problem: Problem) -> FieldError {
        FieldError { field, problem }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field.json_path(), self.problem)
    }
}

/// `{"field": "labels.district", "message": "..."}`
impl Serialize for FieldError {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(2))?;
        m.serialize_entry("field", &self.field.json_path())?;
        m.serialize_entry("message", &self.problem.to_string())?;
        m.end()
    }
}

/// Checks a device id (see the module docs for the rules).
pub fn check_id(id: &str) -> Result<(), Problem> {
    if id.is_empty() {
        return Err(Problem::Empty);
    }
    if let Some(found) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-')))
    {
        return Err(Problem::BadIdChar { found });
    }
    if id.len() > ID_MAX {
        return Err(Problem::TooLong { max: ID_MAX });
    }
    if let [body @ .., check] = id.as_bytes() {
        if body.len() == 14 && id.bytes().all(|b| b.is_ascii_digit()) {
            let expected = luhn_check_digit(body);
            if check - b'0' != expected {
                return Err(Problem::ImeiCheckDigit { expected });
            }
        }
    }
    Ok(())
}

/// The Luhn check digit for `digits` (ASCII digits), as an IMEI's 15th digit.
fn luhn_check_digit(digits: &[u8]) -> u8 {
    // Walking from the right, every first, third, ... digit is doubled (the check digit
    // itself would be at position 0).
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, b)| {
            let d = u32::from(b - b'0');
            if i % 2 == 0 {
                let dd = d * 2;
                dd / 10 + dd % 10
            } else {
                d
            }
        })
        .sum();
    ((10 - sum % 10) % 10) as u8
}

/// A label or param name: `[a-z_][a-z0-9_]*`, at most [`KEY_MAX`] characters.
pub fn is_valid_key(key: &str) -> bool {
    let mut bytes = key.bytes();
    matches!(bytes.next(), Some(b'a'..=b'z' | b'_'))
        && key.len() <= KEY_MAX
        && bytes.all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_'))
}

/// A label value or text param: 1–[`VALUE_MAX`] characters, no control characters.
pub fn check_text(value: &str) -> Result<(), Problem> {
    if value.is_empty() {
        Err(Problem::Empty)
    } else if value.chars().count() > VALUE_MAX {
        Err(Problem::TooLong { max: VALUE_MAX })
    } else if value.chars().any(char::is_control) {
        Err(Problem::ControlChar)
    } else {
        Ok(())
    }
}

pub fn check_param(value: &ParamValue) -> Result<(), Problem> {
    match value {
        ParamValue::Number(n) if !n.is_finite() => Err(Problem::NotFinite),
        ParamValue::Text(t) => check_text(t),
        _ => Ok(()),
    }
}

pub fn check_token(token: &str) -> Result<(), Problem> {
    let ok = (TOKEN_MIN..=TOKEN_MAX).contains(&token.len())
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'~' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Problem::BadToken)
    }
}

/// A parameter value written as text (CSV cell, `--param k=v`): `true`/`false` are
/// booleans; text that starts like a number (digit, sign or `.`) must be a finite number;
/// anything else is a string. So `2.5m` or `1,5` for `depth_m` is an error rather than a
/// string that a rule would later fail to compare.
pub fn parse_param_text(text: &str) -> Result<ParamValue, Problem> {
    match text {
        "true" => return Ok(ParamValue::Bool(true)),
        "false" => return Ok(ParamValue::Bool(false)),
        _ => {}
    }
    let numeric = text
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_digit() || matches!(b, b'+' | b'-' | b'.'));
    if !numeric {
        check_text(text)?;
        return Ok(ParamValue::Text(text.to_owned()));
    }
    match text.parse::<f64>() {
        Ok(n) if n.is_finite() => Ok(ParamValue::Number(n)),
        Ok(_) => Err(Problem::NotFinite),
        Err(_) => Err(Problem::BadNumber {
            text: text.to_owned(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert_eq!(check_id("sensor-01.a:b_c"), Ok(()));
        assert_eq!(check_id(""), Err(Problem::Empty));
        assert_eq!(check_id("a b"), Err(Problem::BadIdChar { found: ' ' }));
        assert_eq!(check_id("a/b"), Err(Problem::BadIdChar { found: '/' }));
        assert_eq!(check_id(&"x".repeat(64)), Ok(()));
        assert_eq!(check_id(&"x".repeat(65)), Err(Problem::TooLong { max: 64 }));
        // IMEIs: 490154203237518 is the well-known example with a valid check digit.
        assert_eq!(check_id("490154203237518"), Ok(()));
        assert_eq!(
            check_id("490154203237519"),
            Err(Problem::ImeiCheckDigit { expected: 8 })
        );
        // 14 or 16 digits are not IMEI-shaped and are not checked.
        assert_eq!(check_id("49015420323751"), Ok(()));
        assert_eq!(check_id("imsi:460001234567890"), Ok(()));
    }

    #[test]
    fn keys_texts_tokens() {
        assert!(is_valid_key("district"));
        assert!(is_valid_key("_x9"));
        assert!(!is_valid_key("District"));
        assert!(!is_valid_key("9x"));
        assert!(!is_valid_key(""));
        assert!(!is_valid_key("a-b"));
        assert!(!is_valid_key(&"a".repeat(65)));
        assert_eq!(check_text("north"), Ok(()));
        assert_eq!(check_text(""), Err(Problem::Empty));
        assert_eq!(check_text("a\tb"), Err(Problem::ControlChar));
        assert_eq!(check_text(&"é".repeat(256)), Ok(()));
        assert_eq!(
            check_text(&"é".repeat(257)),
            Err(Problem::TooLong { max: 256 })
        );
        assert_eq!(check_token("abcd-1234_x.y~z"), Ok(()));
        assert_eq!(check_token("short"), Err(Problem::BadToken));
        assert_eq!(check_token("has space in it"), Err(Problem::BadToken));
    }

    #[test]
    fn param_text() {
        assert_eq!(parse_param_text("2.5"), Ok(ParamValue::Number(2.5)));
        assert_eq!(parse_param_text("-3"), Ok(ParamValue::Number(-3.0)));
        assert_eq!(parse_param_text(".5"), Ok(ParamValue::Number(0.5)));
        assert_eq!(parse_param_text("true"), Ok(ParamValue::Bool(true)));
        assert_eq!(
            parse_param_text("north"),
            Ok(ParamValue::Text("north".into()))
        );
        assert_eq!(
            parse_param_text("2.5m"),
            Err(Problem::BadNumber {
                text: "2.5m".into()
            })
        );
        assert_eq!(
            parse_param_text("1,5"),
            Err(Problem::BadNumber { text: "1,5".into() })
        );
        assert_eq!(parse_param_text("1e999"), Err(Problem::NotFinite));
        assert_eq!(parse_param_text("-inf"), Err(Problem::NotFinite));
    }
}
