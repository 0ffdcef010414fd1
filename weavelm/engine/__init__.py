"""The generation engine: sampling parameters, sampler, and the `LLM` front end."""
