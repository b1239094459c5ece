//! Validation of one profile file: schema, codec, layout, durations, alert rules and
//! examples. Pure apart from the error messages' file name; collects every problem it can
//! find instead of stopping at the first, so one `profiles check` run lists them all.
//!
//! Alert rules are compiled here with the rules engine's own compiler
//! ([`crate::rules::engine::Builder`]), against the fields the codec produces, so a rule
//! that loads is a rule the pipeline can run; an error in an expression or a summary
//! points at its line and column inside the profile file.

use std::collections::BTreeSet;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use nbiot_codecs::registry::{self, CodecConfigError, CodecOptions};
use nbiot_codecs::{Codec, DecodeError, Name, Reading, Value};
use toml::Spanned;

use super::schema::{AlertKind, AlertSpec, ExampleSpec, ExpectedReading, ProfileFile};
use super::{After, Alert, Profile, ProfileError};
use crate::rules::engine::{Builder, CompileError, RulePart, RuleSource};
use crate::rules::expr::ExprErrorKind;

/// Collects errors for one file, turning byte spans into line:column.
struct Diag<'a> {
    file: String,
    text: &'a str,
    errors: Vec<ProfileError>,
}

impl Diag<'_> {
    fn at(&mut self, span: Option<Range<usize>>, message: impl Into<String>) {
        let (line, column) = match span {
            Some(span) => {
                let (l, c) = line_col(self.text, span.start);
                (Some(l), Some(c))
            }
            None => (None, None),
        };
        self.errors.push(ProfileError {
            file: self.file.clone(),
            line,
            column,
            message: message.into(),
        });
    }
}

/// 1-based line and column (in characters) of a byte offset.
pub(crate) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some('a'..='z' | '_'))
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

fn is_profile_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some('a'..='z' | '0'..='9'))
        && s.len() <= 64
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

/// `+08:00`, `-05:30`, `Z` → seconds east of UTC.
fn parse_utc_offset(s: &str) -> Option<i64> {
    if s == "Z" || s == "UTC" {
        return Some(0);
    }
    let (sign, rest) = match s.as_bytes().first()? {
        b'+' => (1, &s[1..]),
        b'-' => (-1, &s[1..]),
        _ => return None,
    };
    let (h, m) = rest.split_once(':')?;
    let (h, m): (i64, i64) = (h.parse().ok()?, m.parse().ok()?);
    ((0..=14).contains(&h) && (0..60).contains(&m)).then_some(sign * (h * 3600 + m * 60))
}

fn parse_duration(d: &mut Diag<'_>, v: &Spanned<String>, what: &str) -> Option<Duration> {
    match humantime::parse_duration(v.get_ref()) {
        Ok(dur) if !dur.is_zero() => Some(dur),
        Ok(_) => {
            d.at(Some(v.span()), format!("{what} must be longer than zero"));
            None
        }
        Err(e) => {
            d.at(
                Some(v.span()),
                format!(
                    "{what} `{}` is not a duration ({e}); write e.g. \"30s\", \"15m\", \"1h\"",
                    v.get_ref()
                ),
            );
            None
        }
    }
}

