//! Output parsing for MiniMax-M3: the worker's generated text -> OpenAI `content`,
//! `reasoning_content` and `tool_calls`, both for whole replies and token by token.
//!
//! Two stages, in this order:
//! 1. [`reasoning::ReasoningSplitter`] separates the `<mm:think>…</mm:think>` section;
//! 2. [`tool_calls::ToolCallStream`] extracts `]<]minimax[>[<tool_call>` blocks from the visible text.
//!
//! The worker must be asked for text with special tokens kept (`skip_special_tokens: false`):
//! `</mm:think>` and the `]<]minimax[>[` namespace token are special tokens of M3's tokenizer, and
//! the parser cannot find tags the detokenizer dropped.
//!
//! ```
//! use m3serve_gateway::parsers::{OutputParser, ParsedDelta};
//! let mut p = OutputParser::new(None, true).with_prefilled_reasoning(true);
//! let mut deltas = p.push("2+2? </mm:th");
//! deltas.extend(p.push("ink>4"));
//! deltas.extend(p.finish());
//! assert_eq!(deltas, vec![ParsedDelta::Reasoning("2+2? ".into()), ParsedDelta::Content("4".into())]);
//! ```

pub mod holdback;
pub mod reasoning;
pub mod tool_calls;
pub mod xml_args;

use serde_json::Value;

use reasoning::{ReasoningSplitter, Section};
use tool_calls::{ToolCallStream, ToolEvent};

/// One streamed piece of a parsed reply, in OpenAI delta terms.
#[derive(Debug, Clone, PartialEq)]
pub enum ParsedDelta {
    /// Visible text (`delta.content`).
    Content(String),
    /// Reasoning text (`delta.reasoning_content`).
    Reasoning(String),
    /// A new tool call: `delta.tool_calls[{index, id, type: "function", function: {name}}]`.
    ToolCallStart { index: usize, id: String, name: String },
    /// Arguments of call `index` (a JSON text fragment; M3 emits each call's arguments whole).
    ToolCallArguments { index: usize, arguments: String },
}

/// A complete tool call, for non-streaming responses.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// JSON object text, as OpenAI's `function.arguments`.
    pub arguments: String,
}

/// A whole parsed reply, for non-streaming responses.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct ParsedMessage {
    pub content: String,
    pub reasoning_content: Option<String>,
    pub tool_calls: Vec<ToolCall>,
}

/// Incremental parser of one reply. Feed text deltas with [`OutputParser::push`] (any split,
/// even inside a tag or a UTF-8-complete character sequence) and call [`OutputParser::finish`] once.
#[derive(Debug)]
pub struct OutputParser {
    reasoning: ReasoningSplitter,
    reasoning_enabled: bool,
    tools: Option<ToolCallStream>,
    tools_value: Option<Value>,
    call_id_prefix: String,
    /// Special-token texts that must never reach the client (role markers, turn end, image
    /// placeholders...): the worker keeps special tokens for the parsers' sake, so the rest are cut here.
    hidden: std::sync::Arc<[String]>,
    /// Tail of the text that may be the start of a hidden token split across deltas.
    pending: String,
}

impl OutputParser {
    /// `tools`: the request's OpenAI `tools` array (used to coerce argument values by schema; tool
    /// calls are parsed even without it). `reasoning_enabled`: split `<mm:think>` sections into
    /// reasoning (otherwise they stay in the content).
    pub fn new(tools: Option<&Value>, reasoning_enabled: bool) -> Self {
        Self {
            reasoning: ReasoningSplitter::new(reasoning_enabled, false),
            reasoning_enabled,
            tools: Some(ToolCallStream::new(tools)),
            tools_value: tools.cloned(),
            call_id_prefix: new_call_id_prefix(),
            hidden: std::sync::Arc::from(Vec::new()),
            pending: String::new(),
        }
    }

