//! Streaming split of M3's `<mm:think>…</mm:think>` section into reasoning and visible text.
//!
//! M3 (m3_architecture.md §8): with `thinking_mode=enabled` the chat template pre-fills `<mm:think>`, so
//! the reply *starts* inside the reasoning section; in adaptive mode the model may open `<mm:think>`
//! itself as its first token; earlier non-thinking turns are rendered with a bare `</mm:think>`, so a
//! reply may open with one stray closer, which is dropped.

use super::holdback::split_safe;

pub const THINK_START: &str = "<mm:think>";
pub const THINK_END: &str = "</mm:think>";

/// One piece of text, classified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Section {
    Reasoning(String),
    Content(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Nothing but whitespace seen yet; the first non-space text decides the mode.
    Leading,
    /// Inside `<mm:think>`; `trim_start` while no reasoning text was emitted yet.
    Reasoning { trim_start: bool },
    /// Visible text; `trim_start` right after `</mm:think>`.
    Content { trim_start: bool },
}

/// Splits a stream of generated text into reasoning and content.
#[derive(Debug)]
pub struct ReasoningSplitter {
    enabled: bool,
    state: State,
    buffer: String,
}

impl ReasoningSplitter {
    /// `enabled`: parse reasoning at all (if false, everything is content, except a stray leading
    /// `</mm:think>`). `prefilled`: the prompt already ends with `<mm:think>`, so the reply starts in it.
    pub fn new(enabled: bool, prefilled: bool) -> Self {
        let state = if enabled && prefilled { State::Reasoning { trim_start: true } } else { State::Leading };
        Self { enabled, state, buffer: String::new() }
    }

    /// Feed a delta; returns the sections that are certain now.
    pub fn push(&mut self, delta: &str) -> Vec<Section> {
        self.buffer.push_str(delta);
        let mut out = Vec::new();
        self.drain(false, &mut out);
        out
    }

    /// End of stream: release everything held back.
    pub fn finish(&mut self) -> Vec<Section> {
        let mut out = Vec::new();
        self.drain(true, &mut out);
        out
    }

    fn drain(&mut self, at_end: bool, out: &mut Vec<Section>) {
        loop {
            match self.state {
                State::Leading => {
                    let trimmed = self.buffer.trim_start();
                    if trimmed.is_empty() {
                        if at_end {
                            self.buffer.clear();
                        }
                        return;
                    }
                    if let Some(rest) = trimmed.strip_prefix(THINK_START).filter(|_| self.enabled) {
                        self.buffer = rest.to_string();
                        self.state = State::Reasoning { trim_start: true };
                        continue;
                    }
                    if let Some(rest) = trimmed.strip_prefix(THINK_END) {
                        self.buffer = rest.to_string();
                        self.state = State::Content { trim_start: true };
                        continue;
                    }
                    let undecided =
                        (self.enabled && THINK_START.starts_with(trimmed)) || THINK_END.starts_with(trimmed);
                    if undecided && !at_end {
                        return;
                    }
                    // Ordinary text: keep the leading whitespace as the model wrote it.
                    self.state = State::Content { trim_start: false };
                }
                State::Reasoning { trim_start } => {
                    if trim_start {
                        let t = self.buffer.trim_start().len();
                        self.buffer.drain(..self.buffer.len() - t);
                        if self.buffer.is_empty() {
                            return;
                        }
                        self.state = State::Reasoning { trim_start: false };
                    }
                    if let Some(pos) = self.buffer.find(THINK_END) {
                        let text: String = self.buffer[..pos].to_string();
                        self.buffer.drain(..pos + THINK_END.len());
                        push_section(out, Section::Reasoning(text));
                        self.state = State::Content { trim_start: true };
                        continue;
                    }
                    let (safe, _) =
                        if at_end { (self.buffer.as_str(), "") } else { split_safe(&self.buffer, &[THINK_END]) };
                    let n = safe.len();
                    let text: String = self.buffer.drain(..n).collect();
                    push_section(out, Section::Reasoning(text));
                    return;
                }
                State::Content { trim_start } => {
                    if trim_start {
                        let t = self.buffer.trim_start().len();
                        self.buffer.drain(..self.buffer.len() - t);
                        if self.buffer.is_empty() {
                            return;
                        }
                        self.state = State::Content { trim_start: false };
                    }
                    let text = std::mem::take(&mut self.buffer);
                    push_section(out, Section::Content(text));
                    return;
                }
            }
        }
    }
}

fn push_section(out: &mut Vec<Section>, section: Section) {
    let empty = match &section {
        Section::Reasoning(s) | Section::Content(s) => s.is_empty(),
    };
    if empty {
        return;
    }
    // Merge with the previous piece of the same kind so callers see fewer fragments.
    match (out.last_mut(), section) {
        (Some(Section::Reasoning(a)), Section::Reasoning(b)) => a.push_str(&b),
        (Some(Section::Content(a)), Section::Content(b)) => a.push_str(&b),
        (_, s) => out.push(s),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(enabled: bool, prefilled: bool, pieces: &[&str]) -> (String, String) {
        let mut s = ReasoningSplitter::new(enabled, prefilled);
        let mut sections = Vec::new();
        for p in pieces {
            sections.extend(s.push(p));
        }
        sections.extend(s.finish());
        let (mut r, mut c) = (String::new(), String::new());
        for sec in sections {
            match sec {
                Section::Reasoning(t) => r.push_str(&t),
                Section::Content(t) => c.push_str(&t),
            }
        }
        (r, c)
    }

    fn every_split(enabled: bool, prefilled: bool, text: &str, want: (&str, &str)) {
        for i in 0..=text.len() {
            if !text.is_char_boundary(i) {
                continue;
            }
            let got = collect(enabled, prefilled, &[&text[..i], &text[i..]]);
            assert_eq!((got.0.as_str(), got.1.as_str()), want, "split at {i} of {text:?}");
        }
        let chars: Vec<String> = text.chars().map(|c| c.to_string()).collect();
        let refs: Vec<&str> = chars.iter().map(|s| s.as_str()).collect();
        let got = collect(enabled, prefilled, &refs);
        assert_eq!((got.0.as_str(), got.1.as_str()), want, "char by char {text:?}");
    }

    #[test]
    fn prefilled_reasoning_then_content() {
        every_split(
            true,
            true,
            "\nLet me think é.\n</mm:think>\n\nThe answer is 4.",
            ("Let me think é.\n", "The answer is 4."),
        );
    }

    #[test]
    fn self_opened_reasoning() {
        every_split(true, false, "<mm:think>hmm</mm:think>ok", ("hmm", "ok"));
    }

    #[test]
    fn no_reasoning_in_adaptive_mode() {
        every_split(true, false, "Hello <mm world", ("", "Hello <mm world"));
        every_split(true, false, "<mm:thinking is a tag", ("", "<mm:thinking is a tag"));
    }

    #[test]
    fn stray_closer_dropped() {
        every_split(false, false, "</mm:think>\nHi", ("", "Hi"));
        every_split(true, false, " </mm:think>Hi", ("", "Hi"));
    }

    #[test]
    fn disabled_keeps_think_tags_as_content() {
        every_split(false, false, "<mm:think>x</mm:think>", ("", "<mm:think>x</mm:think>"));
    }

    #[test]
    fn unterminated_reasoning_is_reasoning() {
        every_split(true, true, "still thinking </mm:thi", ("still thinking </mm:thi", ""));
    }
}
