//! Streaming parser for M3's tool-call blocks (m3_architecture.md §8):
//!
//! ```text
//! ]<]minimax[>[<tool_call>
//! ]<]minimax[>[<invoke name="get_weather">
//! ]<]minimax[>[<location>Paris]<]minimax[>[</location>
//! ]<]minimax[>[</invoke>
//! ]<]minimax[>[</tool_call>
//! ```
//!
//! Text outside blocks is content. A call is announced (id + name) as soon as its `<invoke name=…>`
//! tag is complete and its arguments are emitted as one JSON fragment when `</invoke>` arrives,
//! because values can only be coerced once the element is complete.

use serde_json::Value;

use super::holdback::partial_marker_len;
use super::xml_args::{parse_arguments, NS};

/// One event of the tool-call stream.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolEvent {
    Content(String),
    Start { index: usize, name: String },
    Arguments { index: usize, arguments: String },
}

#[derive(Debug, Clone, PartialEq)]
enum State {
    Text,
    InBlock,
    InInvoke { name: String },
}

/// Streaming tool-call extractor; `tools` is the request's OpenAI `tools` array, if any.
#[derive(Debug)]
pub struct ToolCallStream {
    tools: Vec<Value>,
    state: State,
    buffer: String,
    next_index: usize,
}

fn marker(tag: &str) -> String {
    format!("{NS}{tag}")
}

impl ToolCallStream {
    pub fn new(tools: Option<&Value>) -> Self {
        let tools = tools.and_then(Value::as_array).cloned().unwrap_or_default();
        Self { tools, state: State::Text, buffer: String::new(), next_index: 0 }
    }

    /// Number of calls started so far.
    pub fn calls_started(&self) -> usize {
        self.next_index
    }

    fn parameters_schema(&self, name: &str) -> Option<&Value> {
        self.tools.iter().find_map(|t| {
            let f = t.get("function")?;
            (f.get("name")?.as_str()? == name).then(|| f.get("parameters")).flatten()
        })
    }

    pub fn push(&mut self, delta: &str) -> Vec<ToolEvent> {
        self.buffer.push_str(delta);
        let mut out = Vec::new();
        self.drain(false, &mut out);
        out
    }

    pub fn finish(&mut self) -> Vec<ToolEvent> {
        let mut out = Vec::new();
        self.drain(true, &mut out);
        match std::mem::replace(&mut self.state, State::Text) {
            State::Text => {}
            State::InBlock => {}
            // Cut off mid-call (e.g. max_tokens): close the announced call with what arrived.
            State::InInvoke { name } => {
                let body = std::mem::take(&mut self.buffer);
                self.finish_invoke(&name, &body, &mut out);
            }
        }
        self.buffer.clear();
        out
    }

    fn finish_invoke(&self, name: &str, body: &str, out: &mut Vec<ToolEvent>) {
        let index = self.next_index - 1;
        let args = parse_arguments(body, self.parameters_schema(name));
        out.push(ToolEvent::Arguments { index, arguments: args.to_string() });
    }

    fn drain(&mut self, at_end: bool, out: &mut Vec<ToolEvent>) {
        let start = marker("<tool_call>");
        let end = marker("</tool_call>");
        let invoke = marker("<invoke name=\"");
        let invoke_end = marker("</invoke>");
        loop {
            normalize_tag_spacing(&mut self.buffer);
            match self.state.clone() {
                State::Text => {
                    if let Some(pos) = self.buffer.find(&start) {
                        push_content(out, &self.buffer[..pos]);
                        self.buffer.drain(..pos + start.len());
                        self.state = State::InBlock;
                        continue;
                    }
                    let hold = if at_end { 0 } else { holdback(&self.buffer, &[&start]) };
                    let n = self.buffer.len() - hold;
                    let text: String = self.buffer.drain(..n).collect();
                    push_content(out, &text);
                    return;
                }
                State::InBlock => {
                    let lead = self.buffer.len() - self.buffer.trim_start().len();
                    self.buffer.drain(..lead);
                    if self.buffer.starts_with(&end) {
                        self.buffer.drain(..end.len());
                        self.state = State::Text;
                        continue;
                    }
                    if self.buffer.starts_with(&invoke) {
                        let Some(close) = self.buffer[invoke.len()..].find("\">") else { return };
                        let name = self.buffer[invoke.len()..invoke.len() + close].to_string();
                        self.buffer.drain(..invoke.len() + close + 2);
                        out.push(ToolEvent::Start { index: self.next_index, name: name.clone() });
                        self.next_index += 1;
                        self.state = State::InInvoke { name };
                        continue;
                    }
                    let maybe_marker =
                        end.starts_with(self.buffer.as_str()) || invoke.starts_with(self.buffer.as_str());
                    if self.buffer.is_empty() || maybe_marker {
                        return;
                    }
                    // Stray text inside a block is not part of any call: skip to the next tag.
                    match self.buffer[1..].find(NS) {
                        Some(p) => {
                            self.buffer.drain(..p + 1);
                        }
                        None => {
                            let keep = holdback(&self.buffer, &[NS]);
                            let n = self.buffer.len() - keep;
                            self.buffer.drain(..n);
                            return;
                        }
                    }
                }
                State::InInvoke { name } => {
                    let Some(pos) = self.buffer.find(&invoke_end) else { return };
                    let body: String = self.buffer[..pos].to_string();
                    self.buffer.drain(..pos + invoke_end.len());
                    self.finish_invoke(&name, &body, out);
                    self.state = State::InBlock;
                }
            }
        }
    }
}