    /// Texts of special tokens to drop from the reply. A token split across deltas is held back
    /// until it is complete (or proves not to be one).
    pub fn with_hidden_tokens(mut self, hidden: std::sync::Arc<[String]>) -> Self {
        self.hidden = hidden;
        self
    }

    /// Append `delta`, cut complete hidden tokens, and return what can be released now.
    fn strip_hidden(&mut self, delta: &str, at_end: bool) -> String {
        if self.hidden.is_empty() {
            return std::mem::take(&mut self.pending) + delta;
        }
        self.pending.push_str(delta);
        for token in self.hidden.iter().filter(|t| !t.is_empty()) {
            if self.pending.contains(token.as_str()) {
                self.pending = self.pending.replace(token.as_str(), "");
            }
        }
        if at_end {
            return std::mem::take(&mut self.pending);
        }
        // Hold back the longest tail that is a proper prefix of some hidden token.
        let hold = self
            .pending
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| {
                let tail = &self.pending[i..];
                self.hidden.iter().any(|t| t.len() > tail.len() && t.starts_with(tail))
            })
            .unwrap_or(self.pending.len());
        let rest = self.pending.split_off(hold);
        std::mem::replace(&mut self.pending, rest)
    }

    /// The prompt ended with `<mm:think>` (see `PreparedPrompt::reasoning_prefilled`), so the reply
    /// starts inside the reasoning section.
    pub fn with_prefilled_reasoning(mut self, prefilled: bool) -> Self {
        self.reasoning = ReasoningSplitter::new(self.reasoning_enabled, prefilled);
        self
    }

    /// Disable tool-call parsing (e.g. `tool_choice: "none"`): tool syntax stays in the content.
    pub fn with_tool_calls(mut self, enabled: bool) -> Self {
        self.tools = enabled.then(|| ToolCallStream::new(self.tools_value.as_ref()));
        self
    }

    /// Feed the next piece of generated text; returns what is certain so far.
    pub fn push(&mut self, delta: &str) -> Vec<ParsedDelta> {
        let delta = self.strip_hidden(delta, false);
        let sections = self.reasoning.push(&delta);
        self.route(sections, false)
    }

    /// End of the reply: releases held-back text and closes a call cut off mid-way.
    pub fn finish(&mut self) -> Vec<ParsedDelta> {
        let tail = self.strip_hidden("", true);
        let mut sections = self.reasoning.push(&tail);
        sections.extend(self.reasoning.finish());
        self.route(sections, true)
    }

    /// Parse a whole reply at once.
    pub fn parse_complete(mut self, text: &str) -> ParsedMessage {
        let mut deltas = self.push(text);
        deltas.extend(self.finish());
        collect_message(deltas)
    }

    fn route(&mut self, sections: Vec<Section>, at_end: bool) -> Vec<ParsedDelta> {
        let mut out = Vec::new();
        for section in sections {
            match section {
                Section::Reasoning(t) => out.push(ParsedDelta::Reasoning(t)),
                Section::Content(t) => match self.tools.as_mut() {
                    Some(stream) => {
                        let events = stream.push(&t);
                        self.convert(events, &mut out);
                    }
                    None => out.push(ParsedDelta::Content(t)),
                },
            }
        }
        if at_end {
            if let Some(stream) = self.tools.as_mut() {
                let events = stream.finish();
                self.convert(events, &mut out);
            }
        }
        out
    }

    fn convert(&self, events: Vec<ToolEvent>, out: &mut Vec<ParsedDelta>) {
        for e in events {
            out.push(match e {
                ToolEvent::Content(t) => ParsedDelta::Content(t),
                ToolEvent::Start { index, name } => {
                    ParsedDelta::ToolCallStart { index, id: format!("{}{index}", self.call_id_prefix), name }
                }
                ToolEvent::Arguments { index, arguments } => ParsedDelta::ToolCallArguments { index, arguments },
            });
        }
    }
}

