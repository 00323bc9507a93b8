//! `tool_choice: "required"` / a named function -> an EBNF grammar for the worker's constrained
//! decoding (SGLang's `ebnf` sampling param, xgrammar's GBNF dialect).
//!
//! The grammar accepts exactly M3's tool-call block (m3_architecture.md §8, the syntax that
//! `parsers::tool_calls` reads), every tag prefixed by the namespace token `NS`:
//!
//! ```text
//! NS<tool_call>
//! NS<invoke name="get_weather">
//! NS<location>Paris NS</location>
//! NS</invoke>
//! NS</tool_call>
//! ```
//!
//! with one or more `<invoke>` elements (exactly one when `parallel_tool_calls` is false) whose
//! name is one of the request's tools (`required`) or the named one. Arguments are elements named
//! after the tool's declared `parameters.properties` (any name when it declares none); a value is
//! free text that cannot contain `]<` (so never a closing tag: every tag starts with `NS`, which
//! starts with `]<`), or nested elements (objects, arrays of `<item>`). Values are not checked
//! against the schema: the parser coerces them.
//!
//! What may come before the block depends on how the prompt ends (see [`ReasoningStart`]): the
//! rest of a reasoning section the template opened, an optional one, or nothing but whitespace.
//! No visible text is allowed before or after the block.

use serde_json::Value;

use crate::parsers::reasoning::{THINK_END, THINK_START};
use crate::parsers::xml_args::NS;

/// Which tool calls the grammar forces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForcedToolChoice {
    /// `tool_choice: "required"`: any of the request's tools.
    Required,
    /// `tool_choice: {"type": "function", "function": {"name": ...}}`.
    Function(String),
}

/// Where the reply starts relative to M3's `<mm:think>` section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReasoningStart {
    /// The prompt ends with `<mm:think>` (thinking_mode=enabled): reasoning text, then `</mm:think>`.
    Open,
    /// The prompt ends with `</mm:think>` (thinking_mode=disabled): the calls come right away.
    Closed,
    /// Adaptive: the model may open and close a reasoning section before the calls.
    Optional,
}

/// Whitespace between tags: the template writes one newline; a few characters are allowed, but not
/// an unbounded run (a weak model could otherwise pad forever).
const WS_RULE: &str = "ws ::= [ \\t\\r\\n]{0,4}";

