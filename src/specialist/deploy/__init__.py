"""Deploy and monitor: export artifacts, serve arms behind an OpenAI-compatible API, report on A/B traffic."""
