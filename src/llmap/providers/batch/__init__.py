"""Provider batch APIs: OpenAI Batch (with the Files API) and Anthropic Message Batches (:mod:`.base`)."""
