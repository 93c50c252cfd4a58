//! bpftool's streaming JSON writer (`json_writer.c`), ported so the output matches it byte for
//! byte: its pretty mode breaks lines only at names and closing brackets (array elements stay
//! on one line), and its string escaping has two quirks kept here on purpose (`\` comes out
//! as `\n`, `'` as `\'`).
//!
//! The writer holds only the nesting state; every call appends to the caller's buffer, so
//! bpftool's two writers (the global `-j` one and the pretty one for typed plain dumps) can
//! share one stdout buffer as they share stdout there.

use std::fmt::Write as _;

#[derive(Debug, Clone)]
pub struct JsonWriter {
    depth: usize,
    pretty: bool,
    /// `,` once the current object or array has a member, else none.
    sep: bool,
}

impl JsonWriter {
    pub fn new(pretty: bool) -> Self {
        Self { depth: 0, pretty, sep: false }
    }

    /// End of output (`jsonw_destroy`): bpftool always ends JSON with a newline.
    pub fn finish(&self, out: &mut String) {
        out.push('\n');
    }

    fn eol(&self, out: &mut String) {
        if self.pretty {
            out.push('\n');
            for _ in 0..self.depth {
                out.push_str("    ");
            }
        }
    }

    /// Comma before every member but the first.
    fn eor(&mut self, out: &mut String) {
        if self.sep {
            out.push(',');
        }
        self.sep = true;
    }

    fn begin(&mut self, out: &mut String, c: char) {
        self.eor(out);
        out.push(c);
        self.depth += 1;
        self.sep = false;
    }

    fn end(&mut self, out: &mut String, c: char) {
        self.depth = self.depth.saturating_sub(1);
        if self.sep {
            self.eol(out);
        }
        out.push(c);
        self.sep = true;
    }

    pub fn start_object(&mut self, out: &mut String) {
        self.begin(out, '{');
    }
    pub fn end_object(&mut self, out: &mut String) {
        self.end(out, '}');
    }
    pub fn start_array(&mut self, out: &mut String) {
        self.begin(out, '[');
    }
    pub fn end_array(&mut self, out: &mut String) {
        self.end(out, ']');
    }

    pub fn name(&mut self, out: &mut String, name: &str) {
        self.eor(out);
        self.eol(out);
        self.sep = false;
        puts(out, name);
        out.push(':');
        if self.pretty {
            out.push(' ');
        }
    }

    /// A raw value (`jsonw_printf`): the caller formats it.
    pub fn raw(&mut self, out: &mut String, value: impl std::fmt::Display) {
        self.eor(out);
        let _ = write!(out, "{value}");
    }

    /// A quoted value with no escaping at all (`jsonw_vprintf_enquote`, used for errors).
    pub fn enquote(&mut self, out: &mut String, value: &str) {
        self.eor(out);
        out.push('"');
        out.push_str(value);
        out.push('"');
    }

    pub fn string(&mut self, out: &mut String, value: &str) {
        self.eor(out);
        puts(out, value);
    }

    pub fn bool(&mut self, out: &mut String, value: bool) {
        self.raw(out, if value { "true" } else { "false" });
    }

    pub fn null(&mut self, out: &mut String) {
        self.raw(out, "null");
    }

    pub fn string_field(&mut self, out: &mut String, name: &str, value: &str) {
        self.name(out, name);
        self.string(out, value);
    }

    pub fn uint_field(&mut self, out: &mut String, name: &str, value: u64) {
        self.name(out, name);
        self.raw(out, value);
    }

    pub fn int_field(&mut self, out: &mut String, name: &str, value: i64) {
        self.name(out, name);
        self.raw(out, value);
    }
}

/// `jsonw_puts`: C escapes only, byte by byte; stops at a NUL as the C string would.
fn puts(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars().take_while(|c| *c != '\0') {
        match c {
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\u{c}' => out.push_str("\\f"),
            '\u{8}' => out.push_str("\\b"),
            // bpftool's own bug, kept for byte compatibility.
            '\\' => out.push_str("\\n"),
            '"' => out.push_str("\\\""),
            '\'' => out.push_str("\\'"),
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pretty_layout_matches_bpftool() {
        // The shape of `bpftool -p map dump` for one hash entry.
        let mut out = String::new();
        let mut w = JsonWriter::new(true);
        w.start_array(&mut out);
        w.start_object(&mut out);
        w.name(&mut out, "key");
        w.start_array(&mut out);
        w.raw(&mut out, "\"0x05\"");
        w.raw(&mut out, "\"0x00\"");
        w.end_array(&mut out);
        w.name(&mut out, "formatted");
        w.start_object(&mut out);
        w.int_field(&mut out, "key", 5);
        w.end_object(&mut out);
        w.end_object(&mut out);
        w.end_array(&mut out);
        w.finish(&mut out);
        assert_eq!(
            out,
            "[{\n        \"key\": [\"0x05\",\"0x00\"\n        ],\n        \"formatted\": {\n            \"key\": 5\n        }\n    }\n]\n"
        );
    }

    #[test]
    fn compact_and_empty() {
        let mut out = String::new();
        let mut w = JsonWriter::new(false);
        w.start_array(&mut out);
        w.end_array(&mut out);
        w.finish(&mut out);
        assert_eq!(out, "[]\n");
        let mut out = String::new();
        let mut w = JsonWriter::new(false);
        w.start_object(&mut out);
        w.string_field(&mut out, "a", "x\\y'z\"");
        w.uint_field(&mut out, "b", 7);
        w.end_object(&mut out);
        assert_eq!(out, r#"{"a":"x\ny\'z\"","b":7}"#);
    }
}
