"""Running M3 behind SGLang: `m3serve worker` (one SGLang server) and `m3serve serve` (workers + gateway)."""
