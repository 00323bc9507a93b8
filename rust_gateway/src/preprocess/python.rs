//! PyO3 bindings of preprocessing and output parsing, for tests and benchmarks
//! (`m3serve._gateway.*`). The server itself calls the Rust API directly.
//!
//! Errors: client mistakes raise `ValueError("<status>: <message>")`, our own failures
//! `RuntimeError`. Heavy work runs with the GIL released.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyTuple};
use serde_json::Value;

use super::handoff::{f32_le_bytes, WireDtype};
use super::images::decode::decode_rgb;
use super::images::fetch::{FetchConfig, Fetcher};
use super::images::{patchify, resize, smart_resize as smart_resize_rs, ImageConfig, ImageProcessor, ResizePolicy};
use super::{PreparedPrompt, PreprocessConfig, PreprocessError, Preprocessor};
use crate::parsers::{OutputParser, ParsedDelta};

fn to_py_err(e: PreprocessError) -> PyErr {
    match e.status() {
        500.. => PyRuntimeError::new_err(e.to_string()),
        status => PyValueError::new_err(format!("{status}: {e}")),
    }
}

fn parse_json(text: &str, what: &str) -> PyResult<Value> {
    serde_json::from_str(text).map_err(|e| PyValueError::new_err(format!("400: {what} is not valid JSON: {e}")))
}

/// Settings from a JSON object (all keys optional): max_images, cache_max_tokens,
/// image_cache_bytes, keep_pixel_values (default true here: `prepare_chat` returns the float32
/// rows), max_prompt_tokens, allow_private, allow_hosts, max_bytes, timeout_s, max_redirects,
/// wire_dtype ("float32" | "bfloat16"), resize_policy ("hf_area" | "long_side:<px>").
fn config_from_json(text: Option<&str>) -> PyResult<PreprocessConfig> {
    let mut cfg = PreprocessConfig { keep_pixel_values: true, ..Default::default() };
    let Some(text) = text else { return Ok(cfg) };
    let v = parse_json(text, "config")?;
    let u = |k: &str| v.get(k).and_then(Value::as_u64);
    if let Some(x) = u("max_images") {
        cfg.max_images = x as usize;
    }
    if let Some(x) = u("cache_max_tokens") {
        cfg.cache_max_tokens = x as usize;
    }
    if let Some(x) = u("image_cache_bytes") {
        cfg.image_cache_bytes = x as usize;
    }
    if let Some(b) = v.get("keep_pixel_values").and_then(Value::as_bool) {
        cfg.keep_pixel_values = b;
    }
    if let Some(x) = u("max_prompt_tokens") {
        cfg.max_prompt_tokens = Some(x as usize);
    }
    cfg.fetch = fetch_config(&v);
    if let Some(s) = v.get("wire_dtype").and_then(Value::as_str) {
        cfg.wire_dtype =
            WireDtype::parse(s).ok_or_else(|| PyValueError::new_err(format!("unknown wire_dtype {s:?}")))?;
    }
    if let Some(s) = v.get("resize_policy").and_then(Value::as_str) {
        cfg.resize_policy = Some(parse_policy(s)?);
    }
    Ok(cfg)
}

fn parse_policy(s: &str) -> PyResult<ResizePolicy> {
    if s == "hf_area" {
        return Ok(ResizePolicy::HfArea);
    }
    s.strip_prefix("long_side:")
        .and_then(|n| n.parse().ok())
        .map(ResizePolicy::LongSide)
        .ok_or_else(|| PyValueError::new_err(format!("unknown resize_policy {s:?}")))
}

fn fetch_config(v: &Value) -> FetchConfig {
    let mut f = FetchConfig::default();
    if let Some(b) = v.get("allow_private").and_then(Value::as_bool) {
        f.allow_private = b;
    }
    if let Some(hosts) = v.get("allow_hosts").and_then(Value::as_array) {
        f.allow_hosts = hosts.iter().filter_map(Value::as_str).map(str::to_string).collect();
    }
    if let Some(x) = v.get("max_bytes").and_then(Value::as_u64) {
        f.max_bytes = x as usize;
    }
    if let Some(x) = v.get("timeout_s").and_then(Value::as_f64) {
        f.timeout = Duration::from_secs_f64(x);
    }
    if let Some(x) = v.get("max_redirects").and_then(Value::as_u64) {
        f.max_redirects = x as usize;
    }
    f
}

