//! Alert summaries: `"Manhole {device}: water {distance_m} m below the sensor"`.
//!
//! Placeholders: `{device}`, `{profile}`, `{rule}`, `{value}` (the value that decided the
//! transition: the left side of the deciding comparison, 1/0 for a boolean; for an
//! inactive rule, the seconds the device has been silent), `{$param}` (a parameter of the
//! device), and `{field}` (a field of the reading that caused the transition; not in
//! inactive rules, which have no reading). `{{` and `}}` are literal braces. Every name is
//! checked when the profile loads; a field or param missing at run time renders as `?`.
//! Numbers render with at most three decimals (`26.7`, `1234.568`).

use std::fmt::Write as _;

use super::expr::{Compiler, Env, ExprError, ExprErrorKind, FieldSlot, ParamSlot};
use crate::registry::ParamValue;
use nbiot_codecs::Value;

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Lit(Box<str>),
    Device,
    Profile,
    Rule,
    Value,
    Field(FieldSlot),
    Param(ParamSlot),
}

/// A compiled summary.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Template {
    parts: Box<[Part]>,
}

/// What a summary is rendered with.
pub struct Context<'a> {
    pub device: &'a str,
    pub profile: &'a str,
    pub rule: &'a str,
    pub value: Option<f64>,
    /// The reading and the device's params (fields are all missing for inactive rules).
    pub env: &'a Env<'a>,
}

impl Template {
    /// Compiles `text`; `fields` says whether `{field}` placeholders are allowed (not for
    /// inactive rules).
    pub fn compile(text: &str, c: &mut Compiler<'_>, fields: bool) -> Result<Template, ExprError> {
        let mut parts = Vec::new();
        let mut lit = String::new();
        let mut rest = text;
        while let Some(i) = rest.find(['{', '}']) {
            let (before, from) = rest.split_at(i);
            lit.push_str(before);
            let at = text.len() - from.len();
            if let Some(after) = from.strip_prefix("{{") {
                lit.push('{');
                rest = after;
                continue;
            }
            if let Some(after) = from.strip_prefix("}}") {
                lit.push('}');
                rest = after;
                continue;
            }
            if from.starts_with('}') {
                return Err(error(
                    text,
                    at,
                    "`}` without `{` (write `}}` for a literal brace)",
                ));
            }
            let Some(end) = from.find('}') else {
                return Err(error(
                    text,
                    at,
                    "`{` is not closed (write `{{` for a literal brace)",
                ));
            };
            let name = from.get(1..end).unwrap_or_default().trim();
            if !lit.is_empty() {
                parts.push(Part::Lit(std::mem::take(&mut lit).into()));
            }
            let name_at = at + 1;
            parts.push(match name {
                "device" => Part::Device,
                "profile" => Part::Profile,
                "rule" => Part::Rule,
                "value" => Part::Value,
                p if p.starts_with('$') => {
                    let param = &p[1..];
                    if !is_name(param) {
                        return Err(placeholder(text, name_at, p));
                    }
                    Part::Param(c.param_slot(text, name_at + 1, param)?)
                }
                f if is_name(f) => {
                    if !fields {
                        return Err(error(
                            text,
                            name_at,
                            format!("an inactive rule has no reading: `{{{f}}}` is not available (use {{device}}, {{profile}}, {{rule}}, {{value}} or {{$param}})"),
                        ));
                    }
                    Part::Field(c.field_slot(text, name_at, f)?)
                }
                other => return Err(placeholder(text, name_at, other)),
            });
            rest = from.get(end + 1..).unwrap_or_default();
        }
        lit.push_str(rest);
        if !lit.is_empty() {
            parts.push(Part::Lit(lit.into()));
        }
        Ok(Template {
            parts: parts.into(),
        })
    }

    pub fn render(&self, ctx: &Context<'_>) -> String {
        let mut out = String::with_capacity(64);
        for part in self.parts.iter() {
            match part {
                Part::Lit(s) => out.push_str(s),
                Part::Device => out.push_str(ctx.device),
                Part::Profile => out.push_str(ctx.profile),
                Part::Rule => out.push_str(ctx.rule),
                Part::Value => match ctx.value {
                    Some(v) => push_number(&mut out, v),
                    None => out.push('?'),
                },
                Part::Field(slot) => {
                    let value = ctx
                        .env
                        .slots
                        .get(usize::from(*slot))
                        .and_then(|i| ctx.env.fields.get(usize::from(*i)))
                        .map(|(_, v)| v);
                    match value {
                        Some(Value::Int(i)) => {
                            let _ = write!(out, "{i}");
                        }
                        Some(Value::Float(f)) => push_number(&mut out, *f),
                        Some(Value::Bool(b)) => {
                            let _ = write!(out, "{b}");
                        }
                        Some(Value::Text(t)) => out.push_str(t.as_str()),
                        None => out.push('?'),
                    }
                }
                Part::Param(slot) => {
                    match ctx.env.params.get(usize::from(*slot)).copied().flatten() {
                        Some(ParamValue::Number(n)) => push_number(&mut out, *n),
                        Some(p) => {
                            let _ = write!(out, "{p}");
                        }
                        None => out.push('?'),
                    }
                }
            }
        }
        out
    }
}