pub(crate) fn parse_and_validate(path: &Path, text: String) -> Result<Profile, Vec<ProfileError>> {
    let mut d = Diag {
        file: path.display().to_string(),
        text: &text,
        errors: Vec::new(),
    };
    let file: ProfileFile = match toml::from_str(&text) {
        Ok(f) => f,
        Err(e) => {
            d.at(e.span(), e.message().trim().to_owned());
            return Err(d.errors);
        }
    };

    let name = file.name.get_ref().clone();
    if !is_profile_name(&name) {
        d.at(
            Some(file.name.span()),
            format!("profile name `{name}` must be 1-64 characters of a-z, 0-9, `_` and `-`"),
        );
    }
    let measurement = file.measurement.get_ref().clone();
    if !is_identifier(&measurement) {
        d.at(
            Some(file.measurement.span()),
            format!("measurement `{measurement}` must be snake_case (a-z, 0-9, `_`, not starting with a digit)"),
        );
    }

    let decoder = build_decoder(&mut d, &file);

    let report_interval = file
        .report_interval
        .as_ref()
        .and_then(|v| parse_duration(&mut d, v, "report_interval"));
    let utc_offset_s = match &file.utc_offset {
        None => 0,
        Some(v) => parse_utc_offset(v.get_ref()).unwrap_or_else(|| {
            d.at(
                Some(v.span()),
                format!(
                    "utc_offset `{}` must look like \"+08:00\", \"-05:30\" or \"Z\"",
                    v.get_ref()
                ),
            );
            0
        }),
    };

    let mut fields = std::collections::BTreeMap::new();
    for (field, meta) in &file.fields {
        if !is_identifier(field) {
            d.at(
                Some(meta.span()),
                format!("field name `{field}` must be snake_case with its unit as suffix (e.g. `temperature_c`)"),
            );
        }
        fields.insert(field.clone(), meta.get_ref().clone());
    }

    let Some(decoder) = decoder else {
        return Err(d.errors);
    };

    let mut profile = Profile {
        name,
        description: file.description.clone(),
        measurement: measurement.clone(),
        codec: decoder.id().to_owned(),
        encoding: file
            .encoding
            .as_ref()
            .map(|e| *e.get_ref())
            .unwrap_or_default(),
        report_interval,
        utc_offset_s,
        fields,
        alerts: Vec::new(),
        examples: file.examples.len(),
        source: path.to_path_buf(),
        text: String::new(),
        measurement_name: Name::from(measurement),
        decoder,
    };

    // Examples first: what they produce also tells which fields exist.
    let mut produced: BTreeSet<String> = BTreeSet::new();
    for (i, ex) in file.examples.iter().enumerate() {
        check_example(&mut d, &profile, i + 1, ex, &mut produced);
    }

    let declared: BTreeSet<String> = profile
        .decoder
        .field_names()
        .into_iter()
        .map(str::to_owned)
        .collect();
    if !declared.is_empty() {
        for (field, meta) in &file.fields {
            if !declared.contains(field) {
                d.at(
                    Some(meta.span()),
                    format!(
                        "[fields.{field}] describes a field codec `{}` never produces",
                        profile.codec
                    ),
                );
            }
        }
    }

    let mut known = profile.known_fields();
    known.extend(produced);
    let mut names = BTreeSet::new();
    let mut rules = Builder::new(&profile.name, profile.utc_offset_s, Some(&known));
    for spec in &file.alerts {
        if let Some(alert) = check_alert(&mut d, &profile, spec, &mut rules) {
            if !names.insert(alert.name.clone()) {
                d.at(
                    Some(spec.get_ref().name.span()),
                    format!("alert `{}` is defined twice", alert.name),
                );
            }
            profile.alerts.push(alert);
        }
    }

    if d.errors.is_empty() {
        profile.text = text;
        Ok(profile)
    } else {
        Err(d.errors)
    }
}

