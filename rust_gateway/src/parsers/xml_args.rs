//! M3's XML-ish tool-call arguments -> JSON, with values coerced by the tool's JSON schema.
//!
//! Inside `<invoke name="f">…</invoke>` every argument is an element whose tag is the argument name
//! and every tag is prefixed by the namespace token `]<]minimax[>[`:
//! `NS<city>Paris NS</city>`; objects nest child elements, arrays repeat `<item>` elements, and leaf
//! values are untyped text, so the request's schema decides whether "3" is a number or a string.

use serde_json::{Map, Number, Value};

/// The namespace token that prefixes every M3 tool-call tag.
pub const NS: &str = "]<]minimax[>[";

/// One element of the argument tree.
#[derive(Debug, Default, Clone)]
struct Node {
    tag: String,
    text: String,
    children: Vec<Node>,
}

/// Parse an invoke body into a JSON object of arguments, coerced with `schema` (the tool's
/// `parameters` object schema, if the request declared the tool).
pub fn parse_arguments(body: &str, schema: Option<&Value>) -> Value {
    let root = parse_tree(body);
    match node_to_json(&root, schema, true) {
        Value::Object(map) => Value::Object(map),
        // The root of a call is always an object of named arguments.
        other => {
            let mut map = Map::new();
            if !other.is_null() && other.as_str() != Some("") {
                map.insert("value".into(), other);
            }
            Value::Object(map)
        }
    }
}

/// Split on the namespace token and build the element tree. Lenient: a stray closing tag that
/// matches an open ancestor closes everything above it; one that matches nothing is ignored.
fn parse_tree(body: &str) -> Node {
    let mut stack: Vec<Node> = vec![Node::default()];
    for (i, chunk) in body.split(NS).enumerate() {
        let lead = chunk.trim_start();
        if let Some(rest) = lead.strip_prefix("</") {
            let tag = rest.split('>').next().unwrap_or("").trim();
            if let Some(depth) = stack.iter().rposition(|n| n.tag == tag) {
                if depth > 0 {
                    while stack.len() > depth {
                        let node = stack.pop().expect("depth > 0 keeps the root");
                        stack.last_mut().expect("root").children.push(node);
                    }
                }
            }
        } else if let (Some(rest), true) = (lead.strip_prefix('<'), i > 0 || chunk.starts_with('<')) {
            match rest.find('>') {
                Some(gt) => stack.push(Node {
                    tag: rest[..gt].trim().to_string(),
                    text: rest[gt + 1..].to_string(),
                    children: Vec::new(),
                }),
                None => append_text(&mut stack, chunk, i),
            }
        } else {
            append_text(&mut stack, chunk, i);
        }
    }
    while stack.len() > 1 {
        let node = stack.pop().expect("len > 1");
        stack.last_mut().expect("root").children.push(node);
    }
    stack.pop().expect("root")
}

/// Text that is not a tag: part of the open element's value (the split removed a literal NS).
fn append_text(stack: &mut [Node], chunk: &str, index: usize) {
    if chunk.trim().is_empty() {
        return;
    }
    let node = stack.last_mut().expect("root");
    if index > 0 {
        node.text.push_str(NS);
    }
    node.text.push_str(chunk);
}

/// The JSON-schema types a schema admits (`type`, or the types of `anyOf`/`oneOf` branches).
fn schema_types(schema: Option<&Value>) -> Vec<String> {
    let Some(s) = schema.and_then(Value::as_object) else { return Vec::new() };
    let mut types = Vec::new();
    match s.get("type") {
        Some(Value::String(t)) => types.push(t.to_lowercase()),
        Some(Value::Array(ts)) => types.extend(ts.iter().filter_map(Value::as_str).map(str::to_lowercase)),
        _ => {}
    }
    for key in ["anyOf", "oneOf"] {
        if let Some(Value::Array(branches)) = s.get(key) {
            for b in branches {
                types.extend(schema_types(Some(b)));
            }
        }
    }
    types
}

