//! Request preprocessing for MiniMax-M3, all in Rust: chat template -> token ids (with a prefix
//! cache), images -> M3 `pixel_values` + placeholder tokens, ready for the SGLang worker.
//!
//! Entry points for the server:
//! * [`Preprocessor::load`] once per model directory;
//! * [`Preprocessor::prepare_chat`] per `/v1/chat/completions` body, [`Preprocessor::prepare_completion`]
//!   per `/v1/completions` body; both give a [`PreparedPrompt`] or a [`PreprocessError`] whose
//!   [`PreprocessError::status`] is the HTTP status to answer (400 for client mistakes).
//! * [`PreparedPrompt::worker_image_data`] is the `image_data` field for the worker's `/generate`
//!   (see [`handoff`] for the wire format), `input_ids` its `input_ids`. The server writes it from
//!   [`PreparedImage::data_url_json_bytes`] instead (no copy; `workers::client::GenerateBody`),
//!   the Python binding from [`PreparedPrompt::worker_image_data_json`].
//!
//! ```no_run
//! # async fn demo() -> Result<(), m3serve_gateway::preprocess::PreprocessError> {
//! use m3serve_gateway::preprocess::Preprocessor;
//! let pre = Preprocessor::load("/models/m3")?;
//! let body = serde_json::json!({"model": "m3", "messages": [{"role": "user", "content": "Hi"}]});
//! let prompt = pre.prepare_chat(&body).await?;
//! println!("{} tokens", prompt.prompt_tokens);
//! # Ok(()) }
//! ```

pub mod error;
mod flight;
pub mod handoff;
pub mod image_cache;
pub mod images;
pub mod pyjson;
mod python;
pub mod request;
pub mod template;
pub mod tokenize;

use std::path::Path;
use std::sync::Arc;

use serde_json::Value;

pub use error::PreprocessError;
pub use handoff::{PreparedImage, WireDtype};
pub use image_cache::{ImageCache, ImageCacheStats};
pub use images::{ImageConfig, ImageProcessor, ProcessedImage, ResizePolicy};
pub use python::register;
pub use tokenize::{CacheStats, CachedTokenizer};

use image_cache::ImageSource;
use images::fetch::{FetchConfig, Fetcher};
use template::ChatTemplate;

/// M3's image placeholder strings (the processor's constants; ids come from the tokenizer).
pub const IMAGE_TOKEN: &str = "]<]image[>[";
pub const IMAGE_START_TOKEN: &str = "]<]start of image[>[";
pub const IMAGE_END_TOKEN: &str = "]<]end of image[>[";
/// Reasoning opener the template pre-fills with `thinking_mode=enabled`.
pub const THINK_START: &str = "<mm:think>";

/// Settings of the preprocessing stage (the server fills them from its CLI/config).
#[derive(Debug, Clone)]
pub struct PreprocessConfig {
    /// Most images in one request.
    pub max_images: usize,
    /// Token budget of the tokenization segment cache (0 disables it).
    pub cache_max_tokens: usize,
    /// Bytes the prepared-image cache may hold (0 disables it); see [`image_cache`].
    pub image_cache_bytes: usize,
    /// Keep each image's float32 rows in [`PreparedImage::pixel_values`] (the Python API returns
    /// them); the server only needs the encoded hand-off, so it leaves this off.
    pub keep_pixel_values: bool,
    /// Reject prompts longer than this (defaults to the checkpoint's `max_position_embeddings`).
    pub max_prompt_tokens: Option<usize>,
    pub fetch: FetchConfig,
    pub wire_dtype: WireDtype,
    /// Override the resize rule (default: the HF processor's area rule).
    pub resize_policy: Option<ResizePolicy>,
}

impl Default for PreprocessConfig {
    fn default() -> Self {
        Self {
            max_images: 16,
            cache_max_tokens: 4_000_000,
            image_cache_bytes: 256 << 20,
            keep_pixel_values: false,
            max_prompt_tokens: None,
            fetch: FetchConfig::default(),
            // SGLang's M3 vision tower only takes bf16 pixel_values (the worker would cast anyway).
            wire_dtype: WireDtype::BFloat16,
            resize_policy: None,
        }
    }
}

/// A request turned into what the worker needs.
#[derive(Debug, Clone)]
pub struct PreparedPrompt {
    /// Prompt token ids, image placeholders expanded.
    pub input_ids: Vec<u32>,
    /// Prepared images in prompt order (shared with the image cache).
    pub images: Vec<Arc<PreparedImage>>,
    /// `input_ids.len()`, for usage accounting.
    pub prompt_tokens: usize,
    /// The prompt ends with `<mm:think>`: the reply starts inside the reasoning section
    /// (give it to `parsers::OutputParser::with_prefilled_reasoning`).
    pub reasoning_prefilled: bool,
    /// The rendered template text (before placeholder expansion); for logs and tests.
    pub text: String,
}

