//! A batch: the lines of one write request, the row each line came from, and where the
//! cursor goes once the batch is settled (every line delivered or dead-lettered).
//!
//! The lines sit in one buffer, in row order, each ending in `\n`, so any run of
//! consecutive lines is one contiguous slice: splitting a request (413) or bisecting it
//! (400) sends sub-slices of the same buffer, no copying.

use std::ops::Range;

use bytes::Bytes;

/// Which table a line's row is in (the `dead_letters.source` column).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Reading,
    Alert,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Reading => "reading",
            Source::Alert => "alert",
        }
    }
}

/// A line the TSDB refused for good, or a row that cannot be a line: kept in the
/// `dead_letters` table with the reason, never dropped silently.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    pub source: Source,
    pub row_id: i64,
    /// The line as sent (without its newline); for a row that could not be encoded, the
    /// stored fields.
    pub line: String,
    /// The HTTP status; 0 when the forwarder itself could not encode the row.
    pub status: u16,
    pub error: String,
}

/// Where one line ends in the batch text, and its row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LineMeta {
    pub end: usize,
    pub source: Source,
    pub row_id: i64,
}

/// One write request's worth of lines (see the module docs).
#[derive(Debug, Clone, Default)]
pub struct Batch {
    pub text: Bytes,
    pub lines: Vec<LineMeta>,
    /// `text` gzipped, when the forwarder gzips (done on the reader thread).
    pub gz: Option<Bytes>,
    /// Rows in this batch's id range that could not be encoded.
    pub unencodable: Vec<DeadLetter>,
    /// The cursor once the batch is settled: every reading id and alert id up to these.
    pub reading_to: i64,
    pub alert_to: i64,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.lines.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }

    /// Byte offset where line `i` starts (`i == len()` gives the end of the text).
    fn start_of(&self, i: usize) -> usize {
        match i.checked_sub(1) {
            None => 0,
            Some(prev) => self.lines.get(prev).map_or(self.text.len(), |l| l.end),
        }
    }

    /// The text of lines `range`, newlines included (a cheap slice of the batch).
    pub fn body(&self, range: Range<usize>) -> Bytes {
        let (a, b) = (self.start_of(range.start), self.start_of(range.end));
        if a <= b && b <= self.text.len() {
            self.text.slice(a..b)
        } else {
            Bytes::new()
        }
    }

    /// Line `i` without its newline.
    pub fn line(&self, i: usize) -> String {
        let body = self.body(i..i + 1);
        let text = body.strip_suffix(b"\n").unwrap_or(&body);
        String::from_utf8_lossy(text).into_owned()
    }
}

/// Collects lines until the batch is full.
#[derive(Debug, Default)]
pub struct BatchBuilder {
    pub text: String,
    pub lines: Vec<LineMeta>,
    pub unencodable: Vec<DeadLetter>,
    pub reading_to: i64,
    pub alert_to: i64,
}

impl BatchBuilder {
    pub fn new(reading_from: i64, alert_from: i64) -> BatchBuilder {
        BatchBuilder {
            reading_to: reading_from,
            alert_to: alert_from,
            ..BatchBuilder::default()
        }
    }

    /// Rows taken in (lines plus rows that could not be encoded).
    pub fn rows(&self) -> usize {
        self.lines.len() + self.unencodable.len()
    }

    /// Records that the line just appended to `text` belongs to this row.
    pub fn push_line(&mut self, source: Source, row_id: i64) {
        self.lines.push(LineMeta {
            end: self.text.len(),
            source,
            row_id,
        });
    }

    /// Freezes the batch; gzips it when `gzip`.
    pub fn finish(self, gzip: bool) -> Batch {
        let text = Bytes::from(self.text);
        let gz = (gzip && !text.is_empty()).then(|| super::influxdb::gzip(&text));
        Batch {
            text,
            lines: self.lines,
            gz,
            unencodable: self.unencodable,
            reading_to: self.reading_to,
            alert_to: self.alert_to,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_of_lines_are_slices_of_the_text() {
        let mut b = BatchBuilder::new(0, 0);
        for (i, l) in ["a f=1i 1\n", "b f=2i 2\n", "c f=3i 3\n"]
            .iter()
            .enumerate()
        {
            b.text.push_str(l);
            b.push_line(Source::Reading, i as i64 + 10);
        }
        let batch = b.finish(false);
        assert_eq!(&batch.body(0..3)[..], b"a f=1i 1\nb f=2i 2\nc f=3i 3\n");
        assert_eq!(&batch.body(1..2)[..], b"b f=2i 2\n");
        assert_eq!(&batch.body(2..3)[..], b"c f=3i 3\n");
        assert_eq!(&batch.body(3..3)[..], b"");
        assert_eq!(batch.line(0), "a f=1i 1");
        assert_eq!(batch.lines[2].row_id, 12);
        assert!(batch.gz.is_none());
    }
}