fn prompt_to_dict<'py>(py: Python<'py>, p: &PreparedPrompt) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("input_ids", PyList::new(py, &p.input_ids)?)?;
    d.set_item("text", &p.text)?;
    d.set_item("prompt_tokens", p.prompt_tokens)?;
    d.set_item("reasoning_prefilled", p.reasoning_prefilled)?;
    let grids: Vec<(u32, u32, u32)> = p.images.iter().map(|i| (i.grid_thw[0], i.grid_thw[1], i.grid_thw[2])).collect();
    d.set_item("image_grid_thw", grids)?;
    let rows: usize = p.images.iter().map(|i| i.num_patches()).sum();
    // Float32 rows of all images, when kept (`keep_pixel_values`); None otherwise.
    let kept: Option<Vec<&[f32]>> = p.images.iter().map(|i| i.pixel_values.as_deref()).collect();
    match kept {
        Some(kept) if !p.images.is_empty() => {
            let cols = kept[0].len() / p.images[0].num_patches().max(1);
            let mut bytes = Vec::with_capacity(kept.iter().map(|k| k.len() * 4).sum());
            for k in kept {
                bytes.extend_from_slice(&f32_le_bytes(k));
            }
            d.set_item("pixel_values", PyBytes::new(py, &bytes))?;
            d.set_item("pixel_shape", (rows, cols))?;
        }
        Some(_) => {
            d.set_item("pixel_values", PyBytes::new(py, &[]))?;
            d.set_item("pixel_shape", (0, 0))?;
        }
        None => {
            d.set_item("pixel_values", py.None())?;
            d.set_item("pixel_shape", py.None())?;
        }
    }
    // JSON text from the stored JSON strings (one copy, no escaping pass), built without the GIL.
    let image_data = py.allow_threads(|| p.worker_image_data_json());
    d.set_item("worker_image_data", image_data)?;
    Ok(d)
}

/// A loaded checkpoint: `Preprocessor(model_dir, config_json=None)`.
#[pyclass(name = "Preprocessor", module = "m3serve._gateway", frozen)]
struct PyPreprocessor {
    inner: Arc<Preprocessor>,
}

#[pymethods]
impl PyPreprocessor {
    #[new]
    #[pyo3(signature = (model_dir, config_json=None))]
    fn new(py: Python<'_>, model_dir: String, config_json: Option<String>) -> PyResult<Self> {
        let cfg = config_from_json(config_json.as_deref())?;
        let inner = py.allow_threads(|| Preprocessor::load_with_config(&model_dir, cfg)).map_err(to_py_err)?;
        Ok(Self { inner: Arc::new(inner) })
    }

    /// Rendered chat template text for a request body (JSON text).
    fn render(&self, py: Python<'_>, request_json: &str) -> PyResult<String> {
        let body = parse_json(request_json, "request")?;
        py.allow_threads(|| self.inner.render_chat(&body).map(|(t, _)| t)).map_err(to_py_err)
    }

    /// Full preparation of a chat request: dict with input_ids, text, prompt_tokens,
    /// reasoning_prefilled, image_grid_thw, pixel_values (float32 bytes), pixel_shape,
    /// worker_image_data (JSON text or None).
    fn prepare_chat<'py>(&self, py: Python<'py>, request_json: &str) -> PyResult<Bound<'py, PyDict>> {
        let body = parse_json(request_json, "request")?;
        let p = py.allow_threads(|| self.inner.prepare_chat_blocking(&body)).map_err(to_py_err)?;
        prompt_to_dict(py, &p)
    }

    fn prepare_completion<'py>(&self, py: Python<'py>, request_json: &str) -> PyResult<Bound<'py, PyDict>> {
        let body = parse_json(request_json, "request")?;
        let p = py.allow_threads(|| self.inner.prepare_completion(&body)).map_err(to_py_err)?;
        prompt_to_dict(py, &p)
    }

    /// Token ids of `text` (no added specials), through the segment cache or not.
    #[pyo3(signature = (text, use_cache=true))]
    fn encode(&self, py: Python<'_>, text: &str, use_cache: bool) -> PyResult<Vec<u32>> {
        let tok = self.inner.cached_tokenizer();
        py.allow_threads(|| if use_cache { tok.encode(text) } else { tok.encode_uncached(text) }).map_err(to_py_err)
    }

    fn cache_stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.inner.cached_tokenizer().stats();
        let d = PyDict::new(py);
        d.set_item("hit_tokens", s.hit_tokens)?;
        d.set_item("miss_tokens", s.miss_tokens)?;
        d.set_item("cached_tokens", s.cached_tokens)?;
        d.set_item("coalesced_tokens", s.coalesced_tokens)?;
        Ok(d)
    }

    /// `prepare_images(urls) -> [(t, h, w)]`: the images of a request (data: or http(s) URLs)
    /// fetched and prepared as `prepare_chat` does, through the image cache; for benchmarks.
    fn prepare_images(&self, py: Python<'_>, urls: Vec<String>) -> PyResult<Vec<(u32, u32, u32)>> {
        let images = py.allow_threads(|| self.inner.prepare_images_blocking(&urls)).map_err(to_py_err)?;
        Ok(images.iter().map(|i| (i.grid_thw[0], i.grid_thw[1], i.grid_thw[2])).collect())
    }

    /// Counters of the prepared-image cache: hits, misses, coalesced (waits for another thread's
    /// preparation of the same image), evictions, bytes, entries, max_bytes.
    fn image_cache_stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.inner.image_cache().stats();
        let d = PyDict::new(py);
        d.set_item("hits", s.hits)?;
        d.set_item("misses", s.misses)?;
        d.set_item("coalesced", s.coalesced)?;
        d.set_item("evictions", s.evictions)?;
        d.set_item("bytes", s.bytes)?;
        d.set_item("entries", s.entries)?;
        d.set_item("max_bytes", s.max_bytes)?;
        Ok(d)
    }
}