fn has_type(types: &[String], names: &[&str]) -> bool {
    types.iter().any(|t| names.contains(&t.as_str()))
}

fn is_object_schema(schema: Option<&Value>, types: &[String]) -> bool {
    has_type(types, &["object"]) || schema.and_then(|s| s.get("properties")).is_some()
}

fn is_array_schema(schema: Option<&Value>, types: &[String]) -> bool {
    has_type(types, &["array"]) || schema.and_then(|s| s.get("items")).is_some()
}

fn child_schema<'a>(parent: Option<&'a Value>, tag: &str) -> Option<&'a Value> {
    let parent = parent?;
    if let Some(p) = parent.get("properties").and_then(|p| p.get(tag)) {
        return Some(p);
    }
    match parent.get("additionalProperties") {
        Some(v @ Value::Object(_)) => Some(v),
        _ => None,
    }
}

fn item_schema(parent: Option<&Value>, index: usize) -> Option<&Value> {
    let parent = parent?;
    if let Some(Value::Array(prefix)) = parent.get("prefixItems") {
        if let Some(s) = prefix.get(index) {
            return Some(s);
        }
    }
    match parent.get("items") {
        Some(v @ Value::Object(_)) => Some(v),
        _ => None,
    }
}

fn node_to_json(node: &Node, schema: Option<&Value>, is_root: bool) -> Value {
    let types = schema_types(schema);
    let has_children = !node.children.is_empty();
    if is_array_schema(schema, &types) && !is_root
        || (schema.is_none() || types.is_empty()) && has_children && all_items(node)
    {
        if !has_children {
            return leaf_container(&node.text, true);
        }
        let items =
            node.children.iter().enumerate().map(|(i, c)| node_to_json(c, item_schema(schema, i), false)).collect();
        return Value::Array(items);
    }
    if has_children || is_root || is_object_schema(schema, &types) {
        if !has_children && !is_root {
            return leaf_container(&node.text, false);
        }
        let mut map = Map::new();
        for c in &node.children {
            let v = node_to_json(c, child_schema(schema, &c.tag), false);
            // A repeated element name means a list of values.
            match map.get_mut(&c.tag) {
                Some(Value::Array(existing)) if repeated_ok(schema, &c.tag) => existing.push(v),
                Some(existing) => {
                    let first = existing.take();
                    *existing = Value::Array(vec![first, v]);
                }
                None => {
                    map.insert(c.tag.clone(), v);
                }
            }
        }
        return Value::Object(map);
    }
    coerce_leaf(&node.text, schema, &types)
}

fn all_items(node: &Node) -> bool {
    node.children.iter().all(|c| c.tag == "item")
}

/// Whether an existing array value under `tag` was itself produced by repetition (not a real array).
fn repeated_ok(schema: Option<&Value>, tag: &str) -> bool {
    let s = child_schema(schema, tag);
    !is_array_schema(s, &schema_types(s))
}

/// A container-typed element that holds text instead of children: accept inline JSON.
fn leaf_container(text: &str, want_array: bool) -> Value {
    let t = text.trim();
    match serde_json::from_str::<Value>(t) {
        Ok(v @ Value::Array(_)) if want_array => v,
        Ok(v @ Value::Object(_)) if !want_array => v,
        _ if t.is_empty() => {
            if want_array {
                Value::Array(Vec::new())
            } else {
                Value::Object(Map::new())
            }
        }
        _ if want_array => Value::Array(vec![Value::String(text.to_string())]),
        _ => Value::String(text.to_string()),
    }
}

