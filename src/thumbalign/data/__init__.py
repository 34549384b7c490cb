"""Data layer: files -> rows (readers) -> records (records) -> tokens (tokens) -> training sets (prepare) ->
batches (batching); feedback exports -> the canonical file (importers); prompt files (prompts)."""