fn build_decoder(d: &mut Diag<'_>, file: &ProfileFile) -> Option<Arc<dyn Codec>> {
    let codec_id = file.codec.as_ref().map(|c| c.get_ref().as_str());
    match (&file.layout, codec_id) {
        (Some(layout), None | Some("layout")) => {
            if let Some(opts) = &file.codec_options {
                d.at(
                    Some(opts.span()),
                    "codec_options apply to built-in codecs; a [layout] takes its settings inline",
                );
            }
            match nbiot_codecs::layout::compile(layout) {
                Ok(codec) => Some(Arc::new(codec)),
                Err(e) => {
                    d.at(e.span.clone(), format!("layout: {}", e.message));
                    None
                }
            }
        }
        (Some(_), Some(_)) => {
            let span = file.codec.as_ref().map(Spanned::span);
            d.at(
                span,
                "a profile has either `codec = \"<built-in id>\"` or a [layout] table, not both",
            );
            None
        }
        (None, Some(id)) => {
            let empty = CodecOptions::new();
            let options = file.codec_options.as_ref().map_or(&empty, |o| o.get_ref());
            match registry::build(id, options) {
                Ok(codec) => Some(codec),
                Err(e @ CodecConfigError::UnknownCodec { .. }) => {
                    d.at(file.codec.as_ref().map(Spanned::span), e.to_string());
                    None
                }
                Err(e) => {
                    d.at(
                        file.codec_options.as_ref().map(Spanned::span),
                        e.to_string(),
                    );
                    None
                }
            }
        }
        (None, None) => {
            d.at(
                Some(file.name.span()),
                format!(
                    "no decoder: add `codec = \"<id>\"` (built-in: {}) or a [layout] table",
                    registry::builtin_ids().join(", ")
                ),
            );
            None
        }
    }
}

fn check_alert(
    d: &mut Diag<'_>,
    profile: &Profile,
    spec: &Spanned<AlertSpec>,
    rules: &mut Builder<'_>,
) -> Option<Alert> {
    let line = line_col(d.text, spec.span().start).0;
    let a = spec.get_ref();
    let name = a.name.get_ref().clone();
    let before = d.errors.len();
    if !is_identifier(&name) {
        d.at(
            Some(a.name.span()),
            format!("alert name `{name}` must be snake_case"),
        );
    }
    let for_ = a.for_.as_ref().and_then(|v| parse_duration(d, v, "for"));
    let mut after = None;
    match a.kind {
        AlertKind::Expr => {
            if a.expr.is_none() {
                d.at(
                    Some(a.name.span()),
                    format!("alert `{name}` needs an `expr` (or `kind = \"inactive\"`)"),
                );
            }
            if let Some(v) = &a.after {
                d.at(Some(v.span()), "`after` belongs to `kind = \"inactive\"` rules; use `for` to delay a condition");
            }
        }
        AlertKind::Inactive => {
            if let Some(v) = &a.expr {
                d.at(
                    Some(v.span()),
                    "an inactive rule fires on silence and takes no `expr`",
                );
            }
            match &a.after {
                None => d.at(Some(a.name.span()), format!("inactive alert `{name}` needs `after` (\"3x\" report intervals, or a duration)")),
                Some(v) => {
                    let s = v.get_ref().trim();
                    if let Some(n) = s.strip_suffix('x') {
                        match n.parse::<f64>() {
                            Ok(n) if n > 0.0 && n.is_finite() => {
                                if profile.report_interval.is_none() {
                                    d.at(Some(v.span()), format!("`after = \"{s}\"` counts report intervals, but the profile has no `report_interval`"));
                                }
                                after = Some(After::Intervals(n));
                            }
                            _ => d.at(Some(v.span()), format!("`after = \"{s}\"`: the multiple must be a positive number, e.g. \"3x\"")),
                        }
                    } else {
                        after = parse_duration(d, v, "after").map(After::Duration);
                    }
                }
            }
        }
    }
    if d.errors.len() == before {
        let after_duration = match after {
            Some(After::Duration(dur)) => Some(dur),
            Some(After::Intervals(n)) => profile
                .report_interval
                .and_then(|r| Duration::try_from_secs_f64(r.as_secs_f64() * n).ok()),
            None => None,
        };
        let source = RuleSource {
            name: &name,
            kind: a.kind,
            expr: a.expr.as_ref().map(|e| e.get_ref().as_str()),
            clear: a.clear.as_ref().map(|e| e.get_ref().as_str()),
            for_,
            after: after_duration,
            severity: a.severity,
            summary: &a.summary,
        };
        if let Err(e) = rules.add(&source) {
            rule_error(d, profile, spec, &e);
        }
    }
    (d.errors.len() == before).then(|| Alert {
        name,
        kind: a.kind,
        expr: a.expr.as_ref().map(|e| e.get_ref().clone()),
        for_,
        clear: a.clear.as_ref().map(|e| e.get_ref().clone()),
        after,
        severity: a.severity,
        summary: a.summary.clone(),
        line,
    })
}

