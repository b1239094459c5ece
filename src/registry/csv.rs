//! Device import from CSV (`POST /api/v1/devices/import`, `nbiot-gateway devices import`).
//!
//! ```text
//! device,profile,label:district,param:depth_m,token
//! 490154203237518,manhole_cover,north,2.5,s3cret-token
//! ```
//!
//! - The header names the columns: `device` and `profile` (required), `token` (optional),
//!   `label:<key>` and `param:<key>` (any number up to the registry limits). Any other
//!   column is an error, so a typo never silently drops data.
//! - RFC 4180 quoting (`"a,b"`, `""` for a quote, line breaks inside quotes); `,` separated;
//!   LF or CRLF line ends; a UTF-8 BOM and blank lines are ignored; cells are trimmed.
//! - An empty cell means "not set": no such label or param, and for `token` "keep the
//!   device's current token". Param cells follow
//!   [`parse_param_text`](super::validate::parse_param_text).
//! - Each row is a whole device: an existing device is replaced (its creation time and,
//!   without a `token` cell, its token are kept).
//! - Every bad row is reported with its line number (the line its record starts on) and
//!   the reason; see [`Problem`] for the reasons.

use std::collections::HashMap;
use std::fmt;

use serde::{Serialize, Serializer};

use super::validate::{self, is_valid_key, parse_param_text, Field, Problem};
use super::{prepare, DeviceSpec, Prepared, TokenUpdate};
use crate::profiles::ProfileSet;

/// What to do when some rows are bad.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ImportMode {
    /// Import nothing if any row is bad.
    #[default]
    AllOrNothing,
    /// Import the good rows, report the bad ones.
    Partial,
}

/// The outcome of an import.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ImportReport {
    /// Data rows in the file (blank lines not counted).
    pub rows: usize,
    pub imported: usize,
    pub created: usize,
    pub updated: usize,
    /// Rows not imported because they are bad.
    pub rejected: usize,
    /// Every problem found, in line order (a row may have several).
    pub errors: Vec<RowError>,
}

/// One problem in one row (or in the header, line 1).
#[derive(Debug, Clone, PartialEq)]
pub struct RowError {
    pub line: usize,
    pub device: Option<String>,
    pub column: Option<String>,
    pub problem: Problem,
}

impl fmt::Display for RowError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}", self.line)?;
        if let Some(d) = &self.device {
            write!(f, ": device {d}")?;
        }
        match &self.column {
            Some(c) => write!(f, ": column {c} {}", self.problem),
            None => write!(f, ": {}", self.problem),
        }
    }
}

/// `{"line": 3, "device": "…", "column": "param:depth_m", "message": "…"}`
impl Serialize for RowError {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("line", &self.line)?;
        if let Some(d) = &self.device {
            m.serialize_entry("device", d)?;
        }
        if let Some(c) = &self.column {
            m.serialize_entry("column", c)?;
        }
        m.serialize_entry("message", &self.problem.to_string())?;
        m.end()
    }
}

/// A parsed file: the rows ready to write and the report so far.
#[derive(Debug)]
pub(super) struct Plan {
    pub report: ImportReport,
    pub rows: Vec<Prepared>,
    /// False when the header itself is unusable (then there are no rows).
    pub header_ok: bool,
}

#[derive(Debug, Clone, PartialEq)]
enum Column {
    Device,
    Profile,
    Token,
    Label(String),
    Param(String),
}

const EXPECTED_COLUMNS: &str = "device, profile, token, label:<key> or param:<key>";