/// Fold a delta sequence into a whole message.
pub fn collect_message(deltas: Vec<ParsedDelta>) -> ParsedMessage {
    let mut msg = ParsedMessage::default();
    let mut reasoning: Option<String> = None;
    for d in deltas {
        match d {
            ParsedDelta::Content(t) => msg.content.push_str(&t),
            ParsedDelta::Reasoning(t) => reasoning.get_or_insert_with(String::new).push_str(&t),
            ParsedDelta::ToolCallStart { id, name, .. } => {
                msg.tool_calls.push(ToolCall { id, name, arguments: String::new() })
            }
            ParsedDelta::ToolCallArguments { index, arguments } => {
                if let Some(call) = msg.tool_calls.get_mut(index) {
                    call.arguments.push_str(&arguments);
                }
            }
        }
    }
    msg.reasoning_content = reasoning;
    msg
}

/// `call_` + 16 random-ish hex digits; the call index is appended. Unique per reply, not secret.
fn new_call_id_prefix() -> String {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    format!("call_{:016x}_", h.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use xml_args::NS;

    #[test]
    fn hidden_special_tokens_never_reach_the_client() {
        let hidden: std::sync::Arc<[String]> = vec!["]<]image[>[".to_string(), "[e~[".to_string()].into();
        let mut p = OutputParser::new(None, true).with_hidden_tokens(hidden);
        let mut deltas = p.push("a]<]image[>[");
        deltas.extend(p.push("b]<]im"));
        deltas.extend(p.push("age[>[c[e"));
        deltas.extend(p.push("~["));
        deltas.extend(p.push("[x"));
        deltas.extend(p.finish());
        assert_eq!(collect_message(deltas).content, "abc[x");
    }

    fn reply() -> String {
        format!(
            "<mm:think>I should look up the weather.</mm:think>\nSure.{NS}<tool_call>\n{NS}<invoke name=\"get_weather\">\n{NS}<city>Paris{NS}</city>\n{NS}<days>2{NS}</days>\n{NS}</invoke>\n{NS}</tool_call>"
        )
    }

    fn tools() -> Value {
        json!([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}])
    }

    fn normalize(mut m: ParsedMessage) -> ParsedMessage {
        for c in &mut m.tool_calls {
            c.id = String::new();
        }
        m
    }

    #[test]
    fn complete_reply() {
        let t = tools();
        let m = OutputParser::new(Some(&t), true).parse_complete(&reply());
        assert_eq!(m.reasoning_content.as_deref(), Some("I should look up the weather."));
        assert_eq!(m.content, "Sure.");
        assert_eq!(m.tool_calls.len(), 1);
        assert_eq!(m.tool_calls[0].name, "get_weather");
        let args: Value = serde_json::from_str(&m.tool_calls[0].arguments).unwrap();
        assert_eq!(args, json!({"city": "Paris", "days": 2}));
        assert!(m.tool_calls[0].id.starts_with("call_"));
    }

    #[test]
    fn streaming_equals_whole_at_every_split() {
        let t = tools();
        let text = reply();
        let whole = normalize(OutputParser::new(Some(&t), true).parse_complete(&text));
        for i in 0..=text.len() {
            if !text.is_char_boundary(i) {
                continue;
            }
            for j in (i..=text.len()).step_by(7) {
                if !text.is_char_boundary(j) {
                    continue;
                }
                let mut p = OutputParser::new(Some(&t), true);
                let mut d = p.push(&text[..i]);
                d.extend(p.push(&text[i..j]));
                d.extend(p.push(&text[j..]));
                d.extend(p.finish());
                assert_eq!(normalize(collect_message(d)), whole, "split at {i},{j}");
            }
        }
    }

    #[test]
    fn tool_calls_can_be_disabled() {
        let m = OutputParser::new(None, false).with_tool_calls(false).parse_complete(&format!("{NS}<tool_call>x"));
        assert_eq!(m.content, format!("{NS}<tool_call>x"));
        assert!(m.tool_calls.is_empty());
    }
}