/// Reports a rule that does not compile at the file position of the problem: inside the
/// `expr`/`clear` string, or inside the `summary` string (found in the rule's table).
fn rule_error(d: &mut Diag<'_>, profile: &Profile, spec: &Spanned<AlertSpec>, e: &CompileError) {
    let a = spec.get_ref();
    let value_span = match e.part {
        RulePart::Expr => a.expr.as_ref().map(Spanned::span),
        RulePart::Clear => a.clear.as_ref().map(Spanned::span),
        RulePart::Summary => key_value_span(d.text, spec.span(), "summary"),
    };
    let at = value_span
        .map(|span| value_position(d.text, span, e.error.offset))
        .unwrap_or(spec.span().start);
    let message = match &e.error.kind {
        ExprErrorKind::UnknownField { name, suggestion } => format!(
            "alert `{}` references field `{name}`, which codec `{}` never produces{}",
            e.rule,
            profile.codec,
            suggestion
                .as_ref()
                .map(|s| format!(" (did you mean `{s}`?)"))
                .unwrap_or_default()
        ),
        kind => format!("alert `{}`, {}: {kind}", e.rule, e.part),
    };
    d.at(Some(at..at), message);
}

/// The span of the string value of `key = "…"` in the table whose header starts `table`
/// (serde gives no span for plain `String` values, and an array-of-tables element's span
/// is its header): the table runs to the next header line.
fn key_value_span(text: &str, table: Range<usize>, key: &str) -> Option<Range<usize>> {
    let body = text.get(table.start..)?;
    let mut offset = table.start;
    for (i, line) in body.split_inclusive('\n').enumerate() {
        if i > 0 && line.trim_start().starts_with('[') {
            return None;
        }
        let value = line
            .trim_start()
            .strip_prefix(key)
            .map(str::trim_start)
            .and_then(|rest| rest.strip_prefix('='))
            .map(str::trim_start);
        if let Some(value) = value {
            let start = offset + (line.len() - value.len());
            return Some(start..offset + line.trim_end().len());
        }
        offset += line.len();
    }
    None
}

/// Where byte `value_offset` of a TOML string's decoded value is in the file: after the
/// opening quote(s), counting each escape sequence as the character it stands for.
fn value_position(text: &str, span: Range<usize>, value_offset: usize) -> usize {
    let Some(raw) = text.get(span.clone()) else {
        return span.start;
    };
    let (open, basic) = if raw.starts_with("\"\"\"") {
        (3, true)
    } else if raw.starts_with("'''") {
        (3, false)
    } else if raw.starts_with('"') {
        (1, true)
    } else if raw.starts_with('\'') {
        (1, false)
    } else {
        return span.start;
    };
    let mut i = open;
    if open == 3 {
        // A newline right after the opening delimiter is not part of the value.
        if raw.get(i..).is_some_and(|r| r.starts_with("\r\n")) {
            i += 2;
        } else if raw.get(i..).is_some_and(|r| r.starts_with('\n')) {
            i += 1;
        }
    }
    let mut decoded = 0;
    while decoded < value_offset {
        let Some(rest) = raw.get(i..) else { break };
        let Some(c) = rest.chars().next() else { break };
        if basic && c == '\\' {
            let (raw_len, value_len) = match rest.as_bytes().get(1) {
                Some(b'u') => (6, escaped_len(rest.get(2..6))),
                Some(b'U') => (10, escaped_len(rest.get(2..10))),
                _ => (2, 1),
            };
            i += raw_len;
            decoded += value_len;
        } else {
            i += c.len_utf8();
            decoded += c.len_utf8();
        }
    }
    span.start + i.min(raw.len())
}