/// Parses and validates the whole file against the profiles in force. Pure: nothing is
/// written.
pub(super) fn plan(text: &str, profiles: &ProfileSet) -> Plan {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut records = Records::new(text);
    let mut report = ImportReport::default();
    let Some(header) = records.next() else {
        report.errors.push(RowError {
            line: 1,
            device: None,
            column: None,
            problem: Problem::Csv {
                reason: "the file is empty; the first line must be a header such as \
                         device,profile,label:district,param:depth_m",
            },
        });
        return Plan {
            report,
            rows: Vec::new(),
            header_ok: false,
        };
    };
    let columns = match parse_header(&header) {
        Ok(c) => c,
        Err(errors) => {
            report.errors = errors;
            return Plan {
                report,
                rows: Vec::new(),
                header_ok: false,
            };
        }
    };
    let mut rows = Vec::new();
    let mut first_line: HashMap<String, usize> = HashMap::new();
    for record in records {
        report.rows += 1;
        let before = report.errors.len();
        if let Some(p) = row(
            &record,
            &columns,
            profiles,
            &mut first_line,
            &mut report.errors,
        ) {
            rows.push(p);
        }
        if report.errors.len() > before {
            report.rejected += 1;
        }
    }
    Plan {
        report,
        rows,
        header_ok: true,
    }
}

fn parse_header(header: &Record) -> Result<Vec<Column>, Vec<RowError>> {
    let mut errors = Vec::new();
    let mut err = |column: &str, problem| {
        errors.push(RowError {
            line: header.line,
            device: None,
            column: Some(column.to_owned()),
            problem,
        })
    };
    if let Some(reason) = header.problem {
        err("header", Problem::Csv { reason });
    }
    // One entry per header cell (None where the cell is bad), so positions match the file.
    let mut columns: Vec<Option<Column>> = Vec::with_capacity(header.fields.len());
    for name in &header.fields {
        let lower = name.to_ascii_lowercase();
        let key = |prefix: &str| {
            name.get(prefix.len()..)
                .filter(|_| lower.starts_with(prefix))
        };
        let column = match lower.as_str() {
            "device" => Ok(Column::Device),
            "profile" => Ok(Column::Profile),
            "token" => Ok(Column::Token),
            _ => match (key("label:"), key("param:")) {
                (Some(k), _) if is_valid_key(k) => Ok(Column::Label(k.to_owned())),
                (_, Some(k)) if is_valid_key(k) => Ok(Column::Param(k.to_owned())),
                (Some(_), _) | (_, Some(_)) => Err(Problem::BadKey),
                (None, None) => Err(Problem::UnknownField {
                    expected: EXPECTED_COLUMNS,
                }),
            },
        };
        match column {
            Err(problem) => {
                err(name, problem);
                columns.push(None);
            }
            Ok(c) => {
                if let Some(first) = columns.iter().position(|x| x.as_ref() == Some(&c)) {
                    err(name, Problem::DuplicateColumn { first: first + 1 });
                }
                columns.push(Some(c));
            }
        }
    }
    let columns: Vec<Column> = columns.into_iter().flatten().collect();
    for (needed, name) in [(Column::Device, "device"), (Column::Profile, "profile")] {
        if !columns.contains(&needed) {
            err(name, Problem::Missing);
        }
    }
    let labels = columns
        .iter()
        .filter(|c| matches!(c, Column::Label(_)))
        .count();
    let params = columns
        .iter()
        .filter(|c| matches!(c, Column::Param(_)))
        .count();
    if labels > validate::MAX_LABELS {
        err(
            "label:*",
            Problem::TooMany {
                max: validate::MAX_LABELS,
            },
        );
    }
    if params > validate::MAX_PARAMS {
        err(
            "param:*",
            Problem::TooMany {
                max: validate::MAX_PARAMS,
            },
        );
    }
    if errors.is_empty() {
        Ok(columns)
    } else {
        Err(errors)
    }
}