impl PreparedPrompt {
    /// `image_data` for the worker's `/generate`, or None without images.
    pub fn worker_image_data(&self) -> Option<Value> {
        handoff::worker_image_data(&self.images)
    }

    /// [`Self::worker_image_data`] as JSON text (what `serde_json::to_string` gives for it),
    /// without a `Value` copy or an escaping pass.
    pub fn worker_image_data_json(&self) -> Option<String> {
        handoff::worker_image_data_json(&self.images)
    }
}

/// Template, tokenizer and image pipeline of one checkpoint. Cheap to share (`Arc`); all methods
/// take `&self` and are safe to call concurrently.
pub struct Preprocessor {
    template: ChatTemplate,
    tokenizer: Arc<CachedTokenizer>,
    images: Arc<ImageProcessor>,
    image_cache: Arc<ImageCache>,
    fetcher: Fetcher,
    config: PreprocessConfig,
    /// Ids of (image, start-of-image, end-of-image), if the tokenizer has them.
    image_ids: Option<(u32, u32, u32)>,
}

impl std::fmt::Debug for Preprocessor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Preprocessor").field("config", &self.config).field("image_ids", &self.image_ids).finish()
    }
}

impl Preprocessor {
    /// Load from a checkpoint directory (`tokenizer.json`, `tokenizer_config.json` or
    /// `chat_template.jinja`, optional `preprocessor_config.json` and `config.json`).
    pub fn load(model_dir: impl AsRef<Path>) -> Result<Self, PreprocessError> {
        Self::load_with_config(model_dir, PreprocessConfig::default())
    }

    pub fn load_with_config(
        model_dir: impl AsRef<Path>,
        mut config: PreprocessConfig,
    ) -> Result<Self, PreprocessError> {
        let dir = model_dir.as_ref();
        let template = ChatTemplate::load(dir)?;
        let tokenizer = Arc::new(CachedTokenizer::load(dir, config.cache_max_tokens)?);
        let mut image_config = ImageConfig::load(dir).map_err(PreprocessError::Internal)?;
        if let Some(policy) = config.resize_policy {
            image_config.policy = policy;
        }
        if config.max_prompt_tokens.is_none() {
            config.max_prompt_tokens = max_position_embeddings(dir);
        }
        let image_ids = match (
            tokenizer.token_id(IMAGE_TOKEN),
            tokenizer.token_id(IMAGE_START_TOKEN),
            tokenizer.token_id(IMAGE_END_TOKEN),
        ) {
            (Some(a), Some(b), Some(c)) => Some((a, b, c)),
            _ => None,
        };
        let fetcher = Fetcher::new(config.fetch.clone()).map_err(PreprocessError::Internal)?;
        let settings = image_cache::settings_fingerprint(&image_config, config.wire_dtype, config.keep_pixel_values);
        Ok(Self {
            template,
            tokenizer,
            images: Arc::new(ImageProcessor::new(image_config)),
            image_cache: Arc::new(ImageCache::new(config.image_cache_bytes, settings)),
            fetcher,
            config,
            image_ids,
        })
    }

    pub fn config(&self) -> &PreprocessConfig {
        &self.config
    }

    /// The Hugging Face tokenizer (for detokenizing the worker's ids, counting tokens, …).
    pub fn tokenizer(&self) -> &tokenizers::Tokenizer {
        self.tokenizer.inner()
    }

    pub fn cached_tokenizer(&self) -> &CachedTokenizer {
        &self.tokenizer
    }

    pub fn image_processor(&self) -> &ImageProcessor {
        &self.images
    }

    pub fn image_cache(&self) -> &ImageCache {
        &self.image_cache
    }

    /// Render the chat template for a `/v1/chat/completions` body (no tokenization, no images).
    pub fn render_chat(&self, body: &Value) -> Result<(String, request::ChatInputs), PreprocessError> {
        let inputs = request::chat_inputs(body)?;
        if inputs.image_urls.len() > self.config.max_images {
            return Err(PreprocessError::bad_param(
                "messages",
                format!("{} images in one request; the limit is {}", inputs.image_urls.len(), self.config.max_images),
            ));
        }
        let text = self.template.render(
            &inputs.messages,
            inputs.tools.as_ref(),
            inputs.add_generation_prompt,
            &inputs.kwargs,
        )?;
        Ok((text, inputs))
    }