/// UTF-8 length of the character a `\uXXXX` / `\UXXXXXXXX` escape stands for.
fn escaped_len(hex: Option<&str>) -> usize {
    hex.and_then(|h| u32::from_str_radix(h, 16).ok())
        .and_then(char::from_u32)
        .map_or(1, char::len_utf8)
}

fn check_example(
    d: &mut Diag<'_>,
    profile: &Profile,
    n: usize,
    spec: &Spanned<ExampleSpec>,
    produced: &mut BTreeSet<String>,
) {
    let ex = spec.get_ref();
    let bytes = match nbiot_codecs::hex::decode(ex.hex.get_ref().as_bytes()) {
        Ok(b) => b,
        Err(e) => {
            d.at(Some(ex.hex.span()), format!("example {n}: hex: {e}"));
            return;
        }
    };
    let result = profile.decode_bytes(&bytes);
    if let Some(code) = &ex.error {
        if !DecodeError::CODES.contains(&code.get_ref().as_str()) {
            d.at(
                Some(code.span()),
                format!(
                    "example {n}: unknown error code `{}` (one of: {})",
                    code.get_ref(),
                    DecodeError::CODES.join(", ")
                ),
            );
            return;
        }
        match result {
            Err(e) if e.code() == code.get_ref() => {}
            Err(e) => d.at(
                Some(spec.span()),
                format!(
                    "example {n}: must fail with `{}` but failed with `{}`: {e}",
                    code.get_ref(),
                    e.code()
                ),
            ),
            Ok(r) => d.at(
                Some(spec.span()),
                format!(
                    "example {n}: must fail with `{}` but decoded to {} reading(s)",
                    code.get_ref(),
                    r.len()
                ),
            ),
        }
        return;
    }
    let readings = match result {
        Ok(r) => r,
        Err(e) => {
            d.at(
                Some(spec.span()),
                format!("example {n}: does not decode: {e}"),
            );
            return;
        }
    };
    produced.extend(
        readings
            .iter()
            .flat_map(|r| r.fields.iter().map(|(k, _)| k.to_string())),
    );
    if ex.fields.is_some() || !ex.absent.is_empty() || ex.identity.is_some() {
        let want = ExpectedReading {
            time: None,
            fields: ex.fields.clone().unwrap_or_default(),
            absent: ex.absent.clone(),
            identity: ex.identity.clone(),
        };
        match readings.first() {
            Some(r) => compare_reading(d, spec, n, 0, r, &want),
            None => d.at(
                Some(spec.span()),
                format!("example {n}: decoded to no reading"),
            ),
        }
    }
    if let Some(expected) = &ex.readings {
        if expected.len() != readings.len() {
            d.at(
                Some(spec.span()),
                format!(
                    "example {n}: expected {} reading(s), decoded {}",
                    expected.len(),
                    readings.len()
                ),
            );
        }
        for (i, (want, got)) in expected.iter().zip(&readings).enumerate() {
            compare_reading(d, spec, n, i, got, want);
        }
    }
}

fn compare_reading(
    d: &mut Diag<'_>,
    spec: &Spanned<ExampleSpec>,
    n: usize,
    i: usize,
    got: &Reading,
    want: &ExpectedReading,
) {
    if let Some(t) = &want.time {
        let got_t = got
            .time
            .map(|t| {
                serde_json::to_value(t)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
            })
            .unwrap_or_default();
        if got_t.as_deref() != Some(t.as_str()) {
            d.at(
                Some(spec.span()),
                format!(
                    "example {n}, reading {i}: time is {}, expected {t}",
                    got_t.as_deref().unwrap_or("absent")
                ),
            );
        }
    }
    compare_fields(d, spec, n, i, got, &want.fields);
    for k in &want.absent {
        if let Some(v) = got.field(k) {
            d.at(
                Some(spec.span()),
                format!(
                    "example {n}, reading {i}: field `{k}` must be absent but is {}",
                    show(v)
                ),
            );
        }
    }
    if let Some(want_id) = &want.identity {
        let got_id = got.identity.as_ref();
        let got_dev = got_id.and_then(|i| i.device_id.as_deref());
        let got_seq = got_id.and_then(|i| i.sequence);
        if want_id.device_id.is_some() && want_id.device_id.as_deref() != got_dev {
            d.at(
                Some(spec.span()),
                format!(
                    "example {n}, reading {i}: identity device_id is {}, expected {}",
                    got_dev.unwrap_or("absent"),
                    want_id.device_id.as_deref().unwrap_or_default()
                ),
            );
        }
        if want_id.sequence.is_some() && want_id.sequence != got_seq {
            d.at(
                Some(spec.span()),
                format!(
                    "example {n}, reading {i}: identity sequence is {}, expected {}",
                    got_seq.map_or("absent".to_owned(), |s| s.to_string()),
                    want_id.sequence.unwrap_or_default()
                ),
            );
        }
    }
}