/// Coerce leaf text with the schema; text that does not fit the schema stays a string.
fn coerce_leaf(text: &str, schema: Option<&Value>, types: &[String]) -> Value {
    let t = text.trim();
    if types.is_empty() {
        // Without a schema only the JSON literals are unambiguous; "521" could be a zip code.
        let _ = schema;
        return match t {
            "true" => Value::Bool(true),
            "false" => Value::Bool(false),
            "null" => Value::Null,
            _ => Value::String(text.to_string()),
        };
    }
    let null_ok = has_type(types, &["null"]);
    if has_type(types, &["string", "str"]) && !null_ok {
        return Value::String(text.to_string());
    }
    if null_ok && (t.is_empty() || t == "null" || t == "Null" || t == "NULL") {
        return Value::Null;
    }
    if has_type(types, &["integer", "int"]) {
        if let Ok(i) = t.parse::<i64>() {
            return Value::Number(i.into());
        }
    }
    if has_type(types, &["number", "float"]) {
        if let Ok(i) = t.parse::<i64>() {
            return Value::Number(i.into());
        }
        if let Some(n) = t.parse::<f64>().ok().and_then(Number::from_f64) {
            return Value::Number(n);
        }
    }
    if has_type(types, &["boolean", "bool"]) {
        match t.to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => return Value::Bool(true),
            "false" | "0" | "no" | "off" => return Value::Bool(false),
            _ => {}
        }
    }
    Value::String(text.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn tag(name: &str, inner: &str) -> String {
        format!("{NS}<{name}>{inner}{NS}</{name}>")
    }

    #[test]
    fn scalars_follow_the_schema() {
        let schema = json!({"type": "object", "properties": {
            "city": {"type": "string"}, "days": {"type": "integer"}, "temp": {"type": "number"},
            "metric": {"type": "boolean"}, "zip": {"type": "string"}, "note": {"type": ["string", "null"]}}});
        let body = [
            tag("city", "Paris"),
            tag("days", "3"),
            tag("temp", "21.5"),
            tag("metric", "True"),
            tag("zip", "00501"),
            tag("note", "null"),
        ]
        .join("\n");
        let got = parse_arguments(&format!("\n{body}\n"), Some(&schema));
        assert_eq!(
            got,
            json!({"city": "Paris", "days": 3, "temp": 21.5, "metric": true, "zip": "00501", "note": null})
        );
    }

    #[test]
    fn nested_objects_and_item_arrays() {
        let schema = json!({"type": "object", "properties": {
            "filter": {"type": "object", "properties": {"min": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string"}}}},
            "ids": {"type": "array", "items": {"type": "integer"}},
            "pts": {"type": "array", "items": {"type": "object", "properties": {"x": {"type": "number"}}}}}});
        let body = format!(
            "{}{}{}",
            tag(
                "filter",
                &format!("{}{}", tag("min", "2"), tag("tags", &format!("{}{}", tag("item", "a"), tag("item", "7"))))
            ),
            tag("ids", &format!("{}{}", tag("item", "1"), tag("item", "2"))),
            tag("pts", &tag("item", &tag("x", "1.5"))),
        );
        let got = parse_arguments(&body, Some(&schema));
        assert_eq!(got, json!({"filter": {"min": 2, "tags": ["a", "7"]}, "ids": [1, 2], "pts": [{"x": 1.5}]}));
    }

    #[test]
    fn untyped_values_keep_numbers_as_text() {
        let body = format!(
            "{}{}{}",
            tag("n", "42"),
            tag("flag", "false"),
            tag("list", &format!("{}{}", tag("item", "x"), tag("item", "y")))
        );
        assert_eq!(parse_arguments(&body, None), json!({"n": "42", "flag": false, "list": ["x", "y"]}));
    }

    #[test]
    fn string_values_are_verbatim() {
        let code = "def f():\n    return '<b>' + \"x\"\n";
        let schema = json!({"type": "object", "properties": {"code": {"type": "string"}}});
        assert_eq!(parse_arguments(&tag("code", code), Some(&schema)), json!({"code": code}));
    }

    #[test]
    fn empty_array_and_inline_json() {
        let schema = json!({"type": "object", "properties": {"a": {"type": "array"}, "o": {"type": "object"}}});
        let body = format!("{}{}", tag("a", ""), tag("o", "{\"k\": 1}"));
        assert_eq!(parse_arguments(&body, Some(&schema)), json!({"a": [], "o": {"k": 1}}));
    }
}