fn shared_preprocessor(model_dir: &str) -> Result<Arc<Preprocessor>, PreprocessError> {
    static CACHE: OnceLock<Mutex<HashMap<String, Arc<Preprocessor>>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(p) = cache.lock().ok().and_then(|c| c.get(model_dir).cloned()) {
        return Ok(p);
    }
    let p = Arc::new(Preprocessor::load(model_dir)?);
    if let Ok(mut c) = cache.lock() {
        c.insert(model_dir.to_string(), p.clone());
    }
    Ok(p)
}

/// `render_chat(model_dir, request_json) -> (text, input_ids)` with default settings.
#[pyfunction]
fn render_chat(py: Python<'_>, model_dir: &str, request_json: &str) -> PyResult<(String, Vec<u32>)> {
    let body = parse_json(request_json, "request")?;
    py.allow_threads(|| {
        let p = shared_preprocessor(model_dir)?;
        let prompt = p.prepare_chat_blocking(&body)?;
        Ok((prompt.text, prompt.input_ids))
    })
    .map_err(to_py_err)
}

/// (float32 pixel bytes, (rows, cols), (t, h, w)).
type ImageTuple<'py> = (Bound<'py, PyBytes>, (usize, usize), (u32, u32, u32));

/// `preprocess_image(data, config_json=None) -> (float32 bytes, (rows, 1176), (t, h, w))`.
/// Config keys: min_pixels, max_pixels, resize_policy, max_side, max_pixels_decoded.
#[pyfunction]
#[pyo3(signature = (data, config_json=None))]
fn preprocess_image<'py>(py: Python<'py>, data: &[u8], config_json: Option<&str>) -> PyResult<ImageTuple<'py>> {
    let mut cfg = ImageConfig::default();
    if let Some(text) = config_json {
        let v = parse_json(text, "config")?;
        if let Some(x) = v.get("min_pixels").and_then(Value::as_u64) {
            cfg.min_pixels = x;
        }
        if let Some(x) = v.get("max_pixels").and_then(Value::as_u64) {
            cfg.max_pixels = x;
        }
        if let Some(x) = v.get("max_side").and_then(Value::as_u64) {
            cfg.limits.max_side = x as u32;
        }
        if let Some(x) = v.get("max_pixels_decoded").and_then(Value::as_u64) {
            cfg.limits.max_pixels = x;
        }
        if let Some(s) = v.get("resize_policy").and_then(Value::as_str) {
            cfg.policy = parse_policy(s)?;
        }
    }
    let processor = ImageProcessor::new(cfg);
    let (rgb, h, w) =
        py.allow_threads(|| processor.decode_resize(data)).map_err(|m| PyValueError::new_err(format!("400: {m}")))?;
    // Normalize + patchify straight into the Python bytes object: no second 10 MB buffer and copy.
    let geometry = processor.geometry();
    let n = patchify::patchified_len(w, h, geometry);
    let shape = (n / geometry.row_len(), geometry.row_len());
    if cfg!(target_endian = "little") {
        // A bytes object left uninitialized by CPython (not zero-filled first as
        // `PyBytes::new_with` does: that is a 10 MB memset per image), filled without the GIL.
        // SAFETY: a null source makes CPython allocate `n * 4` bytes without copying; the result
        // is checked for null (a raised MemoryError) and owned by the returned `Bound`.
        let obj = unsafe { pyo3::ffi::PyBytes_FromStringAndSize(std::ptr::null(), (n * 4) as pyo3::ffi::Py_ssize_t) };
        let bytes = unsafe { Bound::from_owned_ptr_or_err(py, obj)? }.downcast_into::<PyBytes>()?;
        // SAFETY: `obj` is a bytes object of `n * 4` bytes; nothing else refers to it yet.
        let buffer = unsafe { pyo3::ffi::PyBytes_AsString(obj) } as usize;
        if buffer.is_multiple_of(std::mem::align_of::<f32>()) {
            let grid = py.allow_threads(|| {
                // SAFETY: `buffer` points at `n * 4` writable bytes aligned for f32, kept alive
                // by `bytes`; `patchify_to_uninit` writes all `n` floats.
                let out = unsafe { std::slice::from_raw_parts_mut(buffer as *mut std::mem::MaybeUninit<f32>, n) };
                processor.patchify_to_uninit(&rgb, h, w, out)
            });
            return Ok((bytes, shape, (grid[0], grid[1], grid[2])));
        }
    }
    let mut grid = [0u32; 3];
    let bytes = PyBytes::new_with(py, n * 4, |buf| {
        match bytemuck::try_cast_slice_mut::<u8, f32>(buf) {
            Ok(floats) if cfg!(target_endian = "little") => grid = processor.patchify_to(&rgb, h, w, floats),
            _ => {
                let mut floats = vec![0f32; n];
                grid = processor.patchify_to(&rgb, h, w, &mut floats);
                buf.copy_from_slice(&f32_le_bytes(&floats));
            }
        }
        Ok(())
    })?;
    Ok((bytes, shape, (grid[0], grid[1], grid[2])))
}

