//! The checkpoint's chat template, rendered with minijinja configured like Hugging Face's Jinja
//! environment (`transformers.utils.chat_template_utils`): `trim_blocks`, `lstrip_blocks`, loop
//! controls, Python string/dict methods (minijinja-contrib `pycompat`), a `tojson` that is
//! Python's `json.dumps`, `raise_exception` and `strftime_now`.

use std::path::Path;

use minijinja::value::Kwargs;
use minijinja::{Environment, Error, ErrorKind, Value};
use serde_json::Value as Json;

use super::error::PreprocessError;
use super::pyjson::{dumps, DumpOptions};

const TEMPLATE_NAME: &str = "chat";

/// A compiled chat template plus the special-token strings HF passes to every render.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// `bos_token`, `eos_token`, … as HF's `special_tokens_map` gives them to the template.
    special_tokens: serde_json::Map<String, Json>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("special_tokens", &self.special_tokens).finish()
    }
}

impl ChatTemplate {
    /// Load `chat_template.jinja` from the checkpoint, else `tokenizer_config.json`'s `chat_template`
    /// (a string, or a list of named templates of which `default` is used).
    pub fn load(model_dir: &Path) -> Result<Self, PreprocessError> {
        let config = read_json(&model_dir.join("tokenizer_config.json"))?;
        let jinja = model_dir.join("chat_template.jinja");
        let source = if jinja.exists() {
            std::fs::read_to_string(&jinja)
                .map_err(|e| PreprocessError::Internal(format!("reading {}: {e}", jinja.display())))?
        } else {
            match config.get("chat_template") {
                Some(Json::String(s)) => s.clone(),
                Some(Json::Array(named)) => named
                    .iter()
                    .find(|t| t.get("name").and_then(Json::as_str) == Some("default"))
                    .and_then(|t| t.get("template")?.as_str().map(str::to_string))
                    .ok_or_else(|| PreprocessError::Internal("no `default` chat template".into()))?,
                _ => {
                    return Err(PreprocessError::Internal(format!(
                        "{} has no chat template (neither chat_template.jinja nor tokenizer_config.json)",
                        model_dir.display()
                    )))
                }
            }
        };
        let mut special_tokens = serde_json::Map::new();
        for key in ["bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token"] {
            let token = match config.get(key) {
                Some(Json::String(s)) => Some(s.clone()),
                // AddedToken form: {"content": "...", ...}
                Some(Json::Object(o)) => o.get("content").and_then(Json::as_str).map(str::to_string),
                _ => None,
            };
            if let Some(t) = token {
                special_tokens.insert(key.to_string(), Json::String(t));
            }
        }
        Self::from_source(source, special_tokens)
    }

    /// Compile a template from source.
    pub fn from_source(source: String, special_tokens: serde_json::Map<String, Json>) -> Result<Self, PreprocessError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned(TEMPLATE_NAME, source)
            .map_err(|e| PreprocessError::Internal(format!("chat template does not compile: {e:#}")))?;
        Ok(Self { env, special_tokens })
    }

    /// Render with HF's variables: `messages`, `tools` (null when absent), `documents` (null),
    /// `add_generation_prompt`, the special tokens, and the template kwargs at top level.
    pub fn render(
        &self,
        messages: &Json,
        tools: Option<&Json>,
        add_generation_prompt: bool,
        kwargs: &serde_json::Map<String, Json>,
    ) -> Result<String, PreprocessError> {
        let mut ctx = self.special_tokens.clone();
        for (k, v) in kwargs {
            ctx.insert(k.clone(), v.clone());
        }
        ctx.insert("messages".into(), messages.clone());
        ctx.insert("tools".into(), tools.cloned().unwrap_or(Json::Null));
        ctx.insert("documents".into(), Json::Null);
        ctx.insert("add_generation_prompt".into(), Json::Bool(add_generation_prompt));
        let tmpl = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| PreprocessError::Internal(format!("chat template missing: {e}")))?;
        tmpl.render(Value::from_serialize(&ctx)).map_err(|e| {
            if e.kind() == ErrorKind::InvalidOperation && e.detail().is_some_and(|d| d.starts_with(RAISED)) {
                let msg = e.detail().unwrap_or_default().trim_start_matches(RAISED).to_string();
                PreprocessError::bad_param("messages", format!("the chat template rejected the conversation: {msg}"))
            } else {
                PreprocessError::bad_param("messages", format!("could not render the chat template: {e:#}"))
            }
        })
    }
}

