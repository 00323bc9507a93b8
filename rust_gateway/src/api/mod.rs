//! The OpenAI-compatible surface: request parameters and response objects.

pub mod objects;
pub mod params;
pub mod tool_grammar;
