"""Gene text: descriptions (tables, NCBI, LLM) and their embeddings."""
