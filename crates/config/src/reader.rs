//! A small typed reader over toml's spanned document tree that collects every problem with its
//! byte span and key path, instead of stopping at the first one.

use std::ops::Range;
use std::path::Path;
use std::time::Duration;

use toml::Spanned;
use toml::de::{DeArray, DeTable, DeValue};

use crate::duration::{UNITS, parse_duration};
use crate::error::Diagnostic;

/// A byte range in the configuration text.
pub(crate) type Span = Range<usize>;
/// A value of the document with its span.
pub(crate) type Value<'i> = Spanned<DeValue<'i>>;

/// The problems found so far, located by byte span.
#[derive(Default)]
pub(crate) struct Report {
    items: Vec<(Span, String, String)>,
}

impl Report {
    /// Records a problem at `span` for the key `key`.
    pub(crate) fn push(&mut self, span: Span, key: impl Into<String>, message: impl Into<String>) {
        self.items.push((span, key.into(), message.into()));
    }

    /// Whether no problem was recorded.
    pub(crate) fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Turns the problems into diagnostics with line and column, in file order.
    pub(crate) fn into_diagnostics(self, file: &Path, text: &str) -> Vec<Diagnostic> {
        let mut items = self.items;
        // Stable: problems at the same place keep the order in which they were found.
        items.sort_by_key(|(span, _, _)| span.start);
        items.dedup();
        items
            .into_iter()
            .map(|(span, key, message)| {
                let (line, column) = line_column(text, span.start);
                Diagnostic {
                    file: file.to_path_buf(),
                    line,
                    column,
                    key,
                    message,
                }
            })
            .collect()
    }
}

/// 1-based line and column (in characters) of the byte `offset` of `text`.
pub(crate) fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

/// `a.b` or `b` when `a` is empty.
pub(crate) fn child(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

/// The TOML header name of a key path: `module.vip` for `module[0].vip`.
fn table_name(path: &str) -> String {
    let mut name = String::with_capacity(path.len());
    let mut in_index = false;
    for c in path.chars() {
        match c {
            '[' => in_index = true,
            ']' => in_index = false,
            c if !in_index => name.push(c),
            _ => {}
        }
    }
    name
}

/// `"a", "b", "c"`.
pub(crate) fn quoted_list<S: AsRef<str>>(items: &[S]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| format!("{:?}", s.as_ref())).collect();
    quoted.join(", ")
}