fn is_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn error(text: &str, at: usize, message: impl Into<String>) -> ExprError {
    let column = text.get(..at).map_or(at, |s| s.chars().count()) + 1;
    ExprError {
        offset: at,
        column,
        kind: ExprErrorKind::Summary(message.into()),
    }
}

fn placeholder(text: &str, at: usize, name: &str) -> ExprError {
    error(
        text,
        at,
        format!("`{{{name}}}`: placeholders are {{device}}, {{profile}}, {{rule}}, {{value}}, {{$param}} or a field name"),
    )
}

/// A number with at most three decimals, without trailing zeros: 26.7, 1234.568, 12.
fn push_number(out: &mut String, v: f64) {
    let r = (v * 1000.0).round() / 1000.0;
    if r.is_finite() && r == r.trunc() && r.abs() < 1e15 {
        let _ = write!(out, "{}", r as i64);
    } else {
        let _ = write!(out, "{r}");
    }
}

#[cfg(test)]
mod tests {
    use super::super::expr::{Symbols, NONE};
    use super::*;
    use nbiot_codecs::Name;
    use std::collections::BTreeSet;

    #[test]
    fn renders_placeholders() {
        let mut symbols = Symbols::default();
        let known: BTreeSet<String> = ["distance_m", "leak"]
            .into_iter()
            .map(String::from)
            .collect();
        let mut c = Compiler {
            symbols: &mut symbols,
            known: Some(&known),
        };
        let t = Template::compile(
            "{{{device}}} {profile}/{rule}: {distance_m} m of {$depth_m} ({value}); {leak} {$x} {$site}",
            &mut c,
            true,
        )
        .unwrap();
        let fields = [
            (Name::Static("distance_m"), Value::Float(0.1 + 0.2)),
            (Name::Static("leak"), Value::Bool(true)),
        ];
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
        let depth = ParamValue::Number(2.0);
        let site = ParamValue::Text("north".into());
        let params: Vec<Option<&ParamValue>> = symbols
            .params
            .iter()
            .map(|p| match &**p {
                "depth_m" => Some(&depth),
                "site" => Some(&site),
                _ => None,
            })
            .collect();
        let env = Env {
            fields: &fields,
            slots: &slots,
            params: &params,
            history: &[],
            time_s: 0,
            utc_offset_s: 0,
        };
        let ctx = Context {
            device: "d1",
            profile: "p",
            rule: "r",
            value: Some(1.23456),
            env: &env,
        };
        assert_eq!(t.render(&ctx), "{d1} p/r: 0.3 m of 2 (1.235); true ? north");
    }

    #[test]
    fn refuses_bad_placeholders() {
        let mut symbols = Symbols::default();
        let known: BTreeSet<String> = ["distance_m"].into_iter().map(String::from).collect();
        let mut c = Compiler {
            symbols: &mut symbols,
            known: Some(&known),
        };
        let cases: &[(&str, bool, usize, &str)] = &[
            ("at {distanse_m} m", true, 5, "field `distanse_m` is not produced by this profile's codec (did you mean `distance_m`?)"),
            ("at {distance_m m", true, 4, "`{` is not closed (write `{{` for a literal brace)"),
            ("a } b", true, 3, "`}` without `{` (write `}}` for a literal brace)"),
            ("{distance_m}", false, 2, "an inactive rule has no reading: `{distance_m}` is not available (use {device}, {profile}, {rule}, {value} or {$param})"),
            ("{a b}", true, 2, "`{a b}`: placeholders are {device}, {profile}, {rule}, {value}, {$param} or a field name"),
        ];
        for (text, fields, column, message) in cases {
            let e = Template::compile(text, &mut c, *fields).unwrap_err();
            assert_eq!(
                (e.column, e.kind.to_string()),
                (*column, (*message).to_owned()),
                "{text}"
            );
        }
    }
}