/// A GBNF string literal for `s` (quotes, backslashes and control characters escaped).
pub fn literal(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A character class of everything except `chars` (ASCII punctuation here; `]`, `\`, `^`, `-` escaped).
fn class_except(chars: &[char]) -> String {
    let mut out = String::from("[^");
    for &c in chars {
        if matches!(c, ']' | '\\' | '^' | '-' | '[') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push(']');
    out
}

/// Rules for `name`: any text that does not contain `closer`, followed by `closer`.
///
/// Needs `closer`'s first character to appear only at its start (true of `</mm:think>`): then a
/// partial match can only restart at that character, and the text is a sequence of plain characters
/// and of "opener + proper prefix of the rest" runs that end in a mismatch.
fn text_until(name: &str, closer: &str) -> Vec<String> {
    let first = closer.chars().next().expect("a non-empty closer");
    let rest: Vec<char> = closer.chars().skip(1).collect();
    assert!(!rest.is_empty() && !rest.contains(&first), "the closer's first character must not repeat");
    let lit = |c: char| literal(&c.to_string());
    // Proper prefixes of `rest` as nested optionals: (r0 (r1 ( ... r(n-2)?)?)?)?
    let mut prefix = String::new();
    for &c in rest[..rest.len() - 1].iter().rev() {
        prefix = if prefix.is_empty() { format!("({})?", lit(c)) } else { format!("({} {prefix})?", lit(c)) };
    }
    // A proper prefix, then a character that neither continues it nor restarts a match.
    let last = rest.len() - 1;
    let mut tail = class_except(&[rest[last], first]);
    for &c in rest[..last].iter().rev() {
        tail = format!("{} | {} ({tail})", class_except(&[c, first]), lit(c));
    }
    let opener = lit(first);
    let plain = format!("{}*", class_except(&[first]));
    let pre = if prefix.is_empty() { String::new() } else { format!(" {name}_pre") };
    let mut rules = vec![
        format!("{name} ::= {plain} ({name}_run {plain})* ({opener}{pre})* {}", literal(closer)),
        format!("{name}_run ::= ({opener}{pre})* {opener} ({tail})"),
    ];
    if !prefix.is_empty() {
        rules.push(format!("{name}_pre ::= {prefix}"));
    }
    rules
}

/// The request's tools that the grammar may call, as (name, declared argument names or None for any).
fn callable<'a>(tools: &'a Value, choice: &ForcedToolChoice) -> Vec<(&'a str, Option<Vec<&'a str>>)> {
    let Some(tools) = tools.as_array() else { return Vec::new() };
    let mut out: Vec<(&str, Option<Vec<&str>>)> = Vec::new();
    for t in tools {
        let Some(f) = t.get("function") else { continue };
        let Some(name) = f.get("name").and_then(Value::as_str) else { continue };
        if matches!(choice, ForcedToolChoice::Function(n) if n != name) || out.iter().any(|(n, _)| *n == name) {
            continue;
        }
        let args = f
            .pointer("/parameters/properties")
            .and_then(Value::as_object)
            .map(|props| props.keys().map(String::as_str).collect::<Vec<_>>());
        // No `properties` object: any argument names; an empty one: a tool without arguments.
        out.push((name, args));
    }
    out
}

/// The EBNF grammar (root rule `root`) forcing one or more calls of the tools `choice` allows.
/// `tools` is the request's validated OpenAI `tools` array.
pub fn tool_call_grammar(
    tools: &Value,
    choice: &ForcedToolChoice,
    parallel: bool,
    reasoning: ReasoningStart,
) -> String {
    let ns = |tag: &str| literal(&format!("{NS}{tag}"));
    let mut rules: Vec<String> = Vec::new();
    let calls = if parallel { "(invoke ws)+" } else { "invoke ws" };
    let lead = match reasoning {
        ReasoningStart::Closed => "ws".to_string(),
        ReasoningStart::Open => "think ws".to_string(),
        ReasoningStart::Optional => format!("ws ({} think ws)?", literal(THINK_START)),
    };
    rules.push(format!("root ::= {lead} {} ws {calls} {}", ns("<tool_call>"), ns("</tool_call>")));
    let callable = callable(tools, choice);
    let invokes: Vec<String> = (0..callable.len()).map(|i| format!("invoke_{i}")).collect();
    rules.push(format!("invoke ::= {}", invokes.join(" | ")));
    let mut any_args = false;
    for (i, (name, args)) in callable.iter().enumerate() {
        let open = ns(&format!("<invoke name=\"{name}\">"));
        match args {
            Some(keys) if keys.is_empty() => {
                rules.push(format!("invoke_{i} ::= {open} ws {}", ns("</invoke>")));
            }
            Some(keys) => {
                rules.push(format!("invoke_{i} ::= {open} ws (arg_{i} ws)* {}", ns("</invoke>")));
                let alts: Vec<String> = keys
                    .iter()
                    .map(|k| format!("{} value {}", ns(&format!("<{k}>")), ns(&format!("</{k}>"))))
                    .collect();
                rules.push(format!("arg_{i} ::= {}", alts.join(" | ")));
            }
            None => {
                any_args = true;
                rules.push(format!("invoke_{i} ::= {open} ws (any_arg ws)* {}", ns("</invoke>")));
            }
        }
    }
    if any_args {
        rules.push("any_arg ::= element".to_string());
    }
    // A value is free text without `]<`, or nested elements (objects nest child elements, arrays
    // repeat `<item>`); element names are not matched against the schema.
    rules.push("value ::= text | ws (element ws)+".to_string());
    rules.push(format!(
        "element ::= {} name \">\" value {} name \">\"",
        literal(&format!("{NS}<")),
        literal(&format!("{NS}</"))
    ));
    rules.push("name ::= [A-Za-z_] [A-Za-z0-9_.\\-]*".to_string());
    // Runs of `]` must be followed by something other than `<` (or end the text).
    rules.push("text ::= [^\\]]* (\"]\"+ [^<\\]] [^\\]]*)* \"]\"*".to_string());
    if reasoning != ReasoningStart::Closed {
        rules.extend(text_until("think", THINK_END));
    }
    rules.push(WS_RULE.to_string());
    let mut out = rules.join("\n");
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn tools() -> Value {
        json!([
            {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object",
                "properties": {"location": {"type": "string"}, "days": {"type": "integer"}}}}},
            {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}},
            {"type": "function", "function": {"name": "say \"hi\"\\now", "parameters": {"type": "object"}}},
        ])
    }

    fn rule<'a>(grammar: &'a str, name: &str) -> &'a str {
        let head = format!("{name} ::= ");
        grammar.lines().find_map(|l| l.strip_prefix(head.as_str())).unwrap_or_else(|| panic!("no rule {name}"))
    }

    #[test]
    fn literals_escape_quotes_backslashes_and_controls() {
        assert_eq!(literal("a\"b\\c"), r#""a\"b\\c""#);
        assert_eq!(literal("x\ny\t\u{1}"), r#""x\ny\t\x01""#);
        assert_eq!(literal("]<]minimax[>[<tool_call>"), r#""]<]minimax[>[<tool_call>""#);
    }

    #[test]
    fn required_allows_every_tool_and_only_those() {
        let g = tool_call_grammar(&tools(), &ForcedToolChoice::Required, true, ReasoningStart::Closed);
        assert_eq!(rule(&g, "invoke"), "invoke_0 | invoke_1 | invoke_2");
        assert!(rule(&g, "invoke_0").starts_with(r#""]<]minimax[>[<invoke name=\"get_weather\">""#));
        assert!(rule(&g, "invoke_1").starts_with(r#""]<]minimax[>[<invoke name=\"get_time\">" ws "#));
        // The quote and backslash of the odd name are escaped inside the literal.
        assert!(rule(&g, "invoke_2").starts_with(r#""]<]minimax[>[<invoke name=\"say \"hi\"\\now\">""#), "{g}");
        assert_eq!(g.matches("<invoke name=").count(), 3);
        assert!(rule(&g, "root").contains("(invoke ws)+"));
        // Declared arguments by name; no arguments for get_time; any name for the untyped tool.
        let args = rule(&g, "arg_0");
        assert!(args.contains(r#""]<]minimax[>[<location>" value "]<]minimax[>[</location>""#), "{args}");
        assert!(args.contains(r#""]<]minimax[>[<days>" value "]<]minimax[>[</days>""#));
        assert!(!g.contains("arg_1"));
        assert!(rule(&g, "invoke_2").contains("any_arg"));
        assert!(g.lines().all(|l| l.contains(" ::= ")));
    }

    #[test]
    fn named_function_allows_only_it() {
        let choice = ForcedToolChoice::Function("get_time".into());
        let g = tool_call_grammar(&tools(), &choice, false, ReasoningStart::Closed);
        assert_eq!(rule(&g, "invoke"), "invoke_0");
        assert!(rule(&g, "invoke_0").contains(r#"<invoke name=\"get_time\">"#));
        assert!(!g.contains("get_weather") && !g.contains("say "));
        // parallel_tool_calls=false: exactly one call.
        assert!(rule(&g, "root").contains(" invoke ws ") && !g.contains("(invoke ws)+"));
    }

    #[test]
    fn reasoning_prefix_follows_the_prompt() {
        let t = tools();
        let closed = tool_call_grammar(&t, &ForcedToolChoice::Required, true, ReasoningStart::Closed);
        assert!(rule(&closed, "root").starts_with(r#"ws "]<]minimax[>[<tool_call>""#));
        assert!(!closed.contains("mm:think"));
        let open = tool_call_grammar(&t, &ForcedToolChoice::Required, true, ReasoningStart::Open);
        assert!(rule(&open, "root").starts_with("think ws "));
        assert!(rule(&open, "think").ends_with(r#""</mm:think>""#));
        let optional = tool_call_grammar(&t, &ForcedToolChoice::Required, true, ReasoningStart::Optional);
        assert!(rule(&optional, "root").starts_with(r#"ws ("<mm:think>" think ws)? "#));
    }

    #[test]
    fn reasoning_text_cannot_contain_the_closer() {
        let rules = text_until("think", "</mm:think>");
        assert_eq!(rules[0], r#"think ::= [^<]* (think_run [^<]*)* ("<" think_pre)* "</mm:think>""#);
        // Every partial match ends in a character that is neither the next one nor a new `<`.
        assert!(rules[1].starts_with(r#"think_run ::= ("<" think_pre)* "<" ([^/<] | "/" ([^m<] | "m" ([^m<]"#));
        assert!(rules[1].contains(r#""k" ([^><])"#), "{}", rules[1]);
        assert_eq!(rules[2], r#"think_pre ::= ("/" ("m" ("m" (":" ("t" ("h" ("i" ("n" ("k")?)?)?)?)?)?)?)?)?"#);
    }
}