/// Validates one data row; pushes its problems onto `errors`.
fn row(
    record: &Record,
    columns: &[Column],
    profiles: &ProfileSet,
    first_line: &mut HashMap<String, usize>,
    errors: &mut Vec<RowError>,
) -> Option<Prepared> {
    let line = record.line;
    let cell = |c: &Column| {
        columns
            .iter()
            .position(|x| x == c)
            .and_then(|i| record.fields.get(i))
            .map(String::as_str)
    };
    let id = cell(&Column::Device).unwrap_or_default().to_owned();
    let device = (!id.is_empty()).then(|| id.clone());
    let mut push = |column: Option<String>, problem| {
        errors.push(RowError {
            line,
            device: device.clone(),
            column,
            problem,
        })
    };
    if let Some(reason) = record.problem {
        push(None, Problem::Csv { reason });
        return None;
    }
    if record.fields.len() != columns.len() {
        push(
            None,
            Problem::ColumnCount {
                expected: columns.len(),
                found: record.fields.len(),
            },
        );
        return None;
    }
    let mut ok = true;
    if !id.is_empty() {
        if let Some(first) = first_line.get(&id) {
            push(
                Some("device".into()),
                Problem::DuplicateId { first_line: *first },
            );
            ok = false;
        } else {
            first_line.insert(id.clone(), line);
        }
    }
    let mut spec = DeviceSpec::default();
    for (column, value) in columns.iter().zip(&record.fields) {
        if value.is_empty() {
            continue;
        }
        match column {
            Column::Device => {}
            Column::Profile => spec.profile = value.clone(),
            Column::Token => spec.token = TokenUpdate::Set(value.clone()),
            Column::Label(k) => {
                spec.labels.insert(k.clone(), value.clone());
            }
            Column::Param(k) => match parse_param_text(value) {
                Ok(v) => {
                    spec.params.insert(k.clone(), v);
                }
                Err(problem) => {
                    push(Some(Field::Param(k.clone()).csv_column()), problem);
                    ok = false;
                }
            },
        }
    }
    match prepare(&id, spec, profiles) {
        Ok(p) if ok => Some(p),
        Ok(_) => None,
        Err(field_errors) => {
            for e in field_errors {
                push(Some(e.field.csv_column()), e.problem);
            }
            None
        }
    }
}

/// One CSV record: its fields (trimmed) and the line it starts on.
#[derive(Debug, Clone, PartialEq)]
struct Record {
    line: usize,
    fields: Vec<String>,
    /// Bad quoting found in the record (it is still split as well as possible).
    problem: Option<&'static str>,
}

/// RFC 4180 records of `text`, skipping blank lines.
struct Records<'a> {
    text: &'a str,
    pos: usize,
    line: usize,
}

enum End {
    Comma,
    Newline,
    Eof,
}

impl<'a> Records<'a> {
    fn new(text: &'a str) -> Self {
        Records {
            text,
            pos: 0,
            line: 1,
        }
    }

    /// The text from `pos` up to the next `,`, line end or end of input, and that end.
    /// Only ASCII delimiters are searched for, so every slice is on a char boundary.
    fn unquoted(&mut self) -> (&'a str, End) {
        let rest = self.text.get(self.pos..).unwrap_or_default();
        let stop = rest
            .bytes()
            .position(|b| matches!(b, b',' | b'\n' | b'\r'))
            .unwrap_or(rest.len());
        let value = rest.get(..stop).unwrap_or_default();
        self.pos += stop;
        (value, self.delimiter())
    }

    /// Consumes the delimiter at `pos`.
    fn delimiter(&mut self) -> End {
        let rest = self.text.as_bytes().get(self.pos..).unwrap_or_default();
        match rest {
            [b',', ..] => {
                self.pos += 1;
                End::Comma
            }
            [b'\r', b'\n', ..] => {
                self.pos += 2;
                self.line += 1;
                End::Newline
            }
            [b'\n' | b'\r', ..] => {
                self.pos += 1;
                self.line += 1;
                End::Newline
            }
            _ => End::Eof,
        }
    }