    /// Everything for one `/v1/chat/completions` body: template, images (fetched concurrently,
    /// processed off the async threads), tokenization with placeholders.
    pub async fn prepare_chat(&self, body: &Value) -> Result<PreparedPrompt, PreprocessError> {
        let (text, inputs) = self.render_chat(body)?;
        let images = self.prepare_images(&inputs.image_urls).await?;
        self.finish_prompt(text, images)
    }

    /// Same as [`Self::prepare_chat`] for callers without an async runtime (tests, benchmarks).
    pub fn prepare_chat_blocking(&self, body: &Value) -> Result<PreparedPrompt, PreprocessError> {
        block_on(self.prepare_chat(body))?
    }

    /// [`Self::prepare_images`] for callers outside an async runtime (the Python binding).
    pub fn prepare_images_blocking(&self, urls: &[String]) -> Result<Vec<Arc<PreparedImage>>, PreprocessError> {
        block_on(self.prepare_images(urls))?
    }

    /// A `/v1/completions` body: `prompt` as a string (tokenized with the tokenizer's own special
    /// tokens, like SGLang does) or as an array of token ids (passed through).
    pub fn prepare_completion(&self, body: &Value) -> Result<PreparedPrompt, PreprocessError> {
        let prompt = body.get("prompt").ok_or_else(|| PreprocessError::bad_param("prompt", "`prompt` is required"))?;
        let (text, ids) = match prompt {
            Value::String(s) => (s.clone(), self.encode_with_specials(s)?),
            Value::Array(items) if items.len() == 1 && items[0].is_string() => {
                let s = items[0].as_str().unwrap_or_default().to_string();
                let ids = self.encode_with_specials(&s)?;
                (s, ids)
            }
            Value::Array(items) if !items.is_empty() && items.iter().all(Value::is_u64) => {
                let vocab = self.tokenizer().get_vocab_size(true) as u64;
                let ids: Vec<u32> = items.iter().filter_map(Value::as_u64).map(|v| v as u32).collect();
                if let Some(bad) = items.iter().filter_map(Value::as_u64).find(|&v| v >= vocab) {
                    return Err(PreprocessError::bad_param("prompt", format!("token id {bad} is outside the vocabulary of {vocab}")));
                }
                (String::new(), ids)
            }
            Value::Array(_) => {
                return Err(PreprocessError::bad_param(
                    "prompt",
                    "`prompt` must be a string, a one-string array or a non-empty array of token ids (batches are not supported)",
                ))
            }
            _ => return Err(PreprocessError::bad_param("prompt", "`prompt` must be a string or an array")),
        };
        self.check_length(ids.len())?;
        Ok(PreparedPrompt {
            prompt_tokens: ids.len(),
            input_ids: ids,
            images: Vec::new(),
            reasoning_prefilled: false,
            text,
        })
    }