/// `decode_image(data) -> (rgb8 bytes, width, height)`.
#[pyfunction]
fn decode_image<'py>(py: Python<'py>, data: &[u8]) -> PyResult<(Bound<'py, PyBytes>, usize, usize)> {
    let img = py
        .allow_threads(|| decode_rgb(data, &Default::default()))
        .map_err(|m| PyValueError::new_err(format!("400: {m}")))?;
    Ok((PyBytes::new(py, &img.data), img.width, img.height))
}

/// `resize_rgb(rgb8, width, height, out_width, out_height) -> rgb8 bytes` (the bicubic alone).
#[pyfunction]
fn resize_rgb<'py>(
    py: Python<'py>,
    rgb: &[u8],
    width: usize,
    height: usize,
    out_width: usize,
    out_height: usize,
) -> PyResult<Bound<'py, PyBytes>> {
    if rgb.len() != width * height * 3 || width == 0 || height == 0 || out_width == 0 || out_height == 0 {
        return Err(PyValueError::new_err("rgb must hold width*height*3 bytes and sizes must be positive"));
    }
    let out = py.allow_threads(|| resize::resize_rgb8(rgb, width, height, out_width, out_height));
    Ok(PyBytes::new(py, &out))
}

/// `smart_resize(height, width, factor=28, min_pixels=3136, max_pixels=451584) -> (h, w)`.
#[pyfunction]
#[pyo3(signature = (height, width, factor=28, min_pixels=3136, max_pixels=451584))]
fn smart_resize(
    height: usize,
    width: usize,
    factor: usize,
    min_pixels: u64,
    max_pixels: u64,
) -> PyResult<(usize, usize)> {
    smart_resize_rs(height, width, factor, min_pixels, max_pixels)
        .map_err(|m| PyValueError::new_err(format!("400: {m}")))
}

/// `fetch_image(url, config_json=None) -> bytes` with the gateway's SSRF guard and limits.
#[pyfunction]
#[pyo3(signature = (url, config_json=None))]
fn fetch_image<'py>(py: Python<'py>, url: &str, config_json: Option<&str>) -> PyResult<Bound<'py, PyBytes>> {
    let v = match config_json {
        Some(t) => parse_json(t, "config")?,
        None => Value::Null,
    };
    let cfg = fetch_config(&v);
    let bytes = py
        .allow_threads(|| -> Result<Vec<u8>, String> {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
            let fetcher = Fetcher::new(cfg)?;
            rt.block_on(fetcher.fetch(url))
        })
        .map_err(|m| PyValueError::new_err(format!("400: {m}")))?;
    Ok(PyBytes::new(py, &bytes))
}

fn delta_to_py<'py>(py: Python<'py>, d: &ParsedDelta) -> PyResult<Bound<'py, PyTuple>> {
    match d {
        ParsedDelta::Content(t) => ("content", t.clone()).into_pyobject(py),
        ParsedDelta::Reasoning(t) => ("reasoning", t.clone()).into_pyobject(py),
        ParsedDelta::ToolCallStart { index, id, name } => {
            ("tool_call_start", *index, id.clone(), name.clone()).into_pyobject(py)
        }
        ParsedDelta::ToolCallArguments { index, arguments } => {
            ("tool_call_arguments", *index, arguments.clone()).into_pyobject(py)
        }
    }
}

