//! `json.dumps` exactly as Python writes it, for the chat template's `tojson` filter.
//!
//! Hugging Face replaces Jinja's `tojson` with `json.dumps(x, ensure_ascii=False, indent=…,
//! separators=…, sort_keys=…)`, so tool schemas in the prompt use Python's spacing (`", "`, `": "`),
//! Python's float spelling (`1e-05`, `1e+16`, `2.0`) and no HTML escaping. Any difference here
//! changes the prompt's tokens.

use serde_json::Value;

/// Options of Python's `json.dumps` that templates use.
#[derive(Debug, Clone, Default)]
pub struct DumpOptions {
    pub ensure_ascii: bool,
    pub indent: Option<String>,
    /// (item separator, key separator); Python's default depends on `indent`.
    pub separators: Option<(String, String)>,
    pub sort_keys: bool,
}

pub fn dumps(value: &Value, opts: &DumpOptions) -> String {
    let (item_sep, key_sep) = match &opts.separators {
        Some((a, b)) => (a.clone(), b.clone()),
        None if opts.indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    let mut out = String::new();
    write_value(&mut out, value, opts, &item_sep, &key_sep, 0);
    out
}

fn newline_indent(out: &mut String, indent: &str, level: usize) {
    out.push('\n');
    for _ in 0..level {
        out.push_str(indent);
    }
}

fn write_value(out: &mut String, v: &Value, opts: &DumpOptions, item_sep: &str, key_sep: &str, level: usize) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                out.push_str(&i.to_string());
            } else if let Some(u) = n.as_u64() {
                out.push_str(&u.to_string());
            } else {
                out.push_str(&python_float_repr(n.as_f64().unwrap_or(f64::NAN)));
            }
        }
        Value::String(s) => write_string(out, s, opts.ensure_ascii),
        Value::Array(items) => {
            if items.is_empty() {
                out.push_str("[]");
                return;
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                if let Some(ind) = &opts.indent {
                    newline_indent(out, ind, level + 1);
                }
                write_value(out, item, opts, item_sep, key_sep, level + 1);
            }
            if let Some(ind) = &opts.indent {
                newline_indent(out, ind, level);
            }
            out.push(']');
        }
        Value::Object(map) => {
            if map.is_empty() {
                out.push_str("{}");
                return;
            }
            out.push('{');
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            if opts.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(b.0));
            }
            for (i, (k, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                if let Some(ind) = &opts.indent {
                    newline_indent(out, ind, level + 1);
                }
                write_string(out, k, opts.ensure_ascii);
                out.push_str(key_sep);
                write_value(out, item, opts, item_sep, key_sep, level + 1);
            }
            if let Some(ind) = &opts.indent {
                newline_indent(out, ind, level);
            }
            out.push('}');
        }
    }
}

fn write_string(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c if ensure_ascii && (c as u32) > 0x7e => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{:04x}", unit));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Python's `repr(float)`: shortest round-trip digits, positional for exponents in [-4, 16).
pub fn python_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity".into() } else { "-Infinity".into() };
    }
    if x == 0.0 {
        return if x.is_sign_negative() { "-0.0".into() } else { "0.0".into() };
    }
    // Rust's `{:e}` gives the shortest round-trip digits: "d.ddde-5".
    let sci = format!("{:e}", x);
    let (mantissa, exp) = sci.split_once('e').expect("{:e} always has an exponent");
    let exp: i32 = exp.parse().expect("integer exponent");
    let negative = mantissa.starts_with('-');
    let digits: String = mantissa.chars().filter(|c| c.is_ascii_digit()).collect();
    let sign = if negative { "-" } else { "" };
    if (-4..16).contains(&exp) {
        let point = exp + 1; // digits before the decimal point
        let s = if point <= 0 {
            format!("0.{}{}", "0".repeat((-point) as usize), digits)
        } else if point as usize >= digits.len() {
            format!("{}{}.0", digits, "0".repeat(point as usize - digits.len()))
        } else {
            format!("{}.{}", &digits[..point as usize], &digits[point as usize..])
        };
        format!("{sign}{s}")
    } else {
        let m = if digits.len() > 1 { format!("{}.{}", &digits[..1], &digits[1..]) } else { digits };
        format!("{sign}{m}e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn floats_like_python() {
        for (x, want) in [
            (1.0, "1.0"),
            (0.1, "0.1"),
            (1e-5, "1e-05"),
            (0.0001, "0.0001"),
            (1e16, "1e+16"),
            (123456789012345.6, "123456789012345.6"),
            (-2.5e-7, "-2.5e-07"),
            (1.5e300, "1.5e+300"),
        ] {
            assert_eq!(python_float_repr(x), want);
        }
    }

    #[test]
    fn spacing_and_escapes_like_python() {
        let v = json!({"b": [1, 2.0, "é<\"\n"], "a": {}});
        assert_eq!(dumps(&v, &DumpOptions::default()), r#"{"b": [1, 2.0, "é<\"\n"], "a": {}}"#);
        let opts = DumpOptions { indent: Some("  ".into()), sort_keys: true, ensure_ascii: true, ..Default::default() };
        assert_eq!(dumps(&v, &opts), "{\n  \"a\": {},\n  \"b\": [\n    1,\n    2.0,\n    \"\\u00e9<\\\"\\n\"\n  ]\n}");
    }
}
