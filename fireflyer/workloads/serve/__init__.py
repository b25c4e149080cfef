"""`fireflyer serve`: paged KV cache with prefix caching, continuous batching, the OpenAI API."""