/// `parse_output_stream(pieces, tools_json=None, reasoning=True, prefilled=False) -> [tuple]`:
/// feeds the pieces one by one; tuples are ("content", text), ("reasoning", text),
/// ("tool_call_start", index, id, name), ("tool_call_arguments", index, json_text).
#[pyfunction]
#[pyo3(signature = (pieces, tools_json=None, reasoning=true, prefilled=false))]
fn parse_output_stream<'py>(
    py: Python<'py>,
    pieces: Vec<String>,
    tools_json: Option<&str>,
    reasoning: bool,
    prefilled: bool,
) -> PyResult<Vec<Bound<'py, PyTuple>>> {
    let tools = tools_json.map(|t| parse_json(t, "tools")).transpose()?;
    let mut parser = OutputParser::new(tools.as_ref(), reasoning).with_prefilled_reasoning(prefilled);
    let mut deltas = Vec::new();
    for p in &pieces {
        deltas.extend(parser.push(p));
    }
    deltas.extend(parser.finish());
    deltas.iter().map(|d| delta_to_py(py, d)).collect()
}

/// `tool_call_grammar(tools_json, function=None, parallel=True, reasoning="optional") -> str`: the
/// EBNF grammar the gateway sends for `tool_choice` "required" (`function` None) or a named function;
/// `reasoning` is "open" (prompt ends with `<mm:think>`), "closed" or "optional".
#[pyfunction]
#[pyo3(signature = (tools_json, function=None, parallel=true, reasoning="optional"))]
fn tool_call_grammar(tools_json: &str, function: Option<String>, parallel: bool, reasoning: &str) -> PyResult<String> {
    use crate::api::tool_grammar::{self, ForcedToolChoice, ReasoningStart};
    let tools = parse_json(tools_json, "tools")?;
    let reasoning = match reasoning {
        "open" => ReasoningStart::Open,
        "closed" => ReasoningStart::Closed,
        "optional" => ReasoningStart::Optional,
        other => {
            return Err(PyValueError::new_err(format!("reasoning must be open, closed or optional, got {other:?}")))
        }
    };
    let choice = function.map_or(ForcedToolChoice::Required, ForcedToolChoice::Function);
    Ok(tool_grammar::tool_call_grammar(&tools, &choice, parallel, reasoning))
}

/// `parse_output(text, tools_json=None, reasoning=True, prefilled=False) -> dict` with content,
/// reasoning_content and tool_calls (list of {id, name, arguments}).
#[pyfunction]
#[pyo3(signature = (text, tools_json=None, reasoning=true, prefilled=false))]
fn parse_output<'py>(
    py: Python<'py>,
    text: &str,
    tools_json: Option<&str>,
    reasoning: bool,
    prefilled: bool,
) -> PyResult<Bound<'py, PyDict>> {
    let tools = tools_json.map(|t| parse_json(t, "tools")).transpose()?;
    let msg = OutputParser::new(tools.as_ref(), reasoning).with_prefilled_reasoning(prefilled).parse_complete(text);
    let d = PyDict::new(py);
    d.set_item("content", msg.content)?;
    d.set_item("reasoning_content", msg.reasoning_content)?;
    let calls = PyList::empty(py);
    for c in msg.tool_calls {
        let cd = PyDict::new(py);
        cd.set_item("id", c.id)?;
        cd.set_item("name", c.name)?;
        cd.set_item("arguments", c.arguments)?;
        calls.append(cd)?;
    }
    d.set_item("tool_calls", calls)?;
    Ok(d)
}

/// Add the preprocessing and parsing functions to the `m3serve._gateway` module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyPreprocessor>()?;
    m.add_function(wrap_pyfunction!(render_chat, m)?)?;
    m.add_function(wrap_pyfunction!(preprocess_image, m)?)?;
    m.add_function(wrap_pyfunction!(decode_image, m)?)?;
    m.add_function(wrap_pyfunction!(resize_rgb, m)?)?;
    m.add_function(wrap_pyfunction!(smart_resize, m)?)?;
    m.add_function(wrap_pyfunction!(fetch_image, m)?)?;
    m.add_function(wrap_pyfunction!(parse_output, m)?)?;
    m.add_function(wrap_pyfunction!(parse_output_stream, m)?)?;
    m.add_function(wrap_pyfunction!(tool_call_grammar, m)?)?;
    Ok(())
}