/// "a string", "an integer"... for type errors.
fn type_name(value: &DeValue<'_>) -> &'static str {
    match value {
        DeValue::String(_) => "a string",
        DeValue::Integer(_) => "an integer",
        DeValue::Float(_) => "a float",
        DeValue::Boolean(_) => "a boolean",
        DeValue::Datetime(_) => "a date-time",
        DeValue::Array(_) => "an array",
        DeValue::Table(_) => "a table",
    }
}

/// A table of the document, with its key path, whose unknown keys were already reported.
pub(crate) struct Table<'a, 'i> {
    /// Key path of the table (`""` for the root, `module[0]`...).
    pub(crate) path: String,
    /// Span of the table: its header for `[table]` and `[[array]]`, the whole inline table,
    /// or the first key of a dotted-key table.
    pub(crate) span: Span,
    table: &'a DeTable<'i>,
}

impl<'a, 'i> Table<'a, 'i> {
    /// The root table of a document.
    pub(crate) fn root(
        report: &mut Report,
        doc: &'a Spanned<DeTable<'i>>,
        allowed: &[&str],
    ) -> Self {
        let table = Table {
            path: String::new(),
            span: 0..0,
            table: doc.get_ref(),
        };
        table.check_keys(report, allowed);
        table
    }

    /// Reads `value` as a table whose keys must be among `allowed`.
    pub(crate) fn open(
        report: &mut Report,
        path: String,
        value: &'a Value<'i>,
        allowed: &[&str],
    ) -> Option<Self> {
        match value.get_ref() {
            DeValue::Table(table) => {
                let table = Table {
                    path,
                    span: value.span(),
                    table,
                };
                table.check_keys(report, allowed);
                Some(table)
            }
            other => {
                let message = format!("expected a table, found {}", type_name(other));
                report.push(value.span(), path, message);
                None
            }
        }
    }

    /// The optional sub-table `key` of `parent`; when absent (or not a table, which is
    /// reported), an empty table standing at the parent's span, so that defaults apply.
    pub(crate) fn optional(
        report: &mut Report,
        parent: &Table<'a, 'i>,
        key: &str,
        allowed: &[&str],
        empty: &'a DeTable<'i>,
    ) -> Self {
        let path = parent.key(key);
        parent
            .get(key)
            .and_then(|value| Table::open(report, path.clone(), value, allowed))
            .unwrap_or_else(|| Table {
                path,
                span: parent.span.clone(),
                table: empty,
            })
    }

    fn check_keys(&self, report: &mut Report, allowed: &[&str]) {
        for (key, _) in self.table.iter() {
            let name: &str = key.get_ref();
            if !allowed.contains(&name) {
                let message = format!(
                    "unknown key {name:?}; allowed keys: {}",
                    quoted_list(allowed)
                );
                report.push(key.span(), child(&self.path, name), message);
            }
        }
    }

    /// The key path of `key` in this table.
    pub(crate) fn key(&self, key: &str) -> String {
        child(&self.path, key)
    }

    /// The value of `key`, if present.
    pub(crate) fn get(&self, key: &str) -> Option<&'a Value<'i>> {
        self.table.get(key)
    }

    /// The value of `key`, reporting its absence.
    pub(crate) fn require(&self, report: &mut Report, key: &str) -> Option<&'a Value<'i>> {
        let value = self.get(key);
        if value.is_none() {
            let what = if self.path.is_empty() {
                "the configuration".to_owned()
            } else {
                self.path.clone()
            };
            report.push(
                self.span.clone(),
                self.key(key),
                format!("missing required key {key:?} in {what}"),
            );
        }
        value
    }

    /// Optional string.
    pub(crate) fn string(&self, report: &mut Report, key: &str) -> Option<Spanned<&'a str>> {
        self.get(key).and_then(|v| as_str(report, self.key(key), v))
    }

    /// Required string.
    pub(crate) fn required_string(
        &self,
        report: &mut Report,
        key: &str,
    ) -> Option<Spanned<&'a str>> {
        self.require(report, key)
            .and_then(|v| as_str(report, self.key(key), v))
    }

    /// Optional boolean, `default` when absent or invalid.
    pub(crate) fn bool_or(&self, report: &mut Report, key: &str, default: bool) -> bool {
        let Some(value) = self.get(key) else {
            return default;
        };
        match value.get_ref() {
            DeValue::Boolean(b) => *b,
            other => {
                let message = format!(
                    "expected a boolean (true or false), found {}",
                    type_name(other)
                );
                report.push(value.span(), self.key(key), message);
                default
            }
        }
    }

    /// Optional integer of any value; type errors are reported.
    pub(crate) fn integer(&self, report: &mut Report, key: &str) -> Option<Spanned<i128>> {
        let value = self.get(key)?;
        match value.get_ref() {
            DeValue::Integer(int) => match i128::from_str_radix(int.as_str(), int.radix()) {
                Ok(n) => Some(Spanned::new(value.span(), n)),
                Err(_) => {
                    let message = format!("{} is out of range", int.as_str());
                    report.push(value.span(), self.key(key), message);
                    None
                }
            },
            other => {
                let message = format!("expected an integer, found {}", type_name(other));
                report.push(value.span(), self.key(key), message);
                None
            }
        }
    }

    /// Optional integer within `min..=max`, `default` when absent or invalid.
    pub(crate) fn int_or<T: TryFrom<i128>>(
        &self,
        report: &mut Report,
        key: &str,
        (min, max): (i128, i128),
        default: T,
    ) -> Spanned<T> {
        let Some(n) = self.integer(report, key) else {
            return Spanned::new(self.span.clone(), default);
        };
        let span = n.span();
        let n = n.into_inner();
        if (min..=max).contains(&n)
            && let Ok(n) = T::try_from(n)
        {
            return Spanned::new(span, n);
        }
        let message = format!("{n} is out of range; allowed: {min}..={max}");
        report.push(span.clone(), self.key(key), message);
        Spanned::new(span, default)
    }

    /// Optional non-zero duration, `default` when absent or invalid.
    pub(crate) fn duration_or(
        &self,
        report: &mut Report,
        key: &str,
        default: Duration,
    ) -> Spanned<Duration> {
        let Some(value) = self.get(key) else {
            return Spanned::new(self.span.clone(), default);
        };
        let path = self.key(key);
        let span = value.span();
        let units = UNITS
            .iter()
            .map(|(unit, _)| *unit)
            .collect::<Vec<_>>()
            .join(", ");
        match value.get_ref() {
            DeValue::String(text) => match parse_duration(text) {
                Ok(d) if d.is_zero() => {
                    report.push(
                        span.clone(),
                        path,
                        format!("{text:?}: must be greater than zero"),
                    );
                }
                Ok(d) => return Spanned::new(span, d),
                Err(why) => {
                    let message = format!(
                        "invalid duration {text:?}: {why}; expected a number and a unit such as \
                         \"250ms\", \"2s\" or \"1.5h\"; allowed units: {units}"
                    );
                    report.push(span.clone(), path, message);
                }
            },
            DeValue::Integer(int) => {
                let message = format!(
                    "a duration needs a unit: write it as a string such as \"{}s\"; allowed units: {units}",
                    int.as_str()
                );
                report.push(span.clone(), path, message);
            }
            other => {
                let message = format!(
                    "expected a duration string such as \"250ms\" or \"2s\", found {}; allowed units: {units}",
                    type_name(other)
                );
                report.push(span.clone(), path, message);
            }
        }
        Spanned::new(span, default)
    }

    /// Optional array; `None` when absent or not an array.
    pub(crate) fn array(&self, report: &mut Report, key: &str) -> Option<&'a DeArray<'i>> {
        self.get(key)
            .and_then(|value| as_array(report, self.key(key), value))
    }

    /// Optional array of tables (`[[key]]`), each checked against `allowed`.
    pub(crate) fn tables(
        &self,
        report: &mut Report,
        key: &str,
        allowed: &[&str],
    ) -> Vec<Table<'a, 'i>> {
        let Some(value) = self.get(key) else {
            return Vec::new();
        };
        let path = self.key(key);
        let DeValue::Array(array) = value.get_ref() else {
            let message = format!(
                "expected an array of tables (write each entry as [[{}]]), found {}",
                table_name(&path),
                type_name(value.get_ref())
            );
            report.push(value.span(), path, message);
            return Vec::new();
        };
        array
            .iter()
            .enumerate()
            .filter_map(|(i, item)| Table::open(report, format!("{path}[{i}]"), item, allowed))
            .collect()
    }
}

/// Reads `value` as a string.
pub(crate) fn as_str<'a>(
    report: &mut Report,
    path: String,
    value: &'a Value<'_>,
) -> Option<Spanned<&'a str>> {
    match value.get_ref() {
        DeValue::String(s) => Some(Spanned::new(value.span(), s.as_ref())),
        other => {
            report.push(
                value.span(),
                path,
                format!("expected a string, found {}", type_name(other)),
            );
            None
        }
    }
}

/// Reads `value` as an array.
pub(crate) fn as_array<'a, 'i>(
    report: &mut Report,
    path: String,
    value: &'a Value<'i>,
) -> Option<&'a DeArray<'i>> {
    match value.get_ref() {
        DeValue::Array(array) => Some(array),
        other => {
            report.push(
                value.span(),
                path,
                format!("expected an array, found {}", type_name(other)),
            );
            None
        }
    }
}