/// Hold back a partial marker, and also a trailing `NS` + whitespace: spacing before a tag is removed.
fn holdback(text: &str, markers: &[&str]) -> usize {
    let partial = partial_marker_len(text, markers);
    let spaced = match text.rfind(NS) {
        Some(p) if text[p + NS.len()..].chars().all(|c| c.is_ascii_whitespace()) => text.len() - p,
        _ => 0,
    };
    partial.max(spaced)
}

/// `NS` followed by whitespace and then `<` is the same tag as `NS<` (the model sometimes spaces them).
fn normalize_tag_spacing(buf: &mut String) {
    if !buf.contains(NS) {
        return;
    }
    let mut out = String::with_capacity(buf.len());
    let mut rest = buf.as_str();
    while let Some(p) = rest.find(NS) {
        out.push_str(&rest[..p + NS.len()]);
        rest = &rest[p + NS.len()..];
        let trimmed = rest.trim_start_matches([' ', '\t', '\r', '\n']);
        if trimmed.len() != rest.len() && trimmed.starts_with('<') {
            rest = trimmed;
        }
    }
    out.push_str(rest);
    if out.len() != buf.len() {
        *buf = out;
    }
}

fn push_content(out: &mut Vec<ToolEvent>, text: &str) {
    if text.is_empty() {
        return;
    }
    if let Some(ToolEvent::Content(prev)) = out.last_mut() {
        prev.push_str(text);
    } else {
        out.push(ToolEvent::Content(text.to_string()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    pub(crate) fn sample_call() -> String {
        [
            "Let me check.\n",
            &format!("{NS}<tool_call>\n"),
            &format!("{NS}<invoke name=\"get_weather\">\n"),
            &format!("{NS}<location>Paris{NS}</location>\n"),
            &format!("{NS} <days>3{NS}</days>\n"),
            &format!("{NS}</invoke>\n"),
            &format!("{NS}<invoke name=\"noop\">\n{NS}</invoke>\n"),
            &format!("{NS}</tool_call>"),
            " done",
        ]
        .concat()
    }

    fn tools() -> Value {
        json!([{"type": "function", "function": {"name": "get_weather", "parameters": {
            "type": "object", "properties": {"location": {"type": "string"}, "days": {"type": "integer"}}}}}])
    }

    fn run(pieces: &[&str]) -> Vec<ToolEvent> {
        let t = tools();
        let mut p = ToolCallStream::new(Some(&t));
        let mut events = Vec::new();
        for piece in pieces {
            events.extend(p.push(piece));
        }
        events.extend(p.finish());
        // Merge adjacent content so different splits compare equal.
        let mut merged: Vec<ToolEvent> = Vec::new();
        for e in events {
            match (merged.last_mut(), e) {
                (Some(ToolEvent::Content(a)), ToolEvent::Content(b)) => a.push_str(&b),
                (_, e) => merged.push(e),
            }
        }
        merged
    }

    fn expected() -> Vec<ToolEvent> {
        vec![
            ToolEvent::Content("Let me check.\n".into()),
            ToolEvent::Start { index: 0, name: "get_weather".into() },
            ToolEvent::Arguments { index: 0, arguments: json!({"location": "Paris", "days": 3}).to_string() },
            ToolEvent::Start { index: 1, name: "noop".into() },
            ToolEvent::Arguments { index: 1, arguments: "{}".into() },
            ToolEvent::Content(" done".into()),
        ]
    }

    #[test]
    fn whole_text() {
        assert_eq!(run(&[&sample_call()]), expected());
    }

    #[test]
    fn every_split_point_and_char_by_char() {
        let text = sample_call();
        for i in 0..=text.len() {
            if text.is_char_boundary(i) {
                assert_eq!(run(&[&text[..i], &text[i..]]), expected(), "split at {i}");
            }
        }
        let chars: Vec<String> = text.chars().map(String::from).collect();
        let refs: Vec<&str> = chars.iter().map(String::as_str).collect();
        assert_eq!(run(&refs), expected());
    }

    #[test]
    fn text_that_only_looks_like_a_marker() {
        assert_eq!(run(&["a ]<]mini", "max is ", "fine"]), vec![ToolEvent::Content("a ]<]minimax is fine".into())]);
    }

    #[test]
    fn truncated_call_is_closed_at_finish() {
        let text = format!("{NS}<tool_call>{NS}<invoke name=\"get_weather\">{NS}<days>2{NS}</days>");
        assert_eq!(
            run(&[&text]),
            vec![
                ToolEvent::Start { index: 0, name: "get_weather".into() },
                ToolEvent::Arguments { index: 0, arguments: json!({"days": 2}).to_string() },
            ]
        );
    }
}
