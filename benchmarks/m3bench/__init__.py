"""Benchmark client for OpenAI-compatible endpoints, shaped like agentic traffic."""