    fn encode_with_specials(&self, s: &str) -> Result<Vec<u32>, PreprocessError> {
        self.tokenizer()
            .encode_fast(s, true)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| PreprocessError::Internal(format!("tokenizer failed: {e}")))
    }

    fn check_length(&self, n: usize) -> Result<(), PreprocessError> {
        match self.config.max_prompt_tokens {
            Some(limit) if n > limit => Err(PreprocessError::PromptTooLong { tokens: n, limit }),
            _ => Ok(()),
        }
    }

    /// Fetch and prepare a request's images (through the image cache), in order.
    pub async fn prepare_images(&self, urls: &[String]) -> Result<Vec<Arc<PreparedImage>>, PreprocessError> {
        if urls.is_empty() {
            return Ok(Vec::new());
        }
        if self.image_ids.is_none() {
            return Err(PreprocessError::bad_param("messages", "this model does not accept images"));
        }
        let jobs = urls.iter().enumerate().map(|(index, url)| async move {
            let cache = &self.image_cache;
            // A data: URL is keyed by its text, so a repeated one skips even the base64 decode.
            let data_key = (cache.enabled() && url.starts_with("data:")).then(|| cache.key(ImageSource::DataUrl(url)));
            if let Some(hit) = data_key.as_ref().and_then(|k| cache.get_cached(k)) {
                return Ok(hit);
            }
            let bytes = self.fetcher.fetch(url).await.map_err(|message| {
                if url.starts_with("data:") {
                    PreprocessError::image(index, message)
                } else {
                    PreprocessError::Fetch { index, url: shorten(url), message }
                }
            })?;
            let (processor, cache) = (self.images.clone(), self.image_cache.clone());
            let (dtype, keep) = (self.config.wire_dtype, self.config.keep_pixel_values);
            // An http(s) image is keyed by the body it returned (hashed off the async threads,
            // like the decode), never by its URL alone.
            let prepare = move || -> Result<Arc<PreparedImage>, String> {
                let key = data_key.or_else(|| cache.enabled().then(|| cache.key(ImageSource::Bytes(&bytes))));
                let process = || Ok(Arc::new(PreparedImage::new(processor.process_bytes(&bytes)?, dtype, keep)));
                match key {
                    // Requests bringing the same new image at once decode it once: the first
                    // prepares it, the others wait for its result (this is a blocking thread).
                    Some(key) => cache.get_or_prepare(key, process),
                    None => process(),
                }
            };
            let prepared = match tokio::runtime::Handle::try_current() {
                // CPU work off the async worker threads.
                Ok(handle) => handle
                    .spawn_blocking(prepare)
                    .await
                    .map_err(|e| PreprocessError::Internal(format!("image task failed: {e}")))?,
                Err(_) => prepare(),
            };
            prepared.map_err(|m| PreprocessError::image(index, m))
        });
        let results = join_all(jobs).await;
        results.into_iter().collect()
    }

    fn finish_prompt(&self, text: String, images: Vec<Arc<PreparedImage>>) -> Result<PreparedPrompt, PreprocessError> {
        let mut ids = Vec::with_capacity(text.len() / 3 + images.iter().map(|i| i.num_tokens() + 2).sum::<usize>());
        let pieces: Vec<&str> = text.split(IMAGE_TOKEN).collect();
        if pieces.len() - 1 != images.len() {
            return Err(PreprocessError::bad_param(
                "messages",
                format!(
                    "the chat template produced {} image placeholders for {} images",
                    pieces.len() - 1,
                    images.len()
                ),
            ));
        }
        for (i, piece) in pieces.iter().enumerate() {
            self.tokenizer.encode_into(piece, &mut ids)?;
            if let Some(img) = images.get(i) {
                let (image_id, start_id, end_id) = self.image_ids.expect("checked when images were loaded");
                ids.push(start_id);
                ids.extend(std::iter::repeat_n(image_id, img.num_tokens()));
                ids.push(end_id);
            }
        }
        self.check_length(ids.len())?;
        let reasoning_prefilled = text.trim_end().ends_with(THINK_START);
        Ok(PreparedPrompt { prompt_tokens: ids.len(), input_ids: ids, images, reasoning_prefilled, text })
    }
}

/// Await all futures concurrently on the current task (tiny `join_all`, no extra dependency).
async fn join_all<F>(futures: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future,
    F::Output: Unpin,
{
    use std::future::Future;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    struct JoinAll<F: Future> {
        futures: Vec<Pin<Box<F>>>,
        outputs: Vec<Option<F::Output>>,
    }
    impl<F: Future> Future for JoinAll<F>
    where
        F::Output: Unpin,
    {
        type Output = Vec<F::Output>;
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
            let this = self.get_mut();
            let mut pending = false;
            for (f, out) in this.futures.iter_mut().zip(this.outputs.iter_mut()) {
                if out.is_none() {
                    match f.as_mut().poll(cx) {
                        Poll::Ready(v) => *out = Some(v),
                        Poll::Pending => pending = true,
                    }
                }
            }
            if pending {
                Poll::Pending
            } else {
                Poll::Ready(this.outputs.iter_mut().map(|o| o.take().expect("ready")).collect())
            }
        }
    }
    let futures: Vec<Pin<Box<F>>> = futures.map(Box::pin).collect();
    let outputs = futures.iter().map(|_| None).collect();
    JoinAll { futures, outputs }.await
}

fn shorten(url: &str) -> String {
    if url.len() > 120 {
        format!("{}...", &url[..url.char_indices().nth(117).map(|(i, _)| i).unwrap_or(url.len())])
    } else {
        url.to_string()
    }
}

fn max_position_embeddings(dir: &Path) -> Option<usize> {
    let text = std::fs::read_to_string(dir.join("config.json")).ok()?;
    let v: Value = serde_json::from_str(&text).ok()?;
    let get = |o: &Value| o.get("max_position_embeddings").and_then(Value::as_u64);
    get(&v).or_else(|| v.get("text_config").and_then(get)).map(|n| n as usize)
}

/// Run `fut` to completion on a fresh single-thread runtime (for callers outside one).
fn block_on<F: std::future::Future>(fut: F) -> Result<F::Output, PreprocessError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| PreprocessError::Internal(format!("tokio runtime: {e}")))?;
    Ok(rt.block_on(fut))
}