    /// A quoted field; `pos` is just after the opening quote.
    fn quoted(&mut self, problem: &mut Option<&'static str>) -> (String, End) {
        let mut out = String::new();
        loop {
            let rest = self.text.get(self.pos..).unwrap_or_default();
            let Some(q) = rest.find('"') else {
                out.push_str(rest);
                self.line += rest.matches('\n').count();
                self.pos = self.text.len();
                *problem = Some("a quoted field is not closed before the end of the file");
                return (out, End::Eof);
            };
            let part = rest.get(..q).unwrap_or_default();
            out.push_str(part);
            self.line += part.matches('\n').count();
            self.pos += q + 1;
            if self.text.as_bytes().get(self.pos) == Some(&b'"') {
                out.push('"');
                self.pos += 1;
                continue;
            }
            break;
        }
        let (after, end) = self.unquoted();
        if !after.trim().is_empty() {
            *problem = Some("text after a closing quote (quote the whole cell)");
            out.push_str(after);
        }
        (out, end)
    }
}

impl Iterator for Records<'_> {
    type Item = Record;

    fn next(&mut self) -> Option<Record> {
        while self.pos < self.text.len() {
            let line = self.line;
            let mut fields = Vec::new();
            let mut problem = None;
            loop {
                let leading = self
                    .text
                    .get(self.pos..)
                    .unwrap_or_default()
                    .bytes()
                    .take_while(|b| *b == b' ' || *b == b'\t')
                    .count();
                let (value, end) = if self.text.as_bytes().get(self.pos + leading) == Some(&b'"') {
                    self.pos += leading + 1;
                    self.quoted(&mut problem)
                } else {
                    let (v, e) = self.unquoted();
                    (v.to_owned(), e)
                };
                fields.push(value.trim().to_owned());
                if !matches!(end, End::Comma) {
                    break;
                }
            }
            let blank = fields.len() == 1 && fields.first().is_some_and(String::is_empty);
            if !blank || problem.is_some() {
                return Some(Record {
                    line,
                    fields,
                    problem,
                });
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(text: &str) -> Vec<(usize, Vec<&str>, Option<&'static str>)> {
        // Leak for the test's convenience: small strings, test-only.
        Records::new(text)
            .map(|r| {
                let fields: Vec<&str> = r
                    .fields
                    .into_iter()
                    .map(|f| &*Box::leak(f.into_boxed_str()))
                    .collect();
                (r.line, fields, r.problem)
            })
            .collect()
    }

    #[test]
    fn splits_records_rfc4180() {
        assert_eq!(
            records("a,b\r\n\n 1 , \"x,\"\"y\"\"\"\n\"multi\nline\",2\n3,"),
            vec![
                (1, vec!["a", "b"], None),
                (3, vec!["1", "x,\"y\""], None),
                (4, vec!["multi\nline", "2"], None),
                (6, vec!["3", ""], None),
            ]
        );
    }

    #[test]
    fn reports_bad_quoting() {
        assert_eq!(
            records("a,\"b\"c\nd,e\n\"open"),
            vec![
                (
                    1,
                    vec!["a", "bc"],
                    Some("text after a closing quote (quote the whole cell)")
                ),
                (2, vec!["d", "e"], None),
                (
                    3,
                    vec!["open"],
                    Some("a quoted field is not closed before the end of the file")
                ),
            ]
        );
    }

    #[test]
    fn header_errors_name_the_column() {
        let header = Records::new("device,profil,label:District,param:x,param:x")
            .next()
            .unwrap();
        let errors = parse_header(&header).unwrap_err();
        let got: Vec<(Option<&str>, &Problem)> = errors
            .iter()
            .map(|e| (e.column.as_deref(), &e.problem))
            .collect();
        assert_eq!(
            got,
            vec![
                (
                    Some("profil"),
                    &Problem::UnknownField {
                        expected: EXPECTED_COLUMNS
                    }
                ),
                (Some("label:District"), &Problem::BadKey),
                (Some("param:x"), &Problem::DuplicateColumn { first: 4 }),
                (Some("profile"), &Problem::Missing),
            ]
        );
    }
}