fn compare_fields(
    d: &mut Diag<'_>,
    spec: &Spanned<ExampleSpec>,
    n: usize,
    i: usize,
    got: &Reading,
    want: &toml::Table,
) {
    for (k, v) in want {
        match got.field(k) {
            None => d.at(
                Some(spec.span()),
                format!(
                    "example {n}, reading {i}: field `{k}` is missing (decoded: {})",
                    field_list(got)
                ),
            ),
            Some(actual) if !value_matches(actual, v) => d.at(
                Some(spec.span()),
                format!(
                    "example {n}, reading {i}: field `{k}` is {}, expected {v}",
                    show(actual)
                ),
            ),
            Some(_) => {}
        }
    }
}

fn field_list(r: &Reading) -> String {
    r.fields
        .iter()
        .map(|(k, _)| k.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

fn show(v: &Value) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

/// Numbers compare within a relative 1e-9 (decimal scaling is exact to that); an integer in
/// the example matches a float field of the same value.
pub(crate) fn value_matches(actual: &Value, want: &toml::Value) -> bool {
    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
    }
    match (actual, want) {
        (Value::Int(a), toml::Value::Integer(b)) => a == b,
        (Value::Int(a), toml::Value::Float(b)) => close(*a as f64, *b),
        (Value::Float(a), toml::Value::Float(b)) => close(*a, *b),
        (Value::Float(a), toml::Value::Integer(b)) => close(*a, *b as f64),
        (Value::Bool(a), toml::Value::Boolean(b)) => a == b,
        (Value::Text(a), toml::Value::String(b)) => a == b,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_inside_toml_strings() {
        // The expr value is `a "é" > b`, written with escapes.
        let text = "expr = \"a \\\"\\u00e9\\\" > b\"\nsummary   = 'x {y}'\n";
        let span = 7..text.find('\n').unwrap();
        let value = "a \"\u{e9}\" > b";
        let pos = value_position(text, span.clone(), value.find('b').unwrap());
        assert_eq!(&text[pos..pos + 1], "b");
        assert_eq!(value_position(text, span, 0), 8);
        let summary = key_value_span(text, 0..1, "summary").unwrap();
        assert_eq!(&text[summary.clone()], "'x {y}'");
        let y = value_position(text, summary, 3);
        assert_eq!(&text[y..y + 1], "y");
        assert_eq!(line_col(text, y), (2, 17));
    }

    #[test]
    fn line_and_column() {
        let text = "a = 1\nbb = 2\n";
        assert_eq!(line_col(text, 0), (1, 1));
        assert_eq!(line_col(text, 6), (2, 1));
        assert_eq!(line_col(text, 11), (2, 6));
    }

    #[test]
    fn utc_offsets() {
        assert_eq!(parse_utc_offset("+08:00"), Some(28_800));
        assert_eq!(parse_utc_offset("-05:30"), Some(-19_800));
        assert_eq!(parse_utc_offset("Z"), Some(0));
        assert_eq!(parse_utc_offset("08:00"), None);
        assert_eq!(parse_utc_offset("+15:00"), None);
    }
}