const RAISED: &str = "raise_exception: ";

fn read_json(path: &Path) -> Result<Json, PreprocessError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| PreprocessError::Internal(format!("reading {}: {e}", path.display())))?;
    serde_json::from_str(&text).map_err(|e| PreprocessError::Internal(format!("parsing {}: {e}", path.display())))
}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, format!("{RAISED}{message}")))
}

/// HF's `tojson`: `json.dumps(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`.
fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let mut opts = DumpOptions {
        ensure_ascii: kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false),
        ..Default::default()
    };
    if let Some(indent) = kwargs.get::<Option<Value>>("indent")? {
        opts.indent = match indent.as_i64() {
            Some(n) => Some(" ".repeat(n.max(0) as usize)),
            None if indent.is_none() => None,
            None => Some(indent.as_str().unwrap_or_default().to_string()),
        };
    }
    if let Some(seps) = kwargs.get::<Option<Vec<String>>>("separators")? {
        if seps.len() != 2 {
            return Err(Error::new(ErrorKind::InvalidOperation, "tojson separators must be a pair"));
        }
        opts.separators = Some((seps[0].clone(), seps[1].clone()));
    }
    opts.sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    kwargs.assert_all_used()?;
    let json: Json =
        serde_json::to_value(&value).map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    Ok(Value::from_safe_string(dumps(&json, &opts)))
}

/// `datetime.now().strftime(fmt)` in UTC for the common directives (%Y %m %d %H %M %S %B %b %A %a %j %%).
fn strftime_now(format: String) -> Result<Value, Error> {
    let secs =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    Ok(Value::from(strftime(&format, secs)))
}

pub(crate) fn strftime(format: &str, unix_secs: i64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];
    let days = unix_secs.div_euclid(86_400);
    let rem = unix_secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy_mar = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy_mar + 2) / 153;
    let day = doy_mar - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let cumulative = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = cumulative[(month - 1) as usize] + day + i64::from(leap && month > 2);
    let weekday = (days + 3).rem_euclid(7); // 1970-01-01 was a Thursday (Monday = 0)
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&year.to_string()),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('H') => out.push_str(&format!("{:02}", rem / 3600)),
            Some('M') => out.push_str(&format!("{:02}", rem % 3600 / 60)),
            Some('S') => out.push_str(&format!("{:02}", rem % 60)),
            Some('B') => out.push_str(MONTHS[(month - 1) as usize]),
            Some('b') => out.push_str(&MONTHS[(month - 1) as usize][..3]),
            Some('A') => out.push_str(DAYS[weekday as usize]),
            Some('a') => out.push_str(&DAYS[weekday as usize][..3]),
            Some('j') => out.push_str(&format!("{yday:03}")),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn strftime_known_dates() {
        assert_eq!(strftime("%Y-%m-%d %H:%M:%S %a %b %j", 0), "1970-01-01 00:00:00 Thu Jan 001");
        assert_eq!(strftime("%d %B %Y %A", 1_709_164_800), "29 February 2024 Thursday");
    }

    #[test]
    fn renders_like_hf_jinja() {
        let src = "{% for m in messages %}\n  {{ m.role }}: {{ m.content.strip() }}|{{ m | tojson }}\n{% endfor %}{% if tools %}T{% endif %}{{ flag }}";
        let t = ChatTemplate::from_source(src.to_string(), Default::default()).unwrap();
        let msgs = json!([{"role": "user", "content": " hi <b> "}]);
        let mut kw = serde_json::Map::new();
        kw.insert("flag".into(), json!(true));
        let out = t.render(&msgs, None, false, &kw).unwrap();
        // lstrip_blocks strips before block tags only, as in Jinja2: the indent before `{{` stays.
        assert_eq!(out, "  user: hi <b>|{\"role\": \"user\", \"content\": \" hi <b> \"}\nTrue");
    }

    #[test]
    fn raise_exception_is_a_client_error() {
        let t = ChatTemplate::from_source("{{ raise_exception('roles must alternate') }}".into(), Default::default())
            .unwrap();
        let err = t.render(&json!([]), None, true, &Default::default()).unwrap_err();
        assert_eq!(err.status(), 400);
        assert!(err.to_string().contains("roles must alternate"), "{err}");
    }
}
