//! The API surface: OpenAI request parameters and response objects, and the Anthropic Messages
//! translation onto them.

pub mod anthropic;
pub mod objects;
pub mod params;
pub mod tool_grammar;
